"""The one metrics function: coco-caption scores (pycocoevalcap's scorers, called one by one).

COCOEvalCap.evaluate() runs SPICE too, which downloads Stanford CoreNLP on first use, so it fails
offline; here each scorer runs on its own and anything that cannot run is skipped with one line.
"""
import contextlib
import os
import re
import shutil
import sys

ALL_METRICS = ("Bleu", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
SCORE_NAMES = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
# what coco-caption's PTB tokenizer strips after tokenising
_PUNCT = {"''", "'", "``", "`", "-lrb-", "-rrb-", "-lcb-", "-rcb-", ".", "?", "!", ",", ":", "-", "--", "...", ";"}
_FALLBACK_RE = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]+")


def java_available():
    return shutil.which("java") is not None


def _note(message, quiet):
    if not quiet:
        print(message, file=sys.stderr)


def fallback_tokenize(captions):
    """Pure-Python stand-in for the PTB tokenizer: lower-case, split words from punctuation,
    drop coco-caption's punctuation list. {id: [str]} -> {id: [str]}."""
    out = {}
    for key, sentences in captions.items():
        out[key] = [" ".join(t for t in _FALLBACK_RE.findall(s.lower()) if t not in _PUNCT) for s in sentences]
    return out


@contextlib.contextmanager
def _quiet_stderr():
    """Silence the Java tools' progress lines, which they write straight to file descriptor 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def ptb_tokenize(captions):
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    with _quiet_stderr():
        return PTBTokenizer().tokenize({k: [{"caption": s} for s in v] for k, v in captions.items()})


def _spice_ready():
    import pycocoevalcap.spice as spice

    jar = os.path.join(os.path.dirname(spice.__file__), "lib", "stanford-corenlp-3.6.0.jar")
    return os.path.exists(jar)


def score_captions(references, hypotheses, metrics=ALL_METRICS, quiet=False):
    """Corpus scores with coco-caption's definitions and names.

    references: {image_id: [reference sentence, ...]}; hypotheses: {image_id: sentence}.
    Returns {"Bleu_1": ..., "Bleu_4": ..., "METEOR": ..., "ROUGE_L": ..., "CIDEr": ..., "SPICE": ...},
    leaving out what was skipped (each skip prints one line on stderr unless quiet).
    """
    if set(references) != set(hypotheses):
        raise ValueError("references and hypotheses must cover the same image ids")
    if not hypotheses:
        return {}
    java = java_available()
    hyps = {k: [v] for k, v in hypotheses.items()}
    if java:
        gts, res = ptb_tokenize(references), ptb_tokenize(hyps)
    else:
        _note("note: no Java found: using a pure-Python tokenizer instead of the PTB tokenizer; METEOR skipped", quiet)
        gts, res = fallback_tokenize(references), fallback_tokenize(hyps)

    scores = {}
    if "Bleu" in metrics:
        from pycocoevalcap.bleu.bleu import Bleu

        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        scores.update({f"Bleu_{n}": float(b) for n, b in enumerate(bleu, 1)})
    if "METEOR" in metrics and java:
        from pycocoevalcap.meteor.meteor import Meteor

        scores["METEOR"] = float(Meteor().compute_score(gts, res)[0])
    if "ROUGE_L" in metrics:
        from pycocoevalcap.rouge.rouge import Rouge

        scores["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    if "CIDEr" in metrics:
        from pycocoevalcap.cider.cider import Cider

        scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    if "SPICE" in metrics:
        if java and _spice_ready():
            from pycocoevalcap.spice.spice import Spice

            scores["SPICE"] = float(Spice().compute_score(gts, res)[0])
        else:
            why = "no Java" if not java else "it needs Stanford CoreNLP 3.6.0, which it downloads on first use"
            _note(f"note: SPICE skipped ({why})", quiet)
    return scores
