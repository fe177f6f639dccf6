"""The built-in synthetic "shapes" dataset: coloured shapes on a 3x3 grid, with template captions,
and the preset of the demo run that `python train.py` makes on it.

It writes PNG images and a Karpathy-format JSON (plus each object's bounding box), so that
create_input_files.py prepares it by exactly the same path as Flickr8k or COCO.
Everything is drawn from one seed, so the same seed gives the same files.
"""
import json
import os

import numpy as np
from PIL import Image, ImageDraw

from utils import data_base_name, write_json

CANVAS = 160  # pixels; the prepared images are resized to --image-size anyway
GRID = 3  # objects sit in the cells of a GRID x GRID layout
SHAPES = ("circle", "square", "triangle", "diamond")
COLORS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 70, 230),
          "yellow": (240, 210, 20), "purple": (150, 40, 190)}
SIZES = {"small": 0.55, "large": 0.85}  # fraction of a grid cell
BACKGROUNDS = ("plain", "striped", "speckled")
POSITIONS = (("top left", "top", "top right"), ("left", "middle", "right"),
             ("bottom left", "bottom", "bottom right"))


def _background(kind, rng):
    base = rng.integers(90, 170)
    img = np.full((CANVAS, CANVAS, 3), base, dtype=np.int16)
    if kind == "striped":
        period = int(rng.integers(6, 14))
        stripes = (np.arange(CANVAS) // (period // 2)) % 2 == 0
        img[stripes, :, :] += 25
    elif kind == "speckled":
        img += rng.integers(-30, 31, size=(CANVAS, CANVAS, 1))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _draw(draw, shape, box, color):
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=color)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=color)


def _random_objects(rng):
    """1-3 objects in distinct cells, with distinct shape nouns (so a noun names one object)."""
    n = int(rng.integers(1, 4))
    cells = rng.choice(GRID * GRID, size=n, replace=False)
    shapes = rng.choice(len(SHAPES), size=n, replace=False)
    cell_size = CANVAS / GRID
    objects = []
    for cell, shape in sorted(zip(cells, shapes)):  # reading order: top to bottom, left to right
        row, col = divmod(int(cell), GRID)
        size = str(rng.choice(list(SIZES)))
        side = SIZES[size] * cell_size
        cx, cy = (col + 0.5) * cell_size, (row + 0.5) * cell_size
        box = [round(cx - side / 2), round(cy - side / 2), round(cx + side / 2), round(cy + side / 2)]
        objects.append({"shape": SHAPES[shape], "color": str(rng.choice(list(COLORS))), "size": size,
                        "row": row, "col": col, "bbox": box})
    return objects


def _phrase(obj):
    return f"a {obj['size']} {obj['color']} {obj['shape']}"


def captions_for(objects, background):
    """Five template captions for one image."""
    if len(objects) == 1:
        a = objects[0]
        where = POSITIONS[a["row"]][a["col"]]
        return [_phrase(a), f"{_phrase(a)} in the {where}", f"there is {_phrase(a)} in the {where}",
                f"one {a['color']} {a['shape']}", f"{_phrase(a)} on a {background} background"]
    if len(objects) == 2:
        a, b = objects
        if a["row"] < b["row"]:
            forward, backward = "above", "below"
        else:
            forward, backward = "to the left of", "to the right of"
        return [f"{_phrase(a)} {forward} {_phrase(b)}", f"{_phrase(b)} {backward} {_phrase(a)}",
                f"{_phrase(a)} and {_phrase(b)}", f"two shapes {_phrase(a)} and {_phrase(b)}",
                f"{_phrase(a)} and {_phrase(b)} on a {background} background"]
    a, b, c = objects
    listing = f"{_phrase(a)} {_phrase(b)} and {_phrase(c)}"
    return [listing, f"three shapes {listing}", f"{listing} on a {background} background",
            f"{_phrase(c)} {_phrase(b)} and {_phrase(a)}", f"three shapes on a {background} background"]


def generate(folder, sizes=(1500, 250, 250), seed=0):
    """Draw the set into `folder`; return the path of its Karpathy-format JSON."""
    rng = np.random.default_rng(seed)
    image_dir = os.path.join(folder, "images")
    os.makedirs(image_dir, exist_ok=True)
    images = []
    for split, count in zip(("train", "val", "test"), sizes):
        for _ in range(count):
            imgid = len(images)
            background = str(rng.choice(BACKGROUNDS))
            objects = _random_objects(rng)
            canvas = _background(background, rng)
            draw = ImageDraw.Draw(canvas)
            for obj in objects:
                _draw(draw, obj["shape"], obj["bbox"], COLORS[obj["color"]])
            filename = f"shapes_{imgid:05d}.png"
            canvas.save(os.path.join(image_dir, filename))
            sentences = [{"tokens": c.split(), "raw": c} for c in captions_for(objects, background)]
            images.append({"filename": filename, "filepath": "images", "imgid": imgid, "split": split,
                           "sentences": sentences, "objects": objects, "background": background,
                           "width": CANVAS, "height": CANVAS})
    path = os.path.join(folder, "dataset_shapes.json")
    write_json(path, {"dataset": "shapes", "seed": seed, "images": images})
    return path


def load_boxes(json_path):
    """{file_name: [object, ...]} with boxes in [0, 1] image coordinates."""
    with open(json_path) as f:
        data = json.load(f)
    boxes = {}
    for img in data["images"]:
        w, h = img["width"], img["height"]
        objs = [dict(o, bbox=[o["bbox"][0] / w, o["bbox"][1] / h, o["bbox"][2] / w, o["bbox"][3] / h])
                for o in img["objects"]]
        boxes[os.path.join(img["filepath"], img["filename"])] = objs
    return boxes


# ---------------------------------------------------------------------------
# The demo run: what `python train.py` does with no --data-folder
# ---------------------------------------------------------------------------

# A CPU-sized run on the built-in shapes set. These replace train.py's
# defaults; options typed on the command line still win. Stride-16 features (14 x 14 at 224 px) keep
# attention on the object being named; the doubly stochastic term is off because it pushes attention away
# from an object once it has been looked at.
PRESET = {"data_folder": os.path.join("data", "shapes"), "encoder": "efficientnet_lite0", "feature_stride": 16,
          "encoded_size": 0, "emb_dim": 128, "attention_dim": 128, "decoder_dim": 256, "dropout": 0.2,
          "epochs": 12, "batch_size": 32, "decoder_lr": 2e-3, "alpha_c": 0.0, "val_beam_size": 1,
          "out_dir": os.path.join("runs", "shapes")}
IMAGE_SIZE = 224  # the prepared images' side


def prepare_demo_data(data_folder, rank):
    """Prepare data/shapes once (on rank 0). Returns the prepared files' base name."""
    name = data_base_name("shapes", 5, 5)
    if not os.path.exists(os.path.join(data_folder, f"WORDMAP_{name}.json")) and rank == 0:
        print(f"No prepared data in {data_folder}: preparing the built-in shapes set first.")
        import create_input_files

        create_input_files.prepare(create_input_files.parse_args(
            ["--dataset", "shapes", "--output-folder", data_folder, "--image-size", str(IMAGE_SIZE),
             "--image-folder", os.path.join("data", "shapes_raw")]))
    return name


def finish_demo(run):
    """Evaluate the best shapes model on TEST and say what to try next."""
    from eval import evaluate

    best = os.path.join(run.out_dir, "best.pt")
    evaluate(best, run.data_folder, run.data_name, "TEST", [run.args.test_beam_size], batch_size=64,
             device=run.device, out=os.path.join(run.out_dir, "test_results.json"))
    example = os.path.join("data", "shapes_raw", "images", "shapes_01750.png")
    print(f"\nNext, caption an image and draw its attention:\n  python caption.py --checkpoint {best} "
          f"--img {example} --out attention.png")
