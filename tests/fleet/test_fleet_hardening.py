"""Timeouts that must not hide anything, against real sshd: a run that overruns is killed on the device before
its lock is released; a fleet host abandoned while activating reports what is active; the host reference is
computed once per model, failures included."""

from __future__ import annotations

import stat
import threading
import time
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType

import numpy as np
import pytest

import edgeq.deploy.reference
from edgeq.deploy import DeployOptions, deploy
from edgeq.errors import DeviceError
from edgeq.fleet_deploy import FleetOptions, deploy_fleet
from edgeq.inventory import InventoryHost
from tests.fleet.conftest import FAST, active, sha
from tests.fleet.test_faults import _runner_pids

pytestmark = pytest.mark.ssh


def test_a_run_timeout_kills_the_runner_before_the_lock_is_released(opts, model_a, model_b, tmp_path, ledger):
    remote = tmp_path / "device"
    deploy(model_a, opts)
    t0 = time.monotonic()
    with pytest.raises(DeviceError) as exc:
        deploy(model_b, replace(opts, run_timeout=3.0, min_seconds=60.0, max_runs=10**9))
    assert time.monotonic() - t0 < 15, "the run timeout did not bound the deploy"
    assert "\n" not in str(exc.value)
    # Nothing this deploy started is still running on the device once it has given up and unlocked.
    assert _runner_pids(str(remote)) == []
    assert not (remote / "lock").exists()
    assert active(remote) == sha(model_a)
    deploy(model_b, opts)
    assert active(remote) == sha(model_b)
    ledger("fault", "run overran its timeout (runner killed, lock released after)")
    ledger("model_kept", "run overran its timeout")


def _slow_activate_python(tmp_path: Path, real: str, seconds: float) -> str:
    """A device python whose 'activate' really switches, then hangs before answering (a stalled link)."""
    script = tmp_path / "slowpy"
    script.write_text(f"""#!/bin/sh
for a in "$@"; do
  if [ "$a" = activate ]; then "{real}" "$@"; sleep {seconds}; exit 0; fi
done
exec "{real}" "$@"
""")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script)


def _host(name: str, server, remote: Path, python: str) -> InventoryHost:
    return InventoryHost(name, MappingProxyType({"ansible_host": "127.0.0.1", "ansible_port": server.port,
                                                 "ansible_user": server.user, "edgeq_remote_dir": str(remote),
                                                 "ansible_python_interpreter": python}), ())


def test_fleet_timeout_during_activation_reports_the_switch(fleet, opts, model_a, model_b, tmp_path, device_python,
                                                            ledger):
    remote = tmp_path / "device"
    deploy(model_a, opts)
    slow = _slow_activate_python(tmp_path, device_python, 30)
    host = _host("pi1", fleet.servers[0], remote, slow)
    base = replace(opts, host=None, remote_dir="~/.unused")
    res = deploy_fleet(model_b, [host], FleetOptions(base, forks=1, host_deadline_s=8.0))
    (h,) = res.hosts
    assert h.status == "timeout"
    assert active(remote) == sha(model_b)  # the switch did happen on the device...
    # ...and the report says so instead of a bare "timeout".
    assert "the new model IS active" in h.error and sha(model_b)[:12] in h.error, h.error
    assert h.active_after == {"current": sha(model_b), "previous": sha(model_a)}
    assert res.to_dict()["hosts"][0]["active_after_timeout"]["current"] == sha(model_b)
    ledger("fault", "fleet host abandoned while activating")


def test_host_reference_is_computed_once_per_model_even_when_it_fails(fleet, opts, model_a, tmp_path,
                                                                      device_python, monkeypatch, ledger):
    shape = _input_shape(model_a)
    data = tmp_path / "eval.npz"
    np.savez(data, x=np.random.default_rng(0).random((8, *shape), dtype=np.float32))
    calls = []
    lock = threading.Lock()

    def hanging_reference(model_path, eval_path, timeout=600.0):
        with lock:
            calls.append(time.monotonic())
        time.sleep(1.5)  # a reference run that hangs until its bound
        raise DeviceError(f"the host reference timed out after {timeout:g} s")

    monkeypatch.setattr(edgeq.deploy.reference, "host_reference", hanging_reference)
    hosts = [_host(f"pi{i}", s, tmp_path / f"dev{i}", device_python) for i, s in enumerate(fleet.servers)]
    base = replace(opts, host=None, eval_data=str(data), reference=True, reference_timeout=5.0)
    t0 = time.monotonic()
    res = deploy_fleet(model_a, hosts, FleetOptions(base, forks=3))
    took = time.monotonic() - t0
    assert all(h.status == "ok" for h in res.hosts), [h.error for h in res.hosts]
    assert len(calls) == 1, f"the reference ran {len(calls)} times"
    for h in res.hosts:
        assert any("no host reference" in w for w in h.result.warnings)
    # Three hosts waited on one bounded reference, not one after another.
    assert took < 1.5 * len(hosts) + 20
    ledger("fault", "host reference hangs for every host of a fleet")


def _input_shape(model: Path) -> tuple[int, ...]:
    from ai_edge_litert.interpreter import Interpreter

    return tuple(int(d) for d in Interpreter(model_path=str(model)).get_input_details()[0]["shape"][1:])


def test_plan_rejects_an_empty_remote_dir_before_anything_runs(fleet, opts, model_a, tmp_path, device_python,
                                                              ledger):
    from edgeq.errors import UsageError
    from edgeq.fleet_deploy import plan_fleet

    host = InventoryHost("pi1", MappingProxyType({"ansible_connection": "local", "edgeq_remote_dir": ""}), ())
    with pytest.raises(UsageError, match="edgeq_remote_dir"):
        plan_fleet([host], DeployOptions(**FAST))
    ledger("bad_input", "empty edgeq_remote_dir in an inventory")


@pytest.mark.parametrize("mode", ["stall"])  # a cut link is seen by sshd, which ends the session itself
def test_a_runner_cut_off_from_its_host_stops_by_itself(fleet, opts, model_a, model_b, tmp_path, mode, ledger):
    """Over a silent link nobody can kill the runner: it must stop on its own deadline, not run on for a minute."""
    from tests.faultproxy import FaultProxy

    remote = tmp_path / "device"
    server = fleet.servers[0]
    with FaultProxy(server.port) as proxy:
        kh = fleet.known_hosts(tmp_path / "kh_proxy", {proxy.port: server.port})
        o = replace(opts, host=f"{server.user}@127.0.0.1:{proxy.port}", ssh=replace(opts.ssh, known_hosts=str(kh)))
        deploy(model_a, o)

        def on(ev):
            if ev.stage == "measure":
                if mode == "stall":
                    threading.Timer(0.5, lambda: proxy.arm("stall", 0)).start()
                else:
                    threading.Timer(0.5, proxy.cut_now).start()

        with pytest.raises(DeviceError):
            deploy(model_b, replace(o, run_timeout=4.0, min_seconds=60.0, max_runs=10**9), on)
        gone_by = time.monotonic() + 4.0
        while _runner_pids(str(remote)) and time.monotonic() < gone_by:
            time.sleep(0.1)
        assert _runner_pids(str(remote)) == [], "the runner kept running after its host was cut off"
        assert active(remote) == sha(model_a)
    ledger("fault", f"link {mode} mid-run: runner stops on its own deadline")
    ledger("model_kept", f"link {mode} mid-run")
