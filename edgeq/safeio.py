"""Files on the host: one atomic-write helper for every output edgeq writes, one check that an output
is not an input, and one bounded reader for every file a user points edgeq at.

A file is written to an exclusively created temporary name in the same
directory (``O_CREAT | O_EXCL`` with a random name, so a planted symlink is
never followed), flushed and fsynced, then renamed over the final name. A
reader sees the old file or the new one, never half of one; a symlink planted
at the final name is replaced, not written through. ``read_bounded`` reads
regular files only (a FIFO or a device is refused before a byte is read), at
most ``limit`` bytes; ``load_toml`` adds bounded nesting.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

from edgeq.errors import InputError, UsageError

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


def same_or_inside(output: str | Path, source: str | Path) -> bool:
    """Would writing ``output`` overwrite ``source``? The same file (by resolved path or inode), or an
    existing file inside ``source`` when it is a directory (a SavedModel, an image folder)."""
    out, src = Path(output), Path(source)
    try:
        out_r, src_r = out.resolve(), src.resolve()
    except (OSError, RuntimeError):
        return False
    if out_r == src_r:
        return True
    try:
        if out.exists() and src.exists() and os.path.samefile(out, src):
            return True  # a hard link, or a bind mount
    except OSError:
        pass
    return src_r.is_dir() and src_r in out_r.parents and os.path.lexists(out)


def refuse_output_over_input(outputs: Iterable[tuple[str, Optional[str | Path]]],
                             inputs: Iterable[tuple[str, Optional[str | Path]]]) -> None:
    """``UsageError`` when an output (``(what, path)``) would overwrite an input or another output.

    Runs before any work: ``convert m.keras -o m.keras`` must not replace the model it reads.
    ``None`` paths and inputs that are not files (``module:function`` data) are skipped.
    """
    outs = [(what, Path(p)) for what, p in outputs if p is not None]
    ins = [(what, Path(p)) for what, p in inputs if p is not None and Path(p).exists()]
    for i, (what, out) in enumerate(outs):
        for src_what, src in ins:
            if same_or_inside(out, src):
                where = "is" if Path(out).resolve() == Path(src).resolve() or not src.is_dir() else "is inside"
                raise UsageError(f"the {what} {out} {where} the {src_what} {src}: writing it would destroy the input",
                                 f"choose another {what} path")
        for other_what, other in outs[i + 1:]:
            if same_or_inside(out, other) or same_or_inside(other, out):
                raise UsageError(f"the {what} {out} and the {other_what} {other} are the same file",
                                 f"choose another path for the {other_what}")


# ------------------------------------------------------------------ reading files from elsewhere

ErrorFactory = Callable[..., Exception]


def read_bounded(path: str | Path, limit: int, label: Optional[str] = None,
                 error: ErrorFactory = InputError, missing_hint: Optional[str] = None, kind: str = "file") -> bytes:
    """The bytes of the regular file ``path``, at most ``limit`` of them; ``error(message, hint)`` otherwise.

    The one reader for files a user points edgeq at (``--target``, ``--recipe-file``, a results
    file): opened ``O_NONBLOCK`` so a FIFO cannot hang the open, then checked with ``fstat`` on the
    open descriptor (no race with a rename), so a FIFO, ``/dev/zero`` or a directory is refused
    before anything is read, and a file that grows while read is cut at ``limit + 1`` bytes.
    """
    where = label or str(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise error(f"{where}: no such {kind}", missing_hint) from None
    except IsADirectoryError:
        raise error(f"{where} is a directory, not a file", missing_hint) from None
    except OSError as exc:
        raise error(f"{where}: cannot read ({exc.strerror or exc})", None) from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise error(f"{where} is a directory, not a file", missing_hint)
        if not stat.S_ISREG(info.st_mode):
            raise error(f"{where} is not a regular file (a FIFO, a device or a socket cannot be read safely)",
                        "give the path of a file")
        if info.st_size > limit:
            raise error(f"{where}: {info.st_size} bytes, larger than the limit of {limit}", None)
        os.set_blocking(fd, True)
        chunks, total = [], 0
        while total <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except OSError as exc:
        raise error(f"{where}: cannot read ({exc.strerror or exc})", None) from None
    finally:
        os.close(fd)
    if total > limit:
        raise error(f"{where}: larger than the limit of {limit} bytes", None)
    return b"".join(chunks)


MAX_TOML_DEPTH = 32  # profiles and recipe tables nest three or four levels


def load_toml(path: str | Path, limit: int, label: Optional[str] = None, error: ErrorFactory = InputError,
              missing_hint: Optional[str] = None, max_depth: int = MAX_TOML_DEPTH, kind: str = "file") -> dict[str, Any]:
    """A TOML file read with :func:`read_bounded`, parsed with its nesting bounded; ``error(...)`` otherwise."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    from edgeq._device import protocol

    where = label or str(path)
    raw = read_bounded(path, limit, where, error, missing_hint, kind)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise error(f"{where}: not UTF-8 text", "give a TOML file") from None
    # Nesting is bounded before the parse too: the parser recurses once per bracket, so a line of
    # 10,000 brackets would reach Python's recursion limit; count them first (outside strings, roughly).
    if _bracket_depth(text) > max_depth:
        raise error(f"{where}: nested deeper than {max_depth} levels", "is it really a TOML file for edgeq?")
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{where}: not valid TOML ({exc})", "fix the file's syntax") from None
    except RecursionError:
        raise error(f"{where}: nested deeper than {max_depth} levels", "is it really a TOML file for edgeq?") from None
    if protocol.depth(doc, max_depth) > max_depth:
        raise error(f"{where}: nested deeper than {max_depth} levels", "is it really a TOML file for edgeq?")
    return doc


def _bracket_depth(text: str) -> int:
    """The deepest run of open ``[``/``{`` brackets outside quoted strings (an upper bound is enough)."""
    depth = deepest = 0
    quote = ""
    for ch in text:
        if quote:
            if ch == quote or ch == "\n":
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch == "#":
            quote = "\n"  # a comment runs to the end of the line
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth = max(0, depth - 1)
    return deepest
