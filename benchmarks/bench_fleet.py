"""Fleet deploy wall time: 8 local sshd "devices" with --forks 8, against one device and a serial loop.

    EDGEQ_DEVICE_PYTHON=.venv-device/bin/python .venv/bin/python benchmarks/bench_fleet.py [--hosts 8] [--repeat 2]

Every device is a real ``sshd -D`` on 127.0.0.1 running the device venv
(numpy<2 + tflite-runtime); each deploy uploads to a fresh remote directory,
probes, locks, measures (benchmark_model defaults: >= 50 runs and >= 1 s) and
activates. Target: 8 hosts with --forks 8 in at most 1.5x the time of one.
Caveat: the 8 "devices" share this machine's cores, which real devices do not.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from dataclasses import replace
from types import MappingProxyType

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgeq.deploy import DeployOptions  # noqa: E402
from edgeq.fleet_deploy import FleetOptions, deploy_fleet  # noqa: E402
from edgeq.inventory import InventoryHost, load_inventory  # noqa: E402
from edgeq.transport import SSHOptions  # noqa: E402
from tests.deploy.sshd_helper import SshdProcess, keygen  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hosts", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--model", default=str(ROOT / "tests" / "fleet" / "data" / "tiny_a.tflite"))
    ap.add_argument("--json", dest="json_out", help="also write the figures here")
    args = ap.parse_args()
    python = os.environ.get("EDGEQ_DEVICE_PYTHON") or str(ROOT / ".venv-device" / "bin" / "python")
    work = Path(tempfile.mkdtemp(prefix="edgeq-bench-fleet-"))
    client, wrong = keygen(work / "client_key"), keygen(work / "wrong_key")
    servers = []
    try:
        for i in range(args.hosts):
            servers.append(SshdProcess(work / f"sshd{i}", client, wrong))
        kh = work / "known_hosts"
        kh.write_text("".join(s.info.known_hosts_line() for s in servers))
        inv = work / "hosts.ini"
        inv.write_text("[pis]\n" + "".join(
            f"pi{i} ansible_host=127.0.0.1 ansible_port={s.info.port} ansible_user={s.info.user}\n"
            for i, s in enumerate(servers)))
        hosts = load_inventory(inv).select()
        base = DeployOptions(python=python, reference=False,
                             ssh=SSHOptions(identity=str(client), known_hosts=str(kh), allow_agent=False,
                                            ssh_config=str(work / "no_ssh_config")))
        n = 0

        def run(selected, forks: int, light: bool = False) -> float:
            nonlocal n
            n += 1
            # Each host gets its own fresh directory (the 8 "devices" share one filesystem), as
            # an inventory would set edgeq_remote_dir; fresh, so every run uploads.
            hs = [InventoryHost(h.name, MappingProxyType({**h.vars, "edgeq_remote_dir": str(work / f"r{n}-{h.name}")}),
                                h.groups) for h in selected]
            t0 = time.monotonic()
            opts = replace(base, runs=1, warmup=0, min_seconds=0.0, min_warmup_seconds=0.0) if light else base
            res = deploy_fleet(args.model, hs, FleetOptions(opts, forks), None)
            took = time.monotonic() - t0
            if not res.ok:
                raise SystemExit(f"bench deploy failed: {[(h.name, h.error) for h in res.failed]}")
            return took

        k = args.hosts
        names = ["one device", f"{k} hosts, --forks {k}", f"{k} hosts, --forks 1 (serial)"]
        figures: dict[str, list[float]] = {}
        run(hosts[:1], 1)  # warm the page cache and sshd
        for light in (False, True):
            tag = " [1 run: SSH, probe, upload, lock, activate]" if light else " [full measurement]"
            for _ in range(args.repeat):
                for name, sel, forks in zip(names, (hosts[:1], hosts, hosts), (1, k, 1)):
                    figures.setdefault(name + tag, []).append(run(sel, forks, light))
    finally:
        for s in servers:
            s.stop()
    rows = {}
    print(f"{'':72} {'wall s (median)':>16} {'x one device':>13}")
    for name, values in figures.items():
        tag = name[name.index(" ["):]
        one = statistics.median(figures["one device" + tag])
        med = statistics.median(values)
        rows[name] = {"median_s": round(med, 3), "runs": [round(v, 3) for v in values], "x_one": round(med / one, 2)}
        print(f"{name:72} {med:16.2f} {med / one:13.2f}")
    print(f"cores on this machine: {os.cpu_count()} (the {args.hosts} devices share them)")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"hosts": args.hosts, "cpu_count": os.cpu_count(), **rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
