"""Write-temp-then-rename, once: a file or folder appears at its final path whole or not at all.

Every output multitune leaves (adapters, merged models, converted and debug models, prep caches, GGUF files, metrics,
plots, CSVs, infer results) is built under a temporary name beside its final path, on the same file system, and
renamed into place in one step; a crash, a full disk or a second process never sees half of it. Checkpoints keep
their own protocol (trainer/checkpoint.py): every rank writes into one folder, fsynced, with kill points for tests.
Imports no multitune layer.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

# The process's umask, read once: mkstemp and mkdtemp create 0600/0700 entries, which would hide outputs (and a shared
# cache) from other users; they get the permissions an ordinary open() or mkdir() would have given.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextmanager
def atomic_dir(final: Path, keep_existing: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """A fresh, empty temporary folder beside `final`; when the block ends without error it is renamed to `final`,
    replacing a folder already there. On error it is removed and `final` is left as it was.

    keep_existing: for content-addressed caches that several processes may build at once (sweep trials, ranks).
    When `keep_existing(final)` is true once the block is done, another process finished first: its folder is kept
    and ours discarded.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    tmp.chmod(0o777 & ~_UMASK)
    try:
        yield tmp
        if keep_existing is not None and final.exists() and keep_existing(final):
            shutil.rmtree(tmp, ignore_errors=True)
            return
        if final.exists():
            retire(final)
        try:
            os.rename(tmp, final)
        except OSError:  # another process renamed its own copy into place a moment before us
            if keep_existing is None or not (final.exists() and keep_existing(final)):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def retire(path: Path) -> None:
    """Delete a folder so that no moment of the deletion leaves a half folder under its name: renamed out of the
    way first, then removed."""
    doomed = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".del", dir=path.parent))
    os.rename(path, doomed / path.name)
    shutil.rmtree(doomed, ignore_errors=True)


@contextmanager
def atomic_file(final: Path) -> Iterator[Path]:
    """A temporary path beside `final` with the same suffix (matplotlib and others choose the format by it); when
    the block ends without error the file written there replaces `final`. On error it is removed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{final.stem}.", suffix=f".tmp{final.suffix}", dir=final.parent)
    os.close(handle)
    tmp = Path(name)
    tmp.chmod(0o666 & ~_UMASK)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, text: str) -> None:
    """`text` (UTF-8) to `path`, whole or not at all."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
