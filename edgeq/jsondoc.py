"""JSON from elsewhere (a device's answer, a report file someone else wrote): finite numbers, bounded nesting.

The rules live in the device protocol (``deploy/protocol.py``), which the Ansible collection embeds too:
``loads`` refuses ``NaN``, ``Infinity``, numbers that overflow to infinity (``1e999``) and integers longer
than ``MAX_INT_DIGITS`` digits, so every number it returns converts to a finite float; ``depth`` measures
nesting without recursion.
"""

from edgeq._device.protocol import MAX_INT_DIGITS, depth, loads

__all__ = ["MAX_INT_DIGITS", "depth", "loads"]
