"""edgeq's int8 against the bare litert-torch PT2E route, on the same PyTorch model and calibration samples.

Both make a static int8 model (per-channel weights) from the same PyTorch
model: edgeq with `edgeq.convert.convert` (litert-torch float export, then
litert-quantizer, int8 inputs and outputs), the bare route as litert-torch's
README shows it (torch.export -> PT2EQuantizer prepare_pt2e -> calibrate ->
convert_pt2e -> litert_torch.convert with the quantizer). Each model is judged
against PyTorch's own outputs on held-out samples: size, top-1 agreement, SQNR,
accuracy, and conversion time. The two routes run interleaved in one process
(one warm-up each) for --reps repetitions; times are given as median and
min-max spread.

    python benchmarks/bench_torch.py [--model digits|mobilenet] [--reps 3]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)  # tests.torch_models is named as module:function from here

import numpy as np  # noqa: E402

from edgeq.calibration import DataOptions  # noqa: E402
from edgeq.convert import ConvertOptions, convert, quiet_tensorflow  # noqa: E402

MODELS = {"digits": "tests.torch_models:digits_cnn", "mobilenet": "tests.torch_models:mobilenet_v2"}


@contextlib.contextmanager
def _quiet():
    level = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with quiet_tensorflow(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logging.disable(level)


def bare_pt2e(model, example, calib: np.ndarray, out: Path) -> None:
    """litert-torch's documented static int8 route (PT2E), as a user would write it."""
    import litert_torch
    import torch
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False))
    m = torch.export.export(model, (example,)).module()
    m = prepare_pt2e(m, quantizer)
    with torch.no_grad():
        for i in range(len(calib)):
            m(torch.from_numpy(calib[i : i + 1]))
    m = convert_pt2e(m, fold_quantize=False)
    edge = litert_torch.convert(m, (example,), quant_config=QuantConfig(pt2e_quantizer=quantizer))
    out.write_bytes(bytes(edge.model_content()))


def run_tflite(path: Path, x: np.ndarray) -> np.ndarray:
    """Outputs of a .tflite on every sample, dequantized to float (inputs quantized when the model is int8)."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path))
    runner = interp.get_signature_runner("serving_default")
    (name, d), = runner.get_input_details().items()
    (oname, od), = runner.get_output_details().items()
    rows = []
    for i in range(len(x)):
        a = x[i : i + 1]
        scale, zp = d["quantization"]
        if np.dtype(d["dtype"]).kind == "i" and scale:
            info = np.iinfo(d["dtype"])
            a = np.clip(np.round(a / scale + zp), info.min, info.max).astype(d["dtype"])
        y = runner(**{name: a})[oname]
        oscale, ozp = od["quantization"]
        if np.dtype(od["dtype"]).kind == "i" and oscale:
            y = (y.astype(np.float32) - ozp) * oscale
        rows.append(np.asarray(y, dtype=np.float32))
    return np.concatenate(rows)


def judge(ref: np.ndarray, got: np.ndarray, y: np.ndarray | None) -> dict[str, float]:
    noise = np.mean((ref - got) ** 2)
    out = {"agreement": float(np.mean(ref.argmax(1) == got.argmax(1))),
           "sqnr_db": float(10 * np.log10(np.mean(ref ** 2) / noise)) if noise > 0 else float("inf")}
    if y is not None:
        out["accuracy"] = float(np.mean(got.argmax(1) == y))
        out["accuracy_torch"] = float(np.mean(ref.argmax(1) == y))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="digits")
    parser.add_argument("--samples", type=int, default=200, help="calibration samples")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)

    from edgeq.torch_convert import keep_triton_out

    keep_triton_out()  # before torch: triton segfaults on import once TensorFlow is loaded
    import torch

    from tests.torch_models import digits_split

    with _quiet():
        import importlib

        mod, fn = MODELS[args.model].split(":")
        model, example = getattr(importlib.import_module(mod), fn)()
    if args.model == "digits":
        d = digits_split()
        calib, x_eval, y_eval = d["x_train"][: args.samples], d["x_test"], d["y_test"]
    else:
        rng = np.random.default_rng(0)
        calib = rng.random((min(args.samples, 64), 3, 64, 64), dtype=np.float32)
        x_eval, y_eval = rng.random((100, 3, 64, 64), dtype=np.float32), None
    with torch.no_grad():
        ref = model(torch.from_numpy(x_eval)).numpy()

    work = Path(tempfile.mkdtemp(prefix="edgeq-bench-torch-"))
    try:
        np.save(work / "calib.npy", calib)
        outs = {"edgeq": work / "edgeq.tflite", "bare": work / "bare.tflite"}

        def run_edgeq() -> None:
            with _quiet():
                convert(MODELS[args.model], work / "calib.npy", outs["edgeq"],
                        ConvertOptions(data=DataOptions(samples=len(calib)), worst_layers=0))

        def run_bare() -> None:
            with _quiet():
                bare_pt2e(model, example, calib, outs["bare"])

        runs = {"edgeq": run_edgeq, "bare": run_bare}
        for fn_ in runs.values():  # warm-up: imports, first traces
            fn_()
        times: dict[str, list[float]] = {k: [] for k in runs}
        for rep in range(args.reps):
            order = list(runs) if rep % 2 == 0 else list(reversed(runs))
            for k in order:
                t = time.perf_counter()
                runs[k]()
                times[k].append(time.perf_counter() - t)

        from edgeq.tflite_file import read_tflite

        print(f"model {args.model} ({MODELS[args.model]}), {len(calib)} calibration samples, "
              f"{len(x_eval)} held-out samples, {args.reps} interleaved repetitions; reference: PyTorch's outputs")
        print(f"  {'route':<28} {'size KB':>8} {'I/O':>14} {'top-1 agr':>9} {'SQNR dB':>8} {'acc':>6}"
              f" {'convert s (median, min-max)':>28}")
        labels = {"edgeq": "edgeq convert (int8)", "bare": "litert-torch PT2E (bare)"}
        for k in runs:
            model_file = read_tflite(outs[k])
            io_types = f"{model_file.inputs[0].dtype}/{model_file.outputs[0].dtype}"
            j = judge(ref, run_tflite(outs[k], x_eval), y_eval)
            acc = f"{100 * j['accuracy']:.1f}" if "accuracy" in j else "-"
            ts = times[k]
            print(f"  {labels[k]:<28} {outs[k].stat().st_size / 1024:>8.1f} {io_types:>14} "
                  f"{100 * j['agreement']:>8.1f}% {j['sqnr_db']:>8.1f} {acc:>6} "
                  f"{statistics.median(ts):>12.2f} ({min(ts):.2f}-{max(ts):.2f})")
        if y_eval is not None:
            print(f"  PyTorch float accuracy: {100 * float(np.mean(ref.argmax(1) == y_eval)):.1f}%")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
