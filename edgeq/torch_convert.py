"""PyTorch models in: load, export the float ``.tflite`` with litert-torch, quantize with litert-quantizer.

No TensorFlow on this path (litert-torch does not need it). ``edgeq.convert``
runs the same stages as for a Keras model; for a PyTorch model the
``LoadedModel`` carries a ``TorchStages`` whose methods replace the TensorFlow
ones: ``export_float`` (litert-torch), ``calibrate`` and ``quantize``
(litert-quantizer, int8 inputs and outputs for the static recipes:
``edgeq.torch_quantize``) and ``reference`` (the PyTorch model's own outputs,
which validation compares the quantized model against).

Two ways to name a PyTorch model:

* ``model.pt2``: a ``torch.export.save()`` file. Loading one unpickles data
  (``torch.export.load`` falls back to ``weights_only=False``) and evaluates
  shape expressions with sympy, so it can run code: refused unless
  ``unsafe_load``.
* ``module:function``: code the user names (trusted, like a ``module:function``
  data source). ``function()`` returns ``(model, example)``: an ``nn.Module``
  and one example input with a batch size of 1 (a tensor, a tuple of tensors
  in ``forward``'s order, or a dict ``{forward parameter name: tensor}``).

Layout: PyTorch images are NCHW, TFLite kernels NHWC. ``layout="nhwc"``
makes every 4-D input take NHWC data (the permutation is folded into the
graph); ``"nchw"`` keeps PyTorch's layout; ``None`` picks the layout the
calibration data has.
"""

from __future__ import annotations

import inspect
import logging
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from edgeq import torch_quantize
from edgeq.calibration import Dataset, InputSpec
from edgeq.convert.tfenv import first_line, quiet_converters
from edgeq.convert.types import FloatModel, LoadedModel
from edgeq.errors import EdgeqError, ModelError, UsageError
from edgeq.progress import ProgressCallback, report
from edgeq.recipes import Recipe
from edgeq.tflite_file import parse_tflite

TORCH_FORMATS = ("pt2", "torch-function")
LAYOUTS = ("nchw", "nhwc")
_FUNCTION = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_EXPORT_DOC = "https://pytorch.org/docs/stable/export.html"
_INSTALL_HINT = "pip install 'edgeq[torch]' (PyTorch and litert-torch)"


# ---------------------------------------------------------------- recognising a PyTorch model


def is_torch_model(path: str | Path) -> bool:
    """Whether ``path`` names a PyTorch model (a ``.pt2`` file or ``module:function``), without importing torch."""
    s = str(path)
    if Path(s).suffix.lower() == ".pt2":
        return True
    return bool(_FUNCTION.match(s)) and not Path(s).exists()


def torch_format(path: str | Path) -> str:
    """"pt2" or "torch-function" (``ModelError`` for a ``.pt2`` that is missing or not a zip archive)."""
    p = Path(path)
    if p.suffix.lower() != ".pt2":
        return "torch-function"
    if not p.is_file():
        raise ModelError(f"{p}: no such file", "check the path to the model")
    try:
        with open(p, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise ModelError(f"{p}: cannot read ({exc.strerror})", "check the file's permissions") from None
    if not head.startswith(b"PK"):
        raise ModelError(f"{p} is not a torch.export program (a .pt2 file is a zip archive)",
                         "save it with torch.export.save(torch.export.export(model, (x,)), 'model.pt2')")
    return "pt2"


def keep_triton_out() -> None:
    """Make ``import triton`` fail in this process (unless it is imported already).

    PyPI's Linux torch wheels bring triton, the GPU kernel compiler, and torch imports it with torch._dynamo
    (an optimizer or torch.export pulls that in). Once TensorFlow is loaded in the same process, importing
    triton segfaults (measured: tensorflow 2.21, then triton 3.8 from torch 2.14.1+cu130); edgeq's
    conversion, sweep and repair load both. Exporting for LiteRT runs on the CPU and never needs triton,
    and torch treats a triton that cannot be imported as absent.
    """
    if "triton" not in sys.modules:
        sys.modules["triton"] = None  # type: ignore[assignment]  # import -> ImportError
        # torch then logs that flop counting cannot count triton kernels: not edgeq's user's concern.
        logging.getLogger("torch.utils.flop_counter").setLevel(logging.ERROR)


def _torch() -> Any:
    keep_triton_out()
    try:
        import torch
    except ImportError:
        raise EdgeqError("PyTorch models need PyTorch", _INSTALL_HINT) from None
    return torch


def _litert_torch() -> Any:
    try:
        # On import torchao reports the CUDA kernels it cannot load, and torch a deprecation (logging).
        logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
        with quiet_converters():
            import litert_torch
    except ImportError:
        raise EdgeqError("PyTorch models need litert-torch", _INSTALL_HINT) from None
    litert_torch.config.show_progress = False  # the library never prints
    return litert_torch


# ---------------------------------------------------------------- stage 1: load


@dataclass(frozen=True)
class TorchStages:
    """The non-TensorFlow stages for one loaded PyTorch model (see the module docstring)."""

    module: Any = field(repr=False)  # the nn.Module in eval mode, wrapped to take named inputs in ``layout``
    example: dict[str, Any] = field(repr=False)  # {input name: example tensor in ``layout``}
    names: tuple[str, ...]
    layout: str

    def export_float(self, loaded: Any, workdir: str | Path, progress: Optional[ProgressCallback] = None) -> Any:
        return export_float(loaded, self, progress)

    def calibrate(self, float_model: Any, calib: Dataset, progress: Optional[ProgressCallback] = None) -> Any:
        return torch_quantize.calibrate(float_model, calib, progress)

    def quantize(self, float_model: Any, calibration: Any, recipe: Recipe, io_types: Any,
                 progress: Optional[ProgressCallback] = None) -> Any:
        return torch_quantize.quantize(float_model, calibration, recipe, io_types, progress)

    def reference(self, data: Dataset) -> dict[str, np.ndarray]:
        return torch_outputs(self, data)


def load_torch(path: str | Path, fmt: str, unsafe_load: bool = False, layout: Optional[str] = None,
               data_hint: Optional[str] = None) -> Any:
    """Load a PyTorch model as an ``edgeq.convert.LoadedModel`` whose ``stages`` are a ``TorchStages``."""
    if layout is not None and layout not in LAYOUTS:
        raise UsageError(f"unknown layout '{layout}'", f"choose one of {', '.join(LAYOUTS)}")
    if fmt == "pt2":
        _refuse_pt2(Path(path), unsafe_load)  # before torch is even imported
    torch = _torch()
    if fmt == "pt2":
        module, example = _load_pt2(torch, Path(path), unsafe_load)
        name = Path(path).stem
    else:
        module, example = _call_function(torch, str(path))
        name = type(module).__name__
    try:
        module.eval()
    except NotImplementedError:
        pass  # a torch.export program's module: its mode was fixed when it was exported
    chosen = layout or layout_from_data(data_hint, example) or "nchw"
    four_d = {n for n, t in example.items() if t.dim() == 4}
    if chosen == "nhwc":
        example = {n: (t.permute(0, 2, 3, 1).contiguous() if n in four_d else t) for n, t in example.items()}
    wrapped = _NamedInputs(torch, module, tuple(example), four_d if chosen == "nhwc" else set())
    wrapped.training = False  # the wrapper only; ``module`` is in eval mode already
    inputs = tuple(InputSpec(n, tuple(int(d) for d in t.shape), str(t.dtype).removeprefix("torch."))
                   for n, t in example.items())
    stages = TorchStages(wrapped, example, tuple(example), chosen)
    weights = sum(int(p.numel()) * 4 for p in module.parameters())
    layers = tuple(n for n, _ in module.named_modules() if n)

    def no_saved_model(out_dir: str, specs: Sequence[InputSpec] = ()) -> None:
        raise ModelError(f"{path} is a PyTorch model: it has no SavedModel export",
                         "PyTorch models are exported by litert-torch (edgeq.torch_convert)")

    return LoadedModel(str(path), fmt, "litert-torch", name, inputs, layers, weights, module, no_saved_model,
                       stages=stages)


def _refuse_pt2(path: Path, unsafe_load: bool) -> None:
    if not unsafe_load:
        raise ModelError(f"{path} is a torch.export program: loading it unpickles data and evaluates its shape "
                         "expressions, which can run code on this machine",
                         "if you trust the file, re-run with --unsafe-load; or name the code that builds the "
                         "model as module:function")


def _load_pt2(torch: Any, path: Path, unsafe_load: bool) -> tuple[Any, dict[str, Any]]:
    _refuse_pt2(path, unsafe_load)
    try:
        with quiet_converters():
            ep = torch.export.load(str(path))
        module = ep.module()
        args, kwargs = ep.example_inputs or ((), {})
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a bad archive
        raise ModelError(f"cannot load {path} as a torch.export program ({first_line(exc, 400)})",
                         "save it with torch.export.save() from the same PyTorch version") from None
    if not args and not kwargs:
        raise ModelError(f"{path} holds no example inputs",
                         "export it with torch.export.export(model, (x,)) and a batch-1 example x")
    names = [s.arg.name for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    return module, _example_dict(torch, tuple(args), dict(kwargs), names[: len(args)], str(path))


def _call_function(torch: Any, src: str) -> tuple[Any, dict[str, Any]]:
    from edgeq.calibration import import_function

    fn_name = src.split(":")[1]
    fn = import_function(src, f"model {src}", ModelError)
    try:
        produced = fn()
    except Exception as exc:  # noqa: BLE001 - the user's code: any failure is a one-line ModelError
        raise ModelError(f"model {src}: {fn_name}() raised {type(exc).__name__}: {first_line(exc, 400)}",
                         "run it on its own to see the traceback, or run edgeq with --debug") from exc
    if not (isinstance(produced, tuple) and len(produced) == 2 and isinstance(produced[0], torch.nn.Module)):
        raise ModelError(f"model {src}: {fn_name}() must return (nn.Module, example input)",
                         "return the model and one batch-1 example: a tensor, a tuple or a dict of tensors")
    model, example = produced
    try:
        params = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    if isinstance(example, dict):
        return model, _example_dict(torch, (), example, [], src)
    args = tuple(example) if isinstance(example, (tuple, list)) else (example,)
    return model, _example_dict(torch, args, {}, [p.name for p in params], src)


def _example_dict(torch: Any, args: tuple, kwargs: dict, names: Sequence[str], src: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for i, a in enumerate(args):
        out[names[i] if i < len(names) else f"args_{i}"] = a
    out.update(kwargs)
    for n, t in out.items():
        if not isinstance(t, torch.Tensor):
            raise ModelError(f"model {src}: example input '{n}' is a {type(t).__name__}, not a tensor",
                             "give tensors (a batch of 1) as the example input")
        if t.dim() == 0 or t.shape[0] != 1:
            raise ModelError(f"model {src}: example input '{n}' has shape {tuple(t.shape)}: the batch size must be 1",
                             "give x[:1] as the example input")
    return {n: t.detach() for n, t in out.items()}


def _named_inputs_class(torch: Any) -> Any:
    class NamedInputs(torch.nn.Module):
        """Takes inputs by name (they name the .tflite's inputs), in NHWC for the inputs listed in ``nhwc``."""

        def __init__(self, inner: Any, names: tuple[str, ...], nhwc: set[str]) -> None:
            super().__init__()
            self.inner = inner
            self.names = names
            self.nhwc = frozenset(nhwc)

        def forward(self, **kw: Any) -> Any:
            xs = [kw[n].permute(0, 3, 1, 2) if n in self.nhwc else kw[n] for n in self.names]
            return self.inner(*xs)

    # litert-torch names every tensor after its module classes: keep this one's name short.
    NamedInputs.__module__, NamedInputs.__qualname__ = "edgeq", "NamedInputs"
    return NamedInputs


def _NamedInputs(torch: Any, inner: Any, names: tuple[str, ...], nhwc: set[str]) -> Any:  # noqa: N802
    return _named_inputs_class(torch)(inner, names, nhwc)


def layout_from_data(source: Optional[str], example: dict[str, Any]) -> Optional[str]:
    """"nhwc" when the data's first 4-D input is the example's shape with channels last, "nchw" when it
    matches as it is, None when unknown (a directory of images is always NHWC)."""
    if not source:
        return None
    p = Path(source)
    four_d = [(n, tuple(int(d) for d in t.shape[1:])) for n, t in example.items() if t.dim() == 4]
    if not four_d:
        return None
    name, chw = four_d[0]
    hwc = (chw[1], chw[2], chw[0])
    if p.is_dir():
        return "nhwc"
    shape = None
    try:
        if p.suffix.lower() == ".npy":
            shape = np.load(p, mmap_mode="r", allow_pickle=False).shape
        elif p.suffix.lower() == ".npz":
            with np.load(p, allow_pickle=False) as z:
                key = name if name in z.files else ("x" if "x" in z.files else None)
                if key is not None:
                    shape = _npz_shape(z, key)
    except (OSError, ValueError):
        return None
    if shape is None or len(shape) != 4:
        return None
    if tuple(shape[1:]) == chw:
        return "nchw"
    if tuple(shape[1:]) == hwc:
        return "nhwc"
    return None


def _npz_shape(z: Any, key: str) -> Optional[tuple[int, ...]]:
    """The shape of one .npz member from its header, without reading the array."""
    from numpy.lib import format as npformat

    with z.zip.open(key + ".npy") as f:
        version = npformat.read_magic(f)
        read = npformat.read_array_header_1_0 if version == (1, 0) else npformat.read_array_header_2_0
        shape, _, _ = read(f)
    return tuple(shape)


# ---------------------------------------------------------------- stage 2: export with litert-torch


class _ModuleStack:
    """Which submodule's forward was running when tracing failed (forward hooks, removed afterwards)."""

    def __init__(self, root: Any) -> None:
        self.stack: list[str] = []
        self.failed: Optional[str] = None
        self.handles = []
        for name, m in root.named_modules():
            if not name:
                continue
            self.handles.append(m.register_forward_pre_hook(self._enter(name)))
            self.handles.append(m.register_forward_hook(self._leave()))

    def _enter(self, name: str) -> Any:
        def hook(module: Any, args: Any) -> None:
            self.stack.append(f"{name.removeprefix('inner.')} ({type(module).__name__})")
            self.failed = None
        return hook

    def _leave(self) -> Any:
        def hook(module: Any, args: Any, out: Any) -> None:
            if self.stack:
                self.stack.pop()
        return hook

    def innermost(self) -> Optional[str]:
        return self.stack[-1] if self.stack else None

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def export_float(loaded: Any, stages: TorchStages, progress: Optional[ProgressCallback] = None) -> Any:
    """The float ``.tflite`` of a PyTorch model, made by litert-torch (through ``torch.export``)."""
    t = time.perf_counter()
    report(progress, "export", f"torch.export and litert-torch ({stages.layout.upper()} inputs)")
    litert_torch = _litert_torch()
    watch = _ModuleStack(stages.module)
    try:
        with quiet_converters():
            content = bytes(litert_torch.convert(stages.module, (), dict(stages.example)).model_content())
    except EdgeqError:
        raise
    except Exception as exc:  # noqa: BLE001 - torch.export and the lowering raise many kinds
        raise trace_error(exc, watch.innermost(), loaded.path) from exc
    finally:
        watch.close()
    return FloatModel(loaded, "", content, parse_tflite(content, f"{loaded.path} (float)"), time.perf_counter() - t)


def trace_error(exc: BaseException, module: Optional[str], path: str) -> ModelError:
    """One line naming the module torch.export could not trace and the documented workaround."""
    first = first_line(exc, 400)
    where = f"module {module}" if module else "the model's forward"
    if module is None and not _is_export_error(exc):
        return ModelError(f"litert-torch could not convert {path}: {first[:300]}",
                          "run with --debug for the full message")
    return ModelError(
        f"torch.export cannot trace {where} of {path}: {first[:300]}",
        "make that forward traceable: no Python branching on tensor values (use torch.cond or torch.where), "
        f"fixed shapes for a batch of 1; see torch.export's guide ({_EXPORT_DOC}) and torch.export.draft_export")


def _is_export_error(exc: BaseException) -> bool:
    names = {type(e).__name__ for e in _chain(exc)}
    return bool(names & {"UserError", "Unsupported", "GuardOnDataDependentSymNode", "TorchRuntimeError",
                         "UncapturedHigherOrderOpError", "DataDependentOutputException"})


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    e: Optional[BaseException] = exc
    while e is not None and len(out) < 20:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


# ---------------------------------------------------------------- stage 5: the PyTorch reference


def torch_outputs(stages: TorchStages, data: Dataset) -> dict[str, np.ndarray]:
    """The PyTorch model's own outputs on ``data`` (in the converted model's input layout), keyed like the
    ``.tflite``'s signature outputs (``output_0``, ...)."""
    torch = _torch()
    rows: dict[str, list[np.ndarray]] = {}
    with torch.no_grad():
        for i in range(len(data)):
            sample = data.sample(i)
            feed = {n: torch.from_numpy(np.ascontiguousarray(sample[n])) for n in stages.names}
            out = stages.module(**feed)
            flat = _flatten(torch, out)
            for k, v in enumerate(flat):
                rows.setdefault(f"output_{k}", []).append(v.detach().float().numpy())
    return {k: np.concatenate(v, axis=0) for k, v in rows.items()}


def _flatten(torch: Any, out: Any) -> list[Any]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _flatten(torch, v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _flatten(torch, v)]
    return []
