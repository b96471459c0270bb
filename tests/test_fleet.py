"""The fleet runner: bounded parallelism, failures isolated, deadlines enforced."""

from __future__ import annotations

import threading
import time

import pytest

from edgeq.errors import ConnectError, EdgeqError
from edgeq.fleet import run_fleet


def test_all_hosts_get_a_status_and_failures_stay_alone():
    def work(h):
        if h == "dead":
            raise ConnectError("connection refused", host=h)
        if h == "buggy":
            raise RuntimeError("boom")
        return h.upper()

    run = run_fleet(["a", "dead", "b", "buggy"], str, work, forks=2)
    assert [o.host for o in run.outcomes] == ["a", "dead", "b", "buggy"]
    assert [o.status for o in run.outcomes] == ["ok", "failed", "ok", "failed"]
    assert run.outcomes[0].result == "A"
    assert "connection refused" in run.outcomes[1].error
    assert run.outcomes[1].error_type == "ConnectError"
    assert "internal error" in run.outcomes[3].error
    assert not run.ok and len(run.failed) == 2


def test_never_more_than_forks_at_once():
    live = 0
    peak = 0
    lock = threading.Lock()

    def work(h):
        nonlocal live, peak
        with lock:
            live += 1
            peak = max(peak, live)
        time.sleep(0.05)
        with lock:
            live -= 1
        return h

    run = run_fleet([str(i) for i in range(12)], str, work, forks=3)
    assert run.ok
    assert peak == 3


def test_hung_host_times_out_within_deadline_and_is_cancelled():
    release = threading.Event()
    cancelled = []

    def work(h):
        if h == "hung":
            release.wait(30)
            return "late"
        return "fine"

    t0 = time.monotonic()
    run = run_fleet(["hung", "ok1", "ok2"], str, work, forks=5, deadline_s=0.5, cancel=cancelled.append)
    elapsed = time.monotonic() - t0
    release.set()
    assert elapsed < 5
    assert [o.status for o in run.outcomes] == ["timeout", "ok", "ok"]
    assert "no answer within 0.5 s" in run.outcomes[0].error
    assert cancelled == ["hung"]


def test_forks_must_be_positive():
    with pytest.raises(EdgeqError, match="--forks must be at least 1"):
        run_fleet(["a"], str, lambda h: h, forks=0)
