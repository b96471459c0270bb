"""How much does `edgeq convert` cost over a bare TFLiteConverter script?

Both convert the same Keras model to full int8 with the same calibration
samples, side by side in one process (TensorFlow imported once, one warm-up
each), interleaved for several repetitions. Prints the median time of each and
the median ratio; the goal is at most 1.15x. Evaluation (--eval) is off: it is
extra work the bare script does not do.

    python benchmarks/bench_convert.py [--model M.keras --calib C.npy] [--reps 7]

Without --model it trains the digits example into a temporary directory first.
"""

from __future__ import annotations

import argparse
import contextlib
import io
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

import numpy as np  # noqa: E402

from edgeq.calibration import DataOptions, InputSpec, load_dataset  # noqa: E402
from edgeq.convert import ConvertOptions, convert, quiet_tensorflow  # noqa: E402


def bare_convert(model_path: Path, samples: np.ndarray, out: Path) -> None:
    """What a user would write by hand: load, set up the converter, convert, write."""
    import tensorflow as tf

    model = tf.keras.models.load_model(model_path, compile=False)
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = lambda: ([samples[i : i + 1]] for i in range(len(samples)))
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = tf.int8
    conv.inference_output_type = tf.int8
    out.write_bytes(conv.convert())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--calib", type=Path)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="edgeq-bench-"))
    model, calib = args.model, args.calib
    if model is None or calib is None:
        sys.path.insert(0, str(ROOT / "examples" / "digits"))
        import train  # the digits example

        with quiet_tensorflow():
            train.train(work / "digits")
        model, calib = work / "digits" / "model.keras", work / "digits" / "calib.npy"

    # The bare script gets exactly the samples edgeq draws.
    with quiet_tensorflow():
        import keras

        inputs = [InputSpec("x", tuple(keras.models.load_model(model, compile=False).inputs[0].shape), "float32")]
    samples = np.asarray(load_dataset(calib, inputs, DataOptions(samples=args.samples)).arrays[0])
    options = ConvertOptions(data=DataOptions(samples=args.samples), worst_layers=0)

    def run_edgeq() -> None:
        convert(model, calib, work / "edgeq.tflite", options)

    def run_bare() -> None:
        # Keras prints "Saved artifact at ..." while from_keras_model exports; not part of the figure.
        with quiet_tensorflow(), contextlib.redirect_stdout(io.StringIO()):
            bare_convert(model, samples, work / "bare.tflite")

    run_edgeq()  # warm-up: TensorFlow import, first traces
    run_bare()
    times: dict[str, list[float]] = {"edgeq": [], "bare": []}
    ratios = []
    for rep in range(args.reps):
        order = (("edgeq", run_edgeq), ("bare", run_bare)) if rep % 2 == 0 else (("bare", run_bare), ("edgeq", run_edgeq))
        took = {}
        for name, fn in order:
            t = time.perf_counter()
            fn()
            took[name] = time.perf_counter() - t
            times[name].append(took[name])
        ratios.append(took["edgeq"] / took["bare"])
    med_e, med_b, med_r = statistics.median(times["edgeq"]), statistics.median(times["bare"]), statistics.median(ratios)
    print(f"model {model}, {len(samples)} calibration samples, {args.reps} interleaved repetitions")
    print(f"  bare TFLiteConverter  median {med_b:.3f} s")
    print(f"  edgeq convert         median {med_e:.3f} s")
    print(f"  median ratio edgeq/bare: {med_r:.2f}x (goal <= 1.15x) {'OK' if med_r <= 1.15 else 'OVER'}")
    shutil.rmtree(work, ignore_errors=True)
    return 0 if med_r <= 1.15 else 1


if __name__ == "__main__":
    sys.exit(main())
