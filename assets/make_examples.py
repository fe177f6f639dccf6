"""Regenerate the README's example figures: real caption.py output of the bundled model on assets/examples/.

    python assets/make_examples.py [CHECKPOINT]      # default: the bundled model (pretrained/)

ex1-ex5 are astronaut, cat, coffee, rocket and grace_hopper (sources and licences in examples/README.md).
"""
import os
import subprocess
import sys
import tempfile

from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
PHOTOS = {"ex1.jpg": "astronaut.jpg", "ex2.jpg": "cat.jpg", "ex3.jpg": "coffee.jpg", "ex4.jpg": "rocket.jpg",
          "ex5.jpg": "grace_hopper.jpg"}


def main():
    checkpoint = sys.argv[1:2]
    with tempfile.TemporaryDirectory() as tmp:
        for target, photo in PHOTOS.items():
            figure = os.path.join(tmp, target.replace(".jpg", ".png"))
            extra = ["--checkpoint", checkpoint[0]] if checkpoint else []
            subprocess.run([sys.executable, os.path.join(HERE, "..", "caption.py"), *extra,
                            "--img", os.path.join(HERE, "examples", photo), "--beam-size", "3", "--out", figure],
                           check=True)
            Image.open(figure).convert("RGB").save(os.path.join(HERE, target), quality=88)
            print(f"wrote {os.path.join(HERE, target)}")


if __name__ == "__main__":
    main()
