"""caption.py: one attention panel per word, figures for every good image, one line for each bad one."""
import os
import subprocess
import sys

import numpy as np
import torch
from PIL import Image


def test_attention_figure_has_one_panel_per_word():
    import figures

    alphas = np.random.rand(4, 9).astype(np.float32)
    fig = figures.attention_figure(Image.new("RGB", (80, 60), (100, 50, 0)), ["a", "red", "square", "here"], alphas, 3)
    titled = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titled == ["a", "red", "square", "here"]


def test_caption_cli_writes_figures_and_survives_bad_images(tiny_checkpoint, prepared, tmp_path, repo_root):
    raw = os.path.join(os.path.dirname(prepared[0]), "raw", "imgs")
    good = os.path.join(raw, "img000.jpg")
    rgba = tmp_path / "photo.png"
    Image.new("RGBA", (90, 50), (0, 200, 0, 128)).save(rgba)
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("hello")
    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(bomb)  # 400 M pixels in a few kB: Pillow's guard refuses it
    figs = tmp_path / "figs"
    result = subprocess.run(
        [sys.executable, "caption.py", "--checkpoint", tiny_checkpoint, "--beam-size", "3", "--out", str(figs),
         "--img", good, str(tmp_path / "missing.jpg"), str(not_image), str(bomb), str(rgba)],
        cwd=repo_root, capture_output=True, text=True)
    assert result.returncode == 2
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 3 and all(line.startswith("error: ") for line in errors)
    assert "no such file" in errors[0] and "not an image" in errors[1] and "decompression bomb" in errors[2]
    assert "Traceback" not in result.stderr
    assert sorted(os.listdir(figs)) == ["img000.png", "photo.png"]  # the good ones were still captioned
    assert result.stdout.count(": ") >= 2


def test_caption_cli_single_png_and_foreign_checkpoint(tiny_checkpoint, prepared, tmp_path, repo_root):
    raw = os.path.join(os.path.dirname(prepared[0]), "raw", "imgs", "img001.jpg")
    out = tmp_path / "one.png"
    ok = subprocess.run([sys.executable, "caption.py", "--checkpoint", tiny_checkpoint, "--img", raw, "--out", str(out)],
                        cwd=repo_root, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size[0] > 100
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(3)}}, foreign)
    bad = subprocess.run([sys.executable, "caption.py", "--checkpoint", str(foreign), "--img", raw],
                         cwd=repo_root, capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "not a checkpoint of this project" in bad.stderr
