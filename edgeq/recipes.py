"""Quantization recipes as data: which level, which quantizer makes it, which runtimes run it.

The table lives in ``targets/_recipes.toml`` (shipped as package data with the
target profiles, package ``edgeq._targets``); users can pass their own file.
Every problem in a file is a ``RecipeError`` naming ``file:key``. No TensorFlow
here: ``edgeq --help`` and the sweep's planning read recipes without it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

from edgeq.errors import RecipeError
from edgeq.safeio import load_toml

ACTIVATIONS = ("float", "dynamic-int8", "int8", "int16")
GRANULARITIES = ("per-channel", "per-tensor", "blockwise")
QUANTIZERS = ("tflite-converter", "litert-quantizer", "simulated")
RUNTIMES = ("litert", "tflite-runtime", "tflm")
BACKENDS = ("xnnpack", "cmsis-nn", "esp-nn", "reference")
METHODS = ("uniform", "kmeans")
DEFAULT_RECIPE = "int8"
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_MAX_FILE = 1 << 20  # a recipe table is a few KB; refuse anything absurd before parsing
_KEYS = {"name", "description", "weights_bits", "activations", "granularity", "block_size", "quantizer",
         "executable", "runtimes", "accelerated_on", "method", "centroids"}


@dataclass(frozen=True)
class Recipe:
    """One quantization level.

    ``runtimes`` lists the runtimes measured to execute it, ``accelerated_on`` the
    backends measured (or documented, see the table's comments) to run it on fast kernels.
    Simulated recipes (``executable`` false) are never written as ``.tflite``.
    """

    name: str
    weights_bits: int
    activations: str  # "float" | "dynamic-int8" | "int8" | "int16"
    granularity: str  # "per-channel" | "per-tensor" | "blockwise"
    block_size: int  # 0 unless blockwise
    quantizer: str  # "tflite-converter" | "litert-quantizer" | "simulated"
    executable: bool
    runtimes: tuple[str, ...]
    accelerated_on: tuple[str, ...]
    description: str = ""
    method: str = "uniform"  # "uniform" | "kmeans" (simulated non-uniform weights)
    centroids: int = 0  # k-means clusters (method "kmeans")
    source: str = ""

    @property
    def needs_calibration(self) -> bool:
        """Static activations need recorded ranges."""
        return self.activations in ("int8", "int16")

    @property
    def full_integer(self) -> bool:
        return self.activations in ("int8", "int16") and self.quantizer == "tflite-converter"

    @property
    def per_channel(self) -> bool:
        return self.granularity != "per-tensor"

    def granularity_label(self) -> str:
        return f"blockwise {self.block_size}" if self.granularity == "blockwise" else self.granularity

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "description": self.description, "weights_bits": self.weights_bits,
            "activations": self.activations, "granularity": self.granularity, "block_size": self.block_size,
            "quantizer": self.quantizer, "executable": self.executable, "runtimes": list(self.runtimes),
            "accelerated_on": list(self.accelerated_on), "method": self.method, "centroids": self.centroids,
        }


@dataclass(frozen=True)
class RecipeTable:
    """The recipes of one file, in file order."""

    source: str
    recipes: tuple[Recipe, ...]

    def __iter__(self) -> Iterator[Recipe]:
        return iter(self.recipes)

    def __len__(self) -> int:
        return len(self.recipes)

    def names(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.recipes)

    def get(self, name: str) -> Recipe:
        """The recipe called ``name``; a one-line ``RecipeError`` listing the known names otherwise."""
        for r in self.recipes:
            if r.name == name:
                return r
        raise RecipeError(f"unknown recipe '{name}'", f"choose one of {', '.join(self.names())}")

    def executable(self) -> tuple[Recipe, ...]:
        return tuple(r for r in self.recipes if r.executable)


def default_recipes_path() -> Path:
    """The shipped table (``targets/_recipes.toml``)."""
    return Path(str(resources.files("edgeq._targets"))) / "_recipes.toml"


def load_recipes(path: Optional[str | Path] = None) -> RecipeTable:
    """Read and validate a recipe table (the shipped one when ``path`` is None)."""
    p = Path(path) if path is not None else default_recipes_path()
    where = str(p)
    doc = load_toml(p, _MAX_FILE, where, RecipeError, "check the path given to --recipe-file", kind="recipe file")
    unknown = sorted(set(doc) - {"recipe"})
    if unknown:
        raise RecipeError(f"{where}:{unknown[0]}: unknown key", "a recipe file holds [[recipe]] tables only")
    items = doc.get("recipe")
    if not isinstance(items, list) or not items:
        raise RecipeError(f"{where}:recipe: no [[recipe]] tables", "add at least one [[recipe]]")
    recipes: list[Recipe] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise RecipeError(f"{where}:recipe[{i}]: not a table")
        r = _recipe(item, f"{where}:recipe[{i}]", where)
        if r.name in seen:
            raise RecipeError(f"{where}:{r.name}.name: recipe '{r.name}' is defined twice")
        seen.add(r.name)
        recipes.append(r)
    return RecipeTable(where, tuple(recipes))


def _recipe(item: Mapping[str, Any], at: str, where: str) -> Recipe:
    name = item.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name) or len(name) > 64:
        raise RecipeError(f"{at}.name: expected a recipe name like 'int8-per-tensor' "
                          "(lower case letters, digits, '.', '_', '-'), got " + _show(name))
    at = f"{where}:{name}"
    for key in sorted(item):
        if key not in _KEYS:
            raise RecipeError(f"{at}.{key}: unknown key", f"known keys: {', '.join(sorted(_KEYS))}")

    def req(key: str, kind: type) -> Any:
        if key not in item:
            raise RecipeError(f"{at}.{key}: missing")
        value = item[key]
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise RecipeError(f"{at}.{key}: expected an integer, got {_show(value)}")
        if not isinstance(value, kind):
            raise RecipeError(f"{at}.{key}: expected a {kind.__name__}, got {_show(value)}")
        return value

    def choice(key: str, allowed: tuple[str, ...], default: Optional[str] = None) -> str:
        value = item.get(key, default) if default is not None else req(key, str)
        if value not in allowed:
            raise RecipeError(f"{at}.{key}: {_show(value)} is not one of {', '.join(allowed)}")
        return value

    def names(key: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
        value = item.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise RecipeError(f"{at}.{key}: expected a list of names, got {_show(value)}")
        for v in value:
            if v not in allowed:
                raise RecipeError(f"{at}.{key}: '{v}' is not one of {', '.join(allowed)}")
        return tuple(value)

    bits = req("weights_bits", int)
    if bits not in (2, 4, 8, 16, 32):
        raise RecipeError(f"{at}.weights_bits: {bits} is not one of 2, 4, 8, 16, 32")
    activations = choice("activations", ACTIVATIONS)
    granularity = choice("granularity", GRANULARITIES)
    block = item.get("block_size", 0)
    if isinstance(block, bool) or not isinstance(block, int):
        raise RecipeError(f"{at}.block_size: expected an integer, got {_show(block)}")
    if granularity == "blockwise" and block not in (32, 64, 128, 256):
        raise RecipeError(f"{at}.block_size: blockwise needs block_size 32, 64, 128 or 256, got {block}")
    if granularity != "blockwise" and block:
        raise RecipeError(f"{at}.block_size: only blockwise recipes have a block size")
    quantizer = choice("quantizer", QUANTIZERS)
    executable = req("executable", bool)
    if quantizer == "simulated" and executable:
        raise RecipeError(f"{at}.executable: a simulated recipe is never executable")
    if quantizer != "simulated" and not executable:
        raise RecipeError(f"{at}.executable: only simulated recipes may be non-executable")
    method = choice("method", METHODS, "uniform")
    centroids = item.get("centroids", 0)
    if isinstance(centroids, bool) or not isinstance(centroids, int):
        raise RecipeError(f"{at}.centroids: expected an integer, got {_show(centroids)}")
    if method == "kmeans":
        if quantizer != "simulated":
            raise RecipeError(f"{at}.method: k-means weights are simulated only (quantizer = \"simulated\")")
        if not 2 <= centroids <= 256:
            raise RecipeError(f"{at}.centroids: k-means needs 2 to 256 centroids, got {centroids}")
    elif centroids:
        raise RecipeError(f"{at}.centroids: only k-means recipes have centroids")
    if quantizer == "tflite-converter":
        ok = {(32, "float"), (16, "float"), (8, "dynamic-int8"), (8, "int8"), (8, "int16")}
        if (bits, activations) not in ok or granularity == "blockwise":
            raise RecipeError(f"{at}.quantizer: TensorFlow's converter makes fp32, fp16, dynamic int8, int8 and "
                              f"int16x8, not {bits}-bit weights with {activations} activations "
                              f"({granularity})", "use quantizer = \"litert-quantizer\"")
        if activations in ("int16", "dynamic-int8") and granularity == "per-tensor":
            raise RecipeError(f"{at}.granularity: per-tensor weights are offered with int8 activations only")
    if quantizer == "litert-quantizer":
        if bits not in (2, 4, 8) or activations not in ("float", "dynamic-int8", "int8", "int16"):
            raise RecipeError(f"{at}.weights_bits: litert-quantizer makes 2, 4 or 8-bit integer weights")
        if activations == "int16" and bits != 8:
            raise RecipeError(f"{at}.weights_bits: int16 activations go with 8-bit weights")
    if activations in ("int8", "int16") and granularity == "blockwise":
        raise RecipeError(f"{at}.granularity: blockwise weights go with float or dynamic activations")
    runtimes = names("runtimes", RUNTIMES)
    accelerated = names("accelerated_on", BACKENDS)
    if not executable and (runtimes or accelerated):
        raise RecipeError(f"{at}.runtimes: a simulated recipe runs nowhere; leave runtimes and accelerated_on empty")
    description = item.get("description", "")
    if not isinstance(description, str):
        raise RecipeError(f"{at}.description: expected a string, got {_show(description)}")
    return Recipe(name=name, weights_bits=bits, activations=activations, granularity=granularity,
                  block_size=block, quantizer=quantizer, executable=executable, runtimes=runtimes,
                  accelerated_on=accelerated, description=description, method=method, centroids=centroids,
                  source=where)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def recipe_for_scheme(scheme: str, per_channel: bool = True) -> str:
    """The recipe name for the older ``--scheme`` option."""
    if scheme == "int16x8":
        return "int16x8"
    return "int8" if per_channel else "int8-per-tensor"
