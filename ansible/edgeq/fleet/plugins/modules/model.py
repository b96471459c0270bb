#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: edgeq contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: model
short_description: Install, measure, gate and activate an int8 TFLite model on an edge device
version_added: "0.1.0"
description:
  - Runs edgeq's on-device runner (the same code as C(edgeq deploy)) with the device's Python.
  - The action plugin sends the model (and eval data) from the controller, as M(ansible.builtin.copy) does; nothing is
    sent when the device already has a file with the same sha256.
  - On the device the upload is verified by sha256 and installed content-addressed under
    C(REMOTE_DIR/models/<sha256>/model.tflite); the model is measured (latency percentiles, peak RSS, accuracy on
    O(eval)); with O(state=active) it is switched to C(REMOTE_DIR/current) atomically and a health gate runs from
    C(REMOTE_DIR/current/model.tflite), as an application loads it. A host that fails its gate reverts to its previous
    model by itself and the task fails with the reason.
  - Idempotent, a model that is already installed (O(state=present)) or active (O(state=active)) is not sent, measured
    or switched again, and the result reports C(changed=false) with the report saved when it was measured.
  - Models are programs, every inference runs in a child interpreter that receives the runner on stdin, so a model
    that crashes the runtime fails the task instead of the module.
author:
  - edgeq contributors (@edgeq)
options:
  src:
    description:
      - Path of the C(.tflite) model on the controller (searched in the role's C(files/) like M(ansible.builtin.copy)).
      - Required unless O(sha256) names an installed model (for O(state=absent)).
    type: path
  sha256:
    description:
      - The model's sha256. Computed from O(src) by the action plugin; give it instead of O(src) to remove a model.
    type: str
  remote_dir:
    description: Directory on the device for models, data and the active link (C(edgeq deploy --remote-dir)).
    type: str
    default: ~/.edgeq
  state:
    description:
      - V(present) installs and measures the model without activating it.
      - V(active) also makes it C(REMOTE_DIR/current) and runs the health gate.
      - V(absent) removes an installed model that is not active.
    type: str
    choices: [present, active, absent]
    default: active
  eval:
    description: Evaluation data on the controller (C(.npz) with C(x) and labels C(y)) for on-device accuracy.
    type: path
  gate_accuracy:
    description: Health gate, minimum on-device accuracy on O(eval) as a fraction from 0 to 1 (as in C(report.json)).
    type: float
  gate_p99_ms:
    description: Health gate, maximum p99 latency in milliseconds of a timed run from C(REMOTE_DIR/current).
    type: float
  runs:
    description: Minimum timed runs (and at least O(min_seconds)).
    type: int
    default: 50
  warmup:
    description: Warm-up runs before timing.
    type: int
    default: 1
  min_seconds:
    description: Minimum seconds of timed runs.
    type: float
    default: 1.0
  min_warmup_seconds:
    description: Minimum seconds of warm-up.
    type: float
    default: 0.5
  max_runs:
    description: Maximum timed runs.
    type: int
    default: 10000
  threads:
    description: Interpreter threads (default, the runtime's choice).
    type: int
  xnnpack:
    description: Use the XNNPACK delegate.
    type: bool
    default: true
  run_timeout:
    description: Seconds after which a model run on the device is killed and counted as failed.
    type: float
    default: 900.0
  lock_stale_s:
    description: A device lock older than this many seconds is treated as left by a dead deploy.
    type: float
    default: 1800.0
  model_tmp:
    description: Internal, set by the action plugin (the uploaded temporary file). Do not set.
    type: str
  eval_tmp:
    description: Internal, set by the action plugin (the uploaded eval data). Do not set.
    type: str
  eval_sha256:
    description: Internal, set by the action plugin (sha256 of O(eval)). Do not set.
    type: str
  model_name:
    description: Internal, set by the action plugin (the file name of O(src)). Do not set.
    type: str
attributes:
  check_mode:
    support: full
    description: Reports whether the model would be sent, installed or switched, and changes nothing.
  diff_mode:
    support: none
    description: No diff; the result names the active and previous model.
  platform:
    platforms: posix
    support: full
    description: Needs numpy and a TFLite runtime (ai-edge-litert, tflite-runtime or tensorflow) on the device.
seealso:
  - module: edgeq.fleet.rollback
  - module: edgeq.fleet.facts
notes:
  - Holds C(REMOTE_DIR/lock) while it works, the same lock as C(edgeq deploy), so the two never overlap on a device.
"""

EXAMPLES = r"""
- name: Make the model active on every device, with a health gate
  edgeq.fleet.model:
    src: models/digits_int8.tflite
    eval: data/eval.npz
    gate_accuracy: 0.9
    gate_p99_ms: 20
  register: edgeq

- name: Install and measure only
  edgeq.fleet.model:
    src: models/digits_int8.tflite
    state: present

- name: Remove an old model that is no longer active
  edgeq.fleet.model:
    sha256: 3f1c0c3a4e7b2d9d0a5f2e6b1c8d7e4f3a2b1c0d9e8f7a6b5c4d3e2f1a0b9c8d
    state: absent
"""

RETURN = r"""
active:
  description: sha256 of the model C(REMOTE_DIR/current) points at after the task.
  returned: always
  type: str
previous:
  description: sha256 of the model C(REMOTE_DIR/previous) points at after the task.
  returned: always
  type: str
sha256:
  description: sha256 of the model the task was about.
  returned: always
  type: str
report:
  description: The same document C(edgeq deploy) writes as C(report.json) (latency, accuracy, device, runtime).
  returned: when the model was measured now or before
  type: dict
gate:
  description: The health gate run from C(REMOTE_DIR/current), with C(passed), C(reasons), C(accuracy), C(p99_ms).
  returned: with state=active, when the model was switched
  type: dict
reverted:
  description: True when the model failed its gate and the device went back to its previous model.
  returned: with state=active
  type: bool
revert_failed:
  description: True when the model failed its gate and the device could not go back (the failing model may be active).
  returned: with state=active
  type: bool
"""

import os
import time

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.edgeq.fleet.plugins.module_utils.edgeq_device import (
    MODEL_ARGSPEC, MODEL_REQUIRED_IF, Device, EdgeqModuleError, build_report, gate, is_sha, now_iso, protocol)


def _absent(module, dev, sha):
    state = dev.activation()
    folder = os.path.join(dev.dir, "models", sha)
    if state["current"] == sha:
        raise EdgeqModuleError("%s is the active model; deploy another one or roll back before removing it" % sha[:12])
    if not os.path.isdir(folder):
        return {"changed": False, "active": state["current"], "previous": state["previous"], "sha256": sha}
    if module.check_mode:
        return {"changed": True, "active": state["current"], "previous": state["previous"], "sha256": sha}
    with dev.locked(sha, module.params["lock_stale_s"], 300.0):
        dev.forget_previous(sha)
        for name in os.listdir(folder):
            os.unlink(os.path.join(folder, name))
        os.rmdir(folder)
        after = dev.activation()
    return {"changed": True, "active": after["current"], "previous": after["previous"], "sha256": sha}


def _deploy(module, dev, sha):
    p = module.params
    state = p["state"]
    started = time.time()
    started_at = now_iso()
    model_rel = dev.model_rel(sha)
    eval_sha = p["eval_sha256"]
    eval_rel = "data/%s/eval.npz" % eval_sha if eval_sha else None
    before = dev.activation()
    have_model = dev.has(model_rel, sha)
    saved = dev.saved_report(sha) if have_model else None
    done = have_model and saved is not None and (state == "present" or before["current"] == sha)
    if done or module.check_mode:
        return {"changed": not done, "active": before["current"], "previous": before["previous"], "sha256": sha,
                "report": saved, "reverted": False, "revert_failed": False,
                "would_send": {"model": not have_model, "eval": bool(eval_rel) and not dev.has(eval_rel, eval_sha)}}
    if not have_model and not p["model_tmp"]:
        raise EdgeqModuleError("the model %s is not on the device and was not sent" % sha[:12], need_upload=True)

    result = {"changed": False, "sha256": sha, "reverted": False, "revert_failed": False}
    # The lock stays fresh for two runs (measure, gate) plus the steps around them.
    with dev.locked(sha, p["lock_stale_s"], 2 * p["run_timeout"] + 300):
        have = [(model_rel, sha)] + ([(eval_rel, eval_sha)] if eval_rel else [])
        probe = dev.probe(have, prepare=True)
        present = probe.get("have") if isinstance(probe.get("have"), dict) else {}
        sent = {}
        if present.get(model_rel) != sha:
            dev.install(p["model_tmp"], model_rel, sha)
            sent["model"] = os.path.getsize(dev.path(model_rel))
            result["changed"] = True
        if eval_rel and present.get(eval_rel) != eval_sha:
            if not p["eval_tmp"]:
                raise EdgeqModuleError("the eval data %s are not on the device and were not sent" % eval_sha[:12],
                                       need_upload=True)
            dev.install(p["eval_tmp"], eval_rel, eval_sha)
            sent["eval"] = os.path.getsize(dev.path(eval_rel))
        eval_path = dev.path(eval_rel) if eval_rel else None
        run_doc = dev.run(dev.path(model_rel), p, eval_path, timed=True)
        if not run_doc.get("ok"):
            raise EdgeqModuleError("the model failed on the device: %s" % run_doc.get("error"),
                                   active=before["current"], previous=before["previous"], sha256=sha,
                                   changed=result["changed"])
        activation = protocol.activation_record(dev.dir, before["current"], before["previous"])
        gate_doc = None
        if state == "active":
            doc = dev.activate(sha)
            activation = protocol.activation_record(dev.dir, doc.get("active"), doc.get("previous"), True,
                                                    doc.get("switched"))
            result["changed"] = result["changed"] or activation["switched"]
            path = "%s/current/model.tflite" % dev.dir
            timed = p["gate_p99_ms"] is not None
            gate_run = dev.run(path, p, eval_path, timed=timed)
            gate_doc = gate(gate_run, p["gate_accuracy"], p["gate_p99_ms"], path, dev.activation()["current"])
            result["gate"] = gate_doc
        model = {"name": p["model_name"] or "model.tflite", "sha256": sha,
                 "bytes": os.path.getsize(dev.path(model_rel))}
        eval_info = {"name": "eval.npz", "sha256": eval_sha} if eval_sha else None
        report = build_report(probe, run_doc, p, dev, model, eval_info, sent, activation, started_at,
                              time.time() - started, [], gate_doc)
        result["report"] = report
        if gate_doc is not None and not gate_doc["passed"]:
            why = "; ".join(gate_doc["reasons"])
            if not activation["switched"]:
                raise EdgeqModuleError("failed its health gate (%s); it was already active, nothing to revert to"
                                       % why, **dict(result, active=sha, previous=activation["previous"]))
            back = dev.rollback()
            after = dev.activation()
            if back.get("ok"):
                result.update(reverted=True, active=after["current"], previous=after["previous"], changed=True)
                raise EdgeqModuleError("failed its health gate (%s); reverted to %s" % (why, str(after["current"])[:12]),
                                       **result)
            result.update(revert_failed=True, active=after["current"], previous=after["previous"], changed=True)
            raise EdgeqModuleError("REVERT FAILED: failed its health gate (%s) and could not revert (%s); the failing "
                                   "model %s may still be active" % (why, back.get("error"), sha[:12]), **result)
        dev.save_report(sha, report)
        after = dev.activation()
        result.update(active=after["current"], previous=after["previous"])
    return result


def main():
    module = AnsibleModule(argument_spec=MODEL_ARGSPEC, required_if=MODEL_REQUIRED_IF, supports_check_mode=True)
    p = module.params
    sha = p["sha256"]
    if not is_sha(sha):
        module.fail_json(msg="sha256 must be 64 lowercase hex digits (it is computed from src by the action plugin; "
                             "run this module through its action plugin, edgeq.fleet.model)")
    if p["eval_sha256"] is not None and not is_sha(p["eval_sha256"]):
        module.fail_json(msg="eval_sha256 must be 64 lowercase hex digits")
    problems = protocol.gate_problems(p["gate_accuracy"], p["gate_p99_ms"], bool(p["eval_sha256"]),
                                      ("gate_accuracy", "gate_p99_ms", "eval"))
    if problems:
        module.fail_json(msg="; ".join(problems))
    for name in ("runs", "max_runs"):
        if p[name] < 1:
            module.fail_json(msg="%s must be at least 1, got %d" % (name, p[name]))
    dev = Device(p["remote_dir"])
    try:
        if p["state"] == "absent":
            result = _absent(module, dev, sha)
        else:
            result = _deploy(module, dev, sha)
    except EdgeqModuleError as exc:
        extra = dict(exc.extra)
        extra.setdefault("changed", False)
        extra.setdefault("sha256", sha)
        state = dev.activation()
        extra.setdefault("active", state["current"])
        extra.setdefault("previous", state["previous"])
        module.fail_json(msg=str(exc), **extra)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
