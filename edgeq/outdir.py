"""Output paths: create what is missing, refuse to overwrite a report unless asked."""

from __future__ import annotations

from pathlib import Path
from typing import Union

from edgeq.errors import UsageError

# Files edgeq writes into a report directory; one of them present means "this directory holds a report".
REPORT_FILES = (
    "report.json",
    "report.md",
    "report.html",
    "summary.json",
    "summary.html",
    "index.html",
    "sweep.json",
    "sweep.html",
    "comparison.html",
)


def prepare_dir(path: Union[str, Path], *, overwrite: bool = False) -> Path:
    """Create ``path`` (and its parents); refuse a directory that already holds a report unless ``overwrite``."""
    directory = Path(path)
    if directory.exists() and not directory.is_dir():
        raise UsageError(f"{directory} is a file, not a directory", hint="choose another -o")
    if directory.is_dir() and not overwrite:
        held = [name for name in REPORT_FILES if (directory / name).exists()]
        if held:
            raise UsageError(
                f"{directory} already holds a report ({held[0]})",
                hint="pass --force to replace it or choose another -o",
            )
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create output directory {directory}: {exc.strerror or exc}",
                         hint="choose another -o") from exc
    return directory


def prepare_file(path: Union[str, Path], *, overwrite: bool = True) -> Path:
    """Create the parent directories of ``path``; refuse an existing file unless ``overwrite``."""
    target = Path(path)
    if target.is_dir():
        raise UsageError(f"{target} is a directory, not a file", hint="pass a file name to -o")
    if target.exists() and not overwrite:
        raise UsageError(f"{target} already exists", hint="pass --force to replace it or choose another -o")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create directory {target.parent}: {exc.strerror or exc}",
                         hint="choose another -o") from exc
    return target
