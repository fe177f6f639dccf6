"""The built-in shapes set: deterministic by seed, true boxes, captions that name what is drawn."""
import json
import os

import numpy as np
from PIL import Image

import shapes


def _generate(folder, seed):
    path = shapes.generate(str(folder), sizes=(12, 3, 3), seed=seed)
    data = json.load(open(path))
    images = {img["filename"]: open(os.path.join(folder, "images", img["filename"]), "rb").read()
              for img in data["images"]}
    return data, images


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    first, first_images = _generate(tmp_path / "a", seed=3)
    again, again_images = _generate(tmp_path / "b", seed=3)
    other, other_images = _generate(tmp_path / "c", seed=4)
    assert first == again and first_images == again_images
    assert first["images"] != other["images"]
    assert [img["split"] for img in first["images"]] == ["train"] * 12 + ["val"] * 3 + ["test"] * 3


def test_boxes_hold_their_shapes_and_captions_name_them(tmp_path):
    data, _ = _generate(tmp_path, seed=0)
    for img in data["images"]:
        pixels = np.asarray(Image.open(tmp_path / "images" / img["filename"]).convert("RGB")).astype(int)
        nouns = [o["shape"] for o in img["objects"]]
        assert 1 <= len(nouns) <= 3 and len(set(nouns)) == len(nouns)  # a noun names one object
        for obj in img["objects"]:
            x0, y0, x1, y1 = obj["bbox"]
            color = np.array(shapes.COLORS[obj["color"]])
            matches = (np.abs(pixels - color).sum(axis=2) == 0)  # (H, W): pixels of exactly this colour
            inside = matches[y0 : y1 + 1, x0 : x1 + 1].sum()
            assert inside > 0.3 * (x1 - x0) * (y1 - y0)  # the shape fills a good part of its box
        captions = [" ".join(s["tokens"]) for s in img["sentences"]]
        assert len(captions) == 5
        phrase = f"{img['objects'][0]['size']} {img['objects'][0]['color']} {img['objects'][0]['shape']}"
        assert phrase in captions[0]  # the first caption names the first object fully
        if len(nouns) == 2:
            a, b = img["objects"]
            relation = "above" if a["row"] < b["row"] else "to the left of"
            assert relation in captions[0]


def test_load_boxes_normalises_to_unit_square(tmp_path):
    path = shapes.generate(str(tmp_path), sizes=(2, 1, 1), seed=1)
    boxes = shapes.load_boxes(path)
    assert len(boxes) == 4
    for objects in boxes.values():
        for obj in objects:
            assert all(0.0 <= v <= 1.0 for v in obj["bbox"])
