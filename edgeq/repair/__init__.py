"""When int8 hurts: diagnose the layers that lose accuracy and repair them, cheapest fix first.

``convert_with_budget`` converts a model to full int8 and measures it against
the float model on the evaluation data. If the accuracy (top-1 agreement when
there are no labels) drops by more than ``max_drop`` points it diagnoses the
layers, named by the user's Keras layer names, and tries, in order of cost:

1. ``calibration``: every calibration sample the data has (not only the drawn
   subset); activations whose ranges had not settled are named.
2. ``equalize``: cross-layer equalization (``edgeq.equalize``): the float
   function is unchanged and the model stays fully int8, so it keeps a
   microcontroller on its int8 kernels.
3. ``mixed-int16``: int16 activations only for the diagnosed layers, int8
   elsewhere (litert-quantizer regex scopes), only where the target's backend
   has fast int16 kernels for those ops (CMSIS-NN does; XNNPACK does not).
4. ``float-fallback``: the diagnosed layers stay float (litert-quantizer,
   ``no_quantize`` scopes); Linux targets only, refused on integer-only
   microcontroller targets.
5. ``qat``: quantization-aware training with the user's labelled training data
   (``edgeq.qat``).

It stops at the first fix that meets the budget and runs on the target (the
target check passes), writes that model and a report whose ``repair`` section
lists the baseline, the diagnosis and every attempt. If none does, it raises
``BudgetNotMet`` (exit code 6) naming the best result and how far it is from
the budget, and writes nothing unless ``keep_best``.

TensorFlow is imported only inside functions.

Where each part lives: ``result.py`` (options, attempts, the report section),
``work.py`` (what attempts share and how one is measured), ``diagnose.py``
(which layers lose accuracy), ``fixes.py`` (the fixes), ``budget.py`` (the
search, ``convert_with_budget``, and the report).
"""

from edgeq.repair.budget import convert_with_budget
from edgeq.repair.result import (BAD_LAYER_STEPS, FIXES, OUTLIER_RATIO, SCHEMA, Attempt, BudgetNotMet, LayerDiagnosis,
                                 RepairOptions, RepairResult)

__all__ = ["BAD_LAYER_STEPS", "FIXES", "OUTLIER_RATIO", "SCHEMA", "Attempt", "BudgetNotMet", "LayerDiagnosis",
           "RepairOptions", "RepairResult", "convert_with_budget"]
