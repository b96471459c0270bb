"""Controller cost per host: native `edgeq deploy --inventory` against `ansible-playbook` with edgeq.fleet.

    EDGEQ_DEVICE_PYTHON=.venv-device/bin/python .venv/bin/python benchmarks/bench_fleet_scale.py [--hosts 8]

Both deploy the same tiny model to the same local sshd "devices" (fresh device
directories every run, so every run uploads), with the same forks, one after
the other. What is measured is the controller only: the command's whole process
tree (edgeq and its threads; ansible-playbook, its worker forks and their ssh
clients), never the devices (their sshd sessions and Python are children of the
sshd daemons, not of the command):

- CPU seconds: user + system of the tree, from ``wait4`` (every descendant is
  reaped inside the tree);
- peak memory: the largest sum of PSS (proportional set size: shared pages of
  forked workers counted once) over the tree, sampled every 20 ms.

Each configuration runs with 1 host and with all hosts: the 1-host figure is the
fixed cost (interpreter start, inventory, imports), the difference divided by
(hosts - 1) the marginal cost per host. The device-side measuring is cut to one
run (``runs=1``, no minimum time), so wall time is mostly connection and
transfer; the controller figures do not depend on it either way.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from tests.deploy.sshd_helper import SshdProcess, keygen  # noqa: E402

BIN = Path(sys.executable).parent


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def _tree(pid: int) -> list[int]:
    kids = _children()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, ()))
    return out


def _pss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _matching(text: str) -> list[int]:
    """Processes whose command line contains ``text`` (ssh ControlPersist masters detach from the tree)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if text.encode() in f.read():
                        out.append(int(entry))
            except OSError:
                pass
    return out


def _cpu(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def measure(argv: list[str], env: dict[str, str], cwd: Path, detached: str = "") -> dict[str, float]:
    """Run ``argv``; return wall seconds, CPU seconds and peak PSS (bytes) of its process tree.

    ``detached``: a string in the command line of processes that belong to the run but leave its tree
    (ssh ControlPersist masters, which do the encryption for every ansible connection); they are
    counted too, and must still be running when the command ends (ControlPersist keeps them 60 s).
    """
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peak = 0
    done = threading.Event()
    out: list[bytes] = []

    def drain() -> None:
        out.append(proc.stdout.read())

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            pids = set(_tree(proc.pid)) | (set(_matching(detached)) if detached else set())
            peak = max(peak, sum(_pss(p) for p in pids))
            done.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _pid, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - t0
    done.set()
    sampler.join()
    reader.join()
    extra_cpu = sum(_cpu(p) for p in _matching(detached)) if detached else 0.0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{argv[0]} failed ({proc.returncode}):\n{out[0].decode(errors='replace')[-3000:]}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime + extra_cpu, "peak_pss_bytes": float(peak)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hosts", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--model", default=str(ROOT / "tests" / "fleet" / "data" / "tiny_a.tflite"))
    ap.add_argument("--json", dest="json_out", help="also write the figures here")
    ap.add_argument("--target-hosts", type=int, default=1000)
    ap.add_argument("--target-forks", type=int, default=50)
    args = ap.parse_args()
    python = os.environ.get("EDGEQ_DEVICE_PYTHON") or str(ROOT / ".venv-device" / "bin" / "python")
    work = Path(tempfile.mkdtemp(prefix="edgeq-bench-scale-", dir="/tmp"))
    client, wrong = keygen(work / "client_key"), keygen(work / "wrong_key")
    servers = []
    figures: dict[str, dict[int, list[dict[str, float]]]] = {}
    try:
        for i in range(args.hosts):
            servers.append(SshdProcess(work / f"sshd{i}", client, wrong))
        kh = work / "known_hosts"
        kh.write_text("".join(s.info.known_hosts_line() for s in servers))

        # The collection, built and installed as a user would.
        dist, colls = work / "dist", work / "collections"
        subprocess.run([str(BIN / "ansible-galaxy"), "collection", "build", str(ROOT / "ansible" / "edgeq" / "fleet"),
                        "--output-path", str(dist)], check=True, capture_output=True)
        subprocess.run([str(BIN / "ansible-galaxy"), "collection", "install", str(next(dist.glob("*.tar.gz"))),
                        "-p", str(colls)], check=True, capture_output=True)
        book = work / "deploy.yml"
        book.write_text(yaml.safe_dump([{
            "hosts": "all", "gather_facts": False,
            "tasks": [{"edgeq.fleet.model": {"src": args.model, "remote_dir": "{{ edgeq_remote_dir }}", "runs": 1,
                                             "warmup": 0, "min_seconds": 0.0, "min_warmup_seconds": 0.0}}]}]))
        cfg = work / "ansible.cfg"
        cfg.write_text("[defaults]\n")
        n = 0

        def inventory(count: int) -> Path:
            nonlocal n
            n += 1
            hosts = {}
            for i, s in enumerate(servers[:count]):
                hosts[f"pi{i}"] = {
                    "ansible_host": "127.0.0.1", "ansible_port": s.info.port, "ansible_user": s.info.user,
                    "ansible_python_interpreter": python, "ansible_ssh_private_key_file": str(client),
                    "ansible_ssh_common_args": f"-o UserKnownHostsFile={kh} -o StrictHostKeyChecking=yes",
                    "edgeq_remote_dir": str(work / f"r{n}-pi{i}")}
            path = work / f"hosts{n}.yml"
            path.write_text(yaml.safe_dump({"all": {"hosts": hosts}}))
            return path

        base_env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_") and k != "SSH_AUTH_SOCK"}

        def native(count: int) -> dict[str, float]:
            inv = inventory(count)
            return measure([sys.executable, "-m", "edgeq", "deploy", args.model, "--inventory", str(inv),
                            "--forks", str(args.hosts), "--identity", str(client), "--known-hosts", str(kh),
                            "--runs", "1", "--warmup", "0", "-o", str(work / f"rep{n}")], base_env, work)

        def ansible(count: int, pipelining: bool) -> dict[str, float]:
            inv = inventory(count)
            home = Path(tempfile.mkdtemp(prefix="a-", dir="/tmp"))
            env = dict(base_env, ANSIBLE_CONFIG=str(cfg), ANSIBLE_COLLECTIONS_PATH=str(colls),
                       ANSIBLE_HOME=str(home), ANSIBLE_LOCAL_TEMP=str(home / "t"),
                       ANSIBLE_SSH_CONTROL_PATH_DIR=str(home / "cp"), ANSIBLE_FORKS=str(args.hosts),
                       ANSIBLE_PIPELINING="1" if pipelining else "0", ANSIBLE_NOCOLOR="1",
                       PATH=f"{BIN}:{base_env.get('PATH', '')}")
            res = measure([str(BIN / "ansible-playbook"), "-i", str(inv), str(book)], env, work, detached=str(home))
            # ControlPersist masters outlive the play (60 s); end them so they do not pile up between runs.
            for sock in (home / "cp").glob("*"):
                subprocess.run(["ssh", "-o", f"ControlPath={sock}", "-O", "exit", "x"], capture_output=True,
                               check=False)
            return res

        configs = {"edgeq deploy --inventory": native,
                   "ansible-playbook + edgeq.fleet": lambda c: ansible(c, False),
                   "ansible-playbook + edgeq.fleet, pipelining": lambda c: ansible(c, True)}
        native(1)  # warm the page cache, sshd and the .pyc files of both tools
        ansible(1, False)
        for _ in range(args.repeat):
            for name, fn in configs.items():
                for count in (1, args.hosts):
                    figures.setdefault(name, {}).setdefault(count, []).append(fn(count))
    finally:
        for s in servers:
            s.stop()

    k = args.hosts
    rows = {}
    for name, by_count in figures.items():
        med = {c: {m: statistics.median(r[m] for r in runs) for m in runs[0]} for c, runs in by_count.items()}
        one, many = med[1], med[k]
        cpu_host = max(0.0, (many["cpu_s"] - one["cpu_s"]) / (k - 1))
        mem_host = max(0.0, (many["peak_pss_bytes"] - one["peak_pss_bytes"]) / (k - 1))
        wall_host = many["wall_s"]  # with forks = hosts, every host runs at once: a host's wall time
        rows[name] = {"fixed_cpu_s": one["cpu_s"], "cpu_s_per_host": cpu_host,
                      "fixed_peak_bytes": one["peak_pss_bytes"], "peak_bytes_per_concurrent_host": mem_host, f"cpu_s_{k}_hosts": many["cpu_s"],
                      f"peak_bytes_{k}_hosts": many["peak_pss_bytes"], f"wall_s_{k}_hosts": wall_host,
                      "runs": {str(c): runs for c, runs in by_count.items()}}
    mib = 1 << 20
    print(f"controller only, {k} local sshd devices, forks {k}, medians of {args.repeat}")
    print(f"{'':44} {'CPU s 1 host':>12} {'CPU s/host':>11} {'peak MiB 1':>11} {'MiB/fork':>9} "
          f"{'CPU s ' + str(k):>9} {'peak MiB ' + str(k):>12} {'wall s ' + str(k):>9}")
    for name, r in rows.items():
        print(f"{name:44} {r['fixed_cpu_s']:12.2f} {r['cpu_s_per_host']:11.3f} {r['fixed_peak_bytes'] / mib:11.0f} "
              f"{r['peak_bytes_per_concurrent_host'] / mib:9.1f} {r[f'cpu_s_{k}_hosts']:9.2f} "
              f"{r[f'peak_bytes_{k}_hosts'] / mib:12.0f} {r[f'wall_s_{k}_hosts']:9.2f}")
    N, F = args.target_hosts, args.target_forks
    print(f"\nextrapolated to {N} devices at {F} forks (assumptions below):")
    print(f"{'':44} {'CPU s total':>11} {'peak MiB':>9} {'cores, 10 s/host':>17} {'cores, 60 s/host':>17}")
    extrap = {}
    for name, r in rows.items():
        cpu_total = r["fixed_cpu_s"] + N * r["cpu_s_per_host"]
        peak = r["fixed_peak_bytes"] + F * r["peak_bytes_per_concurrent_host"]
        # F hosts in flight, each taking T s of wall time on its device: the controller burns F * c / T cores.
        cores = {t: F * r["cpu_s_per_host"] / t for t in (10, 60)}
        extrap[name] = {"cpu_s_total": cpu_total, "peak_bytes": peak, "cores_at_10s_per_host": cores[10],
                        "cores_at_60s_per_host": cores[60]}
        print(f"{name:44} {cpu_total:11.0f} {peak / mib:9.0f} {cores[10]:17.2f} {cores[60]:17.2f}")
    print("assumptions: CPU and memory per host grow linearly, as measured between 1 and "
          f"{k} hosts; {F} hosts in flight at any time; a host's deploy takes 10 s (small model, LAN) or 60 s "
          "(measuring on the device, slow link) of wall time, during which the controller only waits; "
          "same model size as here (upload CPU grows with model bytes); ssh ControlPersist masters (ansible) "
          "are counted while the play runs.")
    print(f"cores on this machine: {os.cpu_count()} (shared by the devices, which are not measured)")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"hosts": k, "rows": rows, "extrapolated": extrap,
                                                   "target_hosts": N, "target_forks": F}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
