"""Deploy a ``.tflite`` to a device and measure it there: probe, upload, run, compare with the host.

One stage per module: ``options`` (what to do, checked before anything
connects), ``session`` (the pipeline below), ``activation`` (switching models
and rolling back), ``reference`` (the host's judgement of the device's
outputs), ``results`` (what comes back; ``to_dict()`` is report.json).

The pipeline, one transport round trip per step:

Every step talks to the device through ``edgeq.device.DeviceClient``: the
runner's source goes on stdin (nothing on the device is executed from a file),
every call has a deadline and every answer is validated.

1. probe: device facts; the remote directory resolved, created 0700 and checked
   (no symlink, ours, not group/world-writable); the sha256 of each
   content-addressed file already there (a corrupt copy is re-sent);
2. lock: ``REMOTE_DIR/lock`` (a complete directory renamed into place)
   refuses a second deploy (``DeviceBusy``); a lock is stale after
   ``lock_stale_s`` without a heartbeat or its holder's own deadline, whichever
   is longer, or when left by a dead deploy of this controller; breaking it is
   atomic (only the deploy that moved the stale directory proceeds);
3. upload: whatever is missing goes to ``<final>.tmp-<random>``, is verified by
   sha256 *on the device* and only then renamed to its final path
   (``REMOTE_DIR/models/<sha256>/model.tflite``, ``data/<sha256>/eval.npz``);
4. run: the runner loads the model, times it and evaluates it (evaluation
   under its own cap; the runner kills itself before the host gives up); this
   is also the smoke inference that gates activation;
5. gate (with ``gate_accuracy``/``gate_p99_ms``): the measured run is judged
   (``protocol.gate_verdict``); a model that fails is not activated, and the
   result (report written as usual) says so: ``outcome`` is ``GATE_FAILED``;
6. activate: ``REMOTE_DIR/current`` -> ``models/<sha256>`` switched by an
   atomic rename, the old target kept as ``REMOTE_DIR/previous``
   (``rollback()`` swaps them back); both new links are made before either is
   renamed, so a full disk changes neither; after a failure the active model
   is read back and reported; ``keep`` prunes old models; skipped with
   ``activate=False``;
7. reference: with eval data, the same runner runs the model on the host with
   the host's LiteRT in a child process, and the device outputs are compared
   with the host's.
"""

from edgeq.deploy.activation import ActivationLinkDown, ActivationUnknown, activate_model, rollback
from edgeq.deploy.options import (DEFAULT_REMOTE_DIR, EVAL_MAX_BYTES, MAX_OUTPUT_VALUES, MAX_TIMEOUT_S, TIMEOUT_FLAGS,
                                  DeployOptions, check_disk_space, check_model, check_options, check_timeout,
                                  run_args, sha256_file, timeout_hint)
from edgeq.deploy.reference import HOST_RUNTIME, host_reference
from edgeq.deploy.results import DeployResult, LatencyStats, Outcome, RollbackResult
from edgeq.deploy.session import deploy, measure_models
from edgeq.device import DeviceLock, runner_source
from edgeq.transport import SSHOptions

__all__ = ["DEFAULT_REMOTE_DIR", "EVAL_MAX_BYTES", "HOST_RUNTIME", "MAX_OUTPUT_VALUES", "MAX_TIMEOUT_S", "TIMEOUT_FLAGS",
           "ActivationLinkDown", "ActivationUnknown", "DeployOptions", "DeployResult", "DeviceLock", "LatencyStats",
           "Outcome", "RollbackResult", "SSHOptions", "activate_model", "check_disk_space",
           "check_model", "check_options", "check_timeout", "deploy", "host_reference", "measure_models",
           "rollback", "run_args", "runner_source", "sha256_file", "timeout_hint"]
