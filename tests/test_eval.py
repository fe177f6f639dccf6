"""eval.py: the report it writes, and its errors."""
import json
import os
import subprocess
import sys

import pytest

import metrics


def test_eval_report_fields_and_scores(prepared, tiny_checkpoint, tmp_path):
    import eval as evaluation

    out = str(tmp_path / "results.json")
    report = evaluation.evaluate(tiny_checkpoint, prepared[0], None, "TEST", [1, 3], batch_size=2, out=out,
                                 workers=0)
    saved = json.load(open(out))
    assert saved == json.loads(json.dumps(report))
    assert {"checkpoint", "split", "data_folder", "results"} <= set(saved)
    assert [r["beam_size"] for r in saved["results"]] == [1, 3]
    refs = json.load(open(os.path.join(prepared[0], f"TEST_REFS_{prepared[1]}.json")))
    for r in saved["results"]:
        assert len(r["captions"]) == 2 and {"image_id", "caption"} <= set(r["captions"][0])
        hyps = {i: c["caption"] for i, c in enumerate(r["captions"])}
        direct = metrics.score_captions({i: [" ".join(t) for t in refs[i]] for i in hyps}, hyps, quiet=True)
        assert r["scores"] == pytest.approx(direct)
        assert "Bleu_4" in r["scores"] and "CIDEr" in r["scores"]


def test_eval_cli_bad_checkpoint(tmp_path, repo_root):
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    result = subprocess.run([sys.executable, "eval.py", "--checkpoint", str(junk)], cwd=repo_root,
                            capture_output=True, text=True)
    assert result.returncode == 2 and "not a checkpoint of this project" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_eval_warns_when_the_folder_was_prepared_at_another_size(prepared, tiny_checkpoint, tmp_path, capsys):
    import torch

    import eval as evaluation

    checkpoint = torch.load(tiny_checkpoint, weights_only=True)
    prepared_size = checkpoint["config"]["image_size"]
    evaluation.evaluate(tiny_checkpoint, prepared[0], None, "TEST", [1], batch_size=2,
                        out=str(tmp_path / "same.json"), workers=0)
    assert "warning: the model was trained" not in capsys.readouterr().out
    checkpoint["config"]["image_size"] = prepared_size + 32
    other = str(tmp_path / "other_size.pt")
    torch.save(checkpoint, other)
    evaluation.evaluate(other, prepared[0], None, "TEST", [1], batch_size=2, out=str(tmp_path / "other.json"),
                        workers=0)
    printed = capsys.readouterr().out
    assert f"trained on pictures prepared at {prepared_size + 32} px" in printed
    assert f"holds {prepared_size} px ones" in printed and f"--image-size {prepared_size + 32}" in printed


def test_eval_decodes_with_the_model_length_penalty_unless_given(prepared, tiny_checkpoint, tmp_path, monkeypatch):
    import torch

    import eval as evaluation

    used, real = [], evaluation.decode_batches

    def recording(*args, **kwargs):
        used.append(kwargs["length_penalty"])
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluation, "decode_batches", recording)
    checkpoint = torch.load(tiny_checkpoint, weights_only=True)
    checkpoint["config"]["length_penalty"] = 0.7
    tuned = str(tmp_path / "tuned.pt")
    torch.save(checkpoint, tuned)
    reports = [evaluation.evaluate(path, prepared[0], None, "TEST", [1], batch_size=2, out=str(tmp_path / f"{i}.json"),
                                   workers=0, length_penalty=given)
               for i, (path, given) in enumerate([(tiny_checkpoint, None), (tuned, None), (tuned, 0.25)])]
    assert used == [0.0, 0.7, 0.25]
    assert [r["decoding"]["length_penalty"] for r in reports] == used


def test_a_split_that_was_not_prepared_names_the_public_path(prepared, tiny_checkpoint, tmp_path):
    """As with Flickr8k's withheld TEST photos: the split has no images file. The one-line error names the
    file the user knows (in the data folder), not the snapshot folder behind it."""
    import shutil

    from dataset import prepared_name
    from utils import UserError

    import eval as evaluation

    folder = str(tmp_path / "prepared")
    shutil.copytree(prepared[0], folder, symlinks=True)
    public = os.path.join(folder, prepared_name("IMAGES", prepared[1], "TEST"))
    real = os.path.realpath(public)
    assert real.startswith(str(tmp_path))  # only the copy is touched
    os.remove(real)
    if os.path.lexists(public):
        os.remove(public)
    with pytest.raises(UserError) as error:
        evaluation.evaluate(tiny_checkpoint, folder, None, "TEST", [1], out=str(tmp_path / "r.json"), workers=0)
    message = str(error.value)
    assert message.startswith(f"{public}: not found") and ".prepared" not in message
