"""File sources: .npy, .npz and directories of images, with their size and decompression-bomb bounds."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from edgeq.calibration.sampling import sample_indices
from edgeq.calibration.types import DataOptions, InputSpec, fmt_shape, no_samples
from edgeq.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")

# Images are decoded from files we did not make: one larger than this many pixels
# (a 12 KB PNG can declare 100000 x 100000) is refused from its header, before
# decoding. 64 Mpx is an 8k x 8k photo, far above any model input.
MAX_IMAGE_PIXELS = 64 * 1024 * 1024


def load_npy(path: Path, inputs: Sequence[InputSpec], role: str) -> tuple[list[np.ndarray], None]:
    """The one array of an .npy (a single-input model only)."""
    if len(inputs) > 1:
        names = ", ".join(s.name for s in inputs)
        raise DataError(
            f"{role} data {path}: the model has {len(inputs)} inputs ({names}) but a .npy holds one array",
            "save an .npz with one array per input name",
        )
    arr = _read_numpy(path, role)
    if not isinstance(arr, np.ndarray):
        raise DataError(f"{role} data {path} does not hold an array")
    return [arr], None


def load_npz(path: Path, inputs: Sequence[InputSpec],
             role: str) -> tuple[list[np.ndarray], Optional[np.ndarray], dict[str, np.ndarray]]:
    """The arrays of an .npz for ``inputs``, its ``y`` labels and its ``y_<output>`` labels by output name."""
    with _read_numpy(path, role) as npz:
        keys = list(npz.files)
        names = [s.name for s in inputs]
        # y_<output name>: labels for one output (never an input's array, whatever its name).
        label_keys = [k for k in keys if k.startswith("y_") and k not in names]
        data_keys = [k for k in keys if k != "y" and k not in label_keys]
        if all(n in keys for n in names):
            chosen = names
        elif len(inputs) == 1 and "x" in keys:
            chosen = ["x"]
        elif len(inputs) == 1 and len(data_keys) == 1:
            chosen = data_keys
        else:
            want = "'x' or '" + names[0] + "'" if len(names) == 1 else ", ".join(f"'{n}'" for n in names)
            raise DataError(
                f"{role} data {path}: expected arrays {want} (plus optional 'y'), found {', '.join(keys) or 'none'}",
                "name the arrays after the model inputs",
            )
        try:
            arrays = [npz[k] for k in chosen]
            labels = npz["y"] if "y" in keys else None
            output_labels = {k[2:]: npz[k] for k in label_keys}
        except (ValueError, OSError, EOFError) as exc:
            raise DataError(f"{role} data {path}: cannot read arrays ({exc})") from None
        except MemoryError:
            raise DataError(f"{role} data {path}: not enough memory to load its arrays", "use a smaller file") from None
    return arrays, labels, output_labels


def _declared_bytes(fp: Any) -> int:
    """Bytes of data an .npy header (at ``fp``) declares; ``fp`` is left after the header."""
    from numpy.lib import format as npy_format

    major, _ = npy_format.read_magic(fp)
    read_header = npy_format.read_array_header_1_0 if major == 1 else npy_format.read_array_header_2_0
    shape, _, dtype = read_header(fp, max_header_size=10_000)
    n = 1
    for d in shape:
        n *= int(d)
    return n * dtype.itemsize


# What a .npy/.npz may declare once loaded (its headers are read before numpy allocates anything).
# Calibration and evaluation sets are a few hundred samples: 2 GiB is far past any of them.
MAX_DATA_BYTES = 2 << 30
# A member that expands more than NPZ_MAX_RATIO times past NPZ_BOMB_FLOOR bytes is a zip bomb: real
# samples (images, features) compress a few times; zeros compress a thousand times.
NPZ_BOMB_FLOOR = 64 << 20
NPZ_MAX_RATIO = 100


def check_numpy_sizes(path: str | Path, role: str, limit: int = MAX_DATA_BYTES) -> int:
    """Bytes the arrays of an .npy/.npz declare, read from their headers without loading any data.

    ``DataError`` naming the file, the array and the sizes when a header declares more than the
    file holds, a member expands like a zip bomb, or the total passes ``limit``.
    """
    import zipfile

    path = Path(path)
    total = 0
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                for info in z.infolist():
                    if not info.filename.endswith(".npy"):
                        continue
                    name = info.filename[:-4]
                    if info.file_size > NPZ_BOMB_FLOOR and info.file_size > NPZ_MAX_RATIO * max(info.compress_size, 1):
                        raise DataError(f"{role} data {path}: array {name!r} expands from "
                                        f"{info.compress_size} to {info.file_size} bytes (a zip bomb?)",
                                        "save it with numpy.savez (uncompressed) or check where it came from")
                    with z.open(info) as member:
                        declared = _declared_bytes(member)
                        holds = info.file_size - member.tell()
                    if declared > holds:
                        raise DataError(f"{role} data {path}: array {name!r} declares {declared} bytes "
                                        f"but holds {holds}", "the file is damaged or crafted; save it again")
                    total += declared
                    if total > limit:
                        raise DataError(f"{role} data {path}: its arrays declare {total} bytes by array {name!r}, "
                                        f"more than the limit of {limit}", "use fewer samples (a smaller file)")
        else:
            with open(path, "rb") as f:
                declared = _declared_bytes(f)
                holds = path.stat().st_size - f.tell()
            if declared > holds:
                raise DataError(f"{role} data {path}: the array declares {declared} bytes but the file holds {holds}",
                                "the file is damaged or crafted; save it again")
            total = declared
            if total > limit:
                raise DataError(f"{role} data {path}: the array declares {total} bytes, more than the limit of "
                                f"{limit}", "use fewer samples (a smaller file)")
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, SyntaxError, TypeError) as exc:
        raise DataError(f"{role} data {path} is not a readable NumPy file ({type(exc).__name__}: {exc})",
                        "save it with numpy.save / numpy.savez") from None
    return total


def _read_numpy(path: Path, role: str) -> Any:
    if path.is_file():
        check_numpy_sizes(path, role)
    try:
        return np.load(path, allow_pickle=False)
    except MemoryError:
        raise DataError(f"{role} data {path}: not enough memory to load it", "use fewer samples") from None
    except FileNotFoundError:
        raise DataError(f"{role} data {path}: no such file", "check the path") from None
    except IsADirectoryError:
        raise DataError(f"{role} data {path} is a directory") from None
    except PermissionError:
        raise DataError(f"{role} data {path}: permission denied") from None
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(
            f"{role} data {path} is not a readable NumPy file ({exc})",
            "save it with numpy.save / numpy.savez (object arrays are not accepted)",
        ) from None


def load_images(
    path: Path, inputs: Sequence[InputSpec], options: DataOptions, role: str
) -> tuple[list[np.ndarray], Optional[np.ndarray], int, np.ndarray]:
    """The drawn images of a directory, resized to the input: (arrays, labels by sub-directory, available, indices)."""
    if len(inputs) > 1:
        raise DataError(
            f"{role} data {path}: a directory of images can feed a single-input model only; "
            f"this model has {len(inputs)} inputs",
            "save an .npz with one array per input name",
        )
    spec = inputs[0]
    shape = spec.sample_shape
    if len(shape) != 3 or shape[0] is None or shape[1] is None:
        raise DataError(
            f"{role} data {path}: images need a model input of shape (height, width, channels), "
            f"input '{spec.name}' has {fmt_shape(shape)}",
            "give an .npy with samples of the right shape, or the size with --input-shape NAME:1xHxWxC",
        )
    height, width, channels = shape
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise no_samples(str(path), role)
    classes = sorted({p.parent.relative_to(path).parts[0] for p in files if p.parent != path})
    labelled = bool(classes) and all(p.parent != path for p in files)
    idx = sample_indices(len(files), options)
    try:
        from PIL import Image  # noqa: F401 - Pillow is needed here; _read_image uses it
    except ImportError:
        raise DataError("reading a directory of images needs Pillow", "pip install 'edgeq[convert]'") from None
    mode = {1: "L", 3: "RGB", 4: "RGBA"}.get(channels or 3)
    if mode is None:
        raise DataError(f"{role} data {path}: input '{spec.name}' has {channels} channels; images have 1, 3 or 4")
    out = np.empty((len(idx), height, width, channels or 3), dtype=np.float32)
    for j, i in enumerate(idx):
        out[j] = _read_image(files[i], mode, width, height, role)
    labels = None
    if labelled:
        class_index = {c: k for k, c in enumerate(classes)}
        labels = np.array([class_index[files[i].relative_to(path).parts[0]] for i in idx], dtype=np.int64)
    return [out], labels, len(files), idx


def _read_image(f: Path, mode: str, width: int, height: int, role: str) -> np.ndarray:
    """One image as float32 (height, width, channels); any failure of Pillow is a DataError naming the file."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            # Pillow only warns between its own limit and twice that; here too many pixels is an error.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(f) as im:
                w, h = im.size
                if w * h > MAX_IMAGE_PIXELS:
                    raise DataError(f"{role} data {f}: the image is {w} x {h} pixels, more than "
                                    f"{MAX_IMAGE_PIXELS // (1024 * 1024)} Mpx (a decompression bomb?)",
                                    "remove the file or resize it before calibrating")
                im = im.convert(mode).resize((width, height), Image.BILINEAR)
                pixels = np.asarray(im, dtype=np.float32)
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(f"{role} data {f}: refused by Pillow's decompression-bomb guard ({exc})",
                        "remove the file or resize it before calibrating") from None
    except MemoryError:
        raise DataError(f"{role} data {f}: not enough memory to decode the image", "resize it first") from None
    except Exception as exc:  # noqa: BLE001 - Pillow's decoders raise many types (SyntaxError, struct.error, ...)
        raise DataError(f"{role} data {f}: cannot read image ({type(exc).__name__}: {exc})",
                        "remove or replace the file") from None
    return pixels.reshape(height, width, -1)
