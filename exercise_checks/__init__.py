"""The grader: one module per exercise, each with check(folder), which raises CheckFailed with a
one-line reason when the copy in `folder` gets that exercise wrong.

This folder stays in the course repository: `python exercises.py make` never copies it, because the
checks hold hand-written reference computations that would give the answers away.
"""
