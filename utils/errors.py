"""User-facing errors and the one place scripts turn them into a message and an exit code."""
from __future__ import annotations

import sys
from typing import Callable, TypeVar

T = TypeVar("T")


class FeatherFaceError(Exception):
    """An error the user can fix (bad file, wrong checkpoint, bad flag). Scripts print its
    message in one line and exit with status 2 instead of showing a traceback."""


class CheckpointError(FeatherFaceError):
    """A checkpoint cannot be read or does not fit the model asked for."""


def run_cli(main: Callable[..., T], *args: object) -> T:
    """Call a script's main(); user errors become `error: <message>` on stderr and exit 2."""
    try:
        return main(*args)
    except (FeatherFaceError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
