"""Faults outside training: crashes, full disks, concurrent runs, odd input, bad options.

Each test shows one promise kept: a reader sees the whole old data or the whole new data, never a
mix; a user mistake ends in one `error:` line and exit code 2, never a traceback; nothing
half-written is left behind, and what a killed run left is removed by the next one.
"""
import errno
import hashlib
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch

import create_input_files
from checkpoints import load_checkpoint, save_checkpoint
from dataset import CaptionDataset, load_references
from utils import (SPLITS, UserError, folder_lock, int_at_least, non_negative_float, non_negative_int,
                   positive_float, positive_int, prepared_name, run_cli)

NEW_SPLITS = ("train",) * 10 + ("val",) * 3  # the second collection: other sizes, other words, no TEST


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def run_script(main, argv, capsys):
    """Run a script's main(argv) as its command line does; returns (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_:
        run_cli(lambda: main(argv))
    captured = capsys.readouterr()
    return exit_.value.code, captured.out, captured.err


def assert_one_error(code, err, *words):
    """Exit code 2 and exactly one line saying `error:` (argparse adds usage lines before its own)."""
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and len(errors) == 1, (code, err)
    assert "Traceback" not in err, err
    for word in words:
        assert word in errors[0], (word, errors[0])
    return errors[0]


def fingerprint(out, base):
    """Everything a reader sees in `out`: the word map, and per split its images, captions and references
    (None for a split it cannot load)."""
    with open(os.path.join(out, prepared_name("WORDMAP", base))) as f:
        seen = {"WORDMAP": json.load(f)}
    for split in SPLITS:
        try:
            data = CaptionDataset(out, base, split)
        except UserError:
            seen[split] = None
            continue
        pixels = data.h5.images()[:]  # (N, 3, S, S)
        seen[split] = (hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest(), data.captions.tolist(),
                       data.caplens.tolist(), load_references(out, base, split))
    return seen


def leftovers(out):
    """What an interrupted run may leave: staging folders, temporary files, sets no link leads to,
    public links that lead nowhere."""
    found = [n for n in os.listdir(out) if n.startswith(".staging-") or (n.startswith(".") and n.endswith(".tmp"))]
    found += [n for n in os.listdir(out) if os.path.islink(os.path.join(out, n))
              and not os.path.exists(os.path.join(out, n))]
    return found + [os.path.relpath(p, out) for p in create_input_files.orphaned_sets(out)]


def new_collection(collection_factory, folder):
    return collection_factory(folder, splits=NEW_SPLITS, extra_words={"train": "zebra"})


# A real `python create_input_files.py`, killed by signal 9 (or stopped) just before the N-th change
# it makes in the output folder itself or in out/.prepared: where the old code moved its files one
# by one, and the new one switches sets. With N = 0 it runs to the end and writes how many there were.
CRASH_AT = r'''
import atexit, os, runpy, shutil, signal, sys

out, mode, at, count_file = os.path.abspath(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
watched = {out, os.path.join(out, ".prepared")}
seen = [0]


def hook(module, name, position):
    real = getattr(module, name)

    def wrapper(*args, **kwargs):
        if len(args) > position and os.path.dirname(os.path.abspath(os.fspath(args[position]))) in watched:
            seen[0] += 1
            if seen[0] == at:
                os.kill(os.getpid(), signal.SIGKILL if mode == "kill" else signal.SIGSTOP)
        return real(*args, **kwargs)

    setattr(module, name, wrapper)


for name in ("replace", "rename", "symlink", "link"):
    hook(os, name, 1)
for name in ("remove", "unlink", "rmdir"):
    hook(os, name, 0)
hook(shutil, "rmtree", 0)
atexit.register(lambda: open(count_file, "w").write(str(seen[0])))
sys.argv = ["create_input_files.py"] + sys.argv[5:]
runpy.run_path("create_input_files.py", run_name="__main__")
'''


def crash_at(repo_root, tmp_path, out, mode, at, argv, **popen):
    script = tmp_path / "crash_at.py"
    script.write_text(CRASH_AT)
    count = tmp_path / "count.txt"
    command = [sys.executable, str(script), out, mode, str(at), str(count), *argv]
    env = dict(os.environ, PYTHONPATH=repo_root)  # the script's folder, as `python create_input_files.py` has
    return subprocess.Popen(command, cwd=repo_root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **popen), count


# ---------------------------------------------------------------------------
# 1. A crash while the new files are moved into place
# ---------------------------------------------------------------------------


def test_kill_9_leaves_the_whole_old_or_the_whole_new_set(tmp_path, repo_root, capsys, collection_factory,
                                                         prepare_argv, tiny_base_name):
    deadline = time.time() + 60
    old_state = str(tmp_path / "old_state")
    create_input_files.main(prepare_argv(collection_factory(str(tmp_path / "a")), old_state))
    new_argv = lambda out: prepare_argv(new_collection(collection_factory, str(tmp_path / "b")), out)  # noqa: E731
    old = fingerprint(old_state, tiny_base_name)

    # A run to the end counts the changes a kill can fall between, and gives the new set.
    counted = str(tmp_path / "counted")
    shutil.copytree(old_state, counted, symlinks=True)
    proc, count_file = crash_at(repo_root, tmp_path, counted, "kill", 0, new_argv(counted))
    assert proc.wait(timeout=60) == 0, proc.stderr.read()
    changes = int(count_file.read_text())
    new = fingerprint(counted, tiny_base_name)
    assert new != old and new["TEST"] is None and changes >= 4

    for at in sorted(random.Random(0).sample(range(1, changes + 1), 4)):
        out = str(tmp_path / f"killed_at_{at}")
        shutil.copytree(old_state, out, symlinks=True)
        proc, _ = crash_at(repo_root, tmp_path, out, "kill", at, new_argv(out))
        assert proc.wait(timeout=max(deadline - time.time(), 1)) == -signal.SIGKILL, proc.stderr.read()
        seen = fingerprint(out, tiny_base_name)
        assert seen in (old, new), f"killed before change {at} of {changes}: a mix of the old and the new set"
        left = leftovers(out)
        capsys.readouterr()
        create_input_files.main(new_argv(out))  # the next run cleans up after the killed one
        said = capsys.readouterr().out
        assert ("leftover" in said and "of interrupted runs" in said) == bool(left), (at, left, said)
        assert leftovers(out) == [] and fingerprint(out, tiny_base_name) == new
    assert time.time() < deadline


def test_next_run_removes_what_killed_runs_left_and_says_so(tmp_path, capsys, collection_factory, prepare_argv,
                                                           tiny_base_name):
    json_path = collection_factory(str(tmp_path / "raw"))
    out = str(tmp_path / "out")
    create_input_files.main(prepare_argv(json_path, out))
    staging = os.path.join(out, f".staging-{tiny_base_name}-4242")  # the old code's staging folder
    os.makedirs(staging)
    with open(os.path.join(staging, "TRAIN_CAPTIONS.json"), "wb") as f:
        f.write(b"x" * 3000)
    temporary = os.path.join(out, f".WORDMAP_{tiny_base_name}.json.abcd1234.tmp")  # atomic_path's name
    with open(temporary, "w") as f:
        f.write("{")
    dead_set = os.path.join(out, ".prepared", f"{tiny_base_name}-dead0000")  # a set nothing leads to
    os.makedirs(dead_set)
    capsys.readouterr()
    create_input_files.main(prepare_argv(json_path, out))
    said = [line for line in capsys.readouterr().out.splitlines() if "leftover" in line]
    assert len(said) == 1 and "removed 3 leftovers of interrupted runs" in said[0] and "KiB" in said[0], said
    assert not any(os.path.exists(p) for p in (staging, temporary, dead_set))
    assert leftovers(out) == [] and len(CaptionDataset(out, tiny_base_name, "TRAIN")) == 40


# ---------------------------------------------------------------------------
# 3. Two runs writing into one folder
# ---------------------------------------------------------------------------


def test_second_run_into_a_busy_folder_is_refused(tmp_path, repo_root, collection_factory, prepare_argv,
                                                  tiny_base_name):
    out, first_json = str(tmp_path / "out"), collection_factory(str(tmp_path / "a"))
    first, _ = crash_at(repo_root, tmp_path, out, "stop", 1, prepare_argv(first_json, out))  # stops to publish
    try:
        _, status = os.waitpid(first.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status), "the first run ended before publishing"
        second = subprocess.run([sys.executable, "create_input_files.py",
                                 *prepare_argv(new_collection(collection_factory, str(tmp_path / "b")), out)],
                                cwd=repo_root, capture_output=True, text=True, timeout=60)
        assert_one_error(second.returncode, second.stderr, "in use by another run", f"pid {first.pid}")
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert first.wait(timeout=60) == 0, first.stderr.read()
    alone = str(tmp_path / "alone")
    create_input_files.main(prepare_argv(first_json, alone))
    assert fingerprint(out, tiny_base_name) == fingerprint(alone, tiny_base_name)  # the first run's, whole
    assert leftovers(out) == []


def test_a_locked_folder_is_left_alone(tmp_path, capsys, collection_factory, prepare_argv):
    out = str(tmp_path / "out")
    os.makedirs(os.path.join(out, ".staging-x-1"))  # a live run's staging folder, not a leftover
    with folder_lock(out, "a test"):
        code, _, err = run_script(create_input_files.main, prepare_argv(collection_factory(str(tmp_path / "a")), out),
                                  capsys)
    assert_one_error(code, err, f"{out} is in use by another run (pid {os.getpid()}, a test)")
    assert sorted(os.listdir(out)) == [".staging-x-1"]  # not touched, and the lock is gone with its holder


def test_a_refused_run_leaves_no_empty_output_folder(tmp_path):
    fresh, kept, used = (str(tmp_path / name) for name in ("fresh", "kept", "used"))
    os.makedirs(kept)
    for folder in (fresh, kept, used):
        with pytest.raises(UserError, match="refused"), folder_lock(folder, "a test"):
            if folder == used:
                open(os.path.join(folder, "last.pt"), "w").close()
            raise UserError("refused at setup")
    assert not os.path.exists(fresh)  # made by the lock, left empty: gone again
    assert os.listdir(kept) == [] and os.listdir(used) == ["last.pt"]  # the user's folder, and one with output


# ---------------------------------------------------------------------------
# A full disk
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["images", "references"])
def test_full_disk_is_one_line_and_keeps_the_previous_set(where, tmp_path, monkeypatch, capsys, collection_factory,
                                                          prepare_argv, tiny_base_name):
    out = str(tmp_path / "out")
    create_input_files.main(prepare_argv(collection_factory(str(tmp_path / "a")), out))
    before = fingerprint(out, tiny_base_name)

    def full():
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if where == "images":
        real, calls = h5py.Dataset.__setitem__, []

        def setitem(self, key, value):
            calls.append(key)
            if len(calls) == 3:
                full()
            return real(self, key, value)

        monkeypatch.setattr(h5py.Dataset, "__setitem__", setitem)
    else:
        real_dump = json.dump

        def dump(obj, f, *args, **kwargs):
            if "_REFS_" in os.path.basename(f.name):
                full()
            return real_dump(obj, f, *args, **kwargs)

        monkeypatch.setattr(json, "dump", dump)
    argv = prepare_argv(new_collection(collection_factory, str(tmp_path / "b")), out)
    code, _, err = run_script(create_input_files.main, argv, capsys)
    assert_one_error(code, err, "no space left on device", "previous output was left as it was")
    monkeypatch.undo()
    assert fingerprint(out, tiny_base_name) == before and leftovers(out) == []


def test_a_write_failing_inside_hdf5_is_one_line_not_a_crash(tmp_path, repo_root, collection_factory, prepare_argv):
    """A real failed write inside HDF5 (here over a file-size limit, as a full disk would do): h5py then
    printed a traceback and the process died of a segmentation fault (exit 139)."""
    out = str(tmp_path / "out")
    argv = prepare_argv(collection_factory(str(tmp_path / "raw")), out, image_size=256)  # TRAIN: 1.5 MiB of pixels

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))  # Python ignores SIGXFSZ: writes fail

    result = subprocess.run([sys.executable, "create_input_files.py", *argv], cwd=repo_root, capture_output=True,
                            text=True, timeout=60, preexec_fn=limit_file_size)
    assert_one_error(result.returncode, result.stderr, "file too large")
    assert not os.path.exists(out)  # nothing half-written, not even the folder it made


# ---------------------------------------------------------------------------
# 4. The same photo listed twice
# ---------------------------------------------------------------------------


def _duplicate(json_path, source, split):
    with open(json_path) as f:
        data = json.load(f)
    copy = json.loads(json.dumps(data["images"][source]))
    copy["split"] = split
    copy["sentences"] = [{"tokens": ["a", "second", "opinion"]}]
    data["images"].append(copy)
    with open(json_path, "w") as f:
        json.dump(data, f)


def test_duplicate_within_a_split_is_merged_and_counted(tmp_path, capsys, collection_factory, prepare_argv,
                                                       tiny_base_name):
    json_path = collection_factory(str(tmp_path / "raw"))
    _duplicate(json_path, 1, "train")
    out = str(tmp_path / "out")
    create_input_files.main(prepare_argv(json_path, out))
    said = capsys.readouterr().out
    assert "warning: images listed twice in TRAIN, captions merged: 1 (first: imgs/img001.jpg)" in said
    refs = load_references(out, tiny_base_name, "TRAIN")
    assert len(refs) == 8 and ["a", "second", "opinion"] in refs[1] and len(refs[1]) == 6


def test_duplicate_across_splits_is_an_error(tmp_path, capsys, collection_factory, prepare_argv):
    json_path = collection_factory(str(tmp_path / "raw"))
    _duplicate(json_path, 2, "val")  # a TRAIN photo again in VAL: it would leak into validation
    out = str(tmp_path / "out")
    code, _, err = run_script(create_input_files.main, prepare_argv(json_path, out), capsys)
    assert_one_error(code, err, "more than one split", "imgs/img002.jpg in TRAIN and VAL")
    assert not os.path.exists(out)


def test_a_name_in_two_split_lists_is_an_error(tmp_path, capsys, collection_factory):
    folder, lists = _flickr_files(tmp_path, collection_factory)
    with open(lists[2], "a") as f:
        f.write("img000.jpg\n")  # a TRAIN image in the TEST list too
    code, _, err = run_script(create_input_files.main, _flickr_argv(tmp_path, folder, "--token-file", lists), capsys)
    assert_one_error(code, err, "more than one split list", "img000.jpg in TRAIN and TEST")


# ---------------------------------------------------------------------------
# 5. Byte-order marks
# ---------------------------------------------------------------------------


def _flickr_files(tmp_path, collection_factory):
    """The tiny collection as a Flickr8k token file, a Kaggle captions.txt and three split lists."""
    json_path = collection_factory(str(tmp_path / "raw"))
    with open(json_path) as f:
        data = json.load(f)
    tokens, csv_rows, lists = [], ["image,caption"], {"train": [], "val": [], "test": []}
    for img in data["images"]:
        lists[img["split"]].append(img["filename"])
        for n, sentence in enumerate(img["sentences"]):
            tokens.append(f"{img['filename']}#{n}\t{sentence['raw']} .")
            csv_rows.append(f"{img['filename']},{sentence['raw']}")
    (tmp_path / "tokens.txt").write_text("\n".join(tokens) + "\n")
    (tmp_path / "captions.txt").write_text("\n".join(csv_rows) + "\n")
    paths = []
    for split in ("train", "val", "test"):
        (tmp_path / f"{split}.txt").write_text("\n".join(lists[split]) + "\n")
        paths.append(str(tmp_path / f"{split}.txt"))
    return os.path.join(os.path.dirname(json_path), "imgs"), paths


def _flickr_argv(tmp_path, folder, option, lists):
    source = str(tmp_path / ("tokens.txt" if option == "--token-file" else "captions.txt"))
    return ["--dataset", "flickr8k", option, source, "--split-lists", *lists, "--image-folder", folder,
            "--output-folder", str(tmp_path / "out"), "--image-size", "32", "--min-word-freq", "1", "--workers", "1"]


def _add_bom(path):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(b"\xef\xbb\xbf" + data)


@pytest.mark.parametrize("marked", ["token file", "split list", "captions.txt", "Karpathy JSON"])
def test_a_byte_order_mark_changes_nothing(marked, tmp_path, collection_factory, prepare_argv, tiny_base_name):
    if marked == "Karpathy JSON":
        json_path = collection_factory(str(tmp_path / "raw"))
        _add_bom(json_path)
        argv = prepare_argv(json_path, str(tmp_path / "out"))
    else:
        folder, lists = _flickr_files(tmp_path, collection_factory)
        _add_bom({"token file": str(tmp_path / "tokens.txt"), "split list": lists[0],
                  "captions.txt": str(tmp_path / "captions.txt")}[marked])
        argv = _flickr_argv(tmp_path, folder, "--captions-csv" if marked == "captions.txt" else "--token-file", lists)
    create_input_files.main(argv)
    out = str(tmp_path / "out")
    with open(os.path.join(out, prepared_name("IMAGEINFO", tiny_base_name, "TRAIN"))) as f:
        names = [os.path.basename(item["file_name"]) for item in json.load(f)]
    assert names == [f"img{i:03d}.jpg" for i in range(8)]  # the first image too
    assert [len(refs) for refs in load_references(out, tiny_base_name, "TRAIN")] == [5] * 8  # and its first caption


# ---------------------------------------------------------------------------
# Bad caption files and options: one line, exit 2
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("field, value, said", [
    ("split", ["train"], "field 'split' is list"),
    ("filename", 1234, "field 'filename' is int"),
    ("filepath", None, "field 'filepath' is NoneType"),
])
def test_karpathy_field_of_the_wrong_type_is_one_line(field, value, said, tmp_path, capsys, collection_factory,
                                                      prepare_argv):
    json_path = collection_factory(str(tmp_path / "raw"))
    with open(json_path) as f:
        data = json.load(f)
    data["images"][4][field] = value
    with open(json_path, "w") as f:
        json.dump(data, f)
    code, _, err = run_script(create_input_files.main, prepare_argv(json_path, str(tmp_path / "out")), capsys)
    assert_one_error(code, err, "images[4]", said)


@pytest.mark.parametrize("option, value", [("--workers", "-1"), ("--min-word-freq", "-1"), ("--val-size", "-3")])
def test_prep_numbers_are_checked_when_parsed(option, value, tmp_path, capsys, collection_factory, prepare_argv):
    argv = prepare_argv(collection_factory(str(tmp_path / "raw")), str(tmp_path / "out"), option, value)
    code, _, err = run_script(create_input_files.main, argv, capsys)
    assert_one_error(code, err, f"argument {option}: expected a whole number of at least 0, got '{value}'")
    assert not os.path.exists(tmp_path / "out")


def test_number_types():
    assert positive_int("3") == 3 and non_negative_int("0") == 0 and int_at_least(16)("16") == 16
    assert positive_float("0.5") == 0.5 and non_negative_float("0") == 0.0
    for check, text in ((positive_int, "0"), (positive_int, "2.5"), (non_negative_int, "-1"), (int_at_least(16), "8"),
                        (positive_float, "0"), (positive_float, "nan"), (non_negative_float, "-0.1"),
                        (non_negative_float, "inf")):
        with pytest.raises(Exception, match="expected"):
            check(text)


@pytest.mark.parametrize("parent_is", ["a file", "read-only"])
def test_unwritable_output_folder_is_one_line_before_any_work(parent_is, tmp_path, capsys, collection_factory,
                                                              prepare_argv):
    if parent_is == "read-only" and os.geteuid() == 0:
        pytest.skip("root may write into a read-only folder, so there is nothing to refuse")
    json_path = collection_factory(str(tmp_path / "raw"))
    parent = tmp_path / "parent"
    if parent_is == "a file":
        parent.write_text("not a folder")
    else:
        parent.mkdir()
        parent.chmod(0o555)
    code, out, err = run_script(create_input_files.main, prepare_argv(json_path, str(parent / "out")), capsys)
    assert_one_error(code, err, "--output-folder", str(parent))
    assert "images" not in out  # refused before decoding anything


# ---------------------------------------------------------------------------
# Damaged prepared files (read by eval.py and train.py)
# ---------------------------------------------------------------------------


def _damaged_copy(prepared, tmp_path, kind, split):
    folder, base = prepared
    copy = str(tmp_path / "copy")
    shutil.copytree(folder, copy, symlinks=True)
    path = os.path.realpath(os.path.join(copy, prepared_name(kind, base, split)))
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    return copy


@pytest.mark.parametrize("kind", ["IMAGES", "REFS"])
def test_eval_on_a_truncated_file_is_one_line(kind, prepared, tiny_checkpoint, tmp_path, capsys):
    import eval as evaluation

    copy = _damaged_copy(prepared, tmp_path, kind, "TEST")
    argv = ["--checkpoint", tiny_checkpoint, "--data-folder", copy, "--workers", "0", "--out", str(tmp_path / "r.json")]
    code, _, err = run_script(evaluation.main, argv, capsys)
    assert_one_error(code, err, prepared_name(kind, prepared[1], "TEST"), "again")


@pytest.mark.parametrize("kind", ["CAPTIONS", "CAPLENS"])
def test_truncated_captions_are_a_user_error(kind, prepared, tmp_path):
    copy = _damaged_copy(prepared, tmp_path, kind, "TRAIN")
    with pytest.raises(UserError, match="again"):
        CaptionDataset(copy, prepared[1], "TRAIN")


# ---------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------


def test_checkpoint_missing_a_key_is_one_line(prepared, tiny_checkpoint, tmp_path, capsys):
    import eval as evaluation

    state = load_checkpoint(tiny_checkpoint)
    del state["config"]
    broken = str(tmp_path / "broken.pt")
    save_checkpoint(broken, state)
    with pytest.raises(UserError, match="no 'config' entry"):
        load_checkpoint(broken)
    assert load_checkpoint(broken, required=("word_map",))["word_map"] == state["word_map"]
    code, _, err = run_script(evaluation.main, ["--checkpoint", broken, "--data-folder", prepared[0]], capsys)
    assert_one_error(code, err, "broken.pt", "'config'")


def test_checkpoint_error_keeps_whole_sentences(tmp_path):
    foreign = str(tmp_path / "foreign.pt")
    torch.save({"format": "show-attend-tell/1", "when": np.datetime64("2020-01-01")}, foreign)  # not weights only
    with pytest.raises(UserError) as err:
        load_checkpoint(foreign)
    message = str(err.value)
    assert "\n" not in message and message.endswith(".)"), message  # a sentence, whole, then the bracket
    assert "weights_only" not in message  # torch's advice to load unsafely must not reach the user


# ---------------------------------------------------------------------------
# eval.py
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("option, value", [("--batch-size", "0"), ("--batch-size", "-1"), ("--max-len", "0")])
def test_eval_numbers_are_checked_when_parsed(option, value, prepared, tiny_checkpoint, tmp_path, capsys):
    import eval as evaluation

    argv = ["--checkpoint", tiny_checkpoint, "--data-folder", prepared[0], "--workers", "0",
            "--out", str(tmp_path / "r.json"), option, value]
    code, out, err = run_script(evaluation.main, argv, capsys)
    assert_one_error(code, err, f"argument {option}", f"got '{value}'")


def test_eval_checks_its_out_path_before_decoding(prepared, tiny_checkpoint, tmp_path, capsys):
    import eval as evaluation

    (tmp_path / "a_file").write_text("")
    argv = ["--checkpoint", tiny_checkpoint, "--data-folder", prepared[0], "--workers", "0",
            "--out", str(tmp_path / "a_file" / "r.json")]
    code, out, err = run_script(evaluation.main, argv, capsys)
    assert_one_error(code, err, "--out", "a_file is a file, not a folder")
    assert "decoded in" not in out  # refused before decoding


def test_eval_saves_the_report_elsewhere_when_writing_fails(prepared, tiny_checkpoint, tmp_path, monkeypatch, capsys):
    import eval as evaluation

    wanted = str(tmp_path / "reports" / "r.json")
    real = evaluation.write_json

    def write_json(path, obj):
        if path == wanted:  # the check before decoding passed; the disk filled up since
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return real(path, obj)

    monkeypatch.setattr(evaluation, "write_json", write_json)
    monkeypatch.setattr(evaluation, "score_captions", lambda refs, hyps, **options: {"Bleu_4": 0.5})  # 10 s saved
    monkeypatch.chdir(tmp_path)
    argv = ["--checkpoint", tiny_checkpoint, "--data-folder", prepared[0], "--workers", "0", "--beam-size", "1",
            "--out", wanted]
    code, out, err = run_script(evaluation.main, argv, capsys)
    line = assert_one_error(code, err, wanted, "no space left on device", "saved to")
    rescued = line.split("saved to ")[1].split(" instead")[0]
    assert os.path.dirname(rescued) == str(tmp_path) and not os.path.exists(wanted)
    with open(rescued) as f:
        assert len(json.load(f)["results"][0]["captions"]) == 2  # the captions were not lost


# ---------------------------------------------------------------------------
# caption.py
# ---------------------------------------------------------------------------


def _two_images(prepared, tmp_path):
    """good.jpg and good.webp: two pictures with one stem."""
    from PIL import Image

    raw = os.path.join(os.path.dirname(prepared[0]), "raw", "imgs")
    (tmp_path / "pics").mkdir()
    paths = []
    for name, source in (("good.jpg", "img000.jpg"), ("good.webp", "img001.jpg")):
        with Image.open(os.path.join(raw, source)) as img:
            img.save(tmp_path / "pics" / name)
        paths.append(str(tmp_path / "pics" / name))
    return paths


@pytest.mark.parametrize("value", ["0", "-1"])
def test_caption_beam_size_is_checked_when_parsed(value, prepared, tiny_checkpoint, tmp_path, capsys):
    import caption

    image = _two_images(prepared, tmp_path)[0]
    argv = ["--checkpoint", tiny_checkpoint, "--img", image, "--no-plot", "--beam-size", value]
    code, _, err = run_script(caption.main, argv, capsys)
    assert_one_error(code, err, "argument --beam-size", f"got '{value}'")


def test_caption_figures_of_one_stem_get_their_own_names(prepared, tiny_checkpoint, tmp_path, capsys):
    import caption

    figures = tmp_path / "figures"
    argv = ["--checkpoint", tiny_checkpoint, "--beam-size", "1", "--out", str(figures),
            "--img", *_two_images(prepared, tmp_path)]
    code, out, _ = run_script(caption.main, argv, capsys)
    assert code == 0 and sorted(os.listdir(figures)) == ["good_jpg.png", "good_webp.png"]


def test_caption_unwritable_out_still_captions_every_image(prepared, tiny_checkpoint, tmp_path, capsys):
    import caption

    (tmp_path / "a_file").write_text("")
    images = _two_images(prepared, tmp_path)
    argv = ["--checkpoint", tiny_checkpoint, "--beam-size", "1", "--out", str(tmp_path / "a_file" / "figs"),
            "--img", *images]
    code, out, err = run_script(caption.main, argv, capsys)
    assert_one_error(code, err, "--out", "captions only")
    assert all(f"{image}: " in out for image in images)  # both were captioned
