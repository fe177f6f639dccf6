"""DistributedDataParallel on the CPU (gloo): two processes must write what one process writes."""
import os
import socket
import subprocess
import sys

import pytest

import train
from checkpoints import load_checkpoint

pytestmark = pytest.mark.slow  # each torchrun start costs seconds


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(repo_root, argv, processes=2, timeout=240):
    """Run train.py under torchrun; a hang fails the test through the timeout instead of stalling CI."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", "train.py", *argv, "--device", "cpu"]
    result = subprocess.run(command, cwd=repo_root, capture_output=True, text=True, env=env, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def key_layout(state):
    """What must not depend on torchrun: the checkpoint's fields and the weights' names and shapes."""
    return (sorted(state), {part: {k: tuple(v.shape) for k, v in state[part].items()} for part in ("encoder", "decoder")})


@pytest.mark.parametrize("mode", [[], ["--fine-tune-encoder"]], ids=["frozen", "fine-tune"])
def test_two_processes_write_the_checkpoint_one_process_writes_and_resume(repo_root, prepared, tiny_model_args,
                                                                          tmp_path, mode):
    common = ["--data-folder", prepared[0], *tiny_model_args, *mode]
    single, ddp = str(tmp_path / "single"), str(tmp_path / "ddp")
    train.main([*common, "--epochs", "1", "--out-dir", single])
    result = torchrun(repo_root, [*common, "--epochs", "1", "--out-dir", ddp])

    one, two = load_checkpoint(os.path.join(single, "last.pt")), load_checkpoint(os.path.join(ddp, "last.pt"))
    assert key_layout(two) == key_layout(one)
    assert not any(k.startswith("module.") for k in list(two["encoder"]) + list(two["decoder"]))
    assert sorted(os.listdir(ddp)) == ["best.pt", "curves.png", "last.pt", "log.jsonl"]  # rank 0 wrote, once
    assert result.stdout.count("epoch 0: loss") == 1
    assert (two["encoder_optimizer"] is not None) == bool(mode)

    torchrun(repo_root, [*common, "--epochs", "2", "--out-dir", ddp, "--resume", os.path.join(ddp, "last.pt")])
    resumed = load_checkpoint(os.path.join(ddp, "last.pt"))
    assert resumed["epoch"] == 1 and [row["epoch"] for row in resumed["history"]] == [0, 1]
    if mode:  # the encoder's later blocks went on training after the resume
        name = "backbone.net._conv_head.weight"
        assert not (resumed["encoder"][name] == two["encoder"][name]).all()
