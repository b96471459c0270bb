#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: edgeq contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: facts
short_description: Probe an edge device the way edgeq deploy does
version_added: "0.1.0"
description:
  - Runs edgeq's probe on the device in one step, architecture, OS, Python and numpy, which TFLite runtime is
    importable, CPU, memory, governor, temperature, throttling, emulation, free disk, and which model is active.
  - The facts are returned under C(ansible_facts.edgeq).
author:
  - edgeq contributors (@edgeq)
options:
  remote_dir:
    description: Directory on the device (C(edgeq deploy --remote-dir)) whose active model to report.
    type: str
    default: ~/.edgeq
attributes:
  check_mode:
    support: full
    description: Only reads.
  diff_mode:
    support: none
    description: No diff; the result names the active and previous model.
  facts:
    support: full
    description: Returns C(ansible_facts.edgeq).
  platform:
    platforms: posix
    support: full
    description: Needs only the device's Python; the runtime and numpy are reported when present.
seealso:
  - module: edgeq.fleet.model
"""

EXAMPLES = r"""
- name: What runtime, governor and model each device has
  edgeq.fleet.facts:

- name: Show it
  ansible.builtin.debug:
    msg: "{{ ansible_facts.edgeq.runtime }} {{ ansible_facts.edgeq.cpu_governor }} {{ ansible_facts.edgeq.active }}"
"""

RETURN = r"""
ansible_facts:
  description: Facts about the device.
  returned: always
  type: complex
  contains:
    edgeq:
      description: The probe document (arch, os, python, numpy, runtime, cpu_governor, thermal_zones, vcgencmd_temp,
        throttling, emulation, disk), plus C(active) and C(previous) model sha256.
      type: dict
      returned: always
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.edgeq.fleet.plugins.module_utils.edgeq_device import (
    FACTS_ARGSPEC, Device, EdgeqModuleError)


def main():
    module = AnsibleModule(argument_spec=FACTS_ARGSPEC, supports_check_mode=True)
    dev = Device(module.params["remote_dir"])
    try:
        doc = dev.probe()
    except EdgeqModuleError as exc:
        module.fail_json(msg=str(exc))
    facts = dict((k, v) for k, v in doc.items() if k not in ("ok", "mode", "have", "activation"))
    state = doc.get("activation") or {}
    facts["active"] = state.get("current")
    facts["previous"] = state.get("previous")
    module.exit_json(changed=False, ansible_facts={"edgeq": facts})


if __name__ == "__main__":
    main()
