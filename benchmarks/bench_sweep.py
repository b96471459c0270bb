"""Does one `edgeq sweep` beat running `edgeq convert --recipe` once per recipe?

Side by side in one run, interleaved for several repetitions, as a user would
run them (each command a fresh process):

* sweep:    `edgeq sweep MODEL --calib C --eval E --target T --recipes R1,...,Rn -o DIR` (host only)
* separate: `edgeq convert MODEL --calib C --eval E --target T --recipe Ri -o DIR/Ri.tflite`, i = 1..n
* one:      the first of those converts alone

Both sides produce the same information per recipe: the .tflite, accuracy
against float on --eval and the target check. The sweep exports the float
model and records the calibration ranges once, and imports TensorFlow once.
Prints the medians and two ratios: sweep / separate (target <= 0.5x) and
sweep / one convert.

    python benchmarks/bench_sweep.py [--model M.keras --calib C.npy --eval E.npz] [--reps 3]

Without --model it trains the digits example into a temporary directory first.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ("int8", "int8-per-tensor", "int16x8", "fp32", "fp16", "dynamic-int8", "int8-weight-only", "int4-dynamic")
TARGET = 0.5


def _edgeq() -> list[str]:
    exe = Path(sys.executable).with_name("edgeq")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "edgeq"]


def _timed(argv: list[str]) -> float:
    t = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(argv)}\n{proc.stderr[-2000:]}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--calib", type=Path)
    parser.add_argument("--eval", type=Path)
    parser.add_argument("--target", default="rpi4")
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)
    recipes = [r for r in args.recipes.split(",") if r]
    if len(recipes) < 6:
        raise SystemExit("give at least 6 executable recipes")

    work = Path(tempfile.mkdtemp(prefix="edgeq-bench-sweep-"))
    try:
        if args.model is None:
            subprocess.run([sys.executable, str(ROOT / "examples" / "digits" / "train.py"), "--out", str(work)],
                           check=True, capture_output=True)
            model, calib, evald = work / "model.keras", work / "calib.npy", work / "eval.npz"
        else:
            model, calib, evald = args.model, args.calib, args.eval
        common = ["--calib", str(calib), "--eval", str(evald), "--target", args.target, "--samples",
                  str(args.samples)]
        sweep_cmd = [*_edgeq(), "sweep", str(model), *common, "--recipes", ",".join(recipes),
                     "--max-drop", "100", "-o", str(work / "sweep"), "--force"]  # every rep replaces the last

        def convert_cmd(recipe: str) -> list[str]:
            return [*_edgeq(), "convert", str(model), *common, "--recipe", recipe,
                    "-o", str(work / "separate" / f"{recipe}.tflite")]

        (work / "separate").mkdir()
        sweep_s: list[float] = []
        separate_s: list[float] = []
        one_s: list[float] = []
        for rep in range(args.reps):
            # Interleaved, alternating which side goes first, so drift on a shared machine hits both.
            order = ("sweep", "separate") if rep % 2 == 0 else ("separate", "sweep")
            for side in order:
                if side == "sweep":
                    sweep_s.append(_timed(sweep_cmd))
                else:
                    per = [_timed(convert_cmd(r)) for r in recipes]
                    separate_s.append(sum(per))
                    one_s.append(per[0])
            print(f"rep {rep + 1}/{args.reps}: sweep {sweep_s[-1]:.1f} s, {len(recipes)} converts "
                  f"{separate_s[-1]:.1f} s (one: {one_s[-1]:.1f} s)", flush=True)

        sweep_m, sep_m, one_m = (statistics.median(x) for x in (sweep_s, separate_s, one_s))
        ratio = sweep_m / sep_m
        print()
        print(f"recipes ({len(recipes)}): {', '.join(recipes)}; target {args.target}; {args.reps} reps, medians")
        print(f"  edgeq sweep (one process)          {sweep_m:7.1f} s")
        print(f"  edgeq convert --recipe x{len(recipes):<2}         {sep_m:7.1f} s")
        print(f"  edgeq convert --recipe (one)       {one_m:7.1f} s")
        print(f"  ratio sweep / separate converts    {ratio:7.2f}x  (target <= {TARGET}x: "
              f"{'met' if ratio <= TARGET else 'NOT met'})")
        print(f"  ratio sweep / one convert          {sweep_m / one_m:7.2f}x")
        return 0 if ratio <= TARGET else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
