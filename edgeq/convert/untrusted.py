"""A model file is untrusted input: refuse the code it carries, and zip bombs, before any loader opens it.

Keras ``Lambda`` layers, serialized functions and marshalled bytecode run when
a model is rebuilt, so ``edgeq.convert.load`` walks the whole config first
(``code_in_config``) and refuses with a one-line ``ModelError`` naming where,
unless the user passes ``--unsafe-load``. No TensorFlow here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional

from edgeq.convert.tfenv import first_line
from edgeq.errors import ModelError

UNSAFE_HINT = ("edgeq refuses to run code from a model file; if you trust this file, "
                "re-run with --unsafe-load (it lets the file run its code on this machine)")
_MAX_H5_CONFIG = 16 << 20  # bytes of model_config JSON we are willing to parse


def refuse_h5_code(path: Path) -> None:
    """Refuse a legacy ``.h5`` whose model config holds Python code (Lambda layers, bytecode).

    ``tf_keras`` deserializes ``Lambda`` layers of an ``.h5`` from marshalled
    bytecode and runs them while rebuilding the model, whatever ``safe_mode``
    says (measured), so the config is read with h5py and checked first.
    """
    try:
        import h5py
    except ImportError:
        raise ModelError(f"cannot check {path} for embedded code: h5py is not installed",
                         "pip install h5py (it comes with tf-keras)") from None
    try:
        with h5py.File(path, "r") as f:
            raw = f.attrs.get("model_config")
            if raw is None and "model_config" not in f.attrs:
                raise ModelError(f"{path} has no model_config: it holds weights only, not a model",
                                 "save the whole model with model.save('model.h5')")
            if isinstance(raw, bytes):
                raw = raw.decode("utf-8", "replace")
            if not isinstance(raw, str):
                raise ModelError(f"{path}: model_config is not JSON text")
            if len(raw) > _MAX_H5_CONFIG:
                raise ModelError(f"{path}: model_config is larger than {_MAX_H5_CONFIG >> 20} MiB")
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001 - h5py raises OSError, KeyError, ValueError for broken files
        raise ModelError(f"cannot read {path} as HDF5 ({first_line(exc)})",
                         "check that the file is a complete Keras model saved with model.save()") from None
    _refuse_code_in(raw, path, "model_config")


# A .keras archive: what its members may declare once decompressed (a zip bomb is refused before Keras
# opens it). Edge models are megabytes; 2 GiB of weights is far past anything a microcontroller or a Pi runs.
MAX_KERAS_UNPACKED = 2 << 30
_MAX_KERAS_RATIO = 100  # weights barely compress; 100x over 64 MiB is a bomb, not a model
_KERAS_RATIO_FLOOR = 64 << 20


def check_keras_archive(path: Path, unsafe_load: bool) -> None:
    """Refuse a ``.keras`` zip whose declared sizes are a bomb, or (unless ``unsafe_load``) whose config holds code.

    Keras 3's safe mode refuses ``Lambda`` and ``__lambda__`` objects and functions outside Keras;
    the same walk as for ``.h5`` also runs here, before Keras opens the archive.
    """
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            members = z.infolist()
            total = sum(max(0, i.file_size) for i in members)
            packed = sum(max(0, i.compress_size) for i in members)
            for info in members:
                if info.file_size > _KERAS_RATIO_FLOOR and info.file_size > _MAX_KERAS_RATIO * max(info.compress_size, 1):
                    raise ModelError(f"{path}: member {info.filename[:80]!r} expands from {info.compress_size} to "
                                     f"{info.file_size} bytes (a zip bomb?)",
                                     "save the model again with model.save('model.keras')")
            if total > MAX_KERAS_UNPACKED or (total > _KERAS_RATIO_FLOOR and total > _MAX_KERAS_RATIO * max(packed, 1)):
                raise ModelError(f"{path}: its members declare {total} bytes unpacked from {packed} "
                                 f"(limit {MAX_KERAS_UNPACKED} bytes, at most {_MAX_KERAS_RATIO}x)",
                                 "save the model again with model.save('model.keras'), or check where it came from")
            if unsafe_load:
                return
            try:
                info = z.getinfo("config.json")
            except KeyError:
                return  # Keras reports the missing config itself
            if info.file_size > _MAX_H5_CONFIG:
                raise ModelError(f"{path}: config.json declares {info.file_size} bytes "
                                 f"(more than {_MAX_H5_CONFIG >> 20} MiB)")
            with z.open(info) as f:
                raw = f.read(_MAX_H5_CONFIG + 1)
    except ModelError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, NotImplementedError) as exc:
        raise ModelError(f"cannot load {path} as a Keras model (its zip archive: {first_line(exc)})",
                         "check that the file is a complete Keras model saved with model.save()") from None
    if len(raw) > _MAX_H5_CONFIG:
        raise ModelError(f"{path}: config.json is larger than {_MAX_H5_CONFIG >> 20} MiB")
    _refuse_code_in(raw, path, "config.json")


def _refuse_code_in(raw: Any, path: Path, what: str) -> None:
    """``ModelError`` when the model config text ``raw`` (``what`` in ``path``) is not JSON or carries code."""
    try:
        config = json.loads(raw)
    except (ValueError, RecursionError):
        raise ModelError(f"{path}: {what} is not valid JSON",
                         "check that the file is a complete Keras model saved with model.save()") from None
    found = code_in_config(config)
    if found:
        raise ModelError(f"{path} carries Python code ({found}) that loading would run", UNSAFE_HINT)


def code_in_config(config: Any) -> Optional[str]:
    """Where ``config`` holds Python code, or None: the whole tree is walked, not a list of known layers.

    Code is a ``Lambda`` layer (Keras 2 or 3), a Keras 3 ``__lambda__`` object,
    any ``*_type: "lambda"`` entry (tf_keras marshals the function next to it:
    ``Lambda.function``, ``ResidualWrapper.residual_fn``, ``DropoutWrapper.dropout_fn``...),
    a ``*_type: "function"`` entry whose module is not Keras/TensorFlow (or is not given),
    or any string that decodes to marshalled Python bytecode. The walk is
    iterative and bounded in nodes and depth; a config past the bounds is refused.
    """
    stack: list[tuple[Any, Any, int]] = [(config, None, 0)]
    seen = 0
    while stack:
        node, where, level = stack.pop()
        seen += 1
        if seen > _MAX_CONFIG_NODES:
            return f"a model config of more than {_MAX_CONFIG_NODES} entries, too large to check"
        if level > _MAX_CONFIG_DEPTH:
            return f"a model config nested deeper than {_MAX_CONFIG_DEPTH}, too deep to check"
        if isinstance(node, dict):
            cls = node.get("class_name")
            if cls in ("Lambda", "__lambda__") or (isinstance(cls, str) and cls.endswith(">Lambda")):
                cfg = node.get("config") if isinstance(node.get("config"), dict) else {}
                name = cfg.get("name") if isinstance(cfg.get("name"), str) else "?"
                what = "a serialized lambda" if cls == "__lambda__" else f"Lambda layer '{name[:80]}'"
                return f"{what} at {_place(where)}"
            for key, value in node.items():
                if not isinstance(key, str):
                    continue
                if key.endswith("_type") and value == "lambda":
                    return f"a serialized function '{key[:-5][:80]}' at {_place((where, key[:-5]))}"
                if key.endswith("_type") and value == "function":
                    module = node.get(key[:-5] + "_module", node.get("module"))
                    if not _keras_module(module):
                        return (f"a function '{key[:-5][:80]}' from module '{str(module)[:80]}' "
                                f"at {_place((where, key[:-5]))}")
            stack.extend((v, (where, k), level + 1) for k, v in node.items())
        elif isinstance(node, list):
            stack.extend((v, (where, i), level + 1) for i, v in enumerate(node))
        elif isinstance(node, str) and _is_bytecode(node):
            return f"marshalled Python bytecode at {_place(where)}"
    return None


_MAX_CONFIG_NODES = 1_000_000
_MAX_CONFIG_DEPTH = 200  # Keras configs nest a few levels per layer; nested models add a few more
_BYTECODE_B64 = re.compile(r"[A-Za-z0-9+/=\s]{64,}")


def _keras_module(module: Any) -> bool:
    return isinstance(module, str) and module.split(".")[0] in ("keras", "tf_keras", "tensorflow")


def _is_bytecode(text: str) -> bool:
    """A base64 string whose bytes start like a marshalled code object (``func_dump``'s output)."""
    # Base64 of 0x63/0xE3 (a marshalled code object) starts with "Y" or "4", then one of these.
    if len(text) < 64 or text[0] not in "4Y" or text[1] not in "wxyz0123456789+/":
        return False
    if not _BYTECODE_B64.fullmatch(text[:4096]):
        return False
    import base64
    import binascii

    try:
        head = base64.b64decode("".join(text[:64].split())[:48])
    except (binascii.Error, ValueError):
        return False
    return len(head) >= 17 and head[0] in (0x63, 0xE3)


def _place(where: Any) -> str:
    """``config.layers[1].config.cell`` for a path kept as nested (parent, key) pairs (cut to 200 characters)."""
    parts: list[str] = []
    while where is not None:
        where, key = where
        parts.append(f"[{key}]" if isinstance(key, int) else f".{key}")
    text = "".join(reversed(parts)).lstrip(".") or "the top level"
    return text if len(text) <= 200 else "…" + text[-199:]
