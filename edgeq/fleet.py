"""Run one piece of work per host, at most ``forks`` at once, each within a deadline.

A failed, unreachable or hung host fails alone: the others go on, and every
host gets a status within a bounded time. A host whose work overruns its
deadline is marked ``timeout`` and its ``cancel`` hook is called (the deploy
closes its SSH transport there); its thread is abandoned as a daemon, so one
hung host can never block the run.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable, Generic, Optional, Sequence, TypeVar

from edgeq.errors import EdgeqError

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class HostOutcome(Generic[R]):
    """What happened on one host: ``status`` is ``ok``, ``failed`` or ``timeout``."""

    host: str
    status: str
    result: Optional[R]
    error: Optional[str]
    error_type: Optional[str]
    seconds: float

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass(frozen=True)
class FleetRun(Generic[R]):
    """Every host's outcome, in the order the hosts were given."""

    outcomes: tuple[HostOutcome[R], ...]
    seconds: float

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outcomes)

    @property
    def failed(self) -> tuple[HostOutcome[R], ...]:
        return tuple(o for o in self.outcomes if not o.ok)


class _Slot:
    def __init__(self, host: str) -> None:
        self.host = host
        self.started: Optional[float] = None
        self.outcome: Optional[HostOutcome] = None
        self.done = threading.Event()


def run_fleet(
    items: Sequence[T],
    name: Callable[[T], str],
    work: Callable[[T], R],
    forks: int = 5,
    deadline_s: float = 600.0,
    cancel: Optional[Callable[[T], None]] = None,
    poll_s: float = 0.05,
) -> FleetRun[R]:
    """Run ``work(item)`` for every item; at most ``forks`` run at once; none runs past ``deadline_s``."""
    if forks < 1:
        raise EdgeqError(f"--forks must be at least 1, got {forks}")
    t0 = time.monotonic()
    slots = [_Slot(name(it)) for it in items]
    pending = list(range(len(items)))
    running: list[int] = []
    lock = threading.Lock()

    def runner(i: int) -> None:
        slot = slots[i]
        try:
            result = work(items[i])
            outcome = HostOutcome(slot.host, "ok", result, None, None, 0.0)
        except EdgeqError as exc:
            outcome = HostOutcome(slot.host, "failed", None, str(exc), type(exc).__name__, 0.0)
        except Exception as exc:  # a bug on one host must not take the fleet down
            outcome = HostOutcome(slot.host, "failed", None, f"internal error: {exc!r}", type(exc).__name__, 0.0)
        with lock:
            if slot.outcome is None:
                slot.outcome = _timed(outcome, slot.started)
        slot.done.set()

    while pending or running:
        now = time.monotonic()
        for i in list(running):
            slot = slots[i]
            if slot.done.is_set():
                running.remove(i)
            elif slot.started is not None and now - slot.started > deadline_s:
                with lock:
                    if slot.outcome is None:
                        slot.outcome = HostOutcome(
                            slot.host, "timeout", None,
                            f"{slot.host}: no answer within {deadline_s:g} s; the host was abandoned",
                            "Timeout", now - slot.started,
                        )
                if cancel is not None:
                    try:
                        cancel(items[i])
                    except Exception:  # cancelling is best effort; the outcome is already recorded
                        pass
                running.remove(i)
        while pending and len(running) < forks:
            i = pending.pop(0)
            slots[i].started = time.monotonic()
            threading.Thread(target=runner, args=(i,), name=f"edgeq-{slots[i].host}", daemon=True).start()
            running.append(i)
        if running:
            slots[running[0]].done.wait(poll_s)
    return FleetRun(tuple(s.outcome for s in slots if s.outcome is not None), time.monotonic() - t0)


def _timed(outcome: HostOutcome, started: Optional[float]) -> HostOutcome:
    elapsed = time.monotonic() - started if started is not None else 0.0
    return HostOutcome(outcome.host, outcome.status, outcome.result, outcome.error, outcome.error_type, elapsed)
