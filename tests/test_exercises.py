"""exercises.py: the reference passes every check, the student copy fails every TODO on its own,
a wrong region fails only its own check, and broken TODO markers are refused with file and line."""
import os
import shutil
import subprocess
import sys

import pytest

import exercises
from conftest import ROOT

EXERCISES = os.path.join(ROOT, "exercises.py")
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
ALL_TODOS = sorted(exercises.CHECKS)


def run_exercises(*args, script=EXERCISES, cwd=ROOT):
    return subprocess.run([sys.executable, script, *args], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=600)


def verdicts(output):
    """{todo: (status, reason)} from the table `check` prints."""
    rows = {}
    for line in output.splitlines():
        for number, (title, _) in exercises.CHECKS.items():
            if line.startswith(f"TODO {number}  {title}"):
                status, _, reason = line[len(f"TODO {number}  {title}"):].strip().partition("  ")
                rows[number] = (status, reason.strip())
    return rows


def copy_reference(folder):
    """The reference repo's files, as `make` would list them, copied unchanged."""
    for name in exercises.repository_files():
        os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, name), os.path.join(folder, name))
    return folder


def region_of(folder, number):
    """(file name, text, region) of TODO `number` in the copy in `folder`."""
    for name in ("dataset.py", "models.py", "train.py"):
        with open(os.path.join(folder, name)) as f:
            text = f.read()
        for region in exercises.find_regions(name, text):
            if region.number == number:
                return name, text, region
    raise AssertionError(f"TODO {number} not found in {folder}")


def paste_wrong_solution(folder, number, old, new):
    """Edit one thing inside TODO `number`'s solution (and nowhere else) in the copy in `folder`."""
    name, text, region = region_of(folder, number)
    lines = text.splitlines(keepends=True)
    solution = "".join(lines[region.solution_start : region.close_index])
    assert solution.count(old) == 1, f"TODO {number} of the reference no longer holds {old!r}: update this test"
    lines[region.solution_start : region.close_index] = [solution.replace(old, new)]
    with open(os.path.join(folder, name), "w") as f:
        f.write("".join(lines))


# ---------------------------------------------------------------------------
# The reference and the student copy
# ---------------------------------------------------------------------------


def test_every_todo_region_has_a_check():
    regions = exercises.all_regions(ROOT, exercises.repository_files())
    numbers = sorted(r.number for found in regions.values() for r in found)
    assert numbers == ALL_TODOS == list(range(1, 8))


def test_reference_passes_every_check():
    done = run_exercises("check")
    assert done.returncode == 0, done.stdout + done.stderr
    assert verdicts(done.stdout) == {n: ("pass", "") for n in ALL_TODOS}, done.stdout
    assert f"{len(ALL_TODOS)}/{len(ALL_TODOS)} TODOs pass" in done.stdout


@pytest.fixture(scope="module")
def student_copy(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("copy") / "student")
    done = run_exercises("make", "--out", out)
    assert done.returncode == 0, done.stderr
    return out


def test_student_copy_fails_every_todo_with_its_own_message(student_copy):
    done = run_exercises("check", student_copy)
    assert done.returncode == 1, done.stdout + done.stderr
    assert verdicts(done.stdout) == {n: ("fail", "not implemented yet") for n in ALL_TODOS}, done.stdout


def test_student_copy_raises_each_todo_by_number(student_copy):
    for number in ALL_TODOS:
        name, text, region = region_of(student_copy, number)
        solution = text.splitlines()[region.solution_start : region.close_index]
        assert len(solution) == 1, solution
        assert solution[0] == f'{region.indent}raise NotImplementedError("TODO {number}: {region.task.rstrip(".")}' \
                              f' (hint: {region.hint.rstrip(".")})")'
        assert region.hint, f"TODO {number} lost its hint"


def lines_outside_solutions(path, name):
    """The file's lines with every solution (but not the TODO comments) cut out."""
    with open(path) as f:
        text = f.read()
    lines = text.splitlines()
    for region in reversed(exercises.find_regions(name, text)):
        del lines[region.solution_start : region.close_index]
    return lines


def test_student_copy_changes_only_the_solutions(student_copy):
    names = exercises.repository_files()
    copied = sorted(os.path.relpath(os.path.join(folder, f), student_copy).replace(os.sep, "/")
                    for folder, _, files in os.walk(student_copy) for f in files)
    assert copied == sorted(names)
    assert not any(n.split("/")[0] in ("data", "runs", "student", ".git") for n in copied)
    changed = []
    for name in names:
        with open(os.path.join(ROOT, name), "rb") as a, open(os.path.join(student_copy, name), "rb") as b:
            if a.read() != b.read():
                changed.append(name)
                assert lines_outside_solutions(os.path.join(ROOT, name), name) == \
                    lines_outside_solutions(os.path.join(student_copy, name), name)
    with_todos = exercises.all_regions(ROOT, names)
    assert sorted(changed) == sorted(name for name, regions in with_todos.items() if regions)
    with open(os.path.join(student_copy, "models.py")) as f:
        models = f.read()
    assert "# Hint: view W_h h as (batch, beams, 1, attention_dim)" in models  # the task stays
    assert "alpha = torch.softmax(scores, dim=2)" not in models  # the solution goes


def test_student_copy_imports_and_runs_outside_the_todos(student_copy):
    modules = "import dataset, models, train, eval, caption, create_input_files, decoding, metrics"
    done = subprocess.run([sys.executable, "-c", modules], cwd=student_copy, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    done = subprocess.run([sys.executable, "create_input_files.py", "--help"], cwd=student_copy, env=ENV,
                          capture_output=True, text=True)
    assert done.returncode == 0 and "usage" in done.stdout, done.stderr


# ---------------------------------------------------------------------------
# Wrong solutions fail their own check, and only it
# ---------------------------------------------------------------------------


def test_softmax_over_the_wrong_dimension_fails_only_todo_2(tmp_path):
    copy = copy_reference(str(tmp_path / "copy"))
    paste_wrong_solution(copy, 2, "torch.softmax(scores, dim=2)", "torch.softmax(scores, dim=1)")
    done = run_exercises("check", copy)
    assert done.returncode == 1, done.stdout + done.stderr
    rows = verdicts(done.stdout)
    assert rows[2][0] == "fail" and "do not sum to 1 over pixels" in rows[2][1], done.stdout
    assert {n: rows[n] for n in ALL_TODOS if n != 2} == {n: ("pass", "") for n in ALL_TODOS if n != 2}, done.stdout


def test_attention_that_ignores_beams_fails_only_todo_2(tmp_path):
    # one query per row, as if every row were its own image: right in training, wrong in beam search
    copy = copy_reference(str(tmp_path / "copy"))
    paste_wrong_solution(copy, 2, "self.decoder_att(h).view(batch, -1, 1, attention_dim)",
                         "self.decoder_att(h).view(-1, 1, 1, attention_dim)")
    done = run_exercises("check", copy)
    assert done.returncode == 1, done.stdout + done.stderr
    rows = verdicts(done.stdout)
    assert rows[2][0] == "fail" and "2 rows per image" in rows[2][1], done.stdout
    assert {n: rows[n] for n in ALL_TODOS if n != 2} == {n: ("pass", "") for n in ALL_TODOS if n != 2}, done.stdout


# (TODO, edit inside its solution, a phrase its check must say): one usual mistake per TODO
WRONG_SOLUTIONS = [
    (1, "[i // self.cpi]", "[i % self.cpi]", "caption 1 belongs to image 1 // captions_per_image = 0"),
    (3, "gate * context", "context", "the context is not gated"),
    (4, "n = active[t]", "n = batch", "step 1 got 4 rows; expected 3"),
    (5, "cross_entropy + alpha_c * attention_penalty", "cross_entropy", "the attention penalty is missing"),
    (6, "run.args.grad_clip)", "1e9)", "the update used unclipped gradients"),
    (7, "losses.update(loss.item(), len(targets))", "losses.update(loss.item())", "plain mean over batches"),
]


def test_each_wrong_solution_fails_its_own_check_only(tmp_path):
    copy = copy_reference(str(tmp_path / "copy"))
    for number, old, new, _ in WRONG_SOLUTIONS:
        paste_wrong_solution(copy, number, old, new)
    done = run_exercises("check", copy)
    assert done.returncode == 1, done.stdout + done.stderr
    rows = verdicts(done.stdout)
    for number, _, _, phrase in WRONG_SOLUTIONS:
        assert rows[number][0] == "fail" and phrase in rows[number][1], (number, done.stdout)
    assert rows[2] == ("pass", ""), done.stdout  # the one TODO left right passes, whatever the others do


def test_check_refuses_a_folder_that_is_not_a_copy(tmp_path):
    done = run_exercises("check", str(tmp_path))
    assert done.returncode == 2 and done.stderr.startswith("error: ") and done.stderr.count("\n") == 1


# ---------------------------------------------------------------------------
# make: markers and folders
# ---------------------------------------------------------------------------

OPEN = "    # TODO {} >>> Do the thing."
CLOSE = "    # <<< TODO {}"


def marked_file(*lines):
    return "\n".join(["def f():"] + list(lines)) + "\n"


BROKEN_MARKERS = [
    (marked_file(OPEN.format(3), "    return 1"), 2, "never closed"),
    (marked_file(OPEN.format(3), "    return 1", CLOSE.format(4)), 4, "the numbers must match"),
    (marked_file("    return 1", CLOSE.format(3)), 3, "never opened"),
    (marked_file(OPEN.format(3), "    x = 1", OPEN.format(4), "    return x", CLOSE.format(4)), 4,
     "opens inside TODO 3"),
    (marked_file("    # TODO 3 >>>", "    return 1", CLOSE.format(3)), 2, "malformed TODO marker"),
    (marked_file(OPEN.format(3), "    return 1", "    # <<< TODO"), 4, "malformed TODO marker"),
    (marked_file(OPEN.format(3), "    # Hint: nothing here", CLOSE.format(3)), 2, "no solution lines"),
]


@pytest.mark.parametrize("text, line, reason", BROKEN_MARKERS)
def test_broken_marker_names_file_and_line(text, line, reason):
    with pytest.raises(exercises.ExerciseError) as err:
        exercises.find_regions("pkg/broken.py", text)
    assert str(err.value).startswith(f"pkg/broken.py:{line}: ") and reason in str(err.value)


def test_well_formed_region_keeps_comments_and_finds_the_hint():
    text = marked_file(OPEN.format(3), "    # Hint: first half;", "    #       second half.", "    # Paper: eq. 1",
                       "    x = 1", "", "    return x", CLOSE.format(3))
    (region,) = exercises.find_regions("f.py", text)
    assert (region.number, region.hint, region.indent) == (3, "first half; second half.", "    ")
    student = exercises.without_solutions(text, [region]).splitlines()
    assert student[1:5] == text.splitlines()[1:5]  # the marker, Hint and Paper lines stay
    assert student[5] == '    raise NotImplementedError("TODO 3: Do the thing (hint: first half; second half)")'
    assert student[6:] == [CLOSE.format(3)]


def fake_repo(folder, files):
    """A folder with exercises.py and `files`, outside git: `make` then lists it by walking it."""
    os.makedirs(folder)
    shutil.copy(EXERCISES, folder)
    for name, text in files.items():
        with open(os.path.join(folder, name), "w") as f:
            f.write(text)
    return os.path.join(folder, "exercises.py")


def test_make_refuses_broken_markers_with_one_line(tmp_path):
    script = fake_repo(str(tmp_path / "repo"), {"a.py": marked_file(OPEN.format(1), "    return 1")})
    out = tmp_path / "out"
    done = run_exercises("make", "--out", str(out), script=script, cwd=str(tmp_path))
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr == "error: a.py:2: 'TODO 1 >>>' is never closed (add '# <<< TODO 1')\n"
    assert not out.exists()  # nothing is written before every marker is checked


def test_make_refuses_a_number_used_twice(tmp_path):
    region = marked_file(OPEN.format(1), "    return 1", CLOSE.format(1))
    script = fake_repo(str(tmp_path / "repo"), {"a.py": region, "b.py": region})
    done = run_exercises("make", "--out", str(tmp_path / "out"), script=script, cwd=str(tmp_path))
    assert done.returncode == 2 and done.stderr == "error: b.py:2: TODO 1 is used twice (also at a.py:2)\n"


def test_make_refuses_a_non_empty_folder_unless_forced(tmp_path):
    script = fake_repo(str(tmp_path / "repo"), {"a.py": marked_file(OPEN.format(1), "    return 1", CLOSE.format(1))})
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("student work")
    done = run_exercises("make", "--out", str(out), script=script, cwd=str(tmp_path))
    assert done.returncode == 2 and "not empty" in done.stderr and done.stderr.count("\n") == 1
    assert sorted(os.listdir(out)) == ["mine.txt"]
    done = run_exercises("make", "--out", str(out), "--force", script=script, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert 'raise NotImplementedError("TODO 1: Do the thing")' in (out / "a.py").read_text()


def test_make_never_writes_over_the_reference(tmp_path):
    repo = str(tmp_path / "repo")
    text = marked_file(OPEN.format(1), "    return 1", CLOSE.format(1))
    script = fake_repo(repo, {"a.py": text})
    done = run_exercises("make", "--out", repo, "--force", script=script, cwd=str(tmp_path))
    assert done.returncode == 2 and "the reference itself" in done.stderr
    with open(os.path.join(repo, "a.py")) as f:
        assert f.read() == text
