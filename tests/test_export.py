"""export.py: the inference-only model file, and --average-with (interpolating two checkpoints of one model)."""
import pytest
import torch

import export
from checkpoints import load_checkpoint, save_checkpoint
from models import Encoder


@pytest.fixture(scope="module")
def packaged_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny model's checkpoint with the Lite0 package's ImageNet weights as its (frozen) encoder."""
    state = load_checkpoint(tiny_checkpoint)
    state["config"] = dict(state["config"], pretrained=True)
    state["encoder"] = Encoder("efficientnet_lite0", 0, pretrained=True).state_dict()
    path = str(tmp_path_factory.mktemp("export") / "packaged.pt")
    save_checkpoint(path, state)
    return path


def shifted_copy(path, out, shift=1.0, **changes):
    """A copy of the checkpoint at `path` whose decoder's float tensors are all `shift` higher."""
    state = load_checkpoint(path)
    state["decoder"] = {k: v + shift if v.is_floating_point() else v for k, v in state["decoder"].items()}
    state.update(changes)
    save_checkpoint(str(out), state)
    return str(out)


def test_export_writes_a_half_precision_decoder_without_the_encoder(packaged_checkpoint, tmp_path):
    out = str(tmp_path / "model.pt")
    export.main([packaged_checkpoint, out])
    state = torch.load(out, map_location="cpu", weights_only=True)
    trained = load_checkpoint(packaged_checkpoint)["decoder"]
    assert "encoder" not in state and state["inference_only"] is True and "averaged_with" not in state
    for key, tensor in state["decoder"].items():
        if tensor.is_floating_point():
            assert tensor.dtype == torch.float16
            assert torch.allclose(tensor.float(), trained[key], atol=1e-3, rtol=1e-3)


def test_export_refuses_a_fine_tuned_encoder(tiny_checkpoint, tmp_path):
    with pytest.raises(export.UserError, match="differs from the efficientnet_lite0 package's weights"):
        export.main([tiny_checkpoint, str(tmp_path / "model.pt")])  # random weights, not the package's
    assert not (tmp_path / "model.pt").exists()


@pytest.mark.parametrize("weight", [0.0, 0.3, 1.0])
def test_average_with_interpolates_every_decoder_weight(packaged_checkpoint, tmp_path, weight):
    other = shifted_copy(packaged_checkpoint, tmp_path / "other.pt", shift=1.0, epoch=7)
    out = str(tmp_path / "mix.pt")
    export.main([packaged_checkpoint, out, "--average-with", other, "--weight", str(weight), "--dtype", "fp32"])
    state = load_checkpoint(out)
    mine = load_checkpoint(packaged_checkpoint)["decoder"]
    assert state["averaged_with"] == {"checkpoint": "other.pt", "epoch": 7, "weight": weight}
    assert "best_score" not in state  # it was measured on the checkpoint alone
    floats = [k for k, v in mine.items() if v.is_floating_point()]
    assert floats
    for key in floats:  # (1 - w) * mine + w * (mine + 1) = mine + w
        assert torch.allclose(state["decoder"][key], mine[key] + weight, atol=1e-6)


@pytest.mark.parametrize("change, message", [
    ({"word_map": {"<pad>": 0, "cat": 1}}, "another word map"),
    ({"config": {"decoder_dim": 64}}, "another model [(]decoder_dim 64, not 32[)]")])
def test_average_with_refuses_another_model(packaged_checkpoint, tmp_path, change, message):
    state = load_checkpoint(packaged_checkpoint)
    if "config" in change:
        change = {"config": dict(state["config"], **change["config"])}
    other = shifted_copy(packaged_checkpoint, tmp_path / "other.pt", **change)
    with pytest.raises(export.UserError, match=message):
        export.main([packaged_checkpoint, str(tmp_path / "mix.pt"), "--average-with", other])
    assert not (tmp_path / "mix.pt").exists()


def test_average_weight_outside_0_to_1_is_refused(packaged_checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        export.main([packaged_checkpoint, str(tmp_path / "mix.pt"), "--average-with", packaged_checkpoint,
                     "--weight", "1.5"])
    assert stop.value.code == 2 and "a number from 0 to 1" in capsys.readouterr().err


def test_weight_without_average_with_is_refused(packaged_checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        export.main([packaged_checkpoint, str(tmp_path / "model.pt"), "--weight", "0.3"])
    assert stop.value.code == 2 and "give --average-with OTHER too" in capsys.readouterr().err
    assert not (tmp_path / "model.pt").exists()
