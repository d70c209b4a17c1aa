"""Command-line mistakes answered as a Unix tool does: one line naming the flag and what to do, exit status 2,
before any model is built.

`training.train`, `training.evaluate` and `training.demo` check their flags with these.
"""

from __future__ import annotations

import argparse
import difflib
import io
import os
from typing import NoReturn

from .model import TINY_MODEL_NAME


def fail(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    """Exit with status 2 (argparse's for a bad flag) after one line `PROG: error: MESSAGE` on stderr."""
    parser.exit(2, f"{parser.prog}: error: {message}\n")


def check_input_file(parser: argparse.ArgumentParser, flag: str, path: str, what: str = "file") -> None:
    """`path` (given as `flag`) must be a readable file."""
    if not os.path.exists(path):
        fail(parser, f"{flag} {path}: no such {what} (check the path; relative paths start from {os.getcwd()})")
    if not os.path.isfile(path):
        fail(parser, f"{flag} {path}: not a file")
    if not os.access(path, os.R_OK):
        fail(parser, f"{flag} {path}: not readable (check its permissions)")


def check_positive(parser: argparse.ArgumentParser, flag: str, value: float) -> None:
    if not value > 0:
        fail(parser, f"{flag} must be > 0, got {value}")


def check_model_name(parser: argparse.ArgumentParser, name: str, model_config: str | None) -> None:
    """`--model` must name an open_clip architecture (the tiny default, a registered config, a `prefix:` model
    such as `local-dir:/path`, or any name with `--model-config`)."""
    if model_config is not None or name == TINY_MODEL_NAME or ":" in name:
        return
    import open_clip

    known = open_clip.list_models()
    if name in known:
        return
    close = difflib.get_close_matches(name, known, n=3)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    fail(
        parser,
        f"--model {name}: not an open_clip model ({hint}"
        '`python -c "import open_clip; print(open_clip.list_models())"` lists them; '
        "--model-config FILE registers your own)",
    )


def usable_triplet_rows(path: str) -> int | None:
    """How many rows of the triplet CSV at `path` can be used, counted cheaply (images are not opened yet); None
    when the file itself is unusable (missing columns...): the full read reports that with its lines."""
    from semclip_kernels.triplets import read_triplet_csv

    try:
        return len(read_triplet_csv(path, bad_rows="skip", report=io.StringIO()))
    except ValueError:
        return None
