"""A link lost after the device switched models, against a real sshd behind a fault proxy: the deploy says the new
model may be active, reconnects, reads back what is active and gives back its lock; a link that stays down is
reported as "may be active", never as a plain connection error."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from edgeq.deploy import ActivationUnknown, deploy, rollback
from tests.fleet.conftest import active, sha
from tests.fleet.test_faults import proxied  # noqa: F401  (fixture)

pytestmark = pytest.mark.ssh


def _switch_then_hang(tmp_path: Path, real: str, mode: str = "activate") -> tuple[str, Path]:
    """A device python whose ``mode`` really switches, says so in a marker file, then hangs (the link is cut
    while the host waits for the answer)."""
    marker = tmp_path / "switched"
    script = tmp_path / "switchpy"
    script.write_text(f"""#!/bin/sh
for a in "$@"; do
  if [ "$a" = {mode} ]; then "{real}" "$@" >/dev/null; touch "{marker}"; sleep 20; exit 0; fi
done
exec "{real}" "$@"
""")
    script.chmod(0o755)
    return str(script), marker


def _cut_when(marker: Path, proxy, then: str = "pass") -> threading.Thread:
    def watch() -> None:
        deadline = time.monotonic() + 60
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        proxy.arm(then)
        proxy.cut_now()

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


def test_a_link_lost_after_the_switch_reads_back_what_is_active(proxied, model_a, model_b, tmp_path,  # noqa: F811
                                                                device_python, ledger):
    proxy, opts = proxied
    remote = tmp_path / "device"
    deploy(model_a, opts)
    fake, marker = _switch_then_hang(tmp_path, device_python)
    watcher = _cut_when(marker, proxy)
    with pytest.raises(ActivationUnknown) as exc:
        deploy(model_b, replace(opts, python=fake))
    watcher.join(5)
    text = str(exc.value)
    assert proxy.tripped.is_set() and active(remote) == sha(model_b)
    assert "lost while activating" in text and "the new model IS active" in text and "\n" not in text, text
    assert exc.value.active == {"current": sha(model_b), "previous": sha(model_a)}
    assert not (remote / "lock").exists()  # given back over the new connection
    ledger("fault", "link lost after the device switched models")


def test_a_link_that_stays_down_after_the_switch_says_it_may_be_active(proxied, model_a, model_b,  # noqa: F811
                                                                      tmp_path, device_python, ledger):
    proxy, opts = proxied
    remote = tmp_path / "device"
    deploy(model_a, opts)
    fake, marker = _switch_then_hang(tmp_path, device_python)
    watcher = _cut_when(marker, proxy, then="blackhole")
    opts = replace(opts, python=fake, ssh=replace(opts.ssh, connect_timeout=1.0, connect_retries=0))
    with pytest.raises(ActivationUnknown) as exc:
        deploy(model_b, opts)
    watcher.join(5)
    text = str(exc.value)
    assert "lost while activating" in text and f"{sha(model_b)[:12]} may be active" in text, text
    assert exc.value.active is None
    assert "stays locked" in text  # the lock could not be given back either, and the error says so
    assert active(remote) == sha(model_b)
    ledger("fault", "link lost after the switch and not back")


def test_a_link_lost_while_rolling_back_reads_back_what_is_active(proxied, model_a, model_b, tmp_path,  # noqa: F811
                                                                  device_python, ledger):
    proxy, opts = proxied
    remote = tmp_path / "device"
    deploy(model_a, opts)
    deploy(model_b, opts)
    fake, marker = _switch_then_hang(tmp_path, device_python, "rollback")
    watcher = _cut_when(marker, proxy)
    with pytest.raises(ActivationUnknown) as exc:
        rollback(replace(opts, python=fake))
    watcher.join(5)
    assert "lost while rolling back" in str(exc.value) and f"current = {sha(model_a)[:12]}" in str(exc.value)
    assert exc.value.active == {"current": sha(model_a), "previous": sha(model_b)} and active(remote) == sha(model_a)
    assert not (remote / "lock").exists()
    ledger("fault", "link lost while rolling back")
