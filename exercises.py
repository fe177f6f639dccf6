"""Exercises for the Show, Attend and Tell course: make the student copy, and grade a copy.

    python exercises.py make [--out student/] [--force]   # the repo with every TODO's solution taken out
    python exercises.py check [DIR] [--only N ...]        # grade DIR (default: this folder, the reference)

The reference code marks each exercise in a .py file as a numbered TODO region:

    <indent># TODO <n> >>> <the task, on one line>
    <indent># Hint: ...            (the comment lines right after the opening marker stay in the student copy)
    <indent><solution lines>       (the student copy gets one `raise NotImplementedError(...)` line instead)
    <indent># <<< TODO <n>

`check` runs one focused check per TODO, each in its own Python process with DIR first on
sys.path, so a missing or broken TODO fails only its own row. Where a TODO calls code that belongs
to another TODO, the check swaps that code for a small stub: a TODO passes when it is right,
whatever the other TODOs do. The checks compare with computations written out by hand here,
never with the reference solutions.
"""
import argparse
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import traceback
import types

ROOT = os.path.dirname(os.path.abspath(__file__))
SKIPPED_FOLDERS = {".git", "data", "runs", "student"}  # never part of the student copy
WALK_SKIPPED = SKIPPED_FOLDERS | {"__pycache__", ".pytest_cache", ".venv"}  # when there is no git to ask
CHECK_TIMEOUT_S = 120
RESULT_TAG = "@@exercise-verdict "  # how a check process hands its verdict back to `check`

OPEN_MARKER = re.compile(r"^(?P<indent>[ \t]*)# TODO (?P<number>\d+) >>> (?P<task>\S.*?)\s*$")
CLOSE_MARKER = re.compile(r"^[ \t]*# <<< TODO (?P<number>\d+)\s*$")
COMMENT_LABEL = re.compile(r"^(?P<label>[A-Z][a-z]+):\s*(?P<text>.*)$")  # "Hint: ...", "Paper: ..."


class ExerciseError(Exception):
    """A problem the user can fix (a broken marker, a non-empty folder): one line, exit code 2."""


# ---------------------------------------------------------------------------
# Finding the TODO regions
# ---------------------------------------------------------------------------


class Region:
    """One TODO region of one file. Line indices are 0-based; messages say 1-based line numbers."""

    def __init__(self, path, number, task, open_index, indent):
        self.path, self.number, self.task = path, number, task
        self.open_index, self.indent = open_index, indent
        self.comment_lines = []  # the task's Hint/Paper lines, kept for the student
        self.solution_start = self.close_index = None
        self.hint = ""

    @property
    def where(self):
        return f"{self.path}:{self.open_index + 1}"

    def student_line(self, newline):
        """The one line that replaces the solution in the student copy."""
        message = f"TODO {self.number}: {self.task.rstrip('.')}"
        if self.hint:
            message += f" (hint: {self.hint.rstrip('.')})"
        return f"{self.indent}raise NotImplementedError({json.dumps(message)}){newline}"


def looks_like_marker(line):
    text = line.strip()
    return text.startswith("#") and "TODO" in text and (">>>" in text or "<<<" in text)


def find_regions(path, text):
    """The TODO regions of one file, in order. Raises ExerciseError naming the file and line of a bad marker."""
    lines = text.splitlines(keepends=True)
    regions, current = [], None
    for index, line in enumerate(lines):
        where = f"{path}:{index + 1}"
        opening, closing = OPEN_MARKER.match(line), CLOSE_MARKER.match(line)
        if opening:
            number = int(opening["number"])
            if current is not None:
                raise ExerciseError(f"{where}: 'TODO {number} >>>' opens inside TODO {current.number} "
                                    f"(opened at line {current.open_index + 1}); close that one first")
            current = Region(path, number, opening["task"], index, opening["indent"])
        elif closing:
            number = int(closing["number"])
            if current is None:
                raise ExerciseError(f"{where}: '<<< TODO {number}' closes a TODO that was never opened")
            if number != current.number:
                raise ExerciseError(f"{where}: '<<< TODO {number}' closes TODO {current.number} "
                                    f"(opened at line {current.open_index + 1}); the numbers must match")
            current.close_index = index
            split_comments_from_solution(current, lines)
            regions.append(current)
            current = None
        elif looks_like_marker(line):
            raise ExerciseError(f"{where}: malformed TODO marker; expected '# TODO <n> >>> <task>' or '# <<< TODO <n>'")
    if current is not None:
        raise ExerciseError(f"{current.where}: 'TODO {current.number} >>>' is never closed "
                            f"(add '# <<< TODO {current.number}')")
    return regions


def split_comments_from_solution(region, lines):
    """The comment lines right after the opening marker describe the task; the rest is the solution."""
    index = region.open_index + 1
    while index < region.close_index and lines[index].strip().startswith("#"):
        region.comment_lines.append(lines[index].strip()[1:].strip())
        index += 1
    region.solution_start = index
    if not any(line.strip() for line in lines[index:region.close_index]):
        raise ExerciseError(f"{region.where}: TODO {region.number} has no solution lines before its '<<<' marker")
    first_code = next(line for line in lines[index:region.close_index] if line.strip())
    region.indent = first_code[: len(first_code) - len(first_code.lstrip())]  # the solution's indentation
    region.hint = hint_text(region.comment_lines)


def hint_text(comments):
    """The 'Hint:' comment with its continuation lines, joined into one line."""
    parts, in_hint = [], False
    for comment in comments:
        label = COMMENT_LABEL.match(comment)
        if label:
            in_hint = label["label"] == "Hint"
            if in_hint:
                parts.append(label["text"])
        elif in_hint and comment:
            parts.append(comment)
    return " ".join(parts)


def check_unique_numbers(regions):
    seen = {}
    for region in regions:
        if region.number in seen:
            raise ExerciseError(f"{region.where}: TODO {region.number} is used twice "
                                f"(also at {seen[region.number].where})")
        seen[region.number] = region


# ---------------------------------------------------------------------------
# make: the student copy
# ---------------------------------------------------------------------------


def repository_files(root=ROOT, exclude=None):
    """The repo's files (tracked, plus untracked ones git does not ignore), relative to root, sorted."""
    try:
        listed = set()
        for extra in ([], ["--others", "--exclude-standard"]):
            out = subprocess.run(["git", "ls-files", "-z", *extra], cwd=root, capture_output=True, check=True)
            listed.update(name for name in out.stdout.decode().split("\0") if name)
    except (OSError, subprocess.CalledProcessError):  # no git, or not a git checkout: walk the folder
        listed = set(walk_files(root))
    files = []
    for name in sorted(listed):
        path = os.path.join(root, name)
        skipped = name.split("/")[0] in SKIPPED_FOLDERS
        inside_out = exclude is not None and os.path.realpath(path).startswith(exclude + os.sep)
        if not skipped and not inside_out and os.path.isfile(path):  # a deleted tracked file is skipped
            files.append(name)
    return files


def walk_files(root):
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [s for s in subfolders if s not in WALK_SKIPPED]
        for name in names:
            if not name.endswith(".pyc"):
                yield os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/")


def read_text(path):
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return f.read()
    except UnicodeDecodeError:
        return None


def all_regions(root, files):
    """{file: [regions]} for every .py file; checks every marker before anything is written."""
    found = {}
    for name in files:
        if name.endswith(".py"):
            text = read_text(os.path.join(root, name))
            if text is not None:
                found[name] = find_regions(name, text)
    check_unique_numbers([r for regions in found.values() for r in regions])
    return found


def without_solutions(text, regions):
    """The file's text with each region's solution lines replaced by one `raise NotImplementedError`."""
    lines = text.splitlines(keepends=True)
    for region in reversed(regions):  # from the bottom, so earlier line indices stay valid
        newline = "\r\n" if lines[region.close_index].endswith("\r\n") else "\n"
        lines[region.solution_start : region.close_index] = [region.student_line(newline)]
    return "".join(lines)


def make(out, force=False, root=ROOT):
    out = os.path.realpath(out)
    if out == os.path.realpath(root):
        raise ExerciseError(f"{out}: that is the reference itself; choose another --out")
    if os.path.isdir(out) and os.listdir(out) and not force:
        raise ExerciseError(f"{out}: folder is not empty; use --force to write into it anyway")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ExerciseError(f"{out}: exists and is not a folder")
    files = repository_files(root, exclude=out)
    regions = all_regions(root, files)
    for name in files:
        source, target = os.path.join(root, name), os.path.join(out, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if regions.get(name):
            with open(target, "w", encoding="utf-8", newline="") as f:
                f.write(without_solutions(read_text(source), regions[name]))
            shutil.copymode(source, target)
        else:
            shutil.copy2(source, target)
    numbers = sorted(r.number for rs in regions.values() for r in rs)
    print(f"Wrote the student copy to {out}: {len(files)} files, TODOs {', '.join(map(str, numbers))} to do.")
    print(f"Grade it with: python {os.path.relpath(os.path.abspath(__file__))} check {out}")


# ---------------------------------------------------------------------------
# check: helpers the individual checks share
# ---------------------------------------------------------------------------


class CheckFailed(Exception):
    """A check's verdict: the one-line reason why a TODO is wrong."""


def expect(condition, reason):
    if not condition:
        raise CheckFailed(reason)


def load(folder, name):
    """Import module `name` from the copy under test (and nowhere else)."""
    import importlib

    module = importlib.import_module(name)
    found = os.path.realpath(os.path.dirname(module.__file__))
    expect(found == os.path.realpath(folder), f"{name}.py was not found in {folder}")
    return module


def largest_difference(a, b):
    return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0


def close(a, b, tol=1e-5):
    """Same shape and values within tol."""
    return tuple(a.shape) == tuple(b.shape) and largest_difference(a, b) <= tol


def expect_tensor(name, value, shape, meaning):
    import torch

    expect(isinstance(value, torch.Tensor), f"{name} should be a tensor; got {type(value).__name__}")
    expect(tuple(value.shape) == tuple(shape),
           f"{name} has shape {tuple(value.shape)}; expected {tuple(shape)} {meaning}")


def expect_tuple(value, length, names):
    got = f"a tuple of {len(value)}" if isinstance(value, (tuple, list)) else type(value).__name__
    expect(isinstance(value, (tuple, list)) and len(value) == length, f"should return ({names}); got {got}")


def expect_same_gradients(student_loss, hand_loss, named_inputs, what):
    """Gradients of two scalar losses with respect to the same inputs must agree."""
    import torch

    names, inputs = zip(*named_inputs)
    expect(student_loss.requires_grad, f"no gradient flows back through {what} (was something detached?)")
    student = torch.autograd.grad(student_loss, inputs, allow_unused=True)
    hand = torch.autograd.grad(hand_loss, inputs, allow_unused=True)
    for name, got, wanted in zip(names, student, hand):
        expect(got is not None, f"no gradient reaches {name} through {what} (was it detached?)")
        expect(close(got, wanted, 1e-4), f"the gradient for {name} differs from the hand computation "
                                         f"(largest difference {largest_difference(got, wanted):.3g})")


# ---------------------------------------------------------------------------
# TODO 1: CaptionDataset.__getitem__
# ---------------------------------------------------------------------------

CAPTIONS_PER_IMAGE = 3


def write_tiny_collection(folder):
    """Five 16 x 16 PNGs (3 TRAIN, 2 VAL), each different, with 3 captions of different lengths each."""
    import numpy as np
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    images = []
    for i in range(5):
        pixels = np.zeros((16, 16, 3), np.uint8)  # (H, W, 3)
        pixels[:, :, 0] = 40 * i + 20  # each image its own red level
        pixels[:, :8, 1] = 200  # left half differs from right half, so a flip shows
        name = f"img{i}.png"
        Image.fromarray(pixels).save(os.path.join(folder, name))
        sentences = [["pic", f"n{i}"] + ["and"] * j + [f"c{j}"] for j in range(CAPTIONS_PER_IMAGE)]
        images.append({"filename": name, "imgid": i, "split": "train" if i < 3 else "val",
                       "sentences": [{"tokens": tokens} for tokens in sentences]})
    path = os.path.join(folder, "dataset_tiny.json")
    with open(path, "w") as f:
        json.dump({"images": images}, f)
    return path


def prepare_tiny_folder(folder, tmp):
    """The tiny collection prepared by the copy's create_input_files.py; returns (data folder, base name)."""
    create_input_files = load(folder, "create_input_files")
    json_path = write_tiny_collection(os.path.join(tmp, "raw"))
    out = os.path.join(tmp, "prepared")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        create_input_files.main(["--dataset", "flickr8k", "--karpathy-json", json_path,
                                 "--image-folder", os.path.dirname(json_path), "--output-folder", out,
                                 "--image-size", "16", "--min-word-freq", "1", "--workers", "1", "--max-len", "8",
                                 "--captions-per-image", str(CAPTIONS_PER_IMAGE)])
    base = next(n[len("WORDMAP_"):-len(".json")] for n in os.listdir(out) if n.startswith("WORDMAP_"))
    return out, base


def read_prepared_split(data_folder, base, split):
    """A split read straight from its files, without dataset.py."""
    import h5py
    import torch

    with h5py.File(os.path.join(data_folder, f"{split}_IMAGES_{base}.hdf5"), "r") as f:
        images = torch.from_numpy(f["images"][:])  # (num_images, 3, S, S) uint8
        cpi = int(f.attrs["captions_per_image"])
    with open(os.path.join(data_folder, f"{split}_CAPTIONS_{base}.json")) as f:
        captions = torch.tensor(json.load(f))  # (num_images * cpi, max_len + 2)
    with open(os.path.join(data_folder, f"{split}_CAPLENS_{base}.json")) as f:
        caplens = torch.tensor(json.load(f))  # (num_images * cpi,)
    return types.SimpleNamespace(images=images, captions=captions, caplens=caplens, cpi=cpi)


def expect_right_image(where, image, i, truth):
    import torch

    wanted = i // truth.cpi  # captions are stored image by image, cpi of them per image
    expect(isinstance(image, torch.Tensor), f"{where}: the image should be a tensor; got {type(image).__name__}")
    expect(tuple(image.shape) == tuple(truth.images.shape[1:]),
           f"{where}: the image has shape {tuple(image.shape)}; expected {tuple(truth.images.shape[1:])} (3, S, S)")
    expect(image.dtype == torch.uint8, f"{where}: the image has dtype {image.dtype}; keep it uint8 "
                                       "(the Encoder scales pixels itself)")
    if not torch.equal(image, truth.images[wanted]):
        got = [k for k in range(len(truth.images)) if torch.equal(image, truth.images[k])]
        read = f"image {got[0]}" if got else "no image"
        raise CheckFailed(f"{where}: got {read} of the HDF5 file; caption {i} belongs to image "
                          f"{i} // captions_per_image = {wanted}")


def expect_right_item(item, i, truth, split):
    import torch

    where = f"{split} item {i}"
    names = "image, caption, caplen" + (", all_captions" if split != "TRAIN" else "")
    got = f"a tuple of {len(item)}" if isinstance(item, (tuple, list)) else type(item).__name__
    expect(isinstance(item, (tuple, list)) and len(item) == len(names.split(", ")),
           f"{where}: expected the tuple ({names}); got {got}")
    image, caption, caplen = item[:3]
    expect_right_image(where, image, i, truth)
    expect(isinstance(caption, torch.Tensor) and caption.dtype == torch.long,
           f"{where}: the caption should be a torch.long tensor")
    expect(torch.equal(caption, truth.captions[i]), f"{where}: the caption is not row {i} of the CAPTIONS file")
    expect(isinstance(caplen, torch.Tensor) and caplen.numel() == 1,
           f"{where}: caplen should be a one-element tensor, like torch.tensor([length])")
    expect(int(caplen.reshape(-1)[0]) == int(truth.caplens[i]),
           f"{where}: caplen is {int(caplen.reshape(-1)[0])}; expected {int(truth.caplens[i])}, entry {i} of CAPLENS")
    if split != "TRAIN":
        first = (i // truth.cpi) * truth.cpi
        all_captions = item[3]
        expect_tensor(f"{where}: all_captions", all_captions, (truth.cpi, truth.captions.shape[1]),
                      "(captions_per_image, max_len + 2)")
        expect(torch.equal(all_captions, truth.captions[first : first + truth.cpi]),
               f"{where}: all_captions should be caption rows {first}..{first + truth.cpi - 1}, "
               f"every caption of image {i // truth.cpi}")


def check_caption_dataset(folder):
    import torch
    from torch.utils.data import DataLoader

    dataset = load(folder, "dataset")
    with tempfile.TemporaryDirectory() as tmp:
        data_folder, base = prepare_tiny_folder(folder, tmp)
        for split in ("TRAIN", "VAL"):
            truth = read_prepared_split(data_folder, base, split)
            items = dataset.CaptionDataset(data_folder, base, split)
            for i in range(len(items)):
                expect_right_item(items[i], i, truth, split)

        truth = read_prepared_split(data_folder, base, "TRAIN")
        flipped = dataset.CaptionDataset(data_folder, base, "TRAIN", transform=lambda image: image.flip(2))
        image = flipped[4][0]  # (3, S, S)
        expect(torch.equal(image, truth.images[4 // truth.cpi].flip(2)),
               "the dataset's transform was not applied to the image")

        loader = DataLoader(dataset.CaptionDataset(data_folder, base, "TRAIN"), batch_size=4)
        images, captions, caplens = next(iter(loader))  # (4, 3, S, S), (4, max_len + 2), (4, 1)
        expect(images.shape == (4,) + tuple(truth.images.shape[1:]) and captions.shape == (4, truth.captions.shape[1])
               and caplens.numel() == 4, "a DataLoader cannot batch the items into (4, 3, S, S), (4, L), (4 or 4 x 1)")


# ---------------------------------------------------------------------------
# TODO 2: Attention.forward
# ---------------------------------------------------------------------------


def attention_by_hand(attention, features, projected, h):
    """Eqs. (4)-(6) one hypothesis and one pixel at a time: e_i = w . relu(projected_i + W_h h + b_h),
    alpha = softmax_i(e), context = sum_i alpha_i a_i. Row r of h belongs to image r // beams."""
    import torch

    W_h = attention.decoder_att.weight  # (attention_dim, decoder_dim)
    b_h = attention.decoder_att.bias  # (attention_dim,)
    w = attention.full_att.weight[0]  # (attention_dim,)
    beams = h.shape[0] // features.shape[0]
    contexts, alphas = [], []
    for r in range(h.shape[0]):
        b = r // beams  # the image this hypothesis describes
        query = W_h @ h[r] + b_h  # (attention_dim,)
        e = torch.stack([w @ torch.clamp(projected[b, i] + query, min=0)
                         for i in range(features.shape[1])])  # (num_pixels,)
        weights = torch.exp(e - e.max())  # (num_pixels,), shifted so exp cannot overflow
        alpha = weights / weights.sum()  # (num_pixels,)
        contexts.append(sum(alpha[i] * features[b, i] for i in range(features.shape[1])))  # (encoder_dim,)
        alphas.append(alpha)
    return torch.stack(contexts), torch.stack(alphas)  # (rows, encoder_dim), (rows, num_pixels)


def check_attention(folder):
    import torch

    models = load(folder, "models")
    batch, num_pixels, encoder_dim, decoder_dim, attention_dim = 3, 5, 6, 4, 7
    attention = models.Attention(encoder_dim, decoder_dim, attention_dim)
    features = torch.randn(batch, num_pixels, encoder_dim, requires_grad=True)  # (batch, num_pixels, encoder_dim)
    # random, not W_a a_i: forward must use `projected` as given (it is computed once per batch)
    projected = torch.randn(batch, num_pixels, attention_dim, requires_grad=True)  # (batch, num_pixels, attention_dim)
    h = torch.randn(batch, decoder_dim, requires_grad=True)  # (batch, decoder_dim)

    out = attention(features, projected, h)  # context (batch, encoder_dim), alpha (batch, num_pixels)
    expect_tuple(out, 2, "context, alpha")
    context, alpha = out
    expect_tensor("context", context, (batch, encoder_dim), "(batch, encoder_dim)")
    expect_tensor("alpha", alpha, (batch, num_pixels), "(batch, num_pixels)")
    sums = alpha.detach().sum(dim=1)  # (batch,)
    worst = float(sums[(sums - 1).abs().argmax()])
    expect(abs(worst - 1) < 1e-4, f"attention weights do not sum to 1 over pixels (got {worst:.2f})")
    expect(float(alpha.min()) >= 0, "attention weights should not be negative (use a softmax)")

    wanted_context, wanted_alpha = attention_by_hand(attention, features, projected, h)
    if not close(alpha, wanted_alpha, 1e-5):
        recomputed = attention_by_hand(attention, features, attention.project_features(features), h)[1]  # (batch, P)
        expect(not close(alpha, recomputed, 1e-5),
               "alpha ignores the `projected` argument (it recomputes W_a a_i); use projected as given")
        raise CheckFailed(f"alpha differs from the hand computation of eqs. (4)-(5) "
                          f"(largest difference {largest_difference(alpha, wanted_alpha):.3g})")
    expect(close(context, wanted_context, 1e-5),
           f"context is not sum_i alpha_i a_i (largest difference {largest_difference(context, wanted_context):.3g})")

    weights_c = torch.randn(batch, encoder_dim)  # (batch, encoder_dim): a random scalar loss tests every gradient
    weights_a = torch.randn(batch, num_pixels)  # (batch, num_pixels)
    expect_same_gradients((context * weights_c).sum() + (alpha * weights_a).sum(),
                          (wanted_context * weights_c).sum() + (wanted_alpha * weights_a).sum(),
                          [("features", features), ("projected", projected), ("h", h),
                           ("decoder_att.weight", attention.decoder_att.weight),
                           ("full_att.weight", attention.full_att.weight)], "the attention")
    check_attention_with_beams(attention, features.detach(), projected.detach())


def check_attention_with_beams(attention, features, projected):
    """Beam search passes several hypotheses per image: h has batch * beams rows, features only batch."""
    import torch

    beams = 2
    h = torch.randn(features.shape[0] * beams, attention.decoder_att.in_features)  # (batch * beams, decoder_dim)
    try:
        context, alpha = attention(features, projected, h)  # (batch * beams, encoder_dim), (batch * beams, num_pixels)
    except RuntimeError as error:
        raise CheckFailed(f"attention fails when h has {beams} rows per image (beam search does this): "
                          f"{str(error).splitlines()[0]}")
    wanted_context, wanted_alpha = attention_by_hand(attention, features, projected, h)
    expect(tuple(alpha.shape) == tuple(wanted_alpha.shape) and close(alpha, wanted_alpha, 1e-5)
           and close(context, wanted_context, 1e-5),
           f"with {beams} hypotheses per image (h of batch * {beams} rows, the rows of one image adjacent), "
           f"row r must attend over image r // {beams}")


# ---------------------------------------------------------------------------
# TODO 3: DecoderWithAttention.step
# ---------------------------------------------------------------------------


def small_decoder(models, vocab_size=11):
    """A decoder with every size different, so a mixed-up dimension shows."""
    return models.DecoderWithAttention(attention_dim=5, embed_dim=3, decoder_dim=4, vocab_size=vocab_size,
                                       encoder_dim=6, dropout=0.0).eval()


def make_attention_stub(torch, context_base, alpha):
    class AttentionStub(torch.nn.Module):
        """Stands in for TODO 2: a known context (which depends on h, so gradients can flow) and alpha."""

        def __init__(self):
            super().__init__()
            self.calls = []

        def forward(self, features, projected, h):
            self.calls.append((features, projected, h))
            context = context_base + 0.1 * h.sum(dim=1, keepdim=True)  # (batch, encoder_dim)
            return context, alpha

    return AttentionStub()


def lstm_cell_by_hand(cell, x, h, c):
    """nn.LSTMCell written out: gates in PyTorch's order input, forget, cell, output."""
    import torch

    gates = x @ cell.weight_ih.T + cell.bias_ih + h @ cell.weight_hh.T + cell.bias_hh  # (batch, 4 * decoder_dim)
    i, f, g, o = gates.chunk(4, dim=1)  # 4 x (batch, decoder_dim)
    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)  # (batch, decoder_dim)
    h_new = torch.sigmoid(o) * torch.tanh(c_new)  # (batch, decoder_dim)
    return h_new, c_new


def step_by_hand(decoder, context, embedded, h, c, gated=True):
    """Section 4.2.1: beta = sigmoid(f_beta(h_{t-1})); LSTM input [embedded word; beta * context]."""
    import torch

    beta = torch.sigmoid(h @ decoder.f_beta.weight.T + decoder.f_beta.bias)  # (batch, encoder_dim)
    x = torch.cat([embedded, beta * context if gated else context], dim=1)  # (batch, embed_dim + encoder_dim)
    return lstm_cell_by_hand(decoder.lstm_cell, x, h, c)


def check_decoder_step(folder):
    import torch

    models = load(folder, "models")
    decoder = small_decoder(models)
    batch, num_pixels, encoder_dim, embed_dim, decoder_dim = 2, 5, 6, 3, 4
    context_base = torch.randn(batch, encoder_dim)  # (batch, encoder_dim)
    stub_alpha = torch.softmax(torch.randn(batch, num_pixels), dim=1)  # (batch, num_pixels)
    decoder.attention = make_attention_stub(torch, context_base, stub_alpha)
    embedded = torch.randn(batch, embed_dim, requires_grad=True)  # (batch, embed_dim)
    h = torch.randn(batch, decoder_dim, requires_grad=True)  # (batch, decoder_dim)
    c = torch.randn(batch, decoder_dim, requires_grad=True)  # (batch, decoder_dim)
    features = torch.randn(batch, num_pixels, encoder_dim)  # (batch, num_pixels, encoder_dim)
    projected = torch.randn(batch, num_pixels, 5)  # (batch, num_pixels, attention_dim)

    out = decoder.step(embedded, h, c, features, projected)  # h, c (batch, decoder_dim), alpha (batch, num_pixels)
    expect_tuple(out, 3, "h, c, alpha")
    new_h, new_c, alpha = out
    calls = decoder.attention.calls
    expect(len(calls) == 1, f"self.attention was called {len(calls)} times; a step attends exactly once")
    got_features, got_projected, got_h = calls[0]
    expect(got_features is features and got_projected is projected,
           "self.attention should get the step's features and projected as they are")
    expect(torch.equal(got_h, h), "self.attention should get the previous hidden state h (h_{t-1})")
    expect_tensor("h", new_h, (batch, decoder_dim), "(batch, decoder_dim)")
    expect_tensor("c", new_c, (batch, decoder_dim), "(batch, decoder_dim)")
    expect(alpha is stub_alpha or torch.equal(alpha, stub_alpha), "the alpha returned is not the attention's alpha")

    context = context_base + 0.1 * h.sum(dim=1, keepdim=True)  # (batch, encoder_dim): what the stub returned
    wanted_h, wanted_c = step_by_hand(decoder, context, embedded, h, c)
    if not (close(new_h, wanted_h) and close(new_c, wanted_c)):
        ungated_h, ungated_c = step_by_hand(decoder, context, embedded, h, c, gated=False)
        expect(not (close(new_h, ungated_h) and close(new_c, ungated_c)),
               "the context is not gated: feed beta * context with beta = sigmoid(f_beta(h))")
        raise CheckFailed(f"the new h and c differ from the hand computation (largest difference "
                          f"{max(largest_difference(new_h, wanted_h), largest_difference(new_c, wanted_c)):.3g})")

    weights_h, weights_c = torch.randn(batch, decoder_dim), torch.randn(batch, decoder_dim)  # 2 x (batch, decoder_dim)
    expect_same_gradients((new_h * weights_h).sum() + (new_c * weights_c).sum(),
                          (wanted_h * weights_h).sum() + (wanted_c * weights_c).sum(),
                          [("embedded", embedded), ("h", h), ("c", c), ("f_beta.weight", decoder.f_beta.weight),
                           ("lstm_cell.weight_ih", decoder.lstm_cell.weight_ih)], "the step")


# ---------------------------------------------------------------------------
# TODO 4: the teacher-forcing loop of DecoderWithAttention.forward
# ---------------------------------------------------------------------------


def stub_step_math(embedded, h, c, features):
    """Stands in for TODO 3: any deterministic function of the inputs will do, as long as it can be
    replayed one caption at a time."""
    import torch

    new_h = torch.tanh(0.5 * h + c + embedded.sum(dim=1, keepdim=True))  # (n, decoder_dim)
    new_c = 0.5 * c + 1.0  # (n, decoder_dim)
    alpha = torch.softmax(features[:, :, 0] + new_h[:, :1], dim=1)  # (n, num_pixels)
    return new_h, new_c, alpha


class StepStub:
    """Replaces decoder.step and records what the loop hands it at every step."""

    def __init__(self):
        self.calls = []

    def __call__(self, embedded, h, c, features, projected):
        t = len(self.calls)
        rows = [embedded.shape[0], h.shape[0], c.shape[0], features.shape[0], projected.shape[0]]
        expect(len(set(rows)) == 1, f"step {t} got embedded, h, c, features, projected with {rows} rows; "
                                    "give every one the same first n rows")
        self.calls.append({name: value.detach().clone() for name, value in
                           (("embedded", embedded), ("h", h), ("c", c), ("features", features),
                            ("projected", projected))})
        return stub_step_math(embedded, h, c, features)


def replay_caption(decoder, features_row, caption, decode_length):
    """One caption on its own through the stub: the h given to each step, and the h and alpha it stores."""
    import torch

    features_row = features_row.unsqueeze(0)  # (1, num_pixels, encoder_dim)
    h, c = decoder.init_hidden_state(features_row)  # 2 x (1, decoder_dim)
    h_in, h_out, alphas = [], [], []
    for t in range(decode_length):
        h_in.append(h[0])
        embedded = decoder.embedding(caption[t : t + 1])  # (1, embed_dim): the true word t
        h, c, alpha = stub_step_math(embedded, h, c, features_row)  # (1, decoder_dim) x2, (1, num_pixels)
        h_out.append(h[0])
        alphas.append(alpha[0])
    return types.SimpleNamespace(h_in=h_in, h_out=torch.stack(h_out), alphas=torch.stack(alphas))


def expect_right_step_inputs(decoder, calls, features, captions, lengths, replays):
    """Step t must get the first n_t rows (the captions still running), word t, and the h of step t - 1."""
    import torch

    projected = decoder.attention.project_features(features)  # (batch, num_pixels, attention_dim)
    for t, call in enumerate(calls):
        n = int((lengths > t).sum())  # rows are sorted by length: the first n are still running
        got = call["embedded"].shape[0]
        expect(got == n, f"step {t} got {got} rows; expected {n}, the captions still running (decode_length > {t})")
        words = decoder.embedding(captions[:n, t])  # (n, embed_dim)
        if not close(call["embedded"], words):
            expect(not close(call["embedded"], decoder.embedding(captions[:n, t + 1])),
                   f"step {t} was fed word {t + 1}; teacher forcing feeds the true word t")
            raise CheckFailed(f"step {t} was not fed the embeddings of word {t} of each caption")
        wanted_h = torch.stack([replays[b].h_in[t] for b in range(n)])  # (n, decoder_dim)
        expect(close(call["h"], wanted_h), f"step {t} did not get the h returned by step {t - 1}" if t else
               "step 0 did not get h from init_hidden_state(features)")
        expect(close(call["features"], features[:n]) and close(call["projected"], projected[:n]),
               f"step {t} should get features[:n] and projected[:n] of the sorted rows")


def check_teacher_forcing_loop(folder):
    import torch

    models = load(folder, "models")
    decoder = small_decoder(models)
    decoder.step = StepStub()  # the loop's bookkeeping is checked, not TODO 3
    batch, num_pixels, encoder_dim, vocab = 4, 5, 6, 11
    caplens = torch.tensor([3, 6, 2, 5])  # (batch,): <start> + words + <end>, all different
    captions = torch.randint(1, vocab, (batch, 8))  # (batch, max_len + 2)
    captions[torch.arange(8).unsqueeze(0) >= caplens.unsqueeze(1)] = 0  # <pad> after each caption
    features = torch.randn(batch, num_pixels, encoder_dim)  # (batch, num_pixels, encoder_dim)

    # (batch, steps, vocab), (batch, steps, num_pixels), (batch,): sorted by length, longest first
    scores, _, _, alphas, sort_ind = decoder(features, captions, caplens)
    lengths = caplens[sort_ind] - 1  # (batch,) decode lengths, longest first
    sorted_captions, sorted_features = captions[sort_ind], features[sort_ind]  # (batch, 8), (batch, P, E)
    steps = int(lengths.max())
    calls = decoder.step.calls
    expect(len(calls) == steps, f"self.step was called {len(calls)} times; expected {steps}, "
                                "one per step of the longest caption")
    replays = [replay_caption(decoder, sorted_features[b], sorted_captions[b], int(lengths[b])) for b in range(batch)]
    expect_right_step_inputs(decoder, calls, sorted_features, sorted_captions, lengths, replays)

    expect_tensor("alphas", alphas, (batch, steps, num_pixels), "(batch, steps, num_pixels)")
    expect_tensor("scores", scores, (batch, steps, vocab), "(batch, steps, vocab_size)")
    hiddens = torch.zeros(batch, steps, decoder.fc.in_features)  # (batch, steps, decoder_dim)
    wanted_alphas = torch.zeros(batch, steps, num_pixels)  # (batch, steps, num_pixels)
    for b, replay in enumerate(replays):
        hiddens[b, : len(replay.h_out)] = replay.h_out
        wanted_alphas[b, : len(replay.alphas)] = replay.alphas
    for b in range(batch):
        n = int(lengths[b])
        expect(float(alphas[b, n:].detach().abs().sum()) == 0,
               f"alphas[{b}, {n}:] should stay zero: that caption ended after {n} steps")
        expect(close(alphas[b, :n], wanted_alphas[b, :n]),
               f"alphas[{b}, t] does not hold the alpha that step t returned for that row")
    expect(close(scores, decoder.word_scores(hiddens)),
           "scores do not match the h of each step: store each step's h in hiddens[:n, t]")

    weights = torch.randn(batch, steps, num_pixels)  # (batch, steps, num_pixels): alphas.sum() would be constant
    for output, name in ((scores.sum(), "scores"), ((alphas * weights).sum(), "alphas")):
        expect(output.requires_grad, f"the {name} carry no gradient: do not detach or run the loop without gradients")
        grads = torch.autograd.grad(output, [decoder.embedding.weight, decoder.init_h.weight], retain_graph=True,
                                    allow_unused=True)
        expect(all(g is not None and float(g.abs().sum()) > 0 for g in grads),
               f"no gradient flows from the {name} back to the embeddings and init_h: do not detach what you store")


# ---------------------------------------------------------------------------
# TODO 5: compute_loss
# ---------------------------------------------------------------------------


def make_decoder_stub(torch, batch, steps, vocab, num_pixels):
    class DecoderStub(torch.nn.Module):
        """Stands in for the decoder: learnable scores and attention, returned in length order
        (like the real decoder), with junk scores on padded steps."""

        def __init__(self):
            super().__init__()
            self.score_table = torch.nn.Parameter(torch.randn(batch, steps, vocab))  # (batch, steps, vocab)
            self.alpha_logits = torch.nn.Parameter(torch.randn(batch, steps, num_pixels))  # (batch, steps, P)
            self.seen_features = None

        def outputs(self, captions, caplens):
            lengths, sort_ind = caplens.view(-1).sort(descending=True)  # (batch,), (batch,)
            decode_lengths = lengths - 1  # (batch,)
            running = torch.arange(steps).unsqueeze(0) < decode_lengths.unsqueeze(1)  # (batch, steps)
            alphas = torch.softmax(self.alpha_logits, dim=2) * running.unsqueeze(2)  # (batch, steps, P), 0 when ended
            return self.score_table, captions[sort_ind], decode_lengths, alphas, sort_ind

        def forward(self, features, captions, caplens):
            self.seen_features = features
            return self.outputs(captions, caplens)

    return DecoderStub()


def make_encoder_stub(torch):
    class EncoderStub(torch.nn.Module):
        """Stands in for the Encoder: uint8 images -> (batch, num_pixels, encoder_dim) features."""

        def __init__(self):
            super().__init__()
            self.outputs = []

        def forward(self, images):
            features = images.float().flatten(2).transpose(1, 2) / 255.0  # (batch, H * W, 3)
            self.outputs.append(features)
            return features

    return EncoderStub()


def loss_by_hand(scores, captions, decode_lengths, alphas, alpha_c, count_padding=False, shift=1):
    """Eq. (14) word by word: mean cross-entropy of each real next word, plus
    alpha_c * mean over images and pixels of (1 - sum_t alpha_ti)^2."""
    import torch

    total, words = 0.0, 0
    for b in range(scores.shape[0]):
        steps = scores.shape[1] if count_padding else int(decode_lengths[b])
        for t in range(steps):
            target = int(captions[b, t + shift])  # shift 1: the word after the input word t
            total = total - (scores[b, t, target] - torch.logsumexp(scores[b, t], dim=0))
            words += 1
    cross_entropy = total / words
    attention = alphas.sum(dim=1)  # (batch, num_pixels): attention each pixel got over the caption
    return cross_entropy, ((1.0 - attention) ** 2).mean(), cross_entropy + alpha_c * ((1.0 - attention) ** 2).mean()


def explain_wrong_loss(got, decoder, captions, caplens, alpha_c):
    """Name the usual mistake when the loss is off."""
    scores, sorted_captions, decode_lengths, alphas, _ = decoder.outputs(captions, caplens)
    cross_entropy, penalty, wanted = (float(x) for x in
                                      loss_by_hand(scores, sorted_captions, decode_lengths, alphas, alpha_c))
    known_mistakes = [
        (cross_entropy, "the attention penalty is missing: add alpha_c * mean((1 - sum_t alpha)^2)"),
        (cross_entropy + penalty, "the attention penalty is not multiplied by alpha_c"),
        (float(loss_by_hand(scores, sorted_captions, decode_lengths, alphas, alpha_c, count_padding=True)[2]),
         "padded steps are counted: keep only steps t < decode_length"),
        (float(loss_by_hand(scores, captions, decode_lengths, alphas, alpha_c)[2]),
         "the targets come from the unsorted captions: use the captions the decoder returns"),
        (float(loss_by_hand(scores, sorted_captions, decode_lengths, alphas, alpha_c, shift=0)[2]),
         "the target of step t is the input word t itself; it should be the next word, captions[:, t + 1]"),
    ]
    for value, reason in known_mistakes:
        if abs(got - value) < 1e-4:
            return f"loss {got:.4f} differs from the expected {wanted:.4f}: {reason}"
    return f"loss {got:.4f} differs from the expected {wanted:.4f}"


def expect_same_words(scores, targets, wanted_scores, wanted_targets):
    """The returned (scores row, target) pairs must be the real words', in any order."""
    def key(row, target):
        return (int(target), tuple(round(float(v), 4) for v in row))

    got = sorted(key(s, t) for s, t in zip(scores.detach(), targets))
    wanted = sorted(key(s, t) for s, t in zip(wanted_scores.detach(), wanted_targets))
    expect(got == wanted, "the returned scores and targets are not the real (unpadded) words' "
                          "scores and next words")


def check_compute_loss(folder):
    import torch

    train = load(folder, "train")
    batch, steps, vocab, num_pixels, alpha_c = 4, 5, 7, 4, 0.7
    caplens = torch.tensor([4, 6, 3, 5])  # (batch,): decode lengths 3, 5, 2, 4
    captions = torch.randint(1, vocab, (batch, 8))  # (batch, max_len + 2)
    captions[torch.arange(8).unsqueeze(0) >= caplens.unsqueeze(1)] = 0  # <pad>
    decoder, encoder = make_decoder_stub(torch, batch, steps, vocab, num_pixels), make_encoder_stub(torch)

    cached_features = torch.randn(batch, num_pixels, 3).half()  # (batch, num_pixels, encoder_dim) as cached
    out = train.compute_loss(encoder, decoder, cached_features, captions, caplens, True, alpha_c)
    expect_tuple(out, 3, "loss, scores, targets")
    loss, scores, targets = out
    expect(not encoder.outputs, "the encoder ran although cached=True: the inputs are already features")
    expect(decoder.seen_features is not None and decoder.seen_features.dtype == torch.float32,
           "cached features are float16: give the decoder inputs.float()")
    expect(torch.equal(decoder.seen_features, cached_features.float()), "the decoder did not get the cached features")
    expect(isinstance(loss, torch.Tensor) and loss.numel() == 1, "the loss should be a one-element tensor")

    # (batch, steps, vocab), (batch, max_len + 2), (batch,), (batch, steps, num_pixels): what the decoder gave
    wanted_scores, sorted_captions, lengths, alphas, _ = decoder.outputs(captions, caplens)
    wanted = loss_by_hand(wanted_scores, sorted_captions, lengths, alphas, alpha_c)[2]
    if abs(float(loss) - float(wanted)) > 1e-4:
        raise CheckFailed(explain_wrong_loss(float(loss), decoder, captions, caplens, alpha_c))
    words = int(lengths.sum())
    expect_tensor("the returned scores", scores, (words, vocab), f"(n, vocab) with n = {words} real words")
    expect_tensor("the returned targets", targets, (words,), f"(n,) with n = {words} real words")
    running = torch.arange(steps).unsqueeze(0) < lengths.unsqueeze(1)  # (batch, steps)
    expect_same_words(scores, targets, wanted_scores[running], sorted_captions[:, 1 : steps + 1][running])
    expect_same_gradients(loss, wanted, [("the scores", decoder.score_table),
                                         ("the attention", decoder.alpha_logits)], "the loss")

    images = torch.randint(0, 256, (batch, 3, 2, 2), dtype=torch.uint8)  # (batch, 3, H, W)
    train.compute_loss(encoder, decoder, images, captions, caplens, False, alpha_c)
    expect(len(encoder.outputs) == 1 and decoder.seen_features is encoder.outputs[0],
           "with cached=False the decoder should get encoder(inputs)")

    expect_training_lowers_loss(lambda: train.compute_loss(encoder, decoder, cached_features, captions, caplens,
                                                           True, alpha_c)[0], decoder.parameters(), "compute_loss")


def expect_training_lowers_loss(loss_fn, parameters, what, steps=30, lr=0.5):
    """A tiny training run: plain gradient descent on `loss_fn` must bring the loss well down."""
    import torch

    optimizer = torch.optim.SGD(list(parameters), lr=lr)
    first = last = None
    for _ in range(steps):
        optimizer.zero_grad()
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        first = float(loss) if first is None else first
        last = float(loss)
    expect(last < 0.7 * first, f"a tiny training run on {what} did not lower the loss ({first:.3f} -> {last:.3f})")


# ---------------------------------------------------------------------------
# TODO 6: optimisation_step
# ---------------------------------------------------------------------------


def fake_run(models, scaler, lr, grad_clip):
    """Just what optimisation_step reads from a training run."""
    import torch

    return types.SimpleNamespace(
        optimizers=[torch.optim.SGD(model.parameters(), lr=lr) for model in models], scaler=scaler,
        trainable_parameters=[p for model in models for p in model.parameters()],
        args=types.SimpleNamespace(grad_clip=grad_clip))


def clip_by_total_norm(grads, max_norm):
    """What clip_grad_norm_ does: scale every gradient by max_norm / (total norm), if that is below 1."""
    total = sum(float((g.double() ** 2).sum()) for g in grads) ** 0.5
    return [g * min(1.0, max_norm / (total + 1e-6)) for g in grads]


def sgd_update(params, grads, lr):
    return [p.detach() - lr * g for p, g in zip(params, grads)]


class ScalingScaler:
    """Behaves like a float16 GradScaler at scale 1024: the loss is scaled, the gradients must be
    unscaled before clipping, steps and update go through it. Records what it is asked to do."""

    factor = 1024.0

    def __init__(self):
        self.events, self.unscaled = [], set()

    def scale(self, loss):
        self.events.append("scale")
        return loss * self.factor

    def _unscale(self, optimizer):
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.div_(self.factor)
        self.unscaled.add(id(optimizer))

    def unscale_(self, optimizer):
        self.events.append("unscale_")
        expect(id(optimizer) not in self.unscaled, "run.scaler.unscale_ was called twice for one optimiser")
        self._unscale(optimizer)

    def step(self, optimizer):
        self.events.append("step")
        if id(optimizer) not in self.unscaled:  # like GradScaler.step, which unscales if you did not
            self._unscale(optimizer)
        optimizer.step()

    def update(self):
        self.events.append("update")
        self.unscaled.clear()


def two_linear_models():
    import torch

    return torch.nn.Linear(3, 1), torch.nn.Linear(3, 1)


def expect_clipped_update(train):
    """Large gradients, stale ones left in .grad: the step must zero, backpropagate, clip the total norm, step both."""
    import torch

    a, b = two_linear_models()
    x = torch.randn(5, 3)  # (examples, inputs)
    loss_fn = lambda: ((a(x) - 10) ** 2).mean() + ((b(x) + 10) ** 2).mean()  # gradient norm far above 1
    params = [p for model in (a, b) for p in model.parameters()]
    grads = torch.autograd.grad(loss_fn(), params)
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.full_like(p, 100.0)  # stale gradients from an earlier batch
    run = fake_run((a, b), torch.amp.GradScaler("cpu", enabled=False), lr=0.1, grad_clip=1.0)
    train.optimisation_step(run, loss_fn())

    after = [p.detach() for p in params]
    changed = [not torch.equal(x, y) for x, y in zip(before, after)]
    expect(any(changed), "no parameter changed: step every optimiser in run.optimizers")
    expect(all(changed[2:]), "the parameters of run.optimizers[1] did not change: step every optimiser")
    expect(all(changed[:2]), "the parameters of run.optimizers[0] did not change: step every optimiser")

    def moved_like(step_grads):
        return all(close(p, q, 1e-5) for p, q in zip(after, sgd_update(before, step_grads, 0.1)))

    if moved_like(clip_by_total_norm(grads, 1.0)):
        return
    stale = [g + 100.0 for g in grads]
    expect(not moved_like(grads), "the update used unclipped gradients: clip them to run.args.grad_clip = 1.0 "
                                  "(clip_grad_norm_ over run.trainable_parameters) before stepping")
    expect(not moved_like(clip_by_total_norm(stale, 1.0)), "old gradients were added to the new ones: "
                                                           "zero every optimiser's gradients before backward")
    expect(not moved_like(clip_by_total_norm(grads[:2], 1.0) + clip_by_total_norm(grads[2:], 1.0)),
           "clip once over all of run.trainable_parameters (one total norm), not per optimiser")
    wanted = sgd_update(before, clip_by_total_norm(grads, 1.0), 0.1)
    raise CheckFailed(f"the update differs from -lr x the clipped gradient (largest difference "
                      f"{max(largest_difference(p, q) for p, q in zip(after, wanted)):.3g})")


def expect_scaler_used(train):
    """With a scaling GradScaler: scale the loss, unscale before clipping, step and update through it."""
    import torch

    a, b = two_linear_models()
    x, y = torch.randn(5, 3), torch.randn(5, 1)  # (examples, inputs), (examples, 1)
    loss_fn = lambda: 0.01 * (((a(x) - y) ** 2).mean() + ((b(x) - y) ** 2).mean())  # gradient norm below the clip
    params = [p for model in (a, b) for p in model.parameters()]
    grads = torch.autograd.grad(loss_fn(), params)
    before = [p.detach().clone() for p in params]
    scaler = ScalingScaler()
    run = fake_run((a, b), scaler, lr=0.1, grad_clip=1.0)
    train.optimisation_step(run, loss_fn())

    events = scaler.events
    expect("scale" in events, "the loss was not scaled: backpropagate run.scaler.scale(loss) (mixed precision)")
    expect(events.count("step") == 2, "step each optimiser through run.scaler.step(optimizer), "
                                      "which skips steps with inf/NaN gradients")
    expect(events.count("update") == 1 and events[-1] == "update",
           "call run.scaler.update() once, after the optimiser steps")
    expect(events.count("unscale_") == 2, "call run.scaler.unscale_(optimizer) for every optimiser before "
                                          "clipping, so the clip sees the true gradients")
    wanted = sgd_update(before, grads, 0.1)  # norm below the clip: the true gradient, unclipped
    expect(all(close(p.detach(), q, 1e-5) for p, q in zip(params, wanted)),
           "with a scaling GradScaler the update is wrong: unscale_ every optimiser before clip_grad_norm_")


def check_optimisation_step(folder):
    import torch

    train = load(folder, "train")
    expect_clipped_update(train)
    expect_scaler_used(train)

    model = torch.nn.Linear(4, 1)
    x = torch.randn(32, 4)  # (examples, inputs)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])  # (examples, 1): a linear target the model can fit
    run = fake_run([model], torch.amp.GradScaler("cpu", enabled=False), lr=0.1, grad_clip=5.0)
    losses = []
    for _ in range(40):
        loss = ((model(x) - y) ** 2).mean()
        train.optimisation_step(run, loss)
        losses.append(float(loss))
    expect(losses[-1] < 0.25 * losses[0],
           f"a tiny training run with optimisation_step did not lower the loss ({losses[0]:.3f} -> {losses[-1]:.3f})")


# ---------------------------------------------------------------------------
# TODO 7: the loss / top-5 loop of validate
# ---------------------------------------------------------------------------

VAL_VOCAB = 10


def scores_with_hits(targets, hits):
    """(words, vocab) scores whose top 5 hold the target exactly where hits is True."""
    import torch

    scores = torch.zeros(len(targets), VAL_VOCAB)  # (words, vocab)
    for j, (target, hit) in enumerate(zip(targets.tolist(), hits.tolist())):
        others = [w for w in range(VAL_VOCAB) if w != target]
        scores[j, [target] + others[:4] if hit else others[:5]] = 1.0
    return scores


class ComputeLossStub:
    """Stands in for compute_loss (TODO 5): a known loss and known top-5 hits for every batch."""

    def __init__(self, autocast):
        self.autocast, self.calls = autocast, []

    def __call__(self, encoder, decoder, inputs, captions, caplens, cached, alpha_c):
        import torch

        ids = captions[:, 1]  # (batch,): every VAL caption carries its id in column 1
        words = int((caplens.view(-1) - 1).sum())
        loss = 1.0 + 0.1 * float(ids.float().mean())  # different for every batch
        targets = torch.arange(words) % VAL_VOCAB  # (words,)
        hits = (torch.arange(words) + int(ids[0])) % 3 != 0  # (words,)
        self.calls.append({"inputs": inputs.clone(), "ids": ids.tolist(), "cached": cached, "alpha_c": alpha_c,
                           "words": words, "loss": loss, "hits": int(hits.sum()),
                           "in_autocast": self.autocast.active, "grad": torch.is_grad_enabled()})
        return torch.tensor(loss), scores_with_hits(targets, hits), targets


class AutocastSpy:
    """run.autocast: a context manager that remembers whether it is open."""

    def __init__(self):
        self.active = False

    def __call__(self):
        return self

    def __enter__(self):
        self.active = True

    def __exit__(self, *exc):
        self.active = False


def make_val_set(torch):
    class TinyValSet(torch.utils.data.Dataset):
        """8 VAL captions of 4 images; caption k has id k + 1 in column 1."""

        cpi = 2

        def __init__(self):
            self.caplens = torch.tensor([3, 5, 4, 6, 2, 4, 5, 3])  # (8,)
            self.captions = torch.randint(1, VAL_VOCAB, (8, 7))  # (8, max_len + 2)
            self.captions[:, 1] = torch.arange(1, 9)  # (8,) caption ids
            self.images = torch.randint(0, 256, (4, 3, 4, 4), dtype=torch.uint8)  # (4, 3, S, S)

        def __len__(self):
            return len(self.captions)

        def __getitem__(self, i):
            return self.images[i // self.cpi], self.captions[i], self.caplens[i : i + 1]

    return TinyValSet()


def validate_with_stubs(train, val_cache):
    """Run the copy's validate on stubbed compute_loss, decoding and BLEU; returns (stats, calls, run)."""
    import torch

    autocast = AutocastSpy()
    val_set = make_val_set(torch)
    run = types.SimpleNamespace(
        encoder=torch.nn.Identity(), decoder=torch.nn.Linear(1, 1), val_set=val_set, device=torch.device("cpu"),
        val_cache=val_cache, autocast=autocast, val_refs={},
        args=types.SimpleNamespace(batch_size=3, workers=0, alpha_c=0.7, val_beam_size=1, max_decode_len=5))
    stub = ComputeLossStub(autocast)
    train.compute_loss = stub
    train.decode_split = lambda run, encoder, decoder, split: {0: "a b"}
    train.score_captions = lambda refs, hyps, metrics=None, quiet=True: {"Bleu_4": 0.25}
    stats = train.validate(run)
    return stats, stub.calls, run


def expect_every_caption_once(calls, run):
    import torch

    expect(calls, "compute_loss was never called: run it on every VAL batch")
    ids = sorted(i for call in calls for i in call["ids"])
    expect(ids == list(range(1, len(run.val_set) + 1)),
           f"VAL captions seen: {ids}; every one of the {len(run.val_set)} should be seen once")
    source = run.val_cache if run.val_cache is not None else run.val_set.images  # what each caption's input is
    for call in calls:
        wanted = torch.stack([source[(i - 1) // run.val_set.cpi] for i in call["ids"]])  # (batch, ...)
        expect(call["inputs"].shape == wanted.shape and torch.equal(call["inputs"], wanted),
               "compute_loss did not get each caption's own image features: use the batches of caption_batches(...)")


def expect_right_averages(stats, calls):
    words = sum(call["words"] for call in calls)
    wanted_loss = sum(call["loss"] * call["words"] for call in calls) / words  # weighted by words
    plain_loss = sum(call["loss"] for call in calls) / len(calls)
    wanted_top5 = 100.0 * sum(call["hits"] for call in calls) / words
    expect("val_loss" in stats and "val_top5" in stats, "validate no longer returns val_loss and val_top5")
    got_loss, got_top5 = float(stats["val_loss"]), float(stats["val_top5"])
    if abs(got_loss - wanted_loss) > 1e-4:
        reason = f"val_loss {got_loss:.4f} differs from the expected {wanted_loss:.4f}"
        if abs(got_loss - plain_loss) < 1e-4:
            reason += ": that is the plain mean over batches; weight each batch by its words, len(targets)"
        raise CheckFailed(reason)
    expect(abs(got_top5 - wanted_top5) < 1e-3, f"val_top5 {got_top5:.2f} differs from the expected {wanted_top5:.2f}, "
                                                "the share of all VAL words with the target in the top 5")


def check_validation_loop(folder):
    import torch

    train = load(folder, "train")
    cache = torch.randn(4, 3, 5).half()  # (num_images, num_pixels, encoder_dim), as FeatureCache holds them
    for val_cache in (cache, None):
        stats, calls, run = validate_with_stubs(train, val_cache)
        cached = val_cache is not None
        expect_every_caption_once(calls, run)
        expect(all(call["cached"] == cached for call in calls),
               f"compute_loss got cached={not cached} although run.val_cache is {'set' if cached else 'None'}: "
               "pass run.val_cache is not None")
        expect(all(call["alpha_c"] == run.args.alpha_c for call in calls),
               f"compute_loss got alpha_c={calls[0]['alpha_c']}; pass run.args.alpha_c")
        expect(all(call["in_autocast"] for call in calls),
               "run compute_loss inside `with run.autocast():`, as in training (mixed precision)")
        expect_right_averages(stats, calls)


# ---------------------------------------------------------------------------
# check: running every TODO's check in its own process
# ---------------------------------------------------------------------------

CHECKS = {
    1: ("dataset.py  CaptionDataset.__getitem__", check_caption_dataset),
    2: ("models.py   Attention.forward", check_attention),
    3: ("models.py   DecoderWithAttention.step", check_decoder_step),
    4: ("models.py   teacher-forcing loop of forward", check_teacher_forcing_loop),
    5: ("train.py    compute_loss", check_compute_loss),
    6: ("train.py    optimisation_step", check_optimisation_step),
    7: ("train.py    loss/top-5 loop of validate", check_validation_loop),
}


def describe_crash(err, folder):
    """'KeyError: 3 (models.py:176)': the exception, and the last line of the copy's code it passed through."""
    message = (str(err).strip().splitlines() or [""])[0][:160]
    text = f"{type(err).__name__}: {message}" if message else type(err).__name__
    if isinstance(err, SyntaxError):  # its message already names the file and line
        return text
    folder, this_file = os.path.realpath(folder), os.path.realpath(__file__)
    for frame in reversed(traceback.extract_tb(err.__traceback__)):
        path = os.path.realpath(frame.filename)
        if os.path.isfile(path) and path.startswith(folder + os.sep) and path != this_file:
            return f"{text} ({os.path.relpath(path, folder)}:{frame.lineno})"
    return text


def verdict(number, folder):
    """(passed, reason) of TODO `number`'s check, run in this process."""
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    try:
        CHECKS[number][1](folder)
    except CheckFailed as err:
        return False, str(err)
    except NotImplementedError as err:
        own = re.match(r"TODO (\d+):", str(err))
        if own and int(own[1]) == number:
            return False, "not implemented yet"
        if own:  # should never happen: every check stubs out the other TODOs
            return False, f"needs TODO {own[1]}, which is not implemented yet"
        return False, describe_crash(err, folder)
    except (Exception, SystemExit) as err:  # the copy's code crashed: say how and where
        return False, describe_crash(err, folder)
    return True, ""


def check_one_in_this_process(number, folder):
    folder = os.path.abspath(folder)
    sys.path[0] = folder  # sys.path[0] is this script's folder: put the copy under test there instead
    passed, reason = verdict(number, folder)
    print(RESULT_TAG + json.dumps({"passed": passed, "reason": reason}), flush=True)


def run_check_process(number, folder):
    command = [sys.executable, os.path.abspath(__file__), "_check_one", str(number), folder]
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    env.setdefault("OMP_NUM_THREADS", "1")  # tiny tensors: threads only cost time
    env.setdefault("MKL_NUM_THREADS", "1")
    try:
        done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=CHECK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return False, f"took longer than {CHECK_TIMEOUT_S} s (an endless loop?)"
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            result = json.loads(line[len(RESULT_TAG):])
            return result["passed"], result["reason"]
    last = (done.stderr.strip().splitlines() or ["no output"])[-1][:160]
    return False, f"the check ended without a verdict (exit code {done.returncode}): {last}"


def check(folder, only=None):
    folder = os.path.abspath(folder)
    if not os.path.isdir(folder):
        raise ExerciseError(f"{folder}: no such folder")
    missing = [f for f in ("dataset.py", "models.py", "train.py") if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise ExerciseError(f"{folder}: not a copy of the repo (no {missing[0]})")
    numbers = only or sorted(CHECKS)
    unknown = [n for n in numbers if n not in CHECKS]
    if unknown:
        raise ExerciseError(f"no TODO {unknown[0]} (there are TODOs {', '.join(map(str, sorted(CHECKS)))})")
    print(f"Checking {folder}")
    passed = 0
    for number in numbers:
        ok, reason = run_check_process(number, folder)
        passed += ok
        print(f"TODO {number}  {CHECKS[number][0]:<45} {'pass' if ok else 'fail  ' + reason}", flush=True)
    print(f"{passed}/{len(numbers)} TODOs pass")
    return 0 if passed == len(numbers) else 1


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True)
    m = commands.add_parser("make", help="write the student copy")
    m.add_argument("--out", default=os.path.join(ROOT, "student"), help="where to write it (default: student/)")
    m.add_argument("--force", action="store_true", help="write even into a non-empty folder")
    c = commands.add_parser("check", help="grade a copy, one row per TODO")
    c.add_argument("folder", nargs="?", default=ROOT, help="the copy to grade (default: this folder)")
    c.add_argument("--only", type=int, nargs="+", metavar="N", help="check only these TODOs")
    return p.parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_check_one"]:  # internal: one TODO's check, in its own process
        check_one_in_this_process(int(argv[1]), argv[2])
        return 0
    args = parse_args(argv)
    try:
        if args.command == "make":
            make(args.out, args.force)
            return 0
        return check(args.folder, args.only)
    except ExerciseError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
