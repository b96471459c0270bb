"""Defaults the command line shows in ``--help``: standard library only, so ``edgeq --help`` stays light."""

from __future__ import annotations

# Calibration samples drawn (seeded) from the calibration data.
DEFAULT_SAMPLES = 200
