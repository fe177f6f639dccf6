"""Small helpers shared by every script: errors, atomic files, tokens, images, checkpoints."""
import contextlib
import json
import os
import re
import resource
import sys
import tempfile
import warnings

import numpy as np
from tqdm import tqdm

# ---------------------------------------------------------------------------
# Errors: user mistakes end in one line and an exit code, never a traceback.
# ---------------------------------------------------------------------------


class UserError(Exception):
    """A problem the user can fix (bad path, bad file, missing weights). Exit code 2."""

    exit_code = 2


class TrainingDiverged(UserError):
    """The loss became inf or NaN: exit code 1, and the last good checkpoint is kept."""

    exit_code = 1


def run_cli(main):
    """Run `main()`; turn UserError and Ctrl-C into one line on stderr and an exit code."""
    try:
        code = main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        print("interrupted: nothing half-written was left behind", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


# ---------------------------------------------------------------------------
# Atomic files: write to a temporary name in the same folder, then rename.
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_path(final_path):
    """Yield a temporary path next to `final_path`; rename it into place only on success."""
    folder = os.path.dirname(os.path.abspath(final_path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(final_path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
    try:
        yield tmp
        os.replace(tmp, final_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj):
    """Write JSON atomically (a crash never leaves a truncated file)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f)


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None


# ---------------------------------------------------------------------------
# Words: one tokenizer and one word-map layout (the sgrvinod tutorial's).
# ---------------------------------------------------------------------------

PAD, UNK, START, END = "<pad>", "<unk>", "<start>", "<end>"
_TOKEN_RE = re.compile(r"[a-z0-9]+")


def tokenize(text):
    """Lower-case and split on anything outside [a-z0-9], like the Karpathy split files."""
    return _TOKEN_RE.findall(text.lower())


def data_base_name(dataset, captions_per_image, min_word_freq):
    return f"{dataset}_{captions_per_image}_cap_per_img_{min_word_freq}_min_word_freq"


def special_ids(word_map):
    return {name: word_map[tok] for name, tok in (("pad", PAD), ("unk", UNK), ("start", START), ("end", END))}


def decode_tokens(ids, rev_word_map, word_map):
    """Word ids -> words, dropping <start>, <end> and <pad>."""
    skip = {word_map[START], word_map[END], word_map[PAD]}
    return [rev_word_map[i] for i in ids if i not in skip]


# ---------------------------------------------------------------------------
# Images: the one preprocessing path used by preparation, caption.py and tests.
# ---------------------------------------------------------------------------


class ImageLoadError(UserError):
    pass


def _to_rgb(img):
    """Any Pillow mode (L, LA, P, RGBA, CMYK, I;16, I, F, 1) -> 8-bit RGB."""
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")  # keeps palette transparency
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def open_rgb(path, draft_size=None):
    """Open any image file as an upright 8-bit RGB Pillow image. Raises ImageLoadError with a reason.

    draft_size lets JPEGs decode at a reduced scale (much faster for large photos)."""
    from PIL import Image, ImageOps

    if not os.path.exists(path):
        raise ImageLoadError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ImageLoadError(f"{path}: is a folder, not an image")
    try:
        with warnings.catch_warnings():
            # Pillow warns above MAX_IMAGE_PIXELS and raises above twice that; refuse both.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if draft_size:
                    img.draft("RGB", (draft_size, draft_size))
                img = ImageOps.exif_transpose(img)
                return _to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageLoadError(f"{path}: refused as a possible decompression bomb ({err})") from None
    except Image.UnidentifiedImageError:
        raise ImageLoadError(f"{path}: not an image file") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageLoadError(f"{path}: unreadable image ({err})") from None


def load_image(path, size):
    """Read any image file as a (3, size, size) uint8 array: the one preprocessing path of
    preparation and caption.py (squashed to a square, as the prepared HDF5 images are)."""
    from PIL import Image

    img = open_rgb(path, draft_size=size)
    try:
        arr = np.asarray(img.resize((size, size), Image.BICUBIC), dtype=np.uint8)  # (size, size, 3)
    except (OSError, ValueError) as err:  # truncated data can surface only when pixels are read
        raise ImageLoadError(f"{path}: unreadable image ({err})") from None
    return arr.transpose(2, 0, 1).copy()  # (3, size, size)


# ---------------------------------------------------------------------------
# Checkpoints: tensors and plain types only, so torch.load(weights_only=True) works.
# ---------------------------------------------------------------------------

CHECKPOINT_FORMAT = "show-attend-tell/1"


def save_checkpoint(path, state):
    import torch

    state = dict(state, format=CHECKPOINT_FORMAT)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path):
    """Load a checkpoint written by save_checkpoint onto the CPU; UserError if it is anything else."""
    import pickle
    import zipfile

    import torch

    if not os.path.isfile(path):
        raise UserError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path}: not a checkpoint of this project ({first[:150]})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path}: not a checkpoint of this project (no '{CHECKPOINT_FORMAT}' format tag)")
    return state


# ---------------------------------------------------------------------------
# Odds and ends
# ---------------------------------------------------------------------------


def pick_device(name="auto"):
    import torch

    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def progress(iterable=None, **options):
    """A tqdm bar. Written to a log file or CI rather than a terminal, it redraws every 30 s instead of
    several times a second, so the log stays a readable trace rather than megabytes of bars."""
    stream = options.get("file") or sys.stderr
    if not (hasattr(stream, "isatty") and stream.isatty()):
        options.setdefault("mininterval", 30)
    return tqdm(iterable, dynamic_ncols=True, **options)


def peak_rss_mb():
    """Peak resident memory of this process and its finished children, in MiB (Linux units)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024.0


class AverageMeter:
    """Running weighted mean."""

    def __init__(self):
        self.sum, self.count = 0.0, 0

    def update(self, value, n=1):
        self.sum += float(value) * n
        self.count += n

    @property
    def avg(self):
        return self.sum / max(self.count, 1)
