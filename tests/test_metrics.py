"""metrics.py: the coco-caption scores, with and without Java, and the SPICE skip."""
import pytest

import metrics

REFS = {1: ["a red square on grey", "the square is red"], 2: ["a blue box", "one blue square ."]}
HYPS = {1: "a red square", 2: "a blue square"}


@pytest.mark.skipif(not metrics.java_available(), reason="needs Java for the PTB tokenizer and METEOR")
def test_scores_equal_pycocoevalcap_called_directly():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    ours = metrics.score_captions(REFS, HYPS, quiet=True)
    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": s} for s in v] for k, v in REFS.items()})
    res = tok.tokenize({k: [{"caption": v}] for k, v in HYPS.items()})
    bleu = Bleu(4).compute_score(gts, res, verbose=0)[0]
    assert [ours[f"Bleu_{n}"] for n in range(1, 5)] == pytest.approx(bleu)
    assert ours["METEOR"] == pytest.approx(Meteor().compute_score(gts, res)[0])
    assert ours["ROUGE_L"] == pytest.approx(Rouge().compute_score(gts, res)[0])
    assert ours["CIDEr"] == pytest.approx(Cider().compute_score(gts, res)[0])


def test_without_java_the_rest_is_still_computed(monkeypatch, capsys):
    monkeypatch.setattr(metrics, "java_available", lambda: False)
    scores = metrics.score_captions(REFS, HYPS)
    assert "METEOR" not in scores and "SPICE" not in scores
    assert {"Bleu_1", "Bleu_4", "ROUGE_L", "CIDEr"} <= set(scores)
    err = capsys.readouterr().err.strip().splitlines()
    assert any("no Java" in line and "METEOR skipped" in line for line in err)
    assert len(err) == 2  # that line, and SPICE's
    assert metrics.fallback_tokenize({1: ["One blue square ."]}) == {1: ["one blue square"]}


def test_spice_skip_says_why(monkeypatch, capsys):
    monkeypatch.setattr(metrics, "_spice_ready", lambda: False)
    metrics.score_captions(REFS, HYPS, metrics=("SPICE",))
    assert "SPICE skipped" in capsys.readouterr().err
