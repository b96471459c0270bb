"""Fixtures for the ``arm64`` tests: the emulated Raspberry Pi of ``tests/devices/testbed.sh``.

The test bed needs root (network namespace, mounts, chroot) and a few Debian
packages the script installs itself. When it cannot start, the fixture fails
with the script's reason under CI (``CI`` set) and skips otherwise, so a
developer without root still gets a green ``make test-fast``.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

HERE = Path(__file__).resolve().parent
TESTBED = HERE / "testbed.sh"
# First build: debootstrap + two pip installs under qemu, about 4 minutes here.
BUILD_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class EmulatedDevice:
    """Connection facts of one running test-bed device (from ``testbed.sh env``)."""

    name: str
    addr: str
    port: int
    user: str
    key: Path
    known_hosts: Path
    python_tflite: str
    python_litert: str
    cpu: str

    @property
    def host(self) -> str:
        """``USER@ADDR:PORT`` as ``edgeq deploy --host`` takes it."""
        return f"{self.user}@{self.addr}:{self.port}"


def testbed(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Runs ``testbed.sh ARGS`` and returns the finished process (never raises on exit status)."""
    return subprocess.run(["bash", str(TESTBED), *args], capture_output=True, text=True, timeout=timeout,
                          check=False)


def _unavailable(reason: str) -> None:
    # CI can install and run everything the test bed needs, so a skip there would hide a break.
    if os.environ.get("CI"):
        pytest.fail(f"emulated arm64 test bed unavailable: {reason}", pytrace=False)
    pytest.skip(f"emulated arm64 test bed unavailable: {reason} (set CI=1 to make this a failure)")


def _parse_env(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        if "=" in line:
            key, value = line.split("=", 1)
            # `printf %q` output: one shell word.
            out[key] = shlex.split(value)[0] if value else ""
    return out


def device_facts(index: int) -> EmulatedDevice:
    """The connection facts of device ``index`` (whether or not it runs)."""
    proc = testbed("env", "-i", str(index))
    if proc.returncode != 0:
        raise RuntimeError(f"testbed.sh env failed: {proc.stderr.strip()}")
    env = _parse_env(proc.stdout)
    return EmulatedDevice(
        name=env["EDGEQ_TESTBED_NAME"],
        addr=env["EDGEQ_TESTBED_ADDR"],
        port=int(env["EDGEQ_TESTBED_PORT"]),
        user=env["EDGEQ_TESTBED_USER"],
        key=Path(env["EDGEQ_TESTBED_KEY"]),
        known_hosts=Path(env["EDGEQ_TESTBED_KNOWN_HOSTS"]),
        python_tflite=env["EDGEQ_TESTBED_PYTHON_TFLITE"],
        python_litert=env["EDGEQ_TESTBED_PYTHON_LITERT"],
        cpu=env["EDGEQ_TESTBED_CPU"],
    )


def start_devices(indices: list[int]) -> list[int]:
    """Starts the devices (building the rootfs first if needed); returns those this call started.

    Calls ``_unavailable`` (fail under CI, skip otherwise) with the script's own reason.
    """
    if os.geteuid() != 0:
        _unavailable("needs root for network namespaces, mounts and chroot; run the arm64 tests as root")
    started = []
    for index in indices:
        if testbed("status", "-i", str(index)).returncode == 0:
            continue
        try:
            proc = testbed("start", "-i", str(index), timeout=BUILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            _unavailable(f"`testbed.sh start -i {index}` did not finish within {BUILD_TIMEOUT_S:.0f} s")
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-8:])
            _unavailable(f"`testbed.sh start -i {index}` failed (exit {proc.returncode}):\n{tail}")
        started.append(index)
    return started


def stop_devices(indices: list[int]) -> None:
    """Stops the devices unless EDGEQ_TESTBED_KEEP is set (to reuse them in the next session)."""
    if os.environ.get("EDGEQ_TESTBED_KEEP"):
        return
    for index in indices:
        testbed("stop", "-i", str(index))


@pytest.fixture(scope="session")
def emulated_pi() -> Iterator[EmulatedDevice]:
    """Device 0 of the test bed, up for the session; stopped at the end if this session started it."""
    started = start_devices([0])
    yield device_facts(0)
    stop_devices(started)


@pytest.fixture(scope="session")
def emulated_pis(emulated_pi) -> Iterator[list[EmulatedDevice]]:
    """Devices 0 and 1, for fleet deploys."""
    started = start_devices([1])
    yield [emulated_pi, device_facts(1)]
    stop_devices(started)


@pytest.fixture
def device_known_hosts(tmp_path, emulated_pi) -> Path:
    """A private copy of the device's known_hosts (edgeq may append to the file it is given)."""
    path = tmp_path / "known_hosts"
    path.write_text(emulated_pi.known_hosts.read_text())
    return path


@pytest.fixture(scope="session")
def tiny_int8_tflite() -> Path:
    """Full-int8 Dense(4 -> 3), dense layer quantized per tensor (runs on both device runtimes)."""
    return HERE / "tiny_int8.tflite"


@pytest.fixture(scope="session")
def tiny_int8_perchannel_tflite() -> Path:
    """The same model with the dense layer quantized per channel (the converter's default): crashes tflite-runtime 2.14 on aarch64."""
    return HERE / "tiny_int8_perchannel.tflite"
