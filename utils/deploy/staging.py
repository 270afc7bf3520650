"""All-or-nothing outputs: check every target first, write into hidden temporary folders beside the
targets, move into place only when everything succeeded (export_dynamic_onnx.py: a failed parity
check or a refused target leaves no graph or package behind and every existing target as it was)."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

from utils.errors import FeatherFaceError

PathLike = Union[str, Path]
FolderCheck = Callable[[Path], Optional[str]]


def _not_empty(folder: Path) -> Optional[str]:
    return "it is not empty"


def _same(a: Path, b: Path) -> bool:
    """The same file: one path resolved, or a hard link / mount of the other."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def check_targets(targets: Sequence[Path], folders: Sequence[Path] = (), inputs: Sequence[Path] = (),
                  check_folder: FolderCheck = _not_empty) -> None:
    """Refuse, before anything is written, targets that replacing would lose data or cannot replace.

    `targets` are files, except those also in `folders`, which are replaced as a whole: those may be
    new, empty, or an existing folder `check_folder` finds nothing against (it returns why not).
    No target may be an input, a folder target may not hold an input or another target, and it may
    not be the current directory, one of its ancestors or a mount point.
    """
    folders = [t for t in targets if any(_same(t, f) for f in folders)]
    cwd = Path.cwd().resolve()
    for i, target in enumerate(targets):
        for other in targets[:i]:
            if _same(target, other):
                raise FeatherFaceError(f"{target} is given as two outputs; choose different paths")
        for source in inputs:
            if _same(target, source):
                raise FeatherFaceError(f"output {target} is the input {source}; writing it would destroy the "
                                       f"input, choose another output path")
        parent = target.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise FeatherFaceError(f"cannot write {target}: {parent} is a file, not a folder")
        resolved = target.resolve()
        if target in folders and (resolved == cwd or resolved in cwd.parents or os.path.ismount(resolved)):
            raise FeatherFaceError(f"{target} cannot be replaced as a whole (it is the current folder, one of "
                                   f"its parents or a mount point); choose a new or empty folder")
        for inner in list(targets) + list(inputs):
            if resolved in inner.resolve().parents:  # replacing the target would remove it
                what = "input" if inner in inputs else "output"
                raise FeatherFaceError(f"{what} {inner} lies inside {target}, which is written as a whole folder; "
                                       f"choose an output folder that does not hold it")
        if target not in folders:
            if target.is_dir():
                raise FeatherFaceError(f"output {target} is an existing folder; give a file path")
            continue
        if target.exists() and not target.is_dir():
            raise FeatherFaceError(f"{target} is an existing file; a folder output needs a new or empty folder")
        if target.is_dir() and any(target.iterdir()):
            why = check_folder(target)
            if why:
                raise FeatherFaceError(f"{target} would be replaced as a whole, but {why}; choose a new or empty "
                                       f"folder")


def _created_parents(path: Path) -> List[Path]:
    """The missing ancestors of `path`, deepest first, created now (removed again on failure)."""
    missing = []
    parent = path.parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    path.parent.mkdir(parents=True, exist_ok=True)
    return missing


def _commit(moves: Sequence[Tuple[Path, Path]]) -> None:
    """Move each (staged, target) into place: the previous targets wait beside their staged paths until
    all moved, and are put back if any move fails."""
    done: List[Tuple[Path, Path, Optional[Path]]] = []
    try:
        for stage, target in moves:
            previous = None
            if target.exists() or target.is_symlink():
                previous = stage.with_name(".previous")
                os.replace(target, previous)
            done.append((stage, target, previous))
            os.replace(stage, target)
    except BaseException:
        for stage, target, previous in reversed(done):
            if not stage.exists() and (target.exists() or target.is_symlink()):
                os.replace(target, stage)
            if previous is not None:
                os.replace(previous, target)
        raise


@contextmanager
def staged(targets: Sequence[Optional[PathLike]], folders: Sequence[Optional[PathLike]] = (),
           inputs: Sequence[Optional[PathLike]] = (), check_folder: FolderCheck = _not_empty) -> Iterator[List[Path]]:
    """Yield a temporary path per target (file, or folder when also in `folders`), on the target's
    file system, after check_targets (None entries are ignored).

    On normal exit each staged path that exists replaces its target (a folder as a whole); if the
    block or a move raises, the staged files and any folders created for them are removed and the
    targets are left as they were.
    """
    targets = [Path(t) for t in targets if t is not None]
    check_targets(targets, [Path(f) for f in folders if f is not None], [Path(p) for p in inputs if p is not None],
                  check_folder)
    created: List[Path] = []
    stages: List[Path] = []
    try:
        for target in targets:
            created += _created_parents(target)
            stages.append(Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent)) / target.name)
        yield stages
        _commit([(stage, target) for stage, target in zip(stages, targets) if stage.exists()])
    except BaseException:
        for stage in stages:
            shutil.rmtree(stage.parent, ignore_errors=True)
        for parent in created:  # deepest first; only if still empty
            try:
                parent.rmdir()
            except OSError:
                pass
        raise
    for stage in stages:
        shutil.rmtree(stage.parent, ignore_errors=True)
