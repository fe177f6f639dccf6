"""Exercises for the Show, Attend and Tell course: make the student copy, and grade a copy.

    python exercises.py make [--out student/] [--force]   # the repo with every exercise's solution taken out
    python exercises.py check [DIR] [--only N ...]        # grade DIR (default: this folder, the reference)

The reference code marks each exercise in a .py file as a numbered region:

    <indent># EXERCISE <n> >>> <the task, on one line>
    <indent># Hint: ...            (the comment lines right after the opening marker stay in the student copy)
    <indent><solution lines>       (the student copy gets one `raise NotImplementedError(...)` line instead)
    <indent># <<< EXERCISE <n>

In the student copy the markers say TODO instead: there the work is to do, in the reference it is
done, and IDEs list TODO comments as unfinished work.

`make` leaves out of the copy what would give the answers away (see COURSE_ONLY): the checks, and
the test suite, which runs and quotes the solutions. So grading runs from the course repository.

`check` runs one focused check per exercise (exercise_checks/exN_*.py), each in its own Python
process with DIR first on sys.path, so a missing or broken exercise fails only its own row. Where an
exercise calls code that belongs to another, the check swaps that code for a small stub: an exercise
passes when it is right, whatever the others do. The checks compare with computations written out
by hand, never with the reference solutions.
"""
import argparse
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import traceback

ROOT = os.path.dirname(os.path.abspath(__file__))
SKIPPED_FOLDERS = {".git", "data", "runs", "student"}  # not part of the repository's files
WALK_SKIPPED = SKIPPED_FOLDERS | {"__pycache__", ".pytest_cache", ".venv"}  # when there is no git to ask
COURSE_ONLY = {  # top-level folders the student copy leaves out, and why
    "exercise_checks": "the checks, with their hand-written reference computations",
    "tests": "the reference's test suite: it runs the solutions, and quotes them",
    ".ci": "the course repository's CI, which runs tests/",
}
CHECKS_FOLDER = os.path.join(ROOT, "exercise_checks")
CHECK_TIMEOUT_S = 120
RESULT_TAG = "@@exercise-verdict "  # how a check process hands its verdict back to `check`

REFERENCE_WORD, STUDENT_WORD = "EXERCISE", "TODO"  # the marker word in the reference, in the student copy
COMMENT_LABEL = re.compile(r"^(?P<label>[A-Z][a-z]+):\s*(?P<text>.*)$")  # "Hint: ...", "Paper: ..."


class ExerciseError(Exception):
    """A problem the user can fix (a broken marker, a non-empty folder): one line, exit code 2."""


# ---------------------------------------------------------------------------
# Finding the exercise regions
# ---------------------------------------------------------------------------


class Region:
    """One exercise region of one file. Line indices are 0-based; messages say 1-based line numbers."""

    def __init__(self, path, number, task, open_index, indent, word=REFERENCE_WORD):
        self.path, self.number, self.task, self.word = path, number, task, word
        self.open_index, self.indent = open_index, indent
        self.comment_lines = []  # the task's Hint/Paper lines, kept for the student
        self.solution_start = self.close_index = None
        self.hint = ""

    @property
    def where(self):
        return f"{self.path}:{self.open_index + 1}"

    def student_line(self, newline):
        """The one line that replaces the solution in the student copy."""
        message = f"{STUDENT_WORD} {self.number}: {self.task.rstrip('.')}"
        if self.hint:
            message += f" (hint: {self.hint.rstrip('.')})"
        return f"{self.indent}raise NotImplementedError({json.dumps(message)}){newline}"


def marker_patterns(word):
    """The opening and closing marker of a region, as written with `word` (EXERCISE or TODO)."""
    opening = re.compile(rf"^(?P<indent>[ \t]*)# {word} (?P<number>\d+) >>> (?P<task>\S.*?)\s*$")
    closing = re.compile(rf"^[ \t]*# <<< {word} (?P<number>\d+)\s*$")
    return opening, closing


def looks_like_marker(line):
    """Either word counts: an old '# TODO 3 >>>' left in the reference would otherwise keep its solution."""
    text = line.strip()
    words = REFERENCE_WORD in text or STUDENT_WORD in text
    return text.startswith("#") and words and (">>>" in text or "<<<" in text)


def find_regions(path, text, word=REFERENCE_WORD):
    """The regions of one file, in order: the reference's (EXERCISE markers), or with word="TODO" a
    student copy's. Raises ExerciseError naming the file and line of a bad marker."""
    open_marker, close_marker = marker_patterns(word)
    lines = text.splitlines(keepends=True)
    regions, current = [], None
    for index, line in enumerate(lines):
        where = f"{path}:{index + 1}"
        opening, closing = open_marker.match(line), close_marker.match(line)
        if opening:
            number = int(opening["number"])
            if current is not None:
                raise ExerciseError(f"{where}: '{word} {number} >>>' opens inside {word} {current.number} "
                                    f"(opened at line {current.open_index + 1}); close that one first")
            current = Region(path, number, opening["task"], index, opening["indent"], word)
        elif closing:
            number = int(closing["number"])
            if current is None:
                raise ExerciseError(f"{where}: '<<< {word} {number}' closes {word} {number}, which was never opened")
            if number != current.number:
                raise ExerciseError(f"{where}: '<<< {word} {number}' closes {word} {current.number} "
                                    f"(opened at line {current.open_index + 1}); the numbers must match")
            current.close_index = index
            split_comments_from_solution(current, lines)
            regions.append(current)
            current = None
        elif looks_like_marker(line):
            raise ExerciseError(f"{where}: malformed {word} marker; "
                                f"expected '# {word} <n> >>> <task>' or '# <<< {word} <n>'")
    if current is not None:
        raise ExerciseError(f"{current.where}: '{word} {current.number} >>>' is never closed "
                            f"(add '# <<< {word} {current.number}')")
    return regions


def split_comments_from_solution(region, lines):
    """The comment lines right after the opening marker describe the task; the rest is the solution."""
    index = region.open_index + 1
    while index < region.close_index and lines[index].strip().startswith("#"):
        region.comment_lines.append(lines[index].strip()[1:].strip())
        index += 1
    region.solution_start = index
    if not any(line.strip() for line in lines[index:region.close_index]):
        raise ExerciseError(f"{region.where}: {region.word} {region.number} has no solution lines "
                            "before its '<<<' marker")
    first_code = next(line for line in lines[index:region.close_index] if line.strip())
    region.indent = first_code[: len(first_code) - len(first_code.lstrip())]  # the solution's indentation
    region.hint = hint_text(region.comment_lines)


def hint_text(comments):
    """The 'Hint:' comment with its continuation lines, joined into one line."""
    parts, in_hint = [], False
    for comment in comments:
        label = COMMENT_LABEL.match(comment)
        if label:
            in_hint = label["label"] == "Hint"
            if in_hint:
                parts.append(label["text"])
        elif in_hint and comment:
            parts.append(comment)
    return " ".join(parts)


def check_unique_numbers(regions):
    seen = {}
    for region in regions:
        if region.number in seen:
            raise ExerciseError(f"{region.where}: {region.word} {region.number} is used twice "
                                f"(also at {seen[region.number].where})")
        seen[region.number] = region


# ---------------------------------------------------------------------------
# make: the student copy
# ---------------------------------------------------------------------------


def repository_files(root=ROOT, exclude=None):
    """The repo's files (tracked, plus untracked ones git does not ignore), relative to root, sorted."""
    try:
        listed = set()
        for extra in ([], ["--others", "--exclude-standard"]):
            out = subprocess.run(["git", "ls-files", "-z", *extra], cwd=root, capture_output=True, check=True)
            listed.update(name for name in out.stdout.decode().split("\0") if name)
    except (OSError, subprocess.CalledProcessError):  # no git, or not a git checkout: walk the folder
        listed = set(walk_files(root))
    files = []
    for name in sorted(listed):
        path = os.path.join(root, name)
        skipped = name.split("/")[0] in SKIPPED_FOLDERS
        inside_out = exclude is not None and os.path.realpath(path).startswith(exclude + os.sep)
        if not skipped and not inside_out and os.path.isfile(path):  # a deleted tracked file is skipped
            files.append(name)
    return files


def student_files(root=ROOT, exclude=None):
    """The repository's files that go into the student copy: all but the COURSE_ONLY folders."""
    return [name for name in repository_files(root, exclude) if name.split("/")[0] not in COURSE_ONLY]


def walk_files(root):
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [s for s in subfolders if s not in WALK_SKIPPED]
        for name in names:
            if not name.endswith(".pyc"):
                yield os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/")


def read_text(path):
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return f.read()
    except UnicodeDecodeError:
        return None


def all_regions(root, files):
    """{file: [regions]} for every .py file; checks every marker before anything is written."""
    found = {}
    for name in files:
        if name.endswith(".py"):
            text = read_text(os.path.join(root, name))
            if text is not None:
                found[name] = find_regions(name, text)
    check_unique_numbers([r for regions in found.values() for r in regions])
    return found


def student_marker(line):
    """'# EXERCISE 4 >>> task' -> '# TODO 4 >>> task', and '# <<< EXERCISE 4' -> '# <<< TODO 4'."""
    return re.sub(rf"# (<<< )?{REFERENCE_WORD} ", rf"# \g<1>{STUDENT_WORD} ", line, count=1)


def without_solutions(text, regions):
    """The file's text with each region's solution lines replaced by one `raise NotImplementedError`,
    and its markers saying TODO."""
    lines = text.splitlines(keepends=True)
    for region in reversed(regions):  # from the bottom, so earlier line indices stay valid
        newline = "\r\n" if lines[region.close_index].endswith("\r\n") else "\n"
        lines[region.close_index] = student_marker(lines[region.close_index])
        lines[region.solution_start : region.close_index] = [region.student_line(newline)]
        lines[region.open_index] = student_marker(lines[region.open_index])
    return "".join(lines)


def make(out, force=False, root=ROOT):
    out = os.path.realpath(out)
    if out == os.path.realpath(root):
        raise ExerciseError(f"{out}: that is the reference itself; choose another --out")
    if os.path.isdir(out) and os.listdir(out) and not force:
        raise ExerciseError(f"{out}: folder is not empty; use --force to write into it anyway")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ExerciseError(f"{out}: exists and is not a folder")
    files = student_files(root, exclude=out)
    regions = all_regions(root, files)
    for name in files:
        source, target = os.path.join(root, name), os.path.join(out, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if regions.get(name):
            with open(target, "w", encoding="utf-8", newline="") as f:
                f.write(without_solutions(read_text(source), regions[name]))
            shutil.copymode(source, target)
        else:
            shutil.copy2(source, target)
    numbers = sorted(r.number for rs in regions.values() for r in rs)
    print(f"Wrote the student copy to {out}: {len(files)} files, TODOs {', '.join(map(str, numbers))} to do.")
    print(f"Left out (they stay in the course repository): {', '.join(f'{name}/' for name in COURSE_ONLY)}")
    print(f"Grade it from here with: python {os.path.relpath(os.path.abspath(__file__))} check {out}")


# ---------------------------------------------------------------------------
# check: running every exercise's check in its own process
# ---------------------------------------------------------------------------

CHECKS = {  # exercise: (its row in the table, its module in exercise_checks/)
    1: ("dataset.py  CaptionDataset.__getitem__", "ex1_caption_dataset"),
    2: ("models.py   Attention.forward", "ex2_attention"),
    3: ("models.py   DecoderWithAttention.step", "ex3_decoder_step"),
    4: ("models.py   teacher-forcing loop of forward", "ex4_teacher_forcing"),
    5: ("train.py    compute_loss", "ex5_compute_loss"),
    6: ("train.py    optimisation_step", "ex6_optimisation_step"),
    7: ("train.py    loss/top-5 loop of validate", "ex7_validation_loop"),
    8: ("hard_attention.py  sample_locations", "ex8_hard_sampling"),
    9: ("hard_attention.py  hard_attention_objective", "ex9_reinforce"),
}


def describe_crash(err, folder):
    """'KeyError: 3 (models.py:176)': the exception, and the last line of the copy's code it passed through."""
    message = (str(err).strip().splitlines() or [""])[0][:160]
    text = f"{type(err).__name__}: {message}" if message else type(err).__name__
    if isinstance(err, SyntaxError):  # its message already names the file and line
        return text
    folder = os.path.realpath(folder)
    for frame in reversed(traceback.extract_tb(err.__traceback__)):
        path = os.path.realpath(frame.filename)
        if os.path.isfile(path) and path.startswith(folder + os.sep) and not is_grader(path):
            return f"{text} ({os.path.relpath(path, folder)}:{frame.lineno})"
    return text


def is_grader(path):
    """This script or a check: when the reference itself is graded, they lie in the folder under test too."""
    return path == os.path.realpath(__file__) or path.startswith(os.path.realpath(CHECKS_FOLDER) + os.sep)


def verdict(number, check, folder):
    """(passed, reason) of exercise `number`'s check, run in this process."""
    import torch
    from exercise_checks.common import CheckFailed

    torch.set_num_threads(1)
    torch.manual_seed(0)
    try:
        check(folder)
    except CheckFailed as err:
        return False, str(err)
    except NotImplementedError as err:
        own = re.match(rf"{STUDENT_WORD} (\d+):", str(err))
        if own and int(own[1]) == number:
            return False, "not implemented yet"
        if own:  # should never happen: every check stubs out the other exercises
            return False, f"needs TODO {own[1]}, which is not implemented yet"
        return False, describe_crash(err, folder)
    except (Exception, SystemExit) as err:  # the copy's code crashed: say how and where
        return False, describe_crash(err, folder)
    return True, ""


def check_one_in_this_process(number, folder):
    folder = os.path.abspath(folder)
    # sys.path[0] is this script's folder: import the check from there, then put the copy under test
    # there instead, so that `import models` finds the copy's models.py
    check = importlib.import_module(f"exercise_checks.{CHECKS[number][1]}").check
    sys.path[0] = folder
    passed, reason = verdict(number, check, folder)
    print(RESULT_TAG + json.dumps({"passed": passed, "reason": reason}), flush=True)


def run_check_process(number, folder):
    command = [sys.executable, os.path.abspath(__file__), "_check_one", str(number), folder]
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    env.setdefault("OMP_NUM_THREADS", "1")  # tiny tensors: threads only cost time
    env.setdefault("MKL_NUM_THREADS", "1")
    try:
        done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=CHECK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return False, f"took longer than {CHECK_TIMEOUT_S} s (an endless loop?)"
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            result = json.loads(line[len(RESULT_TAG):])
            return result["passed"], result["reason"]
    last = (done.stderr.strip().splitlines() or ["no output"])[-1][:160]
    return False, f"the check ended without a verdict (exit code {done.returncode}): {last}"


def grade(folder, only=None):
    """`check`: one row per exercise; 0 when all pass."""
    folder = os.path.abspath(folder)
    if not os.path.isdir(CHECKS_FOLDER):  # a student copy: make leaves the checks out
        raise ExerciseError(f"grading runs from the course repository, which holds the checks: "
                            f"run `python exercises.py check {folder}` there")
    if not os.path.isdir(folder):
        raise ExerciseError(f"{folder}: no such folder")
    missing = [f for f in ("dataset.py", "models.py", "train.py") if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise ExerciseError(f"{folder}: not a copy of the repo (no {missing[0]})")
    numbers = only or sorted(CHECKS)
    unknown = [n for n in numbers if n not in CHECKS]
    if unknown:
        raise ExerciseError(f"no TODO {unknown[0]} (there are TODOs {', '.join(map(str, sorted(CHECKS)))})")
    print(f"Checking {folder}")
    passed = 0
    for number in numbers:
        ok, reason = run_check_process(number, folder)
        passed += ok
        print(f"TODO {number}  {CHECKS[number][0]:<45} {'pass' if ok else 'fail  ' + reason}", flush=True)
    print(f"{passed}/{len(numbers)} TODOs pass")
    return 0 if passed == len(numbers) else 1


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True)
    m = commands.add_parser("make", help="write the student copy")
    m.add_argument("--out", default=os.path.join(ROOT, "student"), help="where to write it (default: student/)")
    m.add_argument("--force", action="store_true", help="write even into a non-empty folder")
    c = commands.add_parser("check", help="grade a copy, one row per TODO")
    c.add_argument("folder", nargs="?", default=ROOT, help="the copy to grade (default: this folder)")
    c.add_argument("--only", type=int, nargs="+", metavar="N", help="check only these TODOs")
    return p.parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_check_one"]:  # internal: one exercise's check, in its own process
        check_one_in_this_process(int(argv[1]), argv[2])
        return 0
    args = parse_args(argv)
    try:
        if args.command == "make":
            make(args.out, args.force)
            return 0
        return grade(args.folder, args.only)
    except ExerciseError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
