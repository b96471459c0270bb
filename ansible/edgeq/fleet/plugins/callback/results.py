# -*- coding: utf-8 -*-
# Copyright: edgeq contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
name: results
type: aggregate
short_description: Save edgeq.fleet.model results for C(edgeq report --ansible)
version_added: "0.1.0"
description:
  - Records every C(edgeq.fleet.model) result (ok, failed, reverted, unreachable), which batch of a C(serial) play it
    ran in, and the play's hosts that were never reached, in one JSON file.
  - C(edgeq report --ansible FILE -o DIR) turns it into the same C(summary.json) and C(summary.html) as
    C(edgeq deploy --inventory).
requirements:
  - enable it with C(callbacks_enabled = edgeq.fleet.results) in C(ansible.cfg) (or C(ANSIBLE_CALLBACKS_ENABLED))
options:
  path:
    description: File to write the results to.
    type: path
    default: edgeq-ansible-results.json
    env:
      - name: EDGEQ_ANSIBLE_RESULTS
    ini:
      - section: callback_edgeq_results
        key: path
"""

import json
import os
import tempfile
import time

from ansible import context
from ansible.plugins.callback import CallbackBase

MODEL_ACTIONS = ("edgeq.fleet.model", "model")
FORMAT = "edgeq.fleet.results/1"


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "edgeq.fleet.results"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self, *args, **kwargs):
        super(CallbackModule, self).__init__(*args, **kwargs)
        self.started = time.time()
        self.plays = []
        self.play = None
        self.play_key = None
        self.batch = 0

    def v2_playbook_on_play_start(self, play):
        # With `serial`, Ansible starts (a copy of) the same play once per batch.
        key = (play.get_name(), getattr(play, "_uuid", None))
        if self.play is not None and self.play_key == key:
            self.batch += 1
            self.play["batches"].append({"index": self.batch, "hosts": []})
            return
        hosts = []
        try:
            # Every host the play selects (after --limit, before the batch restriction), so hosts never
            # reached can be reported as not started.
            inventory = play._variable_manager._inventory  # pylint: disable=protected-access
            selected = inventory.get_hosts(play.hosts, ignore_restrictions=True, order=play.order)
            hosts = [h.get_name() for h in selected]
        except Exception:  # best effort: without it, edgeq report takes the hosts from --inventory
            hosts = []
        serial = play.serial if isinstance(play.serial, list) else [play.serial] if play.serial else []
        self.play_key = key
        self.play = {"name": play.get_name(), "hosts": hosts, "serial": [str(s) for s in serial],
                     "max_fail_percentage": play.max_fail_percentage, "results": {},
                     "batches": [{"index": 1, "hosts": []}]}
        self.plays.append(self.play)
        self.batch = 1

    def _is_model(self, task):
        action = getattr(task, "resolved_action", None) or task.action
        return action in MODEL_ACTIONS

    def _record(self, result, status):
        if self.play is None or not self._is_model(result.task):
            return
        name = result.host.get_name()
        doc = dict(result.result)
        self.play["results"][name] = {"status": status, "batch": self.batch, "task": result.task.get_name(),
                                      "result": doc}
        if self.play["batches"]:
            self.play["batches"][-1]["hosts"].append(name)

    def v2_runner_on_ok(self, result):
        self._record(result, "ok")

    def v2_runner_on_failed(self, result, ignore_errors=False):
        self._record(result, "failed")

    def v2_runner_on_unreachable(self, result):
        self._record(result, "unreachable")

    def v2_playbook_on_stats(self, stats):
        path = os.path.abspath(os.path.expanduser(self.get_option("path")))
        try:
            forks = int(context.CLIARGS.get("forks") or 0) or None
        except (TypeError, ValueError):
            forks = None
        doc = {"schema": FORMAT, "format": FORMAT, "started_at": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(self.started)),
               "seconds": round(time.time() - self.started, 3), "forks": forks, "plays": self.plays}
        folder = os.path.dirname(path) or "."
        try:
            if not os.path.isdir(folder):
                os.makedirs(folder)
            fd, tmp = tempfile.mkstemp(prefix=".edgeq-results-", dir=folder)
            with os.fdopen(fd, "w") as f:
                json.dump(doc, f, default=str)
            os.replace(tmp, path)
        except (OSError, IOError) as exc:
            self._display.warning("edgeq.fleet.results: cannot write %s: %s" % (path, exc))
