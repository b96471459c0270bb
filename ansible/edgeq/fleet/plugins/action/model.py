# -*- coding: utf-8 -*-
# Copyright: edgeq contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""Controller side of edgeq.fleet.model: find the files, hash them, send only what the device lacks.

Like ``copy``: the module is asked first (by sha256) whether the device already
has the model; only when it answers that it needs the file is it transferred to
Ansible's remote temporary directory, and the module verifies its sha256 on the
device before it is installed under its content address.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import hashlib
import os

from ansible.errors import AnsibleActionFail, AnsibleError
from ansible.plugins.action import ActionBase

from ansible_collections.edgeq.fleet.plugins.module_utils.edgeq_device import MODEL_ARGSPEC, MODEL_REQUIRED_IF

INTERNAL = ("model_tmp", "eval_tmp", "eval_sha256", "model_name")
MODULE = "edgeq.fleet.model"


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ActionModule(ActionBase):

    TRANSFERS_FILES = True
    _requires_connection = True

    def _local(self, name, value):
        try:
            path = self._find_needle("files", value)
        except AnsibleError as exc:
            raise AnsibleActionFail("%s %s was not found on the controller: %s" % (name, value, exc))
        if not os.path.isfile(path):
            raise AnsibleActionFail("%s %s is not a file" % (name, value))
        return path

    def run(self, tmp=None, task_vars=None):
        self._supports_check_mode = True
        self._supports_async = False
        result = super(ActionModule, self).run(tmp, task_vars)
        del tmp
        for name in INTERNAL:
            if self._task.args.get(name) is not None:
                raise AnsibleActionFail("%s is set by the action plugin; do not pass it" % name)
        try:
            _validation, args = self.validate_argument_spec(argument_spec=MODEL_ARGSPEC,
                                                            required_if=MODEL_REQUIRED_IF)
        except AnsibleActionFail as exc:
            # The same message the module would give, naming the module rather than this action plugin.
            raise AnsibleActionFail(exc.message.replace("(%s)" % self._load_name, "(%s)" % MODULE))
        module_args = dict((k, v) for k, v in args.items() if k not in ("src", "eval") and v is not None)
        src = args.get("src")
        model_path = self._local("src", src) if src else None
        if model_path:
            with open(model_path, "rb") as f:
                head = f.read(8)
            if len(head) < 8 or head[4:8] != b"TFL3":
                raise AnsibleActionFail("%s is not a .tflite file (no TFL3 identifier); convert the model first "
                                        "with `edgeq convert`" % src)
            sha = _sha256(model_path)
            if args.get("sha256") and args["sha256"] != sha:
                raise AnsibleActionFail("sha256 %s does not match %s (%s)" % (args["sha256"], src, sha))
            module_args["sha256"] = sha
            module_args["model_name"] = os.path.basename(model_path)
        eval_path = self._local("eval", args["eval"]) if args.get("eval") else None
        if eval_path:
            module_args["eval_sha256"] = _sha256(eval_path)

        try:
            # First ask: a device that has the model (by sha256) gets nothing sent.
            ret = self._execute_module(module_name=MODULE, module_args=module_args, task_vars=task_vars)
            if ret.get("need_upload") and args["state"] != "absent" and not self._task.check_mode:
                if model_path is None:
                    raise AnsibleActionFail("the model %s is not on the device; give src to send it"
                                            % module_args["sha256"][:12])
                shell = self._connection._shell
                if shell.tmpdir is None:
                    self._make_tmp_path()
                remote_model = self._transfer_file(model_path, shell.join_path(shell.tmpdir, "model.tflite"))
                sent = [shell.tmpdir, remote_model]
                module_args["model_tmp"] = remote_model
                if eval_path:
                    remote_eval = self._transfer_file(eval_path, shell.join_path(shell.tmpdir, "eval.npz"))
                    module_args["eval_tmp"] = remote_eval
                    sent.append(remote_eval)
                self._fixup_perms2(sent)
                ret = self._execute_module(module_name=MODULE, module_args=module_args, task_vars=task_vars)
        finally:
            self._remove_tmp_path(self._connection._shell.tmpdir)
        ret.pop("need_upload", None)
        result.update(ret)
        name = (task_vars or {}).get("inventory_hostname")
        if isinstance(result.get("report"), dict) and name:
            result["report"]["name"] = name
            result["report"]["host"] = name
        return result
