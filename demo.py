"""A local web demo: drop in a photo, read its caption, and step through the words to see where the model looked.

    pip install -r requirements-demo.txt
    python demo.py [--port 8000] [--checkpoint CKPT]      # then open the address it prints

The page (demo.html) and its API run on 127.0.0.1 only, with no outside requests: no analytics, no fonts or
scripts from a CDN. The API:

    POST /api/caption   form fields: image (a file) or example (a bundled photo's name), beam_size (1-10)
                        -> {caption, words, beams: [{caption, log_prob, score}], grid, attention: [[...] per word],
                            hard, image (the photo as a data URL), seconds}
                        beams: at most beam_size finished captions, best first by score (the log-probability
                        divided by the length to the power of the model's length penalty), which ranks them
    GET  /api/examples  -> the bundled example photos' names; GET /examples/NAME -> one of them

A bad upload (not an image, a decompression bomb, too many pixels) gets {"error": "..."} with status 400,
a request over --max-upload-mb gets 413, and the server goes on serving.
"""
import argparse
import base64
import importlib.util
import io
import os
import tempfile
import threading
import time

import torch

from caption import caption_image
from checkpoints import DEFAULT_MODEL, load_checkpoint
from decoding import model_decoding
from models import load_model
from utils import (ImageLoadError, UserError, load_image, open_rgb, pick_device, port_number, positive_int,
                   run_cli)

ROOT = os.path.dirname(os.path.abspath(__file__))
EXAMPLES = os.path.join(ROOT, "assets", "examples")
PAGE = os.path.join(ROOT, "demo.html")
MAX_BEAM = 10


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=port_number, default=8000, help="port on 127.0.0.1 (0: any free port)")
    p.add_argument("--checkpoint", default=DEFAULT_MODEL, help="model file (default: the bundled model)")
    p.add_argument("--device", default="auto")
    p.add_argument("--max-upload-mb", type=positive_int, default=20, help="larger requests are refused (413)")
    return p.parse_args(argv)


class Captioner:
    """The model, loaded once; one request decodes at a time (the CPU is shared anyway)."""

    def __init__(self, checkpoint_path, device="cpu"):
        checkpoint = load_checkpoint(checkpoint_path)
        self.encoder, self.decoder = load_model(checkpoint, device)
        self.word_map = checkpoint["word_map"]
        self.config = checkpoint["config"]
        self.size = int(self.config.get("image_size", 256))
        self.lock = threading.Lock()

    def caption_file(self, path, beam_size):
        """An image file -> the API's answer (a dict). Raises ImageLoadError for a bad image."""
        start = time.time()
        image = load_image(path, self.size)  # (3, size, size) uint8, as in training
        picture = open_rgb(path, draft_size=800)
        picture.thumbnail((640, 640))
        with self.lock:
            words, alphas, grid, beams = caption_image(
                self.encoder, self.decoder, self.word_map, image, beam_size, with_beams=True,
                **model_decoding(self.config))
        rev = {v: k for k, v in self.word_map.items()}
        return {
            "caption": " ".join(words), "words": words, "grid": grid,
            "attention": [[round(float(a), 5) for a in row] for row in alphas],  # (words, grid * grid)
            "beams": [{"caption": " ".join(rev[t] for t in b["tokens"]), "log_prob": round(b["log_prob"], 3),
                       "score": round(b["score"], 3)} for b in beams],
            "hard": self.config.get("attention") == "hard", "image": data_url(picture),
            "seconds": round(time.time() - start, 3),
        }


def data_url(picture):
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def example_names():
    if not os.path.isdir(EXAMPLES):
        return []
    return sorted(n for n in os.listdir(EXAMPLES) if n.lower().endswith((".jpg", ".jpeg", ".png")))


def beam_size_from(form):
    text = form.get("beam_size", "3")
    try:
        beam = int(text)
    except ValueError:
        beam = 0
    if not 1 <= beam <= MAX_BEAM:
        raise ValueError(f"beam size must be a whole number from 1 to {MAX_BEAM}, not {text!r}")
    return beam


def create_app(captioner, max_upload_mb=20):
    """The Flask app: the page, the examples and the caption API around one Captioner."""
    from flask import Flask, jsonify, request, send_file
    from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

    app = Flask(__name__, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = max_upload_mb * 2**20  # Flask answers 413 to anything larger

    @app.get("/")
    def page():
        return send_file(PAGE, mimetype="text/html")

    @app.get("/api/examples")
    def examples():
        return jsonify(example_names())

    @app.get("/examples/<name>")
    def example(name):
        if name not in example_names():  # only the listed files: no path ever reaches the disk from a request
            return jsonify(error=f"no example photo called {name!r}"), 404
        return send_file(os.path.join(EXAMPLES, name))

    @app.get("/health")
    def health():
        return jsonify(status="ok")

    @app.post("/api/caption")
    def caption_api():
        try:
            beam = beam_size_from(request.form)
        except ValueError as err:
            return jsonify(error=str(err)), 400
        if request.form.get("example"):
            name = request.form["example"]
            if name not in example_names():
                return jsonify(error=f"no example photo called {name!r}"), 400
            return answer(os.path.join(EXAMPLES, name), name, beam)
        upload = request.files.get("image")
        if upload is None or not upload.filename:
            return jsonify(error="no photo in the request: send it as the form field 'image'"), 400
        with tempfile.TemporaryDirectory() as folder:  # Pillow reads a file: the upload goes to a private one
            path = os.path.join(folder, "upload")
            upload.save(path)
            return answer(path, upload.filename, beam)

    def answer(path, shown_name, beam):
        try:
            return jsonify(captioner.caption_file(path, beam))
        except ImageLoadError as err:  # the message names our temporary file: name the user's instead
            return jsonify(error=str(err).replace(path, shown_name)), 400

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(_):
        return jsonify(error=f"the upload is larger than {max_upload_mb} MB: send a smaller photo"), 413

    @app.errorhandler(HTTPException)
    def http_error(err):
        return jsonify(error=f"{err.code} {err.name}"), err.code

    @app.errorhandler(Exception)
    def unexpected(err):  # one failed request must not stop the demo
        app.logger.exception("request failed")
        return jsonify(error=f"the server failed on this request ({type(err).__name__}); try another photo"), 500

    return app


def make_server(app, port):
    """A werkzeug server on 127.0.0.1 (never another address), threaded; port 0 picks a free one."""
    from werkzeug.serving import make_server as werkzeug_server

    return werkzeug_server("127.0.0.1", port, app, threaded=True)


def main(argv=None):
    args = parse_args(argv)
    if importlib.util.find_spec("flask") is None:
        raise UserError("the demo needs Flask: pip install -r requirements-demo.txt")
    torch.set_grad_enabled(False)
    captioner = Captioner(args.checkpoint, pick_device(args.device))
    try:
        server = make_server(create_app(captioner, args.max_upload_mb), args.port)
    except OSError as err:
        raise UserError(f"cannot listen on 127.0.0.1:{args.port} ({err.strerror or err}); try --port 0") from None
    print(f"demo running at http://127.0.0.1:{server.server_port}/  (Ctrl-C stops it)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped")
    return 0


if __name__ == "__main__":
    run_cli(main)
