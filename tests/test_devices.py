"""Device discipline, proven on the CPU: the code must run on CUDA although these machines have no GPU.

A tensor made without `device=` lands on the CPU. On a CPU machine every test passes; on CUDA the first
operation that mixes it with the model's tensors crashes. DeviceDiscipline catches that here: while it
is active, every factory call made by the project's own code (not by torch's internals) must name its
device, and no operation may take tensors from two devices. The training, validation, decoding, SCST,
eval.py and caption.py paths run under it.
"""
import contextlib
import os
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

import caption
import eval as evaluation
import features
import scst
import train
from checkpoints import load_checkpoint
from decoding import beam_search
from models import DecoderWithAttention

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Functions that make a new tensor from sizes or Python data: without device= they make it on the CPU.
FACTORIES = {torch.arange, torch.zeros, torch.ones, torch.full, torch.empty, torch.tensor, torch.as_tensor,
             torch.rand, torch.randn, torch.randint, torch.randperm, torch.linspace, torch.logspace, torch.eye,
             torch.empty_strided, torch.scalar_tensor}


class DeviceDiscipline(TorchFunctionMode):
    """Records factory calls without device= from project code, and operations on mixed devices."""

    def __init__(self, root=ROOT):
        super().__init__()
        self.root, self.violations = root, []

    def project_caller(self):
        """'file.py:line' of the project code that called the current torch function, or None when torch
        itself (or a library, or a test) made the call: torch's internals choose their devices themselves."""
        frame = sys._getframe(2)  # 0: this method, 1: __torch_function__, 2: the caller
        path = os.path.abspath(frame.f_code.co_filename)
        inside = path.startswith(self.root + os.sep) and os.sep + "tests" + os.sep not in path
        return f"{os.path.relpath(path, self.root)}:{frame.f_lineno}" if inside else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.__deepcopy__:  # copies onto the tensor's own device; its memo argument holds
            return func(*args, **kwargs)        # everything copied so far, too slow to flatten at every tensor
        if func in FACTORIES and "device" not in kwargs:
            where = self.project_caller()
            if where:
                self.violations.append(f"{where}: torch.{func.__name__} without device=")
        devices = {t.device for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor) and t.dim() > 0}
        if len(devices) > 1:
            self.violations.append(f"{self.project_caller() or 'torch'}: {func.__name__} mixes "
                                   f"{sorted(map(str, devices))}")
        return func(*args, **kwargs)


def disciplined(function, mode):
    def wrapper(*args, **kwargs):
        with mode:
            return function(*args, **kwargs)

    return wrapper


@pytest.fixture
def discipline(monkeypatch):
    """A DeviceDiscipline active around every step that touches data on the model's device."""
    mode = DeviceDiscipline()
    for module, name in ((train, "setup_run"), (train, "train_one_epoch"), (train, "validate"),
                         (scst, "scst_one_epoch"), (evaluation, "evaluate"), (caption, "main")):
        monkeypatch.setattr(module, name, disciplined(getattr(module, name), mode))
    monkeypatch.setattr(train, "scst_one_epoch", scst.scst_one_epoch)  # train.py calls it by this name
    yield mode
    assert not mode.violations, "tensors made or used off the model's device:\n" + "\n".join(sorted(set(mode.violations)))


def test_the_discipline_catches_a_tensor_made_without_a_device(tmp_path, monkeypatch):
    """The check itself: a module with models.py's old bug is flagged, its fixed line is not."""
    (tmp_path / "buggy.py").write_text(
        "import torch\n"
        "def live_rows(lengths, steps):\n"
        "    return (lengths.unsqueeze(0) > torch.arange(steps).unsqueeze(1)).sum(1)\n"
        "def live_rows_fixed(lengths, steps):\n"
        "    return (lengths.unsqueeze(0) > torch.arange(steps, device=lengths.device).unsqueeze(1)).sum(1)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import buggy

    lengths = torch.tensor([3, 2], device="cpu")
    mode = DeviceDiscipline(root=str(tmp_path))
    with mode:
        buggy.live_rows_fixed(lengths, 4)
    assert mode.violations == []
    with mode:
        buggy.live_rows(lengths, 4)
    assert mode.violations == ["buggy.py:3: torch.arange without device="]


def test_teacher_forcing_keeps_to_the_device():
    mode = DeviceDiscipline()
    decoder = DecoderWithAttention(8, 8, 8, 10, encoder_dim=6)
    captions = torch.tensor([[7, 1, 2, 8], [7, 3, 8, 0]], device="cpu")  # (batch, max_len + 2)
    with mode:
        decoder(torch.randn(2, 4, 6), captions, torch.tensor([4, 3], device="cpu"))
    assert mode.violations == [], mode.violations


@pytest.mark.parametrize("extra", [[], ["--cache", "off"], ["--fine-tune-encoder"], ["--amp"], ["--fine-tune-top", "2"],
                                   ["--attention", "hard"], ["--attention", "hard", "--hard-inference", "argmax"]],
                         ids=["frozen-cached", "frozen-uncached", "fine-tune", "amp", "fine-tune-top", "hard",
                              "hard-argmax"])
def test_training_step_and_validation_keep_to_the_device(discipline, prepared, tiny_model_args, tmp_path, extra):
    train.main(["--data-folder", prepared[0], *tiny_model_args, "--epochs", "1", "--max-steps", "1",
                "--val-beam-size", "3", "--out-dir", str(tmp_path), *extra])
    assert load_checkpoint(os.path.join(tmp_path, "last.pt"))["epoch"] == 0


def test_scst_step_keeps_to_the_device(discipline, prepared, tiny_model_args, tiny_checkpoint, tmp_path):
    start = load_checkpoint(tiny_checkpoint)["epoch"] + 1
    for baseline in ("greedy", "mean"):
        train.main(["--data-folder", prepared[0], *tiny_model_args, "--resume", tiny_checkpoint, "--scst",
                    "--scst-baseline", baseline, "--scst-samples", "2", "--epochs", str(start + 1), "--max-steps", "1",
                    "--out-dir", str(tmp_path / baseline)])


@pytest.mark.parametrize("beam_size", [1, 3])
@pytest.mark.parametrize("constrained", [False, True])
def test_beam_search_keeps_to_the_device(beam_size, constrained, toy_word_map):
    word_map = toy_word_map("a", "b", "with")
    decoder = DecoderWithAttention(8, 8, 8, len(word_map), encoder_dim=6).eval()
    features = torch.randn(3, 4, 6)  # (batch, num_pixels, encoder_dim)
    mode = DeviceDiscipline()
    with mode:
        hyps = beam_search(decoder, features, word_map, beam_size, max_len=6, constrained=constrained,
                           block_trigrams=constrained)
    assert len(hyps) == 3 and not mode.violations, mode.violations


def test_eval_and_caption_keep_to_the_device(discipline, prepared, tiny_checkpoint, tmp_path):
    evaluation.main(["--checkpoint", tiny_checkpoint, "--split", "VAL", "--data-folder", prepared[0],
                     "--beam-size", "1", "3", "--workers", "0", "--out", str(tmp_path / "val.json")])
    image = os.path.join(os.path.dirname(prepared[0]), "raw", "imgs", "img000.jpg")
    assert caption.main(["--checkpoint", tiny_checkpoint, "--img", image, "--out", str(tmp_path / "fig.png"),
                         "--beam-size", "3"]) == 0
    assert os.path.exists(tmp_path / "fig.png")


# ---------------------------------------------------------------------------
# CUDA-only choices, checked through the functions that make them
# ---------------------------------------------------------------------------


def test_mixed_precision_is_fp16_with_a_scaler_on_cuda_and_bf16_on_the_cpu():
    assert train.precision(torch.device("cuda", 0), amp=True) == (torch.float16, True)
    assert train.precision(torch.device("cpu"), amp=True) == (torch.bfloat16, False)
    assert train.precision(torch.device("cuda", 0), amp=False) == (None, False)


def test_pinned_memory_and_non_blocking_copies_only_for_cuda(monkeypatch):
    assert features.loader_options(torch.device("cuda", 0)) == {"pin_memory": True}
    assert features.loader_options(torch.device("cpu")) == {"pin_memory": False}
    calls = []
    fake = type("T", (), {"to": lambda self, device, non_blocking: calls.append(non_blocking)})()
    features.to_device(fake, torch.device("cuda", 0))
    features.to_device(fake, torch.device("cpu"))
    assert calls == [True, False]


def test_cudnn_benchmark_is_on_only_for_cuda(monkeypatch):
    class Stop(Exception):
        pass

    seen = []

    def stop_after_the_flag(folder):  # setup_run's next step after choosing the device
        seen.append(torch.backends.cudnn.benchmark)
        raise Stop

    monkeypatch.setattr(train, "find_data_name", stop_after_the_flag)
    for device in ("cpu", "cuda"):
        monkeypatch.setattr(train, "setup_distributed", lambda name, d=device: (0, 1, torch.device(d)))
        with pytest.raises(Stop):
            train.setup_run(train.parse_args(["--data-folder", "anything"]), contextlib.ExitStack())
    torch.backends.cudnn.benchmark = False
    assert seen == [False, True]


def test_feature_cache_stays_on_the_gpu_only_when_it_fits(monkeypatch):
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * gib, 80 * gib))  # 10 GiB free
    cuda = torch.device("cuda", 0)
    assert features.cache_device(2 * gib, cuda) == cuda
    assert features.cache_device(8 * gib, cuda) == torch.device("cpu")  # would leave too little for training
    assert features.cache_device(1, torch.device("cpu")) == torch.device("cpu")


def test_a_checkpoint_saved_on_a_gpu_loads_on_the_cpu(tmp_path, monkeypatch):
    """CUDA tensors cannot be made here; load_checkpoint must map every storage to the CPU, which is what
    makes a GPU checkpoint load on a CPU-only machine. Record the map_location it asks for."""
    from checkpoints import save_checkpoint

    path = str(tmp_path / "c.pt")
    save_checkpoint(path, {"config": {}, "word_map": {}, "encoder": {}, "decoder": {"w": torch.ones(2)}})
    asked = {}
    real = torch.load

    def spy(*args, **kwargs):
        asked.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    assert torch.equal(load_checkpoint(path)["decoder"]["w"], torch.ones(2))
    assert str(asked["map_location"]) == "cpu" and asked["weights_only"] is True
