"""All-or-nothing outputs: write into hidden temporary folders beside the targets, move into place
only when everything succeeded (export_dynamic_onnx.py: a failed parity check leaves no graph or
package behind)."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Sequence, Union

from utils.errors import FeatherFaceError

PathLike = Union[str, Path]


def _created_parents(path: Path) -> List[Path]:
    """The missing ancestors of `path`, deepest first, created now (removed again on failure)."""
    missing = []
    parent = path.parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    path.parent.mkdir(parents=True, exist_ok=True)
    return missing


@contextmanager
def staged(targets: Sequence[PathLike]) -> Iterator[List[Path]]:
    """Yield a temporary path per target (file or folder), on the target's file system.

    On normal exit each staged path that exists replaces its target (an existing folder is
    replaced as a whole); if the block raises, the staged files and any folders created for them
    are removed and the targets are left as they were.
    """
    targets = [Path(t) for t in targets]
    for inner in targets:
        for outer in targets:
            if outer.resolve() in inner.resolve().parents:  # the folder would replace it on commit
                raise FeatherFaceError(f"{inner} lies inside {outer}, which is written as a whole folder; "
                                       f"choose an output outside it")
    created: List[Path] = []
    folders: List[Path] = []
    try:
        for target in targets:
            created += _created_parents(target)
            folders.append(Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent)))
        yield [folder / target.name for folder, target in zip(folders, targets)]
        for folder, target in zip(folders, targets):
            stage = folder / target.name
            if not stage.exists():
                continue
            if target.is_dir() and not target.is_symlink():
                old = folder / ".previous"
                os.replace(target, old)
            os.replace(stage, target)
    except BaseException:
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)
        for parent in created:  # deepest first; only if still empty
            try:
                parent.rmdir()
            except OSError:
                pass
        raise
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
