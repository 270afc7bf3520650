"""User-facing errors and the one place scripts turn them into a message and an exit code."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, Optional, TypeVar, Union

T = TypeVar("T")


class FeatherFaceError(Exception):
    """An error the user can fix (bad file, wrong checkpoint, bad flag). Scripts print its
    message in one line and exit with status 2 instead of showing a traceback."""


class CheckpointError(FeatherFaceError):
    """A checkpoint cannot be read or does not fit the model asked for."""


# OSErrors a user causes with a path (missing, already there, a file where a folder belongs or
# the reverse, no permission): scripts report them like FeatherFaceError.
PATH_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)


def error_message(exc: BaseException) -> str:
    """One line for a user error; an OSError with a path reads `<reason>: <path>`."""
    if isinstance(exc, OSError) and exc.filename is not None:
        paths = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
        return f"{exc.strerror or type(exc).__name__}: {paths}"
    return str(exc)


def run_cli(main: Callable[..., T], *args: object) -> T:
    """Call a script's main(); user errors (FeatherFaceError, PATH_ERRORS) become `error: <message>`
    on stderr and exit 2, Ctrl-C (after the script's own clean-up, e.g. training keeping its last
    checkpoint) one line and exit 130."""
    try:
        return main(*args)
    except (FeatherFaceError, *PATH_ERRORS) as exc:
        print(f"error: {error_message(exc)}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None


def _bounded(kind: type, description: str, accept: Callable[[float], bool]) -> Callable[[str], object]:
    """An argparse `type`: parses `kind` and refuses values `accept` rejects (argparse then prints
    the usage and one error line and exits 2)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {description}, got {text!r}") from None
        if not accept(value):  # NaN fails every comparison, so it is refused too
            raise argparse.ArgumentTypeError(f"expected {description}, got {text}")
        return value
    parse.__name__ = description  # argparse names the type in its own messages
    return parse


positive_int = _bounded(int, "a positive integer", lambda v: v >= 1)
non_negative_int = _bounded(int, "an integer >= 0", lambda v: v >= 0)
positive_float = _bounded(float, "a finite number > 0", lambda v: 0 < v < float("inf"))
non_negative_float = _bounded(float, "a finite number >= 0", lambda v: 0 <= v < float("inf"))
unit_float = _bounded(float, "a number from 0 to 1", lambda v: 0 <= v <= 1)


def check_output_path(path: Optional[Union[str, Path]], flag: str, folder: bool = False) -> None:
    """Refuse up front (before any model loads or image runs) an output path that cannot be written: a
    folder where a file goes or the reverse, a path below a file, or one in a folder without write access.
    None (an output not asked for) passes."""
    if path is None:
        return
    path = Path(path)
    if (path.exists() or path.is_symlink()) and path.is_dir() != folder:
        kind, wanted = ("a file", "folder") if folder else ("a folder", "file")
        raise FeatherFaceError(f"{flag} {path} is {kind}; give a {wanted} path")
    existing = next(p for p in (path, *path.absolute().parents) if p.exists() or p.is_symlink())
    if not existing.is_dir() and existing != path:
        raise FeatherFaceError(f"{flag} {path} cannot be created: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | (os.X_OK if existing.is_dir() else 0)):
        raise FeatherFaceError(f"{flag} {path} cannot be written: no write permission for {existing}")
