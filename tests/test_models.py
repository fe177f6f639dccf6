"""models.py and train.py: shapes, attention, gradients, overfitting, resume, checkpoints, failures, DDP."""
import math
import os
import subprocess
import sys
import time
import types
import urllib.error

import pytest
import torch

import train
from conftest import ROOT, TINY_MODEL
from decoding import beam_search
from models import Attention, DecoderWithAttention, Encoder, WeightsUnavailable
from utils import UserError, load_checkpoint

WORD_MAP = {"<pad>": 0, **{f"w{i}": i for i in range(1, 11)}, "<unk>": 11, "<start>": 12, "<end>": 13}


def _decoder(encoder_dim=24, vocab=len(WORD_MAP), dropout=0.0):
    return DecoderWithAttention(attention_dim=16, embed_dim=12, decoder_dim=20, vocab_size=vocab,
                                encoder_dim=encoder_dim, dropout=dropout)


# ---------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------


def test_encoder_shapes():
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    assert Encoder("efficientnet_lite0", 0, pretrained=False)(images).shape == (2, 4, 1280)  # 64 / 32 = 2 x 2
    assert Encoder("efficientnet_lite0", 3, pretrained=False)(images).shape == (2, 9, 1280)
    assert Encoder("resnet50", 14, pretrained=False)(images).shape == (2, 196, 2048)  # the paper's 14 x 14 x 2048


def test_lite0_ships_imagenet_weights():
    pretrained = Encoder("efficientnet_lite0", 0, pretrained=True)
    random = Encoder("efficientnet_lite0", 0, pretrained=False)
    p = dict(pretrained.named_parameters())
    r = dict(random.named_parameters())
    name = "backbone.net._conv_stem.weight"
    assert not torch.equal(p[name], r[name])


def test_attention_shapes_and_weights_sum_to_one():
    attention = Attention(encoder_dim=24, decoder_dim=20, attention_dim=16)
    features, h = torch.randn(3, 49, 24), torch.randn(3, 20)
    context, alpha = attention(features, attention.project_features(features), h)
    assert context.shape == (3, 24) and alpha.shape == (3, 49)
    assert torch.allclose(alpha.sum(dim=1), torch.ones(3), atol=1e-6)
    assert (alpha >= 0).all()
    # the context is the alpha-weighted mean of the features
    assert torch.allclose(context, (alpha.unsqueeze(2) * features).sum(1), atol=1e-5)


def test_attention_with_several_beams_per_picture_equals_repeating_the_picture():
    attention = Attention(encoder_dim=24, decoder_dim=20, attention_dim=16)
    features, h = torch.randn(3, 49, 24), torch.randn(3 * 4, 20)  # 4 hypotheses per picture, adjacent rows
    context, alpha = attention(features, attention.project_features(features), h)
    repeated = features.repeat_interleave(4, dim=0)  # (12, 49, 24): what beam search no longer builds
    one_each = [attention(repeated[r : r + 1], attention.project_features(repeated[r : r + 1]), h[r : r + 1])
                for r in range(12)]
    assert context.shape == (12, 24) and alpha.shape == (12, 49)
    assert torch.allclose(context, torch.cat([c for c, _ in one_each]), atol=1e-5)
    assert torch.allclose(alpha, torch.cat([a for _, a in one_each]), atol=1e-6)


def test_decoder_forward_shapes_and_sorting():
    decoder = _decoder()
    features = torch.randn(4, 9, 24)
    captions = torch.randint(1, 11, (4, 8))
    caplens = torch.tensor([[5], [8], [3], [6]])
    scores, caps_sorted, decode_lengths, alphas, sort_ind = decoder(features, captions, caplens)
    assert scores.shape == (4, 7, len(WORD_MAP)) and alphas.shape == (4, 7, 9)
    assert decode_lengths.tolist() == [7, 5, 4, 2] and sort_ind.tolist() == [1, 3, 0, 2]
    assert torch.equal(caps_sorted, captions[sort_ind])
    # finished captions are not computed: their later steps stay zero
    assert alphas[3, 2:].abs().sum() == 0
    assert torch.allclose(alphas[0].sum(1), torch.ones(7), atol=1e-5)


def test_gradients_reach_trainable_parameters_only():
    encoder = Encoder("efficientnet_lite0", 0, pretrained=False)
    decoder = _decoder(encoder_dim=1280)
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    captions = torch.tensor([[12, 1, 2, 3, 13], [12, 4, 5, 13, 0]])
    caplens = torch.tensor([5, 4])
    for fine_tune in (False, True):
        encoder.fine_tune(fine_tune)
        encoder.zero_grad(set_to_none=True)
        decoder.zero_grad(set_to_none=True)
        loss, _, _ = train.compute_loss(encoder, decoder, images, captions, caplens, cached=False, alpha_c=1.0)
        loss.backward()
        for name, p in list(decoder.named_parameters()) + list(encoder.named_parameters()):
            if p.requires_grad:
                assert p.grad is not None and p.grad.abs().sum() > 0, name
            else:
                assert p.grad is None, name
        trainable = [n for n, p in encoder.named_parameters() if p.requires_grad]
        if fine_tune:
            assert trainable and "backbone.net._conv_stem.weight" not in trainable  # early layers stay frozen
            assert "backbone.net._conv_head.weight" in trainable
        else:
            assert trainable == []


# ---------------------------------------------------------------------------
# Learning
# ---------------------------------------------------------------------------


def test_tiny_overfit_learns_eight_captions():
    """8 images, one caption each: the model must memorise them.

    Bound: mean cross-entropy < 0.05 nats per word means the right word gets probability
    about 0.95 on average, far above anything else, so greedy decoding must reproduce every caption."""
    torch.manual_seed(0)
    features = torch.randn(8, 4, 24)  # 8 distinct "images"
    captions = []
    for i in range(8):
        words = [1 + (i + j * 3) % 10 for j in range(2 + i % 4)]
        captions.append([12, *words, 13] + [0] * (7 - len(words)))
    captions = torch.tensor(captions)
    caplens = (captions != 0).sum(1)
    decoder = _decoder()
    opt = torch.optim.Adam(decoder.parameters(), lr=1e-2)
    for _ in range(300):
        loss, _, _ = train.compute_loss(None, decoder, features, captions, caplens, cached=True, alpha_c=0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    decoder.eval()
    hyps = beam_search(decoder, features, WORD_MAP, beam_size=1, max_len=10)
    for hyp, cap, n in zip(hyps, captions.tolist(), caplens.tolist()):
        assert hyp["tokens"] == cap[1 : n - 1]


def _epoch_losses(out_dir):
    return [row["loss"] for row in load_checkpoint(os.path.join(out_dir, "last.pt"))["history"]]


def test_resume_is_exact(prepared, tmp_path):
    common = ["--data-folder", prepared[0], *TINY_MODEL, "--dropout", "0.5"]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    train.main([*common, "--epochs", "3", "--out-dir", full])
    train.main([*common, "--epochs", "2", "--out-dir", part])
    train.main([*common, "--epochs", "3", "--out-dir", part, "--resume", os.path.join(part, "last.pt")])
    assert len(_epoch_losses(full)) == 3
    assert _epoch_losses(part) == _epoch_losses(full)  # bit-for-bit, dropout included


def test_amp_on_cpu_trains_in_bf16_and_keeps_fp32_weights(prepared, tmp_path, monkeypatch):
    real, dtypes = train.compute_loss, set()

    def recording(*args, **kwargs):
        loss, scores, targets = real(*args, **kwargs)
        dtypes.add(scores.dtype)  # the decoder's word scores, computed inside autocast
        return loss, scores, targets

    monkeypatch.setattr(train, "compute_loss", recording)
    out = str(tmp_path / "amp")
    train.main(["--data-folder", prepared[0], *TINY_MODEL, "--epochs", "1", "--amp", "--out-dir", out])
    state = load_checkpoint(os.path.join(out, "last.pt"))
    assert dtypes == {torch.bfloat16}
    assert math.isfinite(state["history"][0]["loss"])
    assert all(v.dtype == torch.float32 for v in state["decoder"].values() if v.is_floating_point())


def test_max_minutes_stops_before_an_epoch_that_would_pass_the_budget(prepared, tmp_path, capsys):
    out = str(tmp_path / "budget")
    train.main(["--data-folder", prepared[0], *TINY_MODEL, "--epochs", "5", "--max-minutes", "0.001", "--out-dir", out])
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


def test_fine_tune_phase_resumes_from_frozen_checkpoint(prepared, tiny_checkpoint, tmp_path):
    out = str(tmp_path / "ft")
    start = load_checkpoint(tiny_checkpoint)["epoch"]
    train.main(["--data-folder", prepared[0], *TINY_MODEL, "--resume", tiny_checkpoint, "--fine-tune-encoder",
                "--epochs", str(start + 2), "--out-dir", out])
    state = load_checkpoint(os.path.join(out, "last.pt"))
    assert state["encoder_optimizer"] is not None and state["epoch"] == start + 1
    before = load_checkpoint(tiny_checkpoint)["encoder"]["backbone.net._conv_head.weight"]
    assert not torch.equal(state["encoder"]["backbone.net._conv_head.weight"], before)
    assert torch.equal(state["encoder"]["backbone.net._conv_stem.weight"],
                       load_checkpoint(tiny_checkpoint)["encoder"]["backbone.net._conv_stem.weight"])


# ---------------------------------------------------------------------------
# Failures
# ---------------------------------------------------------------------------


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(prepared, tmp_path, monkeypatch, capsys):
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
        train.run_cli(lambda: train.main(["--data-folder", prepared[0], *TINY_MODEL, "--epochs", "3", "--out-dir", out]))
    assert exit_info.value.code == 1
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]  # the rest is progress bars
    assert len(errors) == 1 and "loss became nan at epoch 1" in errors[0] and "last.pt" in errors[0]
    assert "Traceback" not in stderr
    assert load_checkpoint(os.path.join(out, "last.pt"))["epoch"] == 0  # the good one, intact
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_offline_imagenet_weights_give_one_line_and_exit_2(prepared, tmp_path, monkeypatch, capsys):
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network in this test")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # no cached weights either
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    with pytest.raises(WeightsUnavailable) as err:
        Encoder("resnet50", 14, pretrained=True)
    message = str(err.value)
    for way_out in ("--encoder efficientnet_lite0", "TORCH_HOME", "--encoder-weights PATH", "--no-pretrained"):
        assert way_out in message
    assert "\n" not in message

    with pytest.raises(SystemExit) as exit_info:
        train.run_cli(lambda: train.main(["--data-folder", prepared[0], "--encoder", "resnet50",
                                          "--epochs", "1", "--out-dir", str(tmp_path / "o")]))
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err.strip().splitlines()
    assert len(stderr) == 1 and stderr[0].startswith("error: cannot get ImageNet weights for resnet50")


def test_encoder_weights_file_is_used(tmp_path):
    import torchvision

    reference = torchvision.models.resnet50(weights=None)
    path = tmp_path / "r50.pth"
    torch.save(reference.state_dict(), path)
    encoder = Encoder("resnet50", 14, pretrained=True, weights_path=str(path))
    assert torch.equal(encoder.backbone[0].weight, reference.conv1.weight)
    (tmp_path / "junk.pth").write_text("junk")
    with pytest.raises(WeightsUnavailable, match="cannot read encoder weights"):
        Encoder("resnet50", 14, pretrained=True, weights_path=str(tmp_path / "junk.pth"))


def test_resume_from_a_foreign_file_is_a_user_error(prepared, tmp_path):
    bogus = tmp_path / "other.pt"
    torch.save({"model": torch.zeros(2)}, bogus)
    with pytest.raises(UserError, match="not a checkpoint of this project"):
        train.main(["--data-folder", prepared[0], *TINY_MODEL, "--resume", str(bogus)])


def test_demo_preset_applies_only_where_not_given():
    args = train.parse_args([])
    assert args.demo and args.encoder == "efficientnet_lite0" and args.data_folder.endswith("shapes")
    args = train.parse_args(["--epochs", "2", "--no-pretrained"])
    assert args.epochs == 2 and args.pretrained is False and args.decoder_dim == train.SHAPES_PRESET["decoder_dim"]
    args = train.parse_args(["--data-folder", "x"])
    assert not args.demo and args.encoder == "resnet50" and args.decoder_dim == 512 and args.decoder_lr == 4e-4


# ---------------------------------------------------------------------------
# DistributedDataParallel
# ---------------------------------------------------------------------------


def test_two_process_ddp_on_cpu(prepared, tmp_path):
    out = str(tmp_path / "ddp")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
         "train.py", "--data-folder", prepared[0], *TINY_MODEL, "--epochs", "2", "--device", "cpu",
         "--out-dir", out],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    state = load_checkpoint(os.path.join(out, "last.pt"))
    assert state["epoch"] == 1 and len(state["history"]) == 2
    assert sorted(os.listdir(out)) == ["best.pt", "curves.png", "last.pt", "log.jsonl"]  # rank 0 wrote, once
    assert result.stdout.count("epoch 1: loss") == 1


def test_disk_feature_cache_matches_ram_cache(prepared, tmp_path):
    common = ["--data-folder", prepared[0], *TINY_MODEL, "--epochs", "2"]
    train.main([*common, "--out-dir", str(tmp_path / "ram")])
    train.main([*common, "--out-dir", str(tmp_path / "disk"), "--cache", "disk"])
    assert os.path.exists(tmp_path / "disk" / "features_TRAIN_rank0.hdf5")
    assert _epoch_losses(str(tmp_path / "disk")) == _epoch_losses(str(tmp_path / "ram"))
