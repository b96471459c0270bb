"""How long does `edgeq --help` take next to `python -c "import click"`?

The command line is the first thing a user runs; it must not pay for numpy,
paramiko or TensorFlow before it has anything to do. Both commands run as fresh
interpreters (the same Python, the same site-packages), paired and interleaved
for several repetitions after one warm-up each (so both read warm .pyc files
and a warm page cache). Prints the median time of each, the median ratio of the
pairs with its spread (min-max of the ratios), and whether it meets the goal of
at most 1.5x.

    python benchmarks/bench_help.py [--reps 21]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GOAL = 1.5

COMMANDS = {
    "click": [sys.executable, "-c", "import click"],
    "edgeq": [sys.executable, "-m", "edgeq", "--help"],
}


def run(argv: list[str]) -> float:
    """Seconds from fork to exit of one fresh interpreter (output discarded)."""
    t = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, cwd=ROOT)
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=21)
    args = parser.parse_args(argv)
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)

    for argv_ in COMMANDS.values():  # warm-up: .pyc files written, pages cached
        run(argv_)
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    ratios = []
    for rep in range(args.reps):
        order = list(COMMANDS) if rep % 2 == 0 else list(reversed(COMMANDS))
        took = {name: run(COMMANDS[name]) for name in order}
        for name, t in took.items():
            times[name].append(t)
        ratios.append(took["edgeq"] / took["click"])
    med = {name: statistics.median(ts) for name, ts in times.items()}
    ratio = statistics.median(ratios)
    print(f"{sys.executable}, {args.reps} interleaved pairs")
    print(f"  python -c 'import click'  median {med['click'] * 1000:.1f} ms")
    print(f"  edgeq --help              median {med['edgeq'] * 1000:.1f} ms")
    print(f"  median ratio edgeq/click: {ratio:.2f}x (spread {min(ratios):.2f}x-{max(ratios):.2f}x; goal <= {GOAL}x) "
          f"{'OK' if ratio <= GOAL else 'OVER'}")
    return 0 if ratio <= GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
