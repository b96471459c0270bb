"""The on-device runner's overhead: its median latency against a bare ``invoke()`` loop.

Same model, same runtime (the device venv's tflite-runtime unless --python says
otherwise), interleaved rounds so drift hits both sides alike. The bare loop
times batches of invokes with one clock pair per batch, so it carries no
per-call timing cost at all; the ratio is what the runner's bookkeeping adds.
Target: within 3 %.

    python benchmarks/bench_runner.py [--python DEVICE_PY] [--model M.tflite ...] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BARE = r"""
import sys, time, numpy as np
for name in ("ai_edge_litert.interpreter", "tflite_runtime.interpreter"):
    try:
        mod = __import__(name, fromlist=["Interpreter"]); break
    except ImportError:
        pass
interp = mod.Interpreter(model_path=sys.argv[1]); interp.allocate_tensors()
d = interp.get_input_details()[0]
rng = np.random.RandomState(0)
x = rng.randint(-128, 128, size=d["shape"]).astype(d["dtype"]) if np.dtype(d["dtype"]).kind in "iu" \
    else rng.random_sample(d["shape"]).astype(d["dtype"])
interp.set_tensor(d["index"], x)
seconds = float(sys.argv[2])
start = time.perf_counter()
while time.perf_counter() - start < 0.5:
    interp.invoke()
# Batch size so that one batch takes about 1 ms.
t0 = time.perf_counter(); interp.invoke(); one = time.perf_counter() - t0
batch = max(1, int(1e-3 / max(one, 1e-7)))
per, start = [], time.perf_counter()
invoke = interp.invoke
while time.perf_counter() - start < seconds or len(per) < 50:
    t0 = time.perf_counter()
    for _ in range(batch):
        invoke()
    per.append((time.perf_counter() - t0) / batch)
per.sort()
print(per[len(per) // 2] * 1e3)
"""


def _models(tmp: Path) -> list[Path]:
    """The digits-sized CNN and a larger 96x96x3 one, both full int8 (needs TensorFlow on the host)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import numpy as np
    import tensorflow as tf

    out = []
    for name, shape, widths in (("small_8x8", (8, 8, 1), (8, 16)), ("conv_96x96", (96, 96, 3), (16, 32, 64))):
        tf.keras.utils.set_random_seed(0)
        layers = [tf.keras.layers.Input(shape)]
        for w in widths:
            layers += [tf.keras.layers.Conv2D(w, 3, padding="same", activation="relu"), tf.keras.layers.MaxPooling2D()]
        layers += [tf.keras.layers.Flatten(), tf.keras.layers.Dense(10)]
        model = tf.keras.Sequential(layers)
        calib = np.random.default_rng(0).random((32, *shape), dtype=np.float32)
        conv = tf.lite.TFLiteConverter.from_keras_model(model)
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = lambda: ([calib[i:i + 1]] for i in range(len(calib)))
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        conv.inference_input_type = tf.int8
        conv.inference_output_type = tf.int8
        path = tmp / f"{name}.tflite"
        path.write_bytes(conv.convert())
        out.append(path)
    return out


def _runner_median(python: str, runner: Path, model: Path, seconds: float) -> float:
    res = subprocess.run([python, str(runner), "run", "--model", str(model), "--min-seconds", str(seconds),
                          "--max-runs", "100000000", "--min-warmup-seconds", "0.5"],
                         capture_output=True, check=True, timeout=600)
    samples = json.loads(res.stdout)["samples_ms"]
    return statistics.median(samples)


def _bare_median(python: str, model: Path, seconds: float) -> float:
    res = subprocess.run([python, "-c", BARE, str(model), str(seconds)], capture_output=True, check=True,
                         timeout=600)
    return float(res.stdout.strip())


def main() -> None:
    default_py = os.environ.get("EDGEQ_DEVICE_PYTHON") or str(ROOT / ".venv-device" / "bin" / "python")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--python", default=default_py if Path(default_py).exists() else sys.executable)
    ap.add_argument("--model", action="append", type=Path)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=1.0)
    args = ap.parse_args()
    runner = ROOT / "deploy" / "runner.py"
    with tempfile.TemporaryDirectory() as tmp:
        models = args.model or _models(Path(tmp))
        print(f"runtime python: {args.python}; {args.rounds} interleaved rounds of {args.seconds:g} s each")
        print(f"{'model':<22} {'runner p50':>12} {'bare p50':>12} {'ratio':>8}")
        for model in models:
            runner_m, bare_m = [], []
            for _ in range(args.rounds):
                runner_m.append(_runner_median(args.python, runner, model, args.seconds))
                bare_m.append(_bare_median(args.python, model, args.seconds))
            r, b = statistics.median(runner_m), statistics.median(bare_m)
            print(f"{model.name:<22} {r * 1e3:>10.2f}µs {b * 1e3:>10.2f}µs {r / b:>8.3f}")


if __name__ == "__main__":
    main()
