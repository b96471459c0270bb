#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: edgeq contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: rollback
short_description: Make the previously active edgeq model active again
version_added: "0.1.0"
description:
  - Makes the previously active model current again (and the current one previous) in one atomic step under the
    device lock, with edgeq's own runner, exactly as C(edgeq rollback) does.
  - Refuses when C(REMOTE_DIR/current) is not a link edgeq made (a link outside C(models/), a file); the message
    names it and says how to move it aside.
author:
  - edgeq contributors (@edgeq)
options:
  remote_dir:
    description: Directory on the device (C(edgeq deploy --remote-dir)).
    type: str
    default: ~/.edgeq
  lock_stale_s:
    description: A device lock older than this many seconds is treated as left by a dead deploy.
    type: float
    default: 1800.0
attributes:
  check_mode:
    support: full
    description: Reports which model would become active and changes nothing.
  diff_mode:
    support: none
    description: No diff; the result names the active and previous model.
  platform:
    platforms: posix
    support: full
    description: Needs only the device's Python.
seealso:
  - module: edgeq.fleet.model
"""

EXAMPLES = r"""
- name: Go back to the model that was active before
  edgeq.fleet.rollback:
"""

RETURN = r"""
active:
  description: sha256 of the model C(REMOTE_DIR/current) points at after the task.
  returned: always
  type: str
previous:
  description: sha256 of the model a rollback after the task would return to.
  returned: always
  type: str
rolled_back_from:
  description: sha256 of the model that was active before the task.
  returned: always
  type: str
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.edgeq.fleet.plugins.module_utils.edgeq_device import (
    ROLLBACK_ARGSPEC, Device, EdgeqModuleError)


def main():
    module = AnsibleModule(argument_spec=ROLLBACK_ARGSPEC, supports_check_mode=True)
    dev = Device(module.params["remote_dir"])
    before = dev.activation()
    if not before["previous"]:
        module.fail_json(msg="there is no previous model in %s to roll back to; deploy a model first" % dev.dir,
                         active=before["current"], previous=None, rolled_back_from=before["current"])
    if module.check_mode:
        module.exit_json(changed=True, active=before["previous"], previous=before["current"],
                         rolled_back_from=before["current"])
    try:
        with dev.locked(before["current"], module.params["lock_stale_s"], 300.0):
            doc = dev.rollback()
    except EdgeqModuleError as exc:
        module.fail_json(msg=str(exc), active=before["current"], previous=before["previous"],
                         rolled_back_from=before["current"])
    after = dev.activation()
    if not doc.get("ok"):
        module.fail_json(msg="cannot roll back: %s" % doc.get("error"), active=after["current"],
                         previous=after["previous"], rolled_back_from=before["current"])
    module.exit_json(changed=True, active=after["current"], previous=after["previous"],
                     rolled_back_from=before["current"])


if __name__ == "__main__":
    main()
