"""Figures saved as PNG files (never shown on screen): caption.py's attention panels, and training curves."""
import numpy as np
import torch

from utils import atomic_path


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, so figures work without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path, dpi=100):
    """Write `fig` to `path` as a PNG, atomically (a crash never leaves half a PNG), and free it."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        pyplot().close(fig)


# ---------------------------------------------------------------------------
# Attention: one panel per word
# ---------------------------------------------------------------------------


def smooth_attention(alpha, grid, height, width):
    """(num_pixels,) attention -> (height, width) map in [0, 1]: upsampled smoothly, then stretched so that
    this step's least-attended place is 0 and its most-attended place is 1 (each word's map on its own scale:
    a 7x7 softmax rarely puts more than a few percent on one cell, which on a common scale looks like fog)."""
    a = torch.from_numpy(alpha).float().view(1, 1, grid, grid)  # (1, 1, grid, grid)
    a = torch.nn.functional.interpolate(a, size=(height, width), mode="bicubic", align_corners=False)[0, 0]  # (H, W)
    low, high = a.min(), a.max()
    return ((a - low) / (high - low).clamp(min=1e-12)).clamp(0, 1).numpy()  # (H, W) in [0, 1]


def highlight(pic, att):
    """pic (H, W, 3) in [0, 1], att (H, W) in [0, 1] -> the picture dark where the word did not look and
    lit, slightly whitened, where it did (the style of the paper's Figure 3)."""
    weight = att[..., None] ** 2  # (H, W, 1): squared so that only the strongly attended region lights up
    lit = pic * (0.12 + 0.88 * weight) + 0.3 * weight  # dim everything, then add a white glow on the region
    return np.clip(lit, 0.0, 1.0)  # (H, W, 3)


def hard_attention_cell(pic, cell, grid):
    """pic (H, W, 3) in [0, 1] -> the picture dimmed except the one grid cell hard attention chose."""
    h, w = pic.shape[:2]
    row, col = divmod(int(cell), grid)
    top, bottom = round(row * h / grid), round((row + 1) * h / grid)
    left, right = round(col * w / grid), round((col + 1) * w / grid)
    shown = pic * 0.18  # (H, W, 3)
    shown[top:bottom, left:right] = np.clip(pic[top:bottom, left:right] * 1.0 + 0.15, 0, 1)
    return shown, (left, top, right - left, bottom - top)


def attention_figure(picture, words, alphas, grid, columns=5, hard=False):
    """One panel per generated word. Soft attention: the picture lit where that word's attention was.
    hard=True: the one grid cell the model chose at that step (its most likely location), outlined."""
    plt = pyplot()
    pic = np.asarray(picture, dtype=np.float32) / 255.0  # (H, W, 3)
    h, w = pic.shape[:2]
    n = max(len(words), 1)
    rows = (n + columns - 1) // columns
    cols = min(columns, n)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, rows * (2.6 * h / w + 0.45) + 0.5), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, word in enumerate(words):
        ax = axes.flat[i]
        if hard:
            shown, (x, y, cw, ch) = hard_attention_cell(pic, int(np.argmax(alphas[i])), grid)
            ax.imshow(shown)
            ax.add_patch(plt.Rectangle((x - 0.5, y - 0.5), cw, ch, fill=False, edgecolor="#ffd400", linewidth=2))
        else:
            att = smooth_attention(alphas[i], grid, h, w)  # (H, W)
            ax.imshow(highlight(pic, att))
        ax.set_title(word, fontsize=13)
    fig.suptitle(" ".join(words), fontsize=14)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------
# Training curves
# ---------------------------------------------------------------------------


def plot_curves(history, path):
    """Loss, top-5 accuracy, BLEU-4 and CIDEr per epoch (and the SCST reward), side by side, as a PNG."""
    plt = pyplot()
    epochs = [h["epoch"] for h in history]
    xe = [h for h in history if "reward" not in h]  # cross-entropy epochs (SCST epochs log a reward instead)
    scst = [h for h in history if "reward" in h]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    axes[0].plot([h["epoch"] for h in xe], [h["loss"] for h in xe], "o-", label="train")
    axes[0].plot(epochs, [h["val_loss"] for h in history], "o-", label="val")
    axes[0].set_title("cross-entropy loss")
    axes[1].plot([h["epoch"] for h in xe], [h["top5"] for h in xe], "o-", label="train")
    axes[1].plot(epochs, [h["val_top5"] for h in history], "o-", label="val")
    axes[1].set_title("top-5 accuracy (%)")
    axes[2].plot(epochs, [h.get("val_Bleu_4", 0) for h in history], "o-", color="C2", label="val BLEU-4")
    axes[2].set_title("free-running decoding")
    cider = axes[2].twinx()
    cider.plot(epochs, [h.get("val_CIDEr", 0) for h in history], "s-", color="C3", label="val CIDEr (right)")
    if scst:
        cider.plot([h["epoch"] for h in scst], [h["reward"] for h in scst], "--", color="C4",
                   label="SCST train reward (right)")
        for ax in axes:
            ax.axvline(scst[0]["epoch"] - 0.5, color="grey", linestyle=":", linewidth=1)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[1].legend()
    lines = axes[2].get_legend_handles_labels()
    more = cider.get_legend_handles_labels()
    axes[2].legend(lines[0] + more[0], lines[1] + more[1], fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
