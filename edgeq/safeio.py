"""Writing files the host owns: one atomic-write helper for every output edgeq writes.

A file is written to an exclusively created temporary name in the same
directory (``O_CREAT | O_EXCL`` with a random name, so a planted symlink is
never followed), flushed and fsynced, then renamed over the final name. A
reader sees the old file or the new one, never half of one; a symlink planted
at the final name is replaced, not written through.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Union

from edgeq.errors import InputError

Data = Union[str, bytes]


def atomic_write(path: str | Path, data: Data, mode: int = 0o644) -> Path:
    """Write ``data`` to ``path`` atomically; raise ``InputError`` naming the path on failure."""
    target = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    parent = target.parent if str(target.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent)
    except OSError as exc:
        raise InputError(f"cannot write {target}: {exc.strerror or exc}",
                         "check that the directory exists and is writable") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise InputError(f"cannot write {target}: {exc.strerror or exc}",
                         "check free space and permissions, or choose another path") from None
    return target


def temp_beside(path: str | Path) -> Path:
    """An exclusively created, empty temporary file next to ``path`` (for writers that stream)."""
    target = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    return Path(name)
