"""The one metrics function: coco-caption scores (pycocoevalcap's scorers, called one by one).

COCOEvalCap.evaluate() runs SPICE too, which downloads Stanford CoreNLP on first use, so it fails
offline; here each scorer runs on its own and anything that cannot run is skipped with one line.
"""
import collections
import contextlib
import math
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


# ---------------------------------------------------------------------------
# CIDEr-D for the self-critical reward: document frequencies computed once, from TRAIN references
# ---------------------------------------------------------------------------


def _ngram_counts(words, n=4):
    counts = collections.Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i : i + k])] += 1
    return counts


class CiderD:
    """CIDEr-D as coco-caption computes it (tf-idf n-gram vectors, n = 1..4, hypothesis counts clipped
    by the reference's, a Gaussian length penalty with sigma 6, times 10), but with the document
    frequencies fixed once from a reference corpus instead of recomputed from each evaluated set.

    references: {image key: [sentence, ...]} (the training references for SCST).
    """

    def __init__(self, references, n=4, sigma=6.0):
        self.n, self.sigma = n, sigma
        self.df = collections.Counter()
        for sentences in references.values():
            self.df.update({g for s in sentences for g in _ngram_counts(s.split(), n)})
        self.log_num_docs = math.log(float(len(references)))
        self._refs = {key: [self._vector(s) for s in sentences] for key, sentences in references.items()}

    def _vector(self, sentence):
        """(tf-idf dict per n, norm per n, length). Length counts bigrams, exactly as coco-caption does."""
        vec = [dict() for _ in range(self.n)]
        norm = [0.0] * self.n
        length = 0
        for gram, tf in _ngram_counts(sentence.split(), self.n).items():
            i = len(gram) - 1
            vec[i][gram] = tf * (self.log_num_docs - math.log(max(1.0, self.df[gram])))
            norm[i] += vec[i][gram] ** 2
            if i == 1:
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    def _similarity(self, hyp, ref):
        (vh, nh, lh), (vr, nr, lr) = hyp, ref
        penalty = math.exp(-((lh - lr) ** 2) / (2 * self.sigma**2))
        total = 0.0
        for i in range(self.n):
            val = sum(min(w, vr[i].get(g, 0.0)) * vr[i].get(g, 0.0) for g, w in vh[i].items())
            if nh[i] != 0 and nr[i] != 0:
                val /= nh[i] * nr[i]
            total += val * penalty
        return total / self.n

    def score(self, key, hypothesis, references=None):
        """CIDEr-D of one hypothesis against the stored references of `key` (or the given ones)."""
        refs = self._refs[key] if references is None else [self._vector(r) for r in references]
        hyp = self._vector(hypothesis)
        return 10.0 * sum(self._similarity(hyp, r) for r in refs) / len(refs)

    def scores(self, keys, hypotheses):
        return [self.score(k, h) for k, h in zip(keys, hypotheses)]
