"""Regenerate assets/ex1.jpg and ex2.jpg: real caption.py output on photos that ship with scikit-image.

    pip install scikit-image && python assets/make_examples.py runs/flickr8k/best.pt

ex1: astronaut.png (NASA, Eileen Collins; public domain). ex2: chelsea.png (Stefan van der Walt; CC0).
"""
import os
import subprocess
import sys
import tempfile

from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
PHOTOS = {"ex1.jpg": "astronaut.png", "ex2.jpg": "chelsea.png"}


def main():
    checkpoint = sys.argv[1] if len(sys.argv) > 1 else os.path.join("runs", "flickr8k", "best.pt")
    try:
        import skimage
    except ImportError:
        sys.exit("error: this script needs scikit-image for its sample photos: pip install scikit-image")
    photos = os.path.join(os.path.dirname(skimage.__file__), "data")
    with tempfile.TemporaryDirectory() as tmp:
        for target, photo in PHOTOS.items():
            figure = os.path.join(tmp, target.replace(".jpg", ".png"))
            subprocess.run([sys.executable, os.path.join(HERE, "..", "caption.py"), "--checkpoint", checkpoint,
                            "--img", os.path.join(photos, photo), "--beam-size", "3", "--out", figure], check=True)
            Image.open(figure).convert("RGB").save(os.path.join(HERE, target), quality=90)
            print(f"wrote {os.path.join(HERE, target)}")


if __name__ == "__main__":
    main()
