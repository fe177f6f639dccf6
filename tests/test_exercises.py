"""exercises.py and exercise_checks/: the reference passes every check, the student copy fails every
exercise on its own and holds no solution, a wrong region fails only its own check, and broken
exercise markers are refused with file and line."""
import ast
import os
import re
import shutil
import subprocess
import sys

import pytest

import exercises

ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
ALL_TODOS = sorted(exercises.CHECKS)
LEFT_OUT = ("exercise_checks", "tests", ".ci")  # what the student copy must not contain, besides data


@pytest.fixture(scope="session")
def course_script(repo_root):
    """The course repository's exercises.py: grading runs from there."""
    return os.path.join(repo_root, "exercises.py")


def run_exercises(script, *args, cwd=None):
    """`python SCRIPT ARGS`, in the script's folder unless cwd is given."""
    return subprocess.run([sys.executable, script, *args], cwd=cwd or os.path.dirname(script), env=ENV,
                          capture_output=True, text=True, timeout=600)


def verdicts(output):
    """{todo: (status, reason)} from the table `check` prints."""
    rows = {}
    for line in output.splitlines():
        for number, (title, _) in exercises.CHECKS.items():
            if line.startswith(f"TODO {number}  {title}"):
                status, _, reason = line[len(f"TODO {number}  {title}"):].strip().partition("  ")
                rows[number] = (status, reason.strip())
    return rows


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def copy_reference(root, folder):
    """The reference repo's files, as `git ls-files` lists them, copied unchanged."""
    for name in exercises.repository_files(root):
        os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
        shutil.copy2(os.path.join(root, name), os.path.join(folder, name))
    return folder


def region_of(folder, number, word="EXERCISE"):
    """(file name, text, region) of exercise `number` in the copy in `folder` (word="TODO": a student copy)."""
    for name in ("dataset.py", "models.py", "train.py", "hard_attention.py"):
        text = read(os.path.join(folder, name))
        for region in exercises.find_regions(name, text, word):
            if region.number == number:
                return name, text, region
    raise AssertionError(f"{word} {number} not found in {folder}")


def paste_wrong_solution(folder, number, old, new):
    """Edit one thing inside exercise `number`'s solution (and nowhere else) in the copy in `folder`."""
    name, text, region = region_of(folder, number)
    lines = text.splitlines(keepends=True)
    solution = "".join(lines[region.solution_start : region.close_index])
    assert solution.count(old) == 1, f"exercise {number} of the reference no longer holds {old!r}: update this test"
    lines[region.solution_start : region.close_index] = [solution.replace(old, new)]
    with open(os.path.join(folder, name), "w") as f:
        f.write("".join(lines))


# ---------------------------------------------------------------------------
# The reference and the student copy
# ---------------------------------------------------------------------------


def test_every_todo_region_has_a_check(repo_root):
    regions = exercises.all_regions(repo_root, exercises.repository_files(repo_root))
    numbers = sorted(r.number for found in regions.values() for r in found)
    assert numbers == ALL_TODOS == list(range(1, 10))
    modules = sorted(f"{module}.py" for _, module in exercises.CHECKS.values())
    assert modules == sorted(n for n in os.listdir(os.path.join(repo_root, "exercise_checks")) if n.startswith("ex"))


@pytest.mark.slow
def test_reference_passes_every_check(course_script):
    done = run_exercises(course_script, "check")
    assert done.returncode == 0, done.stdout + done.stderr
    assert verdicts(done.stdout) == {n: ("pass", "") for n in ALL_TODOS}, done.stdout
    assert f"{len(ALL_TODOS)}/{len(ALL_TODOS)} TODOs pass" in done.stdout


@pytest.fixture(scope="module")
def student_copy(course_script, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("copy") / "student")
    done = run_exercises(course_script, "make", "--out", out)
    assert done.returncode == 0, done.stderr
    return out


def test_check_grades_one_exercise_of_the_reference_and_of_the_copy(course_script, student_copy):
    # the quick run's share of grading; the slow tests below grade all seven
    done = run_exercises(course_script, "check", "--only", "2")
    assert done.returncode == 0 and verdicts(done.stdout) == {2: ("pass", "")}, done.stdout + done.stderr
    done = run_exercises(course_script, "check", student_copy, "--only", "2")
    assert done.returncode == 1 and verdicts(done.stdout) == {2: ("fail", "not implemented yet")}, done.stdout


@pytest.mark.slow
def test_student_copy_fails_every_todo_with_its_own_message(course_script, student_copy):
    done = run_exercises(course_script, "check", student_copy)
    assert done.returncode == 1, done.stdout + done.stderr
    assert verdicts(done.stdout) == {n: ("fail", "not implemented yet") for n in ALL_TODOS}, done.stdout


def test_check_in_a_student_copy_sends_you_to_the_course_repository(student_copy):
    done = run_exercises(os.path.join(student_copy, "exercises.py"), "check")
    assert done.returncode == 2 and done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
    assert "grading runs from the course repository" in done.stderr
    assert f"python exercises.py check {student_copy}" in done.stderr


def test_student_copy_raises_each_todo_by_number(student_copy):
    for number in ALL_TODOS:
        name, text, region = region_of(student_copy, number, word="TODO")
        solution = text.splitlines()[region.solution_start : region.close_index]
        assert len(solution) == 1, solution
        assert solution[0] == f'{region.indent}raise NotImplementedError("TODO {number}: {region.task.rstrip(".")}' \
                              f' (hint: {region.hint.rstrip(".")})")'
        assert region.hint, f"TODO {number} lost its hint"


def lines_outside_solutions(path, name, word):
    """The file's lines with every solution (but not the comments) cut out, and its markers saying TODO."""
    text = read(path)
    lines = text.splitlines()
    for region in reversed(exercises.find_regions(name, text, word)):
        for index in (region.open_index, region.close_index):
            lines[index] = lines[index].replace(f"# {word} ", "# TODO ").replace(f"# <<< {word} ", "# <<< TODO ")
        del lines[region.solution_start : region.close_index]
    return lines


def test_student_copy_changes_only_the_solutions(student_copy, repo_root):
    names = [n for n in exercises.repository_files(repo_root) if n.split("/")[0] not in LEFT_OUT]
    copied = sorted(os.path.relpath(os.path.join(folder, f), student_copy).replace(os.sep, "/")
                    for folder, _, files in os.walk(student_copy) for f in files)
    assert copied == sorted(names)
    assert not any(n.split("/")[0] in ("data", "runs", "student", ".git") + LEFT_OUT for n in copied)
    changed = []
    for name in names:
        with open(os.path.join(repo_root, name), "rb") as a, open(os.path.join(student_copy, name), "rb") as b:
            if a.read() != b.read():
                changed.append(name)
                assert lines_outside_solutions(os.path.join(repo_root, name), name, "EXERCISE") == \
                    lines_outside_solutions(os.path.join(student_copy, name), name, "TODO")
    with_todos = exercises.all_regions(repo_root, names)
    assert sorted(changed) == sorted(name for name, regions in with_todos.items() if regions)
    models = read(os.path.join(student_copy, "models.py"))
    assert "# Hint: view W_h h as (batch, beams, 1, attention_dim)" in models  # the task stays
    assert "alpha = torch.softmax(scores, dim=2)" not in models  # the solution goes
    assert "# TODO 2 >>> Soft attention" in models and "# <<< TODO 2\n" in models  # the markers say TODO
    assert "EXERCISE" not in models


def test_student_copy_imports_and_runs_outside_the_todos(student_copy):
    modules = "import dataset, models, train, eval, caption, create_input_files, decoding, metrics"
    done = subprocess.run([sys.executable, "-c", modules], cwd=student_copy, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    done = subprocess.run([sys.executable, "create_input_files.py", "--help"], cwd=student_copy, env=ENV,
                          capture_output=True, text=True)
    assert done.returncode == 0 and "usage" in done.stdout, done.stderr


# ---------------------------------------------------------------------------
# Nothing in the student copy gives a solution away
# ---------------------------------------------------------------------------

MIN_FRAGMENT = 16  # non-space characters: see test_no_solution_fragment_reaches_the_student_copy

EXERCISE_OPEN = re.compile(r"^\s*# EXERCISE (\d+) >>> ")
EXERCISE_CLOSE = re.compile(r"^\s*# <<< EXERCISE \d+\s*$")
COMMENT = re.compile(r"(^|\s)#.*")  # no solution line has a '#' inside a string


def code_of(line):
    """The line without its comment and without any whitespace, so that reformatting hides nothing."""
    return re.sub(r"\s+", "", COMMENT.sub("", line))


def code_of_all(lines):
    return "".join(code_of(line) for line in lines)


def reference_parts(root):
    """(the lines outside every exercise, {exercise: its lines between the markers}) of the reference's
    files that the copy gets, found without exercises.py's parser."""
    outside, solutions = [], {}
    for name, text in text_files(root, exercises.repository_files(root)).items():
        if name.split("/")[0] in LEFT_OUT:
            continue
        current = None
        for line in text.splitlines():
            opening = EXERCISE_OPEN.match(line)
            if opening:
                current = solutions.setdefault(int(opening[1]), [])
            elif EXERCISE_CLOSE.match(line):
                current = None
            else:
                (outside if current is None else current).append(line)
    return outside, solutions


def solution_fragments(root):
    """{exercise: (the code of its lines of at least MIN_FRAGMENT non-space characters, the code of all of it)}"""
    fragments = {}
    for number, lines in reference_parts(root)[1].items():
        long_lines = {code_of(line) for line in lines if len(code_of(line)) >= MIN_FRAGMENT}
        fragments[number] = (long_lines, code_of_all(lines))
    return fragments


def text_files(folder, names=None):
    """{name: text} of the files under `folder` (default: all) that read as UTF-8 text (images do not)."""
    if names is None:
        names = [os.path.relpath(os.path.join(path, name), folder).replace(os.sep, "/")
                 for path, _, files in os.walk(folder) for name in files]
    texts = {}
    for name in names:
        try:
            texts[name] = read(os.path.join(folder, name))
        except UnicodeDecodeError:
            pass
    return texts


def shared_lines(root):
    """The solution lines that the reference also holds outside every exercise, in a file the copy gets."""
    outside = code_of_all(reference_parts(root)[0])
    return {line for lines, _ in solution_fragments(root).values() for line in lines if line in outside}


def solution_leaks(folder, root):
    """Where a solution fragment of the reference at `root` appears in `folder`, one line per find."""
    shared = shared_lines(root)
    found = []
    for name, text in sorted(text_files(folder).items()):
        anywhere = re.sub(r"\s+", "", text)  # comments and strings too: a quoted solution gives it away as well
        as_code = code_of_all(text.splitlines())
        for number, (lines, whole) in solution_fragments(root).items():
            found += [f"{name}: exercise {number}'s {line}" for line in sorted(lines - shared) if line in anywhere]
            if whole in as_code:
                found.append(f"{name}: all of exercise {number}")
    return found


def grader_definitions(root):
    """The names of the top-level functions and classes of exercise_checks/."""
    folder = os.path.join(root, "exercise_checks")
    names = set()
    for module in os.listdir(folder):
        if module.endswith(".py"):
            tree = ast.parse(read(os.path.join(folder, module)))
            names |= {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    return names


def grader_leaks(folder, root):
    """Files of exercise_checks/ in `folder`, and the grader's functions and classes defined in any of its files."""
    texts = text_files(folder)
    found = [name for name in texts if name.split("/")[0] == "exercise_checks"]
    definition = re.compile(rf"^(?:def|class) ({'|'.join(sorted(grader_definitions(root)))})\b", re.M)
    for name, text in sorted(texts.items()):
        found += [f"{name}: {match[0]}" for match in definition.finditer(text)]
    return found


def test_no_solution_fragment_reaches_the_student_copy(student_copy, repo_root):
    """A solution fragment is (a) the code of one line between an exercise's markers, its comment
    and all whitespace taken out, when at least MIN_FRAGMENT = 16 characters remain, and (b) the code
    of the whole region, all its lines joined the same way. No file of the copy may contain one.

    Why these: a line of 16 or more characters is a specific expression (`alpha = torch.softmax(scores,
    dim=2)`, `run.scaler.unscale_(opt)`), which gives the answer away even when quoted in a test or a
    README, so (a) is searched for anywhere, comments and strings included. Shorter lines are idioms
    that other code may write too and that say little alone (`n = active[t]`, `return h, c, alpha`,
    `hiddens[:n, t] = h`, which the hint spells out anyway); (b) still finds them in their context.
    Whitespace is ignored so that reformatting or wrapping does not hide a copied solution.

    A line that the reference also holds outside every exercise, in a file the copy gets, is in the
    copy anyway: such shared lines are not searched for one by one. They are the statements that
    exercise 7 (validation) repeats from train_one_epoch, a loop header or `for opt in run.optimizers:`
    that other code writes too. A whole region is searched for all the same, and every exercise
    must keep lines of its own, so a solution copied out of its region still fails this test."""
    fragments, shared = solution_fragments(repo_root), shared_lines(repo_root)
    assert sorted(fragments) == ALL_TODOS
    assert all(len(lines - shared) >= 2 for lines, _ in fragments.values()), "an exercise has no lines of its own"
    assert solution_leaks(student_copy, repo_root) == []


def test_no_grader_code_reaches_the_student_copy(student_copy, repo_root):
    """The grader's reference computations (attention_by_hand, loss_by_hand, clip_by_total_norm, ...)
    and stubs live in exercise_checks/: no file of it is copied, nor is any of its definitions."""
    assert {"attention_by_hand", "loss_by_hand", "clip_by_total_norm"} <= grader_definitions(repo_root)
    assert grader_leaks(student_copy, repo_root) == []


def test_the_leak_searches_find_a_leak(student_copy, repo_root, tmp_path):
    # what the two tests above would see if make copied the grader, the tests or a solution
    leaky = shutil.copytree(student_copy, str(tmp_path / "leaky"))
    shutil.copytree(os.path.join(repo_root, "exercise_checks"), os.path.join(leaky, "exercise_checks"))
    shutil.copy(os.path.join(repo_root, "tests", "test_exercises.py"), leaky)
    shutil.copy(os.path.join(repo_root, "train.py"), os.path.join(leaky, "train.py"))
    found = solution_leaks(leaky, repo_root)
    assert "test_exercises.py: exercise 2's alpha=torch.softmax(scores,dim=2)" in found
    assert {f"train.py: all of exercise {n}" for n in (5, 6, 7)} <= set(found)
    assert "train.py: exercise 6's run.scaler.unscale_(opt)" in found
    found = grader_leaks(leaky, repo_root)
    assert "exercise_checks/ex2_attention.py" in found
    assert "exercise_checks/ex2_attention.py: def attention_by_hand" in found


# ---------------------------------------------------------------------------
# Wrong solutions fail their own check, and only it
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_softmax_over_the_wrong_dimension_fails_only_todo_2(course_script, repo_root, tmp_path):
    copy = copy_reference(repo_root, str(tmp_path / "copy"))
    paste_wrong_solution(copy, 2, "torch.softmax(scores, dim=2)", "torch.softmax(scores, dim=1)")
    done = run_exercises(course_script, "check", copy)
    assert done.returncode == 1, done.stdout + done.stderr
    rows = verdicts(done.stdout)
    assert rows[2][0] == "fail" and "do not sum to 1 over pixels" in rows[2][1], done.stdout
    assert {n: rows[n] for n in ALL_TODOS if n != 2} == {n: ("pass", "") for n in ALL_TODOS if n != 2}, done.stdout


@pytest.mark.slow
def test_attention_that_ignores_beams_fails_only_todo_2(course_script, repo_root, tmp_path):
    # one query per row, as if every row were its own image: right in training, wrong in beam search
    copy = copy_reference(repo_root, str(tmp_path / "copy"))
    paste_wrong_solution(copy, 2, "self.decoder_att(h).view(batch, -1, 1, attention_dim)",
                         "self.decoder_att(h).view(-1, 1, 1, attention_dim)")
    done = run_exercises(course_script, "check", copy)
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
    (8, "torch.rand(rows, device=alpha.device) < expected_prob", "torch.rand(rows, device=alpha.device) < 0.5",
     "with expected_prob 0 every row must sample"),
    (9, "reward = log_p_y.detach() - baseline", "reward = log_p_y.detach()", "the baseline is missing"),
]


@pytest.mark.slow
def test_each_wrong_solution_fails_its_own_check_only(course_script, repo_root, tmp_path):
    copy = copy_reference(repo_root, str(tmp_path / "copy"))
    for number, old, new, _ in WRONG_SOLUTIONS:
        paste_wrong_solution(copy, number, old, new)
    done = run_exercises(course_script, "check", copy)
    assert done.returncode == 1, done.stdout + done.stderr
    rows = verdicts(done.stdout)
    for number, _, _, phrase in WRONG_SOLUTIONS:
        assert rows[number][0] == "fail" and phrase in rows[number][1], (number, done.stdout)
    assert rows[2] == ("pass", ""), done.stdout  # the one TODO left right passes, whatever the others do


def test_check_refuses_a_folder_that_is_not_a_copy(course_script, tmp_path):
    done = run_exercises(course_script, "check", str(tmp_path))
    assert done.returncode == 2 and done.stderr.startswith("error: ") and done.stderr.count("\n") == 1


# ---------------------------------------------------------------------------
# make: markers and folders
# ---------------------------------------------------------------------------

OPEN = "    # EXERCISE {} >>> Do the thing."
CLOSE = "    # <<< EXERCISE {}"


def marked_file(*lines):
    return "\n".join(["def f():"] + list(lines)) + "\n"


BROKEN_MARKERS = [
    (marked_file(OPEN.format(3), "    return 1"), 2, "never closed"),
    (marked_file(OPEN.format(3), "    return 1", CLOSE.format(4)), 4, "the numbers must match"),
    (marked_file("    return 1", CLOSE.format(3)), 3, "never opened"),
    (marked_file(OPEN.format(3), "    x = 1", OPEN.format(4), "    return x", CLOSE.format(4)), 4,
     "opens inside EXERCISE 3"),
    (marked_file("    # EXERCISE 3 >>>", "    return 1", CLOSE.format(3)), 2, "malformed EXERCISE marker"),
    (marked_file(OPEN.format(3), "    return 1", "    # <<< EXERCISE"), 4, "malformed EXERCISE marker"),
    (marked_file(OPEN.format(3), "    # Hint: nothing here", CLOSE.format(3)), 2, "no solution lines"),
    # the student copy's marker in the reference: refused, or its solution would reach the copy
    (marked_file("    # TODO 3 >>> Do the thing.", "    return 1", "    # <<< TODO 3"), 2, "malformed EXERCISE marker"),
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
    assert student[1] == "    # TODO 3 >>> Do the thing."  # the student's marker says TODO
    assert student[2:5] == text.splitlines()[2:5]  # the Hint and Paper lines stay
    assert student[5] == '    raise NotImplementedError("TODO 3: Do the thing (hint: first half; second half)")'
    assert student[6:] == ["    # <<< TODO 3"]
    (again,) = exercises.find_regions("f.py", "\n".join(student) + "\n", word="TODO")
    assert (again.number, again.hint) == (3, region.hint)


def fake_repo(course_script, folder, files):
    """A folder with exercises.py and `files`, outside git: `make` then lists it by walking it."""
    os.makedirs(folder)
    shutil.copy(course_script, folder)
    for name, text in files.items():
        os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
        with open(os.path.join(folder, name), "w") as f:
            f.write(text)
    return os.path.join(folder, "exercises.py")


def test_make_refuses_broken_markers_with_one_line(course_script, tmp_path):
    script = fake_repo(course_script, str(tmp_path / "repo"), {"a.py": marked_file(OPEN.format(1), "    return 1")})
    out = tmp_path / "out"
    done = run_exercises(script, "make", "--out", str(out), cwd=str(tmp_path))
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr == "error: a.py:2: 'EXERCISE 1 >>>' is never closed (add '# <<< EXERCISE 1')\n"
    assert not out.exists()  # nothing is written before every marker is checked


def test_make_refuses_a_number_used_twice(course_script, tmp_path):
    region = marked_file(OPEN.format(1), "    return 1", CLOSE.format(1))
    script = fake_repo(course_script, str(tmp_path / "repo"), {"a.py": region, "b.py": region})
    done = run_exercises(script, "make", "--out", str(tmp_path / "out"), cwd=str(tmp_path))
    assert done.returncode == 2 and done.stderr == "error: b.py:2: EXERCISE 1 is used twice (also at a.py:2)\n"


def test_make_refuses_a_non_empty_folder_unless_forced(course_script, tmp_path):
    region = marked_file(OPEN.format(1), "    return 1", CLOSE.format(1))
    script = fake_repo(course_script, str(tmp_path / "repo"), {"a.py": region})
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("student work")
    done = run_exercises(script, "make", "--out", str(out), cwd=str(tmp_path))
    assert done.returncode == 2 and "not empty" in done.stderr and done.stderr.count("\n") == 1
    assert sorted(os.listdir(out)) == ["mine.txt"]
    done = run_exercises(script, "make", "--out", str(out), "--force", cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert 'raise NotImplementedError("TODO 1: Do the thing")' in (out / "a.py").read_text()


def test_make_leaves_the_checks_and_tests_out(course_script, tmp_path):
    region = marked_file(OPEN.format(1), "    return 1", CLOSE.format(1))
    files = {"a.py": region, "exercise_checks/ex1.py": "x = 1\n", "tests/test_a.py": "x = 1\n",
             ".ci/run": "pytest\n", "notes/tests.txt": "kept\n"}
    script = fake_repo(course_script, str(tmp_path / "repo"), files)
    out = tmp_path / "out"
    done = run_exercises(script, "make", "--out", str(out), cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr
    copied = sorted(str(p.relative_to(out)).replace(os.sep, "/") for p in out.rglob("*") if p.is_file())
    assert copied == ["a.py", "exercises.py", "notes/tests.txt"]


def test_make_never_writes_over_the_reference(course_script, tmp_path):
    repo = str(tmp_path / "repo")
    text = marked_file(OPEN.format(1), "    return 1", CLOSE.format(1))
    script = fake_repo(course_script, repo, {"a.py": text})
    done = run_exercises(script, "make", "--out", repo, "--force", cwd=str(tmp_path))
    assert done.returncode == 2 and "the reference itself" in done.stderr
    assert read(os.path.join(repo, "a.py")) == text
