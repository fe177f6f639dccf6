"""bench/gpu_check.sh --dry-run: every step of the GPU check parses and starts, for one batch on the CPU."""
import subprocess

import pytest


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_step_and_prints_the_table(repo_root):
    result = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run"], cwd=repo_root, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    table = result.stdout.split("GPU check (DRY RUN")[1].splitlines()[2:]
    steps = [line.split("  ")[0] for line in table if line.strip()]
    assert steps == ["shapes main job, --amp",
                     "training, Lite0 224 px, cached features, fp32", "training, Lite0 224 px, cached features, amp",
                     "training, ResNet-50 256 px, frozen, fp32", "training, ResNet-50 256 px, frozen, amp",
                     "training, ResNet-50 256 px, fine-tuned, fp32", "training, ResNet-50 256 px, fine-tuned, amp",
                     "beam-5 decoding, random 512-d model", "hard attention, 20 steps", "--fine-tune-top 2, 20 steps",
                     "torchrun, 1 process (NCCL on CUDA, gloo on CPU)"]
    assert "TEST BLEU-4 (beam 3)" in table[0] and "img/s" in table[1]


def test_gpu_check_refuses_unknown_arguments(repo_root):
    result = subprocess.run(["bash", "bench/gpu_check.sh", "--fast"], cwd=repo_root, capture_output=True, text=True)
    assert result.returncode == 2 and "usage:" in result.stderr
