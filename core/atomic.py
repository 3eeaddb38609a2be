"""Atomic outputs: a stage killed midway leaves nothing at the final path.

Work is written to a hidden temporary sibling (same filesystem) and renamed
into place only when complete, so DVC never caches a half-written output.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(final: str | Path) -> list[Path]:
    """Delete the temporaries a killed writer of ``final`` left beside it (``.<name>.tmp-<pid>-*``
    of a process that no longer runs); returns what was removed."""
    final = Path(final)
    removed = []
    if not final.parent.is_dir():
        return removed
    for entry in final.parent.glob(f".{final.name}.tmp-*"):
        pid = entry.name[len(f".{final.name}.tmp-"):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
            removed.append(entry)
    return removed


def replace_path(new: Path, final: Path) -> None:
    """Rename ``new`` (a file or a finished folder) to ``final``, replacing what is there; an older
    folder is moved aside first (a folder cannot replace a non-empty one in one rename)."""
    if final.is_dir() and not final.is_symlink():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(new, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        if new.is_dir() and (final.exists() or final.is_symlink()):
            final.unlink()
        os.replace(new, final)


@contextlib.contextmanager
def atomic_path(final: str | Path, *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path; on success rename it to ``final`` (replacing it).

    On an exception the temporary is removed and ``final`` is left untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(final)
    prefix = f".{final.name}.tmp-{os.getpid()}-"
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=final.suffix, dir=final.parent)
        os.close(fd)
        tmp = Path(name)
    # mkstemp/mkdtemp create owner-only files; give outputs the usual umask-based modes.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, (0o777 if is_dir else 0o666) & ~umask)
    try:
        yield tmp
        replace_path(tmp, final)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        raise


def save_torch_atomic(obj: Any, final: str | Path) -> None:
    """``torch.save`` to ``final`` atomically, with bytes that depend only on ``obj``: saving to a
    buffer keeps the temporary file's name out of the archive (torch names its records after the file)."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    with atomic_path(final) as tmp:
        tmp.write_bytes(buf.getvalue())


def write_text_atomic(final: str | Path, text: str) -> None:
    """Write a small text file (metrics json, lists) atomically."""
    with atomic_path(final) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def locked(path: str | Path) -> Iterator[None]:
    """Serialise builders of ``path`` (parallel test sessions, workers) on a lock file beside it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
