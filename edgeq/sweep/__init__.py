"""Try every quantization level on a target and choose one by measurement.

``sweep()`` runs the conversion stages of :mod:`edgeq.convert` once where they
can be shared (load, float export, calibration) and once per recipe where they
cannot (quantize, validate), checks each result against the target
(:func:`edgeq.check.check_model`: fits, fast kernels), estimates energy
(:mod:`edgeq.energy`) and, with a device, measures every executable recipe that
fits there in one session (:func:`edgeq.deploy.measure_models`). Simulated
recipes (levels no runtime here executes) only report accuracy and compressed
size; they are never written and never recommended.

The recommendation is the best qualifying recipe by the objective; every
other recipe carries the reason it lost. No TensorFlow at import: the
conversion stages import it when they run.

Where each part lives: ``result.py`` (options, outcomes, ``sweep.json``),
``recommend.py`` (``choose``: the recommendation and every other recipe's
reason), ``run.py`` (``sweep()``: the stages, the device, writing the reports).
"""

from edgeq.sweep.recommend import choose
from edgeq.sweep.result import (DEFAULT_MAX_DROP, OBJECTIVES, SCHEMA, SWEEP_HTML, SWEEP_JSON, TIE_TOLERANCE, DeviceLost,
                                NoQualifyingRecipe, RecipeOutcome, SweepOptions, SweepResult)
from edgeq.sweep.run import sweep, write_outputs

__all__ = ["DEFAULT_MAX_DROP", "OBJECTIVES", "SCHEMA", "SWEEP_HTML", "SWEEP_JSON", "TIE_TOLERANCE", "DeviceLost",
           "NoQualifyingRecipe", "RecipeOutcome", "SweepOptions", "SweepResult", "choose", "sweep", "write_outputs"]
