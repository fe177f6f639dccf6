"""train.py: learning, exact resume, mixed precision, time budget, checkpoints, phases, failures."""
import math
import os
import time
import types

import pytest
import torch

import shapes
import train
from checkpoints import load_checkpoint, save_checkpoint
from decoding import beam_search
from models import DecoderWithAttention
from utils import UserError


def test_tiny_overfit_learns_eight_captions(toy_word_map, eight_captions):
    """8 images, one caption each: the model must memorise them.

    Bound: mean cross-entropy < 0.05 nats per word means the right word gets probability
    about 0.95 on average, far above anything else, so greedy decoding must reproduce every caption."""
    word_map = toy_word_map(*[f"w{i}" for i in range(1, 11)])  # w1..w10 are ids 1..10; <start> 12, <end> 13
    features, captions, caplens = eight_captions
    torch.manual_seed(0)
    decoder = DecoderWithAttention(attention_dim=16, embed_dim=12, decoder_dim=20, vocab_size=len(word_map),
                                   encoder_dim=24, dropout=0.0)
    opt = torch.optim.Adam(decoder.parameters(), lr=1e-2)
    for _ in range(300):
        loss, _, _ = train.compute_loss(None, decoder, features, captions, caplens, cached=True, alpha_c=0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    decoder.eval()
    hyps = beam_search(decoder, features, word_map, beam_size=1, max_len=10)
    for hyp, cap, n in zip(hyps, captions.tolist(), caplens.tolist()):
        assert hyp["tokens"] == cap[1 : n - 1]


def _epoch_losses(out_dir):
    return [row["loss"] for row in load_checkpoint(os.path.join(out_dir, "last.pt"))["history"]]


def test_resume_is_exact(prepared, tmp_path, tiny_model_args):
    common = ["--data-folder", prepared[0], *tiny_model_args, "--dropout", "0.5"]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    train.main([*common, "--epochs", "3", "--out-dir", full])
    train.main([*common, "--epochs", "2", "--out-dir", part])
    train.main([*common, "--epochs", "3", "--out-dir", part, "--resume", os.path.join(part, "last.pt")])
    assert len(_epoch_losses(full)) == 3
    assert _epoch_losses(part) == _epoch_losses(full)  # bit-for-bit, dropout included


def test_amp_on_cpu_trains_in_bf16_and_keeps_fp32_weights(prepared, tmp_path, monkeypatch, tiny_model_args):
    real, dtypes = train.compute_loss, set()

    def recording(*args, **kwargs):
        loss, scores, targets = real(*args, **kwargs)
        dtypes.add(scores.dtype)  # the decoder's word scores, computed inside autocast
        return loss, scores, targets

    monkeypatch.setattr(train, "compute_loss", recording)
    out = str(tmp_path / "amp")
    train.main(["--data-folder", prepared[0], *tiny_model_args, "--epochs", "1", "--amp", "--out-dir", out])
    state = load_checkpoint(os.path.join(out, "last.pt"))
    assert dtypes == {torch.bfloat16}
    assert math.isfinite(state["history"][0]["loss"])
    assert all(v.dtype == torch.float32 for v in state["decoder"].values() if v.is_floating_point())


def test_max_minutes_stops_before_an_epoch_that_would_pass_the_budget(prepared, tmp_path, capsys, tiny_model_args):
    out = str(tmp_path / "budget")
    train.main(["--data-folder", prepared[0], *tiny_model_args, "--epochs", "5", "--max-minutes", "0.001", "--out-dir", out])
    assert load_checkpoint(os.path.join(out, "last.pt"))["epoch"] == 0  # one epoch is longer than 0.06 s
    assert "another epoch would pass --max-minutes 0.001: stopping" in capsys.readouterr().out


def test_the_time_budget_counts_from_the_start_of_the_run():
    # the run started 40 s ago (feature caching included) and the last epoch took 15 s: 55 s < 60 s ...
    now = time.time()
    run = types.SimpleNamespace(started=now - 40, args=types.SimpleNamespace(max_minutes=1))
    assert not train.out_of_time(run, epoch_start=now - 15)
    run.started = now - 50  # ... but after 10 s more of caching, another epoch would end at 65 s
    assert train.out_of_time(run, epoch_start=now - 15)


def test_checkpoint_holds_only_plain_types(tiny_checkpoint):
    state = torch.load(tiny_checkpoint, weights_only=True)  # no pickled modules
    assert {"config", "word_map", "encoder", "decoder", "decoder_optimizer", "epoch", "rng", "history"} <= set(state)
    assert state["config"]["encoder"] == "efficientnet_lite0" and state["config"]["image_size"] == 64


def test_fine_tune_phase_resumes_from_frozen_checkpoint(prepared, tiny_checkpoint, tmp_path, tiny_model_args):
    out = str(tmp_path / "ft")
    start = load_checkpoint(tiny_checkpoint)["epoch"]
    train.main(["--data-folder", prepared[0], *tiny_model_args, "--resume", tiny_checkpoint, "--fine-tune-encoder",
                "--epochs", str(start + 2), "--out-dir", out])
    state = load_checkpoint(os.path.join(out, "last.pt"))
    assert state["encoder_optimizer"] is not None and state["epoch"] == start + 1
    before = load_checkpoint(tiny_checkpoint)["encoder"]["backbone.net._conv_head.weight"]
    assert not torch.equal(state["encoder"]["backbone.net._conv_head.weight"], before)
    assert torch.equal(state["encoder"]["backbone.net._conv_stem.weight"],
                       load_checkpoint(tiny_checkpoint)["encoder"]["backbone.net._conv_stem.weight"])


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(prepared, tmp_path, monkeypatch, capsys, tiny_model_args):
    out = str(tmp_path / "nan")
    real = train.compute_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        loss, scores, targets = real(*args, **kwargs)
        calls["n"] += 1
        if train_epoch["now"] == 1:
            loss = loss * float("nan")
        return loss, scores, targets

    train_epoch = {"now": 0}
    real_epoch = train.train_one_epoch

    def tracking(run, epoch):
        train_epoch["now"] = epoch
        return real_epoch(run, epoch)

    monkeypatch.setattr(train, "compute_loss", poisoned)
    monkeypatch.setattr(train, "train_one_epoch", tracking)
    with pytest.raises(SystemExit) as exit_info:
        train.run_cli(lambda: train.main(["--data-folder", prepared[0], *tiny_model_args, "--epochs", "3", "--out-dir", out]))
    assert exit_info.value.code == 1
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]  # the rest is progress bars
    assert len(errors) == 1 and "loss became nan at epoch 1" in errors[0] and "last.pt" in errors[0]
    assert "Traceback" not in stderr
    assert load_checkpoint(os.path.join(out, "last.pt"))["epoch"] == 0  # the good one, intact
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_resume_from_a_foreign_file_is_a_user_error(prepared, tmp_path, tiny_model_args):
    bogus = tmp_path / "other.pt"
    torch.save({"model": torch.zeros(2)}, bogus)
    with pytest.raises(UserError, match="not a checkpoint of this project"):
        train.main(["--data-folder", prepared[0], *tiny_model_args, "--resume", str(bogus),
                    "--out-dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()  # the refused run leaves no empty folder behind


def test_demo_preset_applies_only_where_not_given():
    args = train.parse_args([])
    assert args.demo and args.encoder == "efficientnet_lite0" and args.data_folder.endswith("shapes")
    args = train.parse_args(["--epochs", "2", "--no-pretrained"])
    assert args.epochs == 2 and args.pretrained is False and args.decoder_dim == shapes.PRESET["decoder_dim"]
    args = train.parse_args(["--data-folder", "x"])
    assert not args.demo and args.encoder == "resnet50" and args.decoder_dim == 512 and args.decoder_lr == 4e-4


def test_disk_feature_cache_matches_ram_cache(prepared, tmp_path, tiny_model_args):
    common = ["--data-folder", prepared[0], *tiny_model_args, "--epochs", "2"]
    train.main([*common, "--out-dir", str(tmp_path / "ram")])
    train.main([*common, "--out-dir", str(tmp_path / "disk"), "--cache", "disk", "--cache-dir", str(tmp_path / "cache")])
    assert [f for f in os.listdir(tmp_path / "cache") if f.startswith("features_TRAIN_")]
    assert _epoch_losses(str(tmp_path / "disk")) == _epoch_losses(str(tmp_path / "ram"))


# ---------------------------------------------------------------------------
# Faults: nothing lost, nothing mixed, one line for every mistake
# ---------------------------------------------------------------------------


def _one_error_line(capsys, argv):
    """Run train.py's command line; return its exit code and its only `error:` line (no traceback allowed)."""
    with pytest.raises(SystemExit) as exit_info:
        train.run_cli(lambda: train.main(argv))
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-2000:]
    return exit_info.value.code, errors[0]


def test_resume_with_weights_that_do_not_fit_their_config_is_one_line(prepared, tiny_checkpoint, tiny_model_args,
                                                                      tmp_path, capsys):
    state = load_checkpoint(tiny_checkpoint)
    state["config"]["decoder_dim"] += 8  # the weights were trained with another size
    bad = str(tmp_path / "bad.pt")
    save_checkpoint(bad, state)
    code, error = _one_error_line(capsys, ["--data-folder", prepared[0], *tiny_model_args, "--resume", bad,
                                           "--out-dir", str(tmp_path / "o")])
    assert code == 2 and "weights do not fit the model its config describes" in error and "size mismatch" in error


def test_resuming_a_run_that_has_done_its_epochs_says_nothing_is_left_to_train(prepared, tiny_checkpoint,
                                                                                tiny_model_args, tmp_path, capsys):
    done = load_checkpoint(tiny_checkpoint)["epoch"]
    code, error = _one_error_line(capsys, ["--data-folder", prepared[0], *tiny_model_args, "--resume", tiny_checkpoint,
                                           "--epochs", str(done + 1), "--out-dir", str(tmp_path / "o")])
    assert code == 2 and "nothing to train" in error and f"--epochs {done + 2} or more" in error
    assert not (tmp_path / "o").exists()  # no empty output folder left behind
    # in the run's own folder the same resume only repairs best.pt and the log, and says so
    own = tmp_path / "own"  # a copy: the shared fixture's folder stays as it is
    own.mkdir()
    save_checkpoint(str(own / "last.pt"), load_checkpoint(tiny_checkpoint))
    train.main(["--data-folder", prepared[0], *tiny_model_args, "--resume", str(own / "last.pt"),
                "--epochs", str(done + 1), "--out-dir", str(own)])
    assert "note: nothing to train" in capsys.readouterr().out
    assert load_checkpoint(str(own / "last.pt"))["epoch"] == done


@pytest.mark.parametrize("missing", ["config", "rng", "decoder_optimizer"])
def test_resume_from_a_checkpoint_missing_a_key_is_one_line(prepared, tiny_checkpoint, tiny_model_args, tmp_path,
                                                            capsys, missing):
    state = load_checkpoint(tiny_checkpoint)
    del state[missing]
    bad = str(tmp_path / "bad.pt")
    save_checkpoint(bad, state)
    code, error = _one_error_line(capsys, ["--data-folder", prepared[0], *tiny_model_args, "--resume", bad,
                                           "--out-dir", str(tmp_path / "o")])
    assert code == 2 and f"no '{missing}' entry" in error


@pytest.mark.parametrize("option,value", [("--batch-size", "0"), ("--epochs", "-1"), ("--decoder-lr", "nan"),
                                          ("--dropout", "1.5"), ("--val-beam-size", "0"), ("--scst-samples", "0")])
def test_bad_numbers_stop_at_parse_time(option, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(["--data-folder", "x", option, value])
    assert exit_info.value.code == 2 and option in capsys.readouterr().err


def test_an_output_folder_that_is_a_file_is_one_line(prepared, tiny_model_args, tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    code, error = _one_error_line(capsys, ["--data-folder", prepared[0], *tiny_model_args,
                                           "--out-dir", str(tmp_path / "file" / "run")])
    assert code == 2 and "--out-dir" in error and "is a file" in error


def test_a_second_run_in_the_same_folder_is_refused(prepared, tiny_model_args, tmp_path, capsys):
    from utils import folder_lock

    out = str(tmp_path / "shared")
    with folder_lock(out, "another train.py"):  # what a live run holds for its whole length
        code, error = _one_error_line(capsys, ["--data-folder", prepared[0], *tiny_model_args, "--epochs", "1",
                                               "--out-dir", out])
    assert code == 2 and "in use by another run" in error and f"pid {os.getpid()}" in error
    assert not os.path.exists(os.path.join(out, "last.pt"))


def test_leftovers_of_crashed_runs_are_removed_and_reported(prepared, tiny_model_args, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".last.pt.x1y2.tmp").write_bytes(b"half a checkpoint")
    train.main(["--data-folder", prepared[0], *tiny_model_args, "--epochs", "1", "--out-dir", str(out)])
    assert not (out / ".last.pt.x1y2.tmp").exists()
    assert "removed 1 leftover of interrupted runs" in capsys.readouterr().out


@pytest.mark.parametrize("best_file", ["missing", "older"])
def test_resume_repairs_a_best_checkpoint_the_crash_left_stale(prepared, tiny_model_args, tmp_path, capsys,
                                                               best_file):
    """A crash after last.pt (which records its own epoch as the best) but before best.pt is written."""
    out = str(tmp_path / "run")
    common = ["--data-folder", prepared[0], *tiny_model_args, "--out-dir", out]
    train.main([*common, "--epochs", "2"])
    last_path, best_path = os.path.join(out, "last.pt"), os.path.join(out, "best.pt")
    state = load_checkpoint(last_path)
    state["best_epoch"] = state["epoch"]  # epoch 1 was the best ...
    save_checkpoint(last_path, state)
    if best_file == "missing":  # ... but best.pt was never written
        os.remove(best_path)
    else:  # ... but best.pt still holds epoch 0
        older = load_checkpoint(best_path)
        older["epoch"] = 0
        save_checkpoint(best_path, older)
    rows = open(os.path.join(out, "log.jsonl")).read()
    open(os.path.join(out, "log.jsonl"), "w").write(rows.splitlines()[0] + "\n")  # the log lost a row too
    train.main([*common, "--epochs", "2", "--resume", last_path])  # nothing left to train: only the repair runs
    assert load_checkpoint(best_path)["epoch"] == 1
    assert torch.equal(load_checkpoint(best_path)["decoder"]["fc.weight"], state["decoder"]["fc.weight"])
    assert len(open(os.path.join(out, "log.jsonl")).read().splitlines()) == 2
    assert "was not the best epoch (1) that last.pt records: written again" in capsys.readouterr().out


def test_a_full_disk_while_saving_is_one_line_and_keeps_the_last_checkpoint(prepared, tiny_model_args, tmp_path,
                                                                             capsys, monkeypatch):
    import errno

    import checkpoints

    out = str(tmp_path / "run")
    common = ["--data-folder", prepared[0], *tiny_model_args, "--out-dir", out]
    train.main([*common, "--epochs", "1"])
    good = load_checkpoint(os.path.join(out, "last.pt"))

    def full_disk_open(path, mode="r", *args, **kwargs):
        if "w" in mode and ".last.pt." in os.path.basename(path):  # the disk fills while last.pt is written
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(checkpoints, "open", full_disk_open, raising=False)  # how save_checkpoint writes its bytes
    code, error = _one_error_line(capsys, [*common, "--epochs", "2", "--resume", os.path.join(out, "last.pt")])
    assert code == 2 and "no space left on device" in error and "last.pt" in error
    assert load_checkpoint(os.path.join(out, "last.pt"))["epoch"] == good["epoch"] == 0
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


@pytest.mark.slow
def test_a_really_full_disk_is_one_line(prepared, tiny_model_args, repo_root, tmp_path):
    """A 4 MiB tmpfs cannot hold the tiny model's 14 MB checkpoint. Needs root and mount(8)."""
    import subprocess
    import sys

    disk = tmp_path / "small_disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        result = subprocess.run([sys.executable, "train.py", "--data-folder", prepared[0], *tiny_model_args,
                                 "--epochs", "1", "--out-dir", str(disk / "run")], cwd=repo_root, capture_output=True,
                                text=True, timeout=300)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.returncode == 2 and len(errors) == 1 and "no space left on device" in errors[0], result.stderr[-2000:]
        assert "Traceback" not in result.stderr
        run = disk / "run"  # the folder the run made goes again if nothing in it survived
        assert not run.exists() or not [f for f in os.listdir(run) if f.endswith(".tmp") or f == "last.pt"]
    finally:
        subprocess.run(["umount", str(disk)], check=True)


DIE_WHILE_SAVING = """
import os, signal, sys
import checkpoints, train, utils
n, real, calls = int(os.environ["DIE_AT_SAVE"]), checkpoints.save_checkpoint, []

def dying(path, state):  # the n-th save writes part of its temporary file, then the process is killed
    calls.append(path)
    if len(calls) == n:
        with utils.atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"PK half a checkpoint")
            os.kill(os.getpid(), signal.SIGKILL)
    real(path, state)

checkpoints.save_checkpoint = dying
utils.run_cli(lambda: train.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_kill_9_while_saving_then_resume_gives_a_consistent_run(prepared, tiny_model_args, repo_root, tmp_path):
    """Killed at seeded points inside checkpoint saving (bounded: 3 points, a 300 s timeout each), then resumed:
    last.pt always loads, best.pt is the epoch last.pt names, the log has every epoch once, no leftovers remain,
    and the losses equal those of an uninterrupted run."""
    import random
    import subprocess
    import sys

    common = ["--data-folder", prepared[0], *tiny_model_args, "--epochs", "3"]
    train.main([*common, "--out-dir", str(tmp_path / "whole")])
    whole = load_checkpoint(str(tmp_path / "whole" / "last.pt"))
    for point in sorted(random.Random(7).sample(range(1, 6), 3)):  # saves: last 0, best 0, last 1, (best 1,) last 2
        out = tmp_path / f"killed_at_save_{point}"
        killed = subprocess.run([sys.executable, "-c", DIE_WHILE_SAVING, *common, "--out-dir", str(out)],
                                cwd=repo_root, env=dict(os.environ, DIE_AT_SAVE=str(point)), capture_output=True,
                                text=True, timeout=300)
        assert killed.returncode == -9, killed.stderr[-2000:]
        resume = ["--resume", str(out / "last.pt")] if (out / "last.pt").exists() else []
        if resume:
            load_checkpoint(str(out / "last.pt"))  # loadable after the kill
        again = subprocess.run([sys.executable, "train.py", *common, "--out-dir", str(out), *resume], cwd=repo_root,
                               capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr[-2000:]
        assert "leftover of interrupted runs" in again.stdout
        last, best = load_checkpoint(str(out / "last.pt")), load_checkpoint(str(out / "best.pt"))
        assert best["epoch"] == last["best_epoch"]
        assert [row["epoch"] for row in last["history"]] == [0, 1, 2]
        assert [r["loss"] for r in last["history"]] == [r["loss"] for r in whole["history"]]
        assert len(open(out / "log.jsonl").read().splitlines()) == 3
        assert not [f for f in os.listdir(out) if f.endswith(".tmp") or f.startswith(".staging")]


def test_label_smoothing_matches_the_smoothed_target_by_hand(toy_word_map, eight_captions):
    """With smoothing eps, each real word's loss is (1 - eps) * -log p(true) + eps * mean over the vocabulary of -log p."""
    word_map = toy_word_map(*[f"w{i}" for i in range(1, 11)])
    features, captions, caplens = eight_captions
    torch.manual_seed(0)
    decoder = DecoderWithAttention(attention_dim=16, embed_dim=12, decoder_dim=20, vocab_size=len(word_map),
                                   encoder_dim=24, dropout=0.0)
    plain, scores, targets = train.compute_loss(None, decoder, features, captions, caplens, cached=True, alpha_c=0.0)
    smoothed, _, _ = train.compute_loss(None, decoder, features, captions, caplens, cached=True, alpha_c=0.0,
                                        label_smoothing=0.2)
    log_p = torch.log_softmax(scores.float(), dim=1)  # (n, vocab)
    nll = -log_p.gather(1, targets.unsqueeze(1)).squeeze(1)  # (n,)
    by_hand = (0.8 * nll - 0.2 * log_p.mean(dim=1)).mean()
    assert smoothed.item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert plain.item() == pytest.approx(nll.mean().item(), rel=1e-5) and smoothed.item() != pytest.approx(plain.item())


def test_label_smoothing_reaches_the_training_loss_and_is_refused_for_scst(prepared, tmp_path, tiny_model_args,
                                                                          tiny_checkpoint, monkeypatch):
    seen, real = [], train.compute_loss

    def recording(*args, **kwargs):
        seen.append(kwargs.get("label_smoothing"))
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "compute_loss", recording)
    train.main(["--data-folder", prepared[0], *tiny_model_args, "--epochs", "1", "--max-steps", "1",
                "--label-smoothing", "0.1", "--out-dir", str(tmp_path / "smoothed")])
    assert 0.1 in seen  # the training step's call; validation's reports the plain cross-entropy
    with pytest.raises(UserError, match="--label-smoothing"):
        train.main(["--data-folder", prepared[0], *tiny_model_args, "--resume", tiny_checkpoint, "--scst",
                    "--label-smoothing", "0.1", "--out-dir", str(tmp_path / "scst")])


def test_hflip_trains_on_mirrored_features_and_is_refused_for_scst(prepared, tmp_path, tiny_model_args,
                                                                   tiny_checkpoint, monkeypatch):
    caches, seen, real = [], [], train.compute_loss

    class Recorded(train.FeatureCache):
        def __init__(self, *args, mirrored=False, **kwargs):
            super().__init__(*args, mirrored=mirrored, **kwargs)
            caches.append((args[3], mirrored, self))  # (split, mirrored, cache)

    def recording(encoder, decoder, inputs, *args, **kwargs):
        if decoder.training:
            seen.append(inputs.float().clone())  # (batch, num_pixels, encoder_dim)
        return real(encoder, decoder, inputs, *args, **kwargs)

    monkeypatch.setattr(train, "FeatureCache", Recorded)
    monkeypatch.setattr(train, "compute_loss", recording)
    train.main(["--data-folder", prepared[0], *tiny_model_args, "--epochs", "1", "--max-steps", "2", "--hflip",
                "--out-dir", str(tmp_path / "mirrored")])
    assert [(split, mirrored) for split, mirrored, _ in caches] == [("TRAIN", False), ("VAL", False), ("TRAIN", True)]
    plain, mirrored = (cache[torch.arange(len(cache), device="cpu")].float() for _, _, cache in (caches[0], caches[2]))
    rows = torch.cat(seen)  # (captions seen, num_pixels, encoder_dim)

    def matches(rows, table):  # (rows,) bool: is each row one of the table's images' features?
        return (rows.unsqueeze(1) == table.unsqueeze(0)).flatten(2).all(dim=2).any(dim=1)

    assert not matches(plain, mirrored).any()  # the two caches can be told apart
    from_plain, from_mirror = matches(rows, plain), matches(rows, mirrored)
    assert (from_plain | from_mirror).all() and from_plain.any() and from_mirror.any()
    with pytest.raises(UserError, match="--hflip"):
        train.main(["--data-folder", prepared[0], *tiny_model_args, "--resume", tiny_checkpoint, "--scst",
                    "--hflip", "--out-dir", str(tmp_path / "scst")])


def test_feature_dropout_is_recorded_kept_on_resume_and_refused_for_scst(prepared, tmp_path, tiny_model_args,
                                                                         tiny_checkpoint, monkeypatch):
    rates, real = [], train.build_decoder

    def recording(config, vocab_size):
        decoder = real(config, vocab_size)
        rates.append(decoder.feature_dropout.p)
        return decoder

    monkeypatch.setattr(train, "build_decoder", recording)
    out = tmp_path / "dropped"
    train.main(["--data-folder", prepared[0], *tiny_model_args, "--epochs", "1", "--max-steps", "1",
                "--feature-dropout", "0.3", "--out-dir", str(out)])
    assert rates == [0.3] and load_checkpoint(str(out / "last.pt"))["config"]["feature_dropout"] == 0.3
    train.main(["--data-folder", prepared[0], "--resume", str(out / "last.pt"), "--epochs", "2", "--max-steps", "1",
                "--out-dir", str(out)])  # a resumed run keeps the checkpoint's rate...
    train.main(["--data-folder", prepared[0], "--resume", str(out / "last.pt"), "--epochs", "3", "--max-steps", "1",
                "--feature-dropout", "0.1", "--out-dir", str(out)])  # ...unless it is given a new one
    assert rates == [0.3, 0.3, 0.1] and load_checkpoint(str(out / "last.pt"))["config"]["feature_dropout"] == 0.1
    with pytest.raises(UserError, match="--feature-dropout"):
        train.main(["--data-folder", prepared[0], *tiny_model_args, "--resume", tiny_checkpoint, "--scst",
                    "--feature-dropout", "0.3", "--out-dir", str(tmp_path / "scst")])


def test_scst_no_dropout_samples_from_the_test_time_decoder_and_still_learns(prepared, tmp_path, tiny_model_args,
                                                                            tiny_checkpoint, monkeypatch):
    import scst

    modes, real = [], scst.sample_captions

    def recording(decoder, *args, **kwargs):
        modes.append(decoder.training)
        return real(decoder, *args, **kwargs)

    monkeypatch.setattr(scst, "sample_captions", recording)
    start = load_checkpoint(tiny_checkpoint)
    assert start["config"]["dropout"] == 0.5  # the tiny model has dropout to turn off
    for flag, expected in (([], True), (["--scst-no-dropout"], False)):
        modes.clear()
        out = tmp_path / f"scst{len(flag)}"
        train.main(["--data-folder", prepared[0], *tiny_model_args, "--resume", tiny_checkpoint, "--scst",
                    "--scst-samples", "2", "--epochs", str(start["epoch"] + 2), "--max-steps", "1",
                    "--out-dir", str(out), *flag])
        assert modes and all(m is expected for m in modes), (flag, modes)
        trained = load_checkpoint(str(out / "last.pt"))["decoder"]
        assert any(not torch.equal(trained[k], v) for k, v in start["decoder"].items())  # gradients flowed


def test_val_decoding_rules_are_used_and_recorded(prepared, tmp_path, tiny_model_args, tiny_checkpoint, monkeypatch):
    seen, real = [], train.decode_batches

    def recording(*args, **kwargs):
        seen.append((kwargs["length_penalty"], kwargs["block_trigrams"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "decode_batches", recording)
    start = load_checkpoint(tiny_checkpoint)["epoch"]
    out = tmp_path / "ruled"
    train.main(["--data-folder", prepared[0], *tiny_model_args, "--resume", tiny_checkpoint, "--epochs", str(start + 2),
                "--length-penalty", "0.5", "--block-trigrams", "--out-dir", str(out)])
    assert seen == [(0.5, True)]  # the one resumed epoch's VAL decoding
    config = load_checkpoint(str(out / "last.pt"))["config"]
    assert config["length_penalty"] == 0.5 and config["block_trigrams"] is True  # what eval.py and caption.py follow
    assert (out / "best.pt").exists()  # other rules start a new best: the resumed epoch is it


@pytest.mark.parametrize("phase, change, carried", [
    ("xe_fine_tune", {}, True), ("xe_fine_tune", {"length_penalty": 1.0}, False),
    ("xe_fine_tune", {"block_trigrams": True}, False),
    # cross-entropy -> SCST: SCST's VAL decoding is constrained, so the cross-entropy best is not comparable
    # (carried over, it kept best.pt out of SCST's new --out-dir until an SCST epoch beat it)
    ("scst", {"constrained_decoding": True}, False)])
def test_a_best_score_carries_over_only_under_the_same_decoding(phase, change, carried):
    checkpoint = {"phase": "xe", "epoch": 4, "select_on": "CIDEr", "best_score": 0.5, "best_epoch": 3,
                  "epochs_since_improvement": 1, "history": [], "config": {"length_penalty": 0.0}}
    run = types.SimpleNamespace(phase=phase, select_on="CIDEr", best_score=-1.0, best_epoch=-1, hard_baseline=None,
                                config={"length_penalty": 0.0, **change})
    train.restore_training_state(run, checkpoint)
    assert (run.best_score, run.best_epoch) == ((0.5, 3) if carried else (-1.0, -1))


def test_a_resumed_run_warns_once_per_typed_model_option_it_ignores(prepared, tiny_checkpoint, tiny_model_args,
                                                                    tmp_path, capsys):
    start = load_checkpoint(tiny_checkpoint)
    trained_dropout = start["config"]["dropout"]
    # the run's own model options, typed again, say nothing; a different dropout is named, and not used
    train.main(["--data-folder", prepared[0], *tiny_model_args, "--resume", tiny_checkpoint, "--dropout", "0.1",
                "--epochs", str(start["epoch"] + 2), "--max-steps", "1", "--out-dir", str(tmp_path / "resumed")])
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: dropout=0.1 ignored: {tiny_checkpoint} was trained with dropout={trained_dropout}, "
                        "and a resumed run keeps its model's options"]
    assert load_checkpoint(str(tmp_path / "resumed" / "last.pt"))["config"]["dropout"] == trained_dropout
