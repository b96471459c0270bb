"""Energy per inference, *estimated* from a target's published power figures and a latency.

Never a measurement: edgeq has no power meter. The figures come from the
profile's ``[power]`` table (each with its source in a comment there):

* Linux boards: the board draws between ``idle_w`` and ``load_w``; an inference
  on ``threads`` of ``cores`` cores is taken to draw
  ``idle_w + (load_w - idle_w) x threads / cores``. The estimate gives the whole
  figure and the share above idle (what the inference adds to a board that is
  on anyway).
* Microcontrollers: ``V x I_run x t`` at the profile's clock.

The latency is the device's measured p50 when there was a device, otherwise
the profile's latency estimate; ``latency_source`` says which.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from edgeq.targets import TargetProfile

LATENCY_SOURCES = ("device", "emulated-device", "profile-estimate")


@dataclass(frozen=True)
class EnergyEstimate:
    """Millijoules per inference (an estimate) and how it was reached."""

    total_mj: float
    above_idle_mj: Optional[float]  # Linux boards only
    latency_ms: float
    latency_source: str  # one of LATENCY_SOURCES
    power_w: float
    basis: str
    label: str = "estimate"

    def to_dict(self) -> dict[str, Any]:
        return {"total_mj": self.total_mj, "above_idle_mj": self.above_idle_mj, "latency_ms": self.latency_ms,
                "latency_source": self.latency_source, "power_w": self.power_w, "basis": self.basis,
                "label": self.label}


def estimate_energy(target: TargetProfile, latency_ms: Optional[float],
                    latency_source: str = "profile-estimate") -> Optional[EnergyEstimate]:
    """Energy of one inference of ``latency_ms`` on ``target``; None without power figures or a latency."""
    if latency_source not in LATENCY_SOURCES:
        raise ValueError(f"latency_source must be one of {LATENCY_SOURCES}")
    p = target.power
    if p is None or latency_ms is None or not latency_ms >= 0:
        return None
    seconds = latency_ms / 1000.0
    latency_words = {"device": "latency measured on the device",
                     "emulated-device": "latency measured on an emulated device (not the real chip's speed)",
                     "profile-estimate": "the profile's latency estimate"}[latency_source]
    if p.idle_w is not None and p.load_w is not None:
        share = min(target.threads, target.cores) / target.cores
        watts = p.idle_w + (p.load_w - p.idle_w) * share
        above = (watts - p.idle_w) * seconds * 1000.0
        basis = (f"estimate: {watts:.2f} W (idle {p.idle_w:g} W + {share:.0%} of the {p.load_w - p.idle_w:g} W "
                 f"between idle and all-core load, {target.threads} of {target.cores} cores) x {latency_words}; "
                 "published board figures, not a measurement")
        return EnergyEstimate(round(watts * seconds * 1000.0, 6), round(above, 6), latency_ms, latency_source,
                              round(watts, 4), basis)
    if p.voltage_v is not None and p.run_ma is not None:
        watts = p.voltage_v * p.run_ma / 1000.0
        basis = (f"estimate: {p.voltage_v:g} V x {p.run_ma:g} mA run current at {target.clock_hz / 1e6:g} MHz x "
                 f"{latency_words}; published chip figures, not a measurement")
        return EnergyEstimate(round(watts * seconds * 1000.0, 6), None, latency_ms, latency_source,
                              round(watts, 6), basis)
    return None
