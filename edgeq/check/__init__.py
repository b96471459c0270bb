"""Does a model fit and run on a target? Every problem at once, before anything is flashed.

``check_model`` looks at the ``.tflite`` (read without TensorFlow) against a
``TargetProfile``: ops and op x dtype support, kernels that fall back to slow
reference code, float tensors on full-integer targets, flash and RAM budgets
(RAM measured by the target's own runtime in a sandboxed child), MACs and a
latency estimate. ``apply_thresholds`` adds the limits of a CI gate.

* ``result``  - options, findings, ``CheckResult`` (JSON ``edgeq.check/1``, terminal summary), thresholds
* ``model``   - ``check_model``: the check itself, at the file's or the given input shapes
* ``compute`` - MACs per op, the quantization scheme, fast kernels, the latency estimate
* ``memory``  - RAM measured by the target's runtime (or estimated), what TFLite Micro stops on
"""

from edgeq.check.compute import op_compute
from edgeq.check.memory import TFLM_SOFTMAX_MIN_SCALE, estimated_arena, tflm_stops
from edgeq.check.model import check_model
from edgeq.check.result import (CHECK_SCHEMA, DEFAULT_ARENA_MARGIN, CheckOptions, CheckResult, Finding, OpMacs,
                                Thresholds, apply_thresholds, ram_needed_bytes)

__all__ = ["CHECK_SCHEMA", "DEFAULT_ARENA_MARGIN", "TFLM_SOFTMAX_MIN_SCALE", "CheckOptions", "CheckResult", "Finding",
           "OpMacs", "Thresholds", "apply_thresholds", "check_model", "estimated_arena", "op_compute",
           "ram_needed_bytes", "tflm_stops"]
