"""Calibration and evaluation data: load, sample, validate (no TensorFlow here).

A data source is one of:

* ``.npy``: one array, first axis = samples (single-input models);
* ``.npz``: one array per model input name, or ``x`` (single input), plus an
  optional ``y`` with labels and optional ``y_<output name>`` with labels for
  one output of a model with several (``edgeq.fidelity.assign_labels``);
* a directory of images (``.png``, ``.jpg``, ...), resized to the model input
  with Pillow; images in sub-directories get the sorted sub-directory index as
  their label;
* ``module:function``: a function returning an iterable of samples, each an
  array (single input), a tuple/list of arrays (in input order) or a dict
  ``{input name: array}`` (a ``"y"`` key is taken as the label).

Samples are drawn reproducibly (seeded) and checked against the model's input
signature; every problem is a ``DataError`` naming the source and input.
"""

from __future__ import annotations

import importlib
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np

from edgeq.defaults import DEFAULT_SAMPLES
from edgeq.errors import DataError, EdgeqError, UsageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")

# A `module:function` source may yield forever; we read at most this many samples.
MAX_ITERABLE_SAMPLES = 10_000

# Images are decoded from files we did not make: one larger than this many pixels
# (a 12 KB PNG can declare 100000 x 100000) is refused from its header, before
# decoding. 64 Mpx is an 8k x 8k photo, far above any model input.
MAX_IMAGE_PIXELS = 64 * 1024 * 1024


@dataclass(frozen=True)
class InputSpec:
    """One model input: its name, shape (``None`` for unknown dims, batch first) and dtype name."""

    name: str
    shape: tuple[Optional[int], ...]
    dtype: str = "float32"

    @property
    def sample_shape(self) -> tuple[Optional[int], ...]:
        """The shape of one sample (without the batch axis)."""
        return tuple(self.shape[1:])


@dataclass(frozen=True)
class DataOptions:
    """How to draw and normalise samples.

    ``samples=None`` takes every sample (what evaluation wants). ``mean``/``std``
    (one value, or one per channel) or ``scale`` normalise the raw values:
    ``(x - mean) / std`` or ``x * scale``; they apply to every source kind.
    """

    samples: Optional[int] = DEFAULT_SAMPLES
    seed: int = 0
    mean: Optional[tuple[float, ...]] = None
    std: Optional[tuple[float, ...]] = None
    scale: Optional[float] = None

    def __post_init__(self) -> None:
        if self.samples is not None and self.samples < 1:
            raise UsageError(f"--samples must be at least 1, got {self.samples}")
        if self.scale is not None and (self.mean is not None or self.std is not None):
            raise UsageError("use either --scale or --mean/--std, not both")
        if self.std is not None and any(s == 0 for s in self.std):
            raise UsageError("--std must not be 0")

    def to_dict(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "seed": self.seed,
            "mean": list(self.mean) if self.mean is not None else None,
            "std": list(self.std) if self.std is not None else None,
            "scale": self.scale,
        }


@dataclass(frozen=True)
class Dataset:
    """Validated samples for every model input (read-only arrays, batch axis first)."""

    source: str
    kind: str  # "npy" | "npz" | "images" | "function"
    names: tuple[str, ...]
    arrays: tuple[np.ndarray, ...] = field(repr=False)
    labels: Optional[np.ndarray] = field(default=None, repr=False)
    available: int = 0  # samples in the source before sampling
    indices: tuple[int, ...] = field(default=(), repr=False)  # which source samples were drawn
    # Labels for one output each (``y_<output name>`` in an .npz), drawn like ``labels``.
    output_labels: Mapping[str, np.ndarray] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return int(self.arrays[0].shape[0]) if self.arrays else 0

    def as_dict(self) -> dict[str, np.ndarray]:
        """``{input name: array}`` with all samples."""
        return dict(zip(self.names, self.arrays))

    def sample(self, i: int) -> dict[str, np.ndarray]:
        """Sample ``i`` as ``{input name: array with a batch axis of 1}``."""
        return {n: a[i : i + 1] for n, a in zip(self.names, self.arrays)}

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "kind": self.kind,
            "samples": len(self),
            "available": self.available,
            "has_labels": self.labels is not None or bool(self.output_labels),
            **({"output_labels": sorted(self.output_labels)} if self.output_labels else {}),
            "inputs": {n: list(a.shape[1:]) for n, a in zip(self.names, self.arrays)},
        }


def load_dataset(
    source: str | Path,
    inputs: Sequence[InputSpec],
    options: DataOptions = DataOptions(),
    role: str = "calibration",
) -> Dataset:
    """Load ``source``, draw ``options.samples`` samples (seeded) and validate them against ``inputs``.

    ``role`` ("calibration" or "evaluation") only words the error messages.
    Raises ``DataError`` for anything that does not fit the model.
    """
    if not inputs:
        raise DataError("the model has no inputs to feed")
    output_labels: dict[str, np.ndarray] = {}
    src = str(source)
    path = Path(src)
    if path.is_dir():
        kind = "images"
        arrays, labels, available, indices = _load_images(path, inputs, options, role)
    elif path.suffix.lower() == ".npy":
        kind = "npy"
        arrays, labels = _load_npy(path, inputs, role)
        available, indices, arrays, labels = _draw(arrays, labels, options)
    elif path.suffix.lower() == ".npz":
        kind = "npz"
        arrays, labels, output_labels = _load_npz(path, inputs, role)
        for key, y in output_labels.items():
            if y.ndim == 0 or y.shape[0] != arrays[0].shape[0]:
                raise DataError(f"{role} data {src}: 'y_{key}' holds {y.shape[0] if y.ndim else 0} labels for "
                                f"{arrays[0].shape[0] if arrays[0].ndim else 0} samples",
                                "give one label per sample")
        available, indices, arrays, labels = _draw(arrays, labels, options)
        output_labels = {k: y[indices] for k, y in output_labels.items()}
    elif _looks_like_function(src) and not path.exists():
        kind = "function"
        arrays, labels = _load_function(src, inputs, role)
        available, indices, arrays, labels = _draw(arrays, labels, options)
    elif not path.exists():
        raise DataError(
            f"{role} data {src}: no such file or directory",
            "give a .npy, .npz, a directory of images or module:function",
        )
    else:
        raise DataError(
            f"{role} data {src}: unknown format '{path.suffix or path.name}'",
            "give a .npy, .npz, a directory of images or module:function",
        )

    checked = []
    for spec, arr in zip(inputs, arrays):
        arr = _check_array(arr, spec, src, role, len(inputs) > 1)
        arr = _normalise(arr, options, spec, src)
        _check_finite(arr, spec, src, role)
        arr = np.ascontiguousarray(arr)
        arr.setflags(write=False)
        checked.append(arr)
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape[0] != checked[0].shape[0]:
            raise DataError(
                f"{role} data {src}: {labels.shape[0]} labels for {checked[0].shape[0]} samples",
                "give one label per sample in 'y'",
            )
        labels.setflags(write=False)
    for y in output_labels.values():
        y.setflags(write=False)
    return Dataset(
        source=src,
        kind=kind,
        names=tuple(s.name for s in inputs),
        arrays=tuple(checked),
        labels=labels,
        available=available,
        indices=tuple(int(i) for i in indices),
        output_labels=output_labels,
    )


def parse_floats(text: Optional[str], option: str) -> Optional[tuple[float, ...]]:
    """Parse ``"0.5"`` or ``"0.485,0.456,0.406"`` for ``--mean``/``--std``."""
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"{option} takes numbers separated by commas, got '{text}'") from None
    if not values:
        raise UsageError(f"{option} takes numbers separated by commas, got '{text}'")
    if not all(np.isfinite(values)):
        raise UsageError(f"{option} takes finite numbers, got '{text}'", "nan and inf cannot normalise data")
    if option == "--std" and 0.0 in values:
        raise UsageError("--std cannot be 0 (it divides the data)", "use 1 to leave a channel's scale alone")
    return values


MAX_INPUT_DIM = 1 << 16  # one dimension of an --input-shape


def parse_input_shape(text: str) -> tuple[Optional[str], tuple[int, ...]]:
    """``"NAME:1x32x32x3"`` or ``"1x32x32x3"`` (the only input) for ``--input-shape``: (name or None, shape)."""
    name, _, dims = text.rpartition(":")
    parts = dims.lower().split("x")
    if not dims or not all(re.fullmatch(r"[0-9]{1,9}", p.strip()) for p in parts):
        raise UsageError(f"--input-shape takes NAME:1xHxWxC (or 1xHxWxC for a single-input model), got '{text}'",
                         "e.g. --input-shape image:1x96x96x3")
    shape = tuple(int(p) for p in parts)
    if not 1 <= len(shape) <= 8 or not all(1 <= d <= MAX_INPUT_DIM for d in shape):
        raise UsageError(f"--input-shape {text}: each of 1 to 8 dimensions must be between 1 and {MAX_INPUT_DIM}")
    if shape[0] != 1:
        raise UsageError(f"--input-shape {text}: the first (batch) dimension must be 1",
                         "edgeq exports and runs models with a batch of one sample")
    return (name.strip() or None), shape


def concrete_inputs(
    inputs: Sequence[InputSpec],
    given: Sequence[tuple[Optional[str], tuple[int, ...]]] = (),
    data: Optional[Dataset] = None,
) -> tuple[tuple[InputSpec, ...], tuple[dict[str, Any], ...]]:
    """Give inputs with unknown dims (other than the batch) a concrete shape, and say where it came from.

    ``given`` (``--input-shape``) comes first; else the shape of ``data``'s samples.
    Returns the specs (batch 1 where a shape was set) and one record per input
    that was made concrete: ``{"name", "model_shape", "shape", "source"}``.
    Raises ``UsageError`` for a shape that names no input or does not fit one.
    """
    by_name: dict[str, tuple[int, ...]] = {}
    for name, shape in given:
        if name is None:
            if len(inputs) != 1:
                raise UsageError(f"--input-shape {'x'.join(map(str, shape))} names no input, but the model has "
                                 f"{len(inputs)} ({', '.join(s.name for s in inputs)})", "write NAME:1xHxWxC")
            name = inputs[0].name
        if name not in {s.name for s in inputs}:
            raise UsageError(f"--input-shape names input '{name}', which the model does not have",
                             f"the inputs are {', '.join(s.name for s in inputs)}")
        by_name[name] = shape
    specs, records = [], []
    for spec in inputs:
        dynamic = any(d is None for d in spec.shape[1:])
        shape: Optional[tuple[int, ...]] = None
        source = ""
        if spec.name in by_name:
            shape, source = by_name[spec.name], "--input-shape"
            fits = len(shape) == len(spec.shape) and all(e is None or e == g for e, g in zip(spec.shape[1:], shape[1:]))
            if not fits:
                raise UsageError(f"--input-shape {spec.name}:{'x'.join(map(str, shape))} does not fit the model's "
                                 f"input {_fmt_shape(spec.shape)}", "keep the model's known dimensions")
        elif dynamic and data is not None and spec.name in data.names:
            arr = data.arrays[data.names.index(spec.name)]
            shape, source = (1,) + tuple(int(d) for d in arr.shape[1:]), "calibration data"
        if shape is None or (not dynamic and source != "--input-shape"):
            specs.append(spec)
            continue
        specs.append(InputSpec(spec.name, shape, spec.dtype))
        if dynamic:
            records.append({"name": spec.name, "model_shape": [-1 if d is None else d for d in spec.shape],
                            "shape": list(shape), "source": source})
    return tuple(specs), tuple(records)


# ---------------------------------------------------------------- loaders


def _looks_like_function(src: str) -> bool:
    if src.count(":") != 1:
        return False
    mod, fn = src.split(":")
    return bool(mod) and fn.isidentifier() and all(p.isidentifier() for p in mod.split("."))


def _empty(src: str, role: str) -> DataError:
    return DataError(f"{role} data {src} holds no samples", f"give at least one {role} sample")


def _load_npy(path: Path, inputs: Sequence[InputSpec], role: str) -> tuple[list[np.ndarray], None]:
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


def _load_npz(path: Path, inputs: Sequence[InputSpec],
              role: str) -> tuple[list[np.ndarray], Optional[np.ndarray], dict[str, np.ndarray]]:
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


def _draw(
    arrays: list[np.ndarray], labels: Optional[np.ndarray], options: DataOptions
) -> tuple[int, np.ndarray, list[np.ndarray], Optional[np.ndarray]]:
    lengths = {a.shape[0] if a.ndim else 0 for a in arrays}
    available = min(lengths) if lengths else 0
    if len(lengths) > 1:
        raise DataError(f"the input arrays hold different numbers of samples ({sorted(lengths)})",
                        "give every input the same number of samples")
    idx = _indices(available, options)
    arrays = [a[idx] if a.ndim else a for a in arrays]
    if labels is not None and labels.ndim and labels.shape[0] == available:
        labels = labels[idx]
    return available, idx, arrays, labels


def _indices(available: int, options: DataOptions) -> np.ndarray:
    if options.samples is None or options.samples >= available:
        return np.arange(available)
    rng = np.random.default_rng(options.seed)
    return np.sort(rng.choice(available, size=options.samples, replace=False))


def _load_images(
    path: Path, inputs: Sequence[InputSpec], options: DataOptions, role: str
) -> tuple[list[np.ndarray], Optional[np.ndarray], int, np.ndarray]:
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
            f"input '{spec.name}' has {_fmt_shape(shape)}",
            "give an .npy with samples of the right shape, or the size with --input-shape NAME:1xHxWxC",
        )
    height, width, channels = shape
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise _empty(str(path), role)
    classes = sorted({p.parent.relative_to(path).parts[0] for p in files if p.parent != path})
    labelled = bool(classes) and all(p.parent != path for p in files)
    idx = _indices(len(files), options)
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


def import_function(src: str, what: str, error: type[EdgeqError]) -> Callable[[], Any]:
    """The function named by ``module:function`` (user code, trusted), found as ``python -m`` finds modules.

    ``what`` starts each message (``"calibration data mod:fn"``); failures raise ``error``.
    """
    mod_name, fn_name = src.split(":")
    added = False
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")  # like `python -m`: modules in the working directory are found
        added = True
    try:
        module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise error(f"{what}: cannot import module '{mod_name}' ({exc})",
                    "check the module name and that it is on PYTHONPATH") from None
    finally:
        if added:
            sys.path.remove("")
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise error(f"{what}: module '{mod_name}' has no function '{fn_name}'")
    return fn


def _load_function(src: str, inputs: Sequence[InputSpec], role: str) -> tuple[list[np.ndarray], Optional[np.ndarray]]:
    fn_name = src.split(":")[1]
    fn = import_function(src, f"{role} data {src}", DataError)
    try:
        produced = fn()
        iterator = iter(produced)
    except TypeError:
        raise DataError(f"{role} data {src}: {fn_name}() must return an iterable of samples") from None

    names = [s.name for s in inputs]
    columns: list[list[np.ndarray]] = [[] for _ in inputs]
    labels: list[Any] = []
    for n, item in enumerate(iterator):
        if n >= MAX_ITERABLE_SAMPLES:
            break
        label = None
        if isinstance(item, Mapping):
            missing = [k for k in names if k not in item]
            if missing:
                raise DataError(f"{role} data {src}: sample {n} has no value for input(s) {', '.join(missing)}")
            values = [item[k] for k in names]
            label = item.get("y")
        elif isinstance(item, (tuple, list)):
            if len(item) != len(inputs):
                raise DataError(
                    f"{role} data {src}: sample {n} has {len(item)} arrays, the model has {len(inputs)} inputs",
                    "yield one array per input, or a dict {input name: array}",
                )
            values = list(item)
        else:
            if len(inputs) != 1:
                raise DataError(f"{role} data {src}: sample {n} is one array, the model has {len(inputs)} inputs",
                                "yield a tuple or a dict {input name: array}")
            values = [item]
        for k, (spec, v) in enumerate(zip(inputs, values)):
            v = np.asarray(v)
            # A leading batch axis of 1 is what a Keras user naturally yields.
            if v.ndim == len(spec.sample_shape) + 1 and v.shape[0] == 1:
                v = v[0]
            columns[k].append(v)
        labels.append(label)
    if not columns[0]:
        raise _empty(src, role)
    arrays = []
    for spec, col in zip(inputs, columns):
        shapes = {c.shape for c in col}
        if len(shapes) > 1:
            raise DataError(
                f"{role} data {src}: input '{spec.name}' samples have different shapes "
                f"({', '.join(_fmt_shape(s) for s in sorted(shapes)[:3])})",
                f"expected {_fmt_shape(spec.sample_shape)} for every sample",
            )
        try:
            arrays.append(np.stack(col))
        except (TypeError, ValueError) as exc:
            raise DataError(f"{role} data {src}: input '{spec.name}' samples are not numeric arrays ({exc})") from None
    y = np.asarray(labels) if all(v is not None for v in labels) else None
    return arrays, y


# ---------------------------------------------------------------- checks


def _fmt_shape(shape: Sequence[Optional[int]]) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + (",)" if len(shape) == 1 else ")")


def _check_array(arr: np.ndarray, spec: InputSpec, src: str, role: str, multi: bool) -> np.ndarray:
    where = f"{role} data {src}" + (f" (input '{spec.name}')" if multi else "")
    if arr.ndim == 0 or arr.shape[0] == 0:
        raise _empty(src, role)
    expected = spec.sample_shape
    got = arr.shape[1:]
    fits = len(got) == len(expected) and all(e is None or e == g for e, g in zip(expected, got))
    if not fits:
        hint = f"each sample must have shape {_fmt_shape(expected)} (first axis = samples)"
        if len(got) + 1 == len(expected) and expected[-1] == 1 and tuple(got) == tuple(expected[:-1]):
            hint = "add the channel axis, e.g. x[..., None]"
        elif tuple(arr.shape) == tuple(expected):
            hint = "add a leading samples axis, e.g. x[None]"
        raise DataError(
            f"{where}: expected samples of shape {_fmt_shape(expected)} (rank {len(expected)}), "
            f"got {_fmt_shape(got)} (rank {len(got)}) from an array of shape {_fmt_shape(arr.shape)}",
            hint,
        )
    return _cast(arr, spec, where)


def _cast(arr: np.ndarray, spec: InputSpec, where: str) -> np.ndarray:
    try:
        target = np.dtype(spec.dtype)
    except TypeError:
        raise DataError(f"{where}: the model input '{spec.name}' has dtype {spec.dtype}, which edgeq cannot feed") from None
    src = arr.dtype
    if src == target:
        return arr
    safe = (
        np.can_cast(src, target, casting="same_kind")
        or (src.kind in "biu" and target.kind == "f")
        or (src.kind == "b" and target.kind in "iu")
    )
    if src.kind in "iu" and target.kind in "iu" and arr.size:
        info = np.iinfo(target)
        safe = bool(arr.min() >= info.min and arr.max() <= info.max)
    if not safe:
        raise DataError(
            f"{where}: dtype {src} cannot be safely cast to the model's input dtype {target}",
            f"convert the data to {target} yourself if the values allow it",
        )
    with np.errstate(over="ignore", invalid="ignore"):
        return arr.astype(target)


def _normalise(arr: np.ndarray, options: DataOptions, spec: InputSpec, src: str) -> np.ndarray:
    if options.scale is None and options.mean is None and options.std is None:
        return arr
    if np.dtype(spec.dtype).kind in "biu":
        return arr  # an integer model input (token ids, indices) is data, not a signal to normalise
    if arr.dtype.kind != "f":
        raise DataError(f"--mean/--std/--scale need a float model input; '{spec.name}' is {arr.dtype}")
    out = arr.astype(np.float32)
    if options.scale is not None:
        return out * np.float32(options.scale)
    channels = arr.shape[-1] if arr.ndim > 1 else 1
    for values, option in ((options.mean, "--mean"), (options.std, "--std")):
        if values is not None and len(values) not in (1, channels):
            raise DataError(f"{option} has {len(values)} values but input '{spec.name}' has {channels} channels",
                            "give one value, or one per channel")
    if options.mean is not None:
        out = out - np.asarray(options.mean, dtype=np.float32)
    if options.std is not None:
        out = out / np.asarray(options.std, dtype=np.float32)
    return out


def _check_finite(arr: np.ndarray, spec: InputSpec, src: str, role: str) -> None:
    if arr.dtype.kind != "f":
        return
    bad = ~np.isfinite(arr)
    if bad.any():
        n_nan = int(np.isnan(arr).sum())
        n_inf = int(bad.sum()) - n_nan
        first = int(np.argwhere(bad.reshape(arr.shape[0], -1).any(axis=1))[0][0])
        what = " and ".join(p for p in (f"{n_nan} NaN" if n_nan else "", f"{n_inf} Inf" if n_inf else "") if p)
        raise DataError(
            f"{role} data {src}: input '{spec.name}' contains {what} values (first in sample {first})",
            "remove or repair those samples (Inf can also mean values too large for float32)",
        )


def iter_samples(data: Dataset) -> Iterable[dict[str, np.ndarray]]:
    """Every sample as ``{input name: array with a batch axis of 1}``."""
    for i in range(len(data)):
        yield data.sample(i)
