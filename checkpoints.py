"""Checkpoints: the one format, and what a training run saves, restores and repairs.

A checkpoint holds only tensors and plain types (state dicts, the config, the word map, the history), so
torch.load(weights_only=True) loads it and no pickled code ever runs. train.py writes last.pt every epoch
and best.pt when VAL improves; eval.py, caption.py and --resume read them back.
"""
import io
import json
import os
import pickle
import random
import re
import zipfile

import torch

from decoding import model_decoding
from figures import plot_curves
from utils import UserError, atomic_path, disk_errors


CHECKPOINT_FORMAT = "show-attend-tell/1"


def save_checkpoint(path, state):
    state = dict(state, format=CHECKPOINT_FORMAT)
    buffer = io.BytesIO()
    torch.save(state, buffer)  # in memory first: on a full disk torch.save's own writer fails with "unexpected pos"
    with disk_errors(path, "(the previous file there, if any, is intact)"), atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(buffer.getbuffer())


MODEL_KEYS = ("config", "word_map", "decoder")  # what eval.py and caption.py need (and "encoder", or see below)
RESUME_KEYS = ("encoder", "epoch", "phase", "select_on", "best_score", "epochs_since_improvement", "history", "rng",
               "decoder_optimizer", "encoder_optimizer", "scaler")  # what --resume needs beyond the model


def load_checkpoint(path, required=MODEL_KEYS):
    """Load a checkpoint written by save_checkpoint onto the CPU; UserError if it is anything else,
    or if it lacks one of the `required` keys."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's own message suggests weights_only=False, which could run code
        raise UserError(f"{path}: not a checkpoint of this project (not a torch.save file of tensors and plain "
                        "types only; anything else is refused, since loading it could run code.)") from None
    except (zipfile.BadZipFile, RuntimeError, EOFError, OSError, ValueError) as err:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()  # torch marks words bold for terminals
        first = text.splitlines()[0].strip() if text else type(err).__name__  # the whole sentence, not cut
        raise UserError(f"{path}: not a checkpoint of this project ({first})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path}: not a checkpoint of this project (no '{CHECKPOINT_FORMAT}' format tag)")
    for key in required:
        if key not in state:
            raise UserError(f"{path}: incomplete checkpoint: it has no '{key}' entry (was it written by another "
                            "tool, or edited by hand?)")
    return state


# The bundled pretrained model (export.py writes it): caption.py, eval.py and demo.py use it by default
DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrained", "flickr8k_lite2_scst.pt")


def export_inference(checkpoint, encoder_digest, dtype=torch.float16):
    """A trained checkpoint -> an inference-only one: the decoder's weights in `dtype`, the config, the word
    map, and no encoder weights: the encoder is rebuilt from its pip package, whose weights must hash to
    `encoder_digest` (models.Encoder.weights_digest), checked when the model is loaded."""
    decoder = {k: v.to(dtype) if v.is_floating_point() else v for k, v in checkpoint["decoder"].items()}
    config = dict(checkpoint["config"], pretrained=True)
    keep = ("data_folder", "data_name", "epoch", "best_score", "select_on", "history")
    return {"config": config, "word_map": checkpoint["word_map"], "decoder": decoder,
            "encoder_digest": encoder_digest, "inference_only": True, **{k: checkpoint[k] for k in keep if k in checkpoint}}


def rng_state():
    """The torch, CUDA and Python random states: resuming from them continues the same random stream."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))  # weights_only loading turns its tuples into lists
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(i) for i in x) if isinstance(x, (list, tuple)) else x


# ---------------------------------------------------------------------------
# A training run's checkpoints
# ---------------------------------------------------------------------------


def checkpoint_state(run, epoch):
    """Plain types and tensors only; the raw modules' weights, so the keys are the same under torchrun."""
    return {
        "config": run.config, "word_map": run.word_map, "epoch": epoch,
        "encoder": run.encoder.state_dict(), "decoder": run.decoder.state_dict(),
        "decoder_optimizer": run.decoder_opt.state_dict(),
        "encoder_optimizer": run.encoder_opt.state_dict() if run.encoder_opt else None,
        "scaler": run.scaler.state_dict(), "phase": run.phase, "select_on": run.select_on,
        "best_score": run.best_score, "best_epoch": run.best_epoch,
        "epochs_since_improvement": run.epochs_since_improvement, "history": run.history,
        "rng": rng_state(), "data_folder": run.data_folder, "data_name": run.data_name,
        "args": {k: v for k, v in vars(run.args).items() if isinstance(v, (int, float, str, bool, type(None)))},
        "hard_baseline": run.hard_baseline.state_dict() if run.hard_baseline is not None else None,
    }


def same_selection_decoding(old_config, new_config):
    """Do two configs score VAL with the same decoding rules: SCST's constraints (--scst), the length penalty and
    the trigram rule (train.py --length-penalty, --block-trigrams)? If not, their best scores cannot be compared."""
    return model_decoding(old_config) == model_decoding(new_config)


def restore_training_state(run, checkpoint):
    same_phase = checkpoint["phase"] == run.phase
    if same_phase:  # a new phase (frozen -> fine-tuning -> SCST) starts with fresh optimisers
        run.decoder_opt.load_state_dict(checkpoint["decoder_optimizer"])
        if run.encoder_opt is not None:
            run.encoder_opt.load_state_dict(checkpoint["encoder_optimizer"])
        run.scaler.load_state_dict(checkpoint["scaler"])
    run.start_epoch = checkpoint["epoch"] + 1
    # a new selection metric (BLEU-4 -> CIDEr for SCST) or new decoding rules (SCST's constraints, a length penalty,
    # the trigram rule) start a new "best": the old score was measured another way
    if checkpoint["select_on"] == run.select_on and same_selection_decoding(checkpoint["config"], run.config):
        run.best_score, run.best_epoch = checkpoint["best_score"], checkpoint.get("best_epoch", -1)
    run.epochs_since_improvement = checkpoint["epochs_since_improvement"] if same_phase else 0
    run.history = list(checkpoint["history"])
    if run.hard_baseline is not None and checkpoint.get("hard_baseline"):
        run.hard_baseline.load_state_dict(checkpoint["hard_baseline"])


def write_logs(out_dir, history):
    with atomic_path(os.path.join(out_dir, "log.jsonl")) as tmp, open(tmp, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in history)
    plot_curves(history, os.path.join(out_dir, "curves.png"))


def save_epoch(run, state):
    """last.pt first: it records which epoch is best, so a crash before best.pt is written is repaired on resume."""
    save_checkpoint(os.path.join(run.out_dir, "last.pt"), state)
    if state["best_epoch"] == state["epoch"]:
        save_checkpoint(os.path.join(run.out_dir, "best.pt"), state)
    with disk_errors(run.out_dir):
        write_logs(run.out_dir, run.history)


def resumes_in_its_own_folder(run):
    """Does --resume continue a checkpoint of --out-dir itself (not start a new phase in a new folder)?"""
    return os.path.abspath(os.path.dirname(run.args.resume)) == os.path.abspath(run.out_dir)


def repair_best(run, last):
    """Resuming this folder's last.pt: if it is the best epoch but best.pt is missing or older (a crash
    between the two saves), write best.pt again; rewrite the log to match last.pt's history."""
    if not resumes_in_its_own_folder(run):
        return  # a new phase in a new folder: that folder's best.pt is its own
    best_path = os.path.join(run.out_dir, "best.pt")
    if last.get("best_epoch") == last["epoch"]:
        try:
            best_epoch = load_checkpoint(best_path)["epoch"] if os.path.exists(best_path) else None
        except UserError:  # unreadable: written again below
            best_epoch = None
        if best_epoch != last["epoch"]:
            print(f"note: {best_path} was not the best epoch ({last['epoch']}) that last.pt records: written again")
            save_checkpoint(best_path, last)
    with disk_errors(run.out_dir):
        write_logs(run.out_dir, run.history)
