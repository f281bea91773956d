"""The command line: thin click commands that parse, call the library, and print.

app.py holds the group (errors, exit codes, the program's fast exit), render.py every line
printed for people, and each command has its module.
"""
from . import convert, fingerprint, inspect, layouts, sample, verify  # noqa: F401  (registers the commands)
from .app import main, run

__all__ = ["main", "run"]
