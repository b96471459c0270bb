"""Every report page in a real browser: headless Chromium renders it (the screenshot is not blank) and, on the
digits sweep, no two chart labels overlap.

Pages are built from small documents made here (and tests/data/sweep_digits.json, the sweep.json of the
examples/digits model on rpi4, measured on an x86_64 host), so no device or TensorFlow is needed.
"""

from __future__ import annotations

import copy
import html
import json
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from edgeq.report.sweep import render_html as render_sweep_html

DATA = Path(__file__).parent / "data"

pytestmark = pytest.mark.browser


# ------------------------------------------------------------------ the browser


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        pytest.fail("headless Chromium is not installed: run scripts/system-deps.sh (Debian package chromium)")
    return exe


def _run_browser(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp / "chromium-profile"
    profile.mkdir(exist_ok=True)
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           f"--user-data-dir={profile}", *args]
    proc = subprocess.run(cmd, capture_output=True, timeout=120, cwd=tmp)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
    return proc


def screenshot(page: Path, tmp: Path, size: str = "1280,1600") -> Path:
    png = tmp / (page.stem + ".png")
    _run_browser(tmp, f"--screenshot={png}", f"--window-size={size}", page.as_uri())
    return png


_PROBE = """<script>
(function () {
  var out = [];
  document.querySelectorAll('svg').forEach(function (svg, s) {
    var b = svg.getBoundingClientRect();
    out.push({svg: s, kind: 'svg', box: [b.left, b.top, b.right, b.bottom]});
    svg.querySelectorAll('text').forEach(function (t) {
      var r = t.getBoundingClientRect();
      out.push({svg: s, kind: 'text', text: t.textContent, box: [r.left, r.top, r.right, r.bottom]});
    });
  });
  var pre = document.createElement('pre');
  pre.id = 'edgeq-rects';
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
})();
</script>"""


def text_boxes(page_html: str, tmp: Path) -> list[dict]:
    """The on-screen box of every SVG <text> (and of every <svg>), as laid out by Chromium."""
    probe = tmp / "probe.html"
    probe.write_text(page_html.replace("</body>", _PROBE + "</body>"), encoding="utf-8")
    dom = _run_browser(tmp, "--window-size=1280,1600", "--dump-dom", probe.as_uri()).stdout.decode()
    m = re.search(r'<pre id="edgeq-rects">(.*?)</pre>', dom, re.S)
    assert m, "the probe script did not run"
    return json.loads(html.unescape(m.group(1)))


def overlaps(boxes: list[dict], slack: float = 0.5) -> list[tuple[str, str]]:
    texts = [b for b in boxes if b["kind"] == "text" and b["box"][2] > b["box"][0]]
    bad = []
    for i, a in enumerate(texts):
        for b in texts[i + 1:]:
            (al, at, ar, ab), (bl, bt, br, bb) = a["box"], b["box"]
            if al < br - slack and bl < ar - slack and at < bb - slack and bt < ab - slack:
                bad.append((a["text"], b["text"]))
    return bad


def outside_their_chart(boxes: list[dict], slack: float = 0.5) -> list[str]:
    svgs = {b["svg"]: b["box"] for b in boxes if b["kind"] == "svg"}
    out = []
    for b in boxes:
        if b["kind"] == "text":
            l, t, r, bt = b["box"]
            sl, st, sr, sb = svgs[b["svg"]]
            if l < sl - slack or t < st - slack or r > sr + slack or bt > sb + slack:
                out.append(b["text"])
    return out


# ------------------------------------------------------------- PNG, no Pillow


def png_pixels(path: Path) -> tuple[int, int, list[bytes]]:
    """Width, height and unfiltered rows of an 8-bit RGB/RGBA PNG (what Chromium writes)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, width = 8, b"", 0
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, color = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and color in (2, 6), (depth, color)
            bpp = 3 if color == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = width * bpp
    rows, prev = [], bytearray(stride)
    for y in range(height):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for x in range(stride):
            a = line[x - bpp] if x >= bpp else 0
            b = prev[x]
            c = prev[x - bpp] if x >= bpp else 0
            if f == 1:
                line[x] = (line[x] + a) & 255
            elif f == 2:
                line[x] = (line[x] + b) & 255
            elif f == 3:
                line[x] = (line[x] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[x] = (line[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return width, height, rows


def assert_not_blank(png: Path) -> None:
    width, height, rows = png_pixels(png)
    assert width >= 800 and height >= 600
    bpp = len(rows[0]) // width
    colours: dict[bytes, int] = {}
    for r in rows[::4]:
        for i in range(0, len(r), bpp * 4):
            px = r[i:i + 3]
            colours[px] = colours.get(px, 0) + 1
    total = sum(colours.values())
    background = max(colours.values())
    assert len(colours) > 20, f"{png.name}: only {len(colours)} colours: a blank page"
    assert background < 0.98 * total, f"{png.name}: {background / total:.1%} of the page is one colour"


# -------------------------------------------------------------------- documents


def sweep_doc() -> dict:
    return json.loads((DATA / "sweep_digits.json").read_text())


# ------------------------------------------------------------------------ tests


def crowded_sweep_doc() -> dict:
    """The digits sweep three times over, with long names and a Pareto front of many close points."""
    doc = sweep_doc()
    recipes = []
    for k in range(3):
        for i, r in enumerate(copy.deepcopy(doc["recipes"])):
            r["name"] = f"{r['name']}-variant-with-a-long-name-{k}"
            r["size_bytes"] = r["size_bytes"] * (1 + 0.03 * k) - 40 * i
            r["host"]["accuracy"] = r["host"]["accuracy"] - 0.0004 * (k * 15 + i)
            recipes.append(r)
    doc["recipes"] = recipes
    doc["recommended"] = recipes[2]["name"]
    return doc


@pytest.mark.parametrize("make", [sweep_doc, crowded_sweep_doc], ids=["digits", "crowded"])
def test_sweep_page_labels_do_not_overlap_in_the_browser(tmp_path, make):
    """The digits sweep: 15 recipes bunched near 95 % and 1-2 µs; no two SVG texts may touch, none is clipped."""
    boxes = text_boxes(render_sweep_html(make()), tmp_path)
    assert sum(b["kind"] == "text" for b in boxes) >= 10
    assert overlaps(boxes) == []
    assert outside_their_chart(boxes) == []


def deploy_doc(host: str = "pi@10.0.0.7", p50: float = 1.3, model_bytes: int = 24576, accuracy: float = 0.97,
               gate: dict | None = None) -> dict:
    """A report.json as `edgeq deploy` writes it, with 400 latency samples around ``p50`` ms."""
    samples = [round(p50 * (0.9 + 0.2 * ((i * 37) % 100) / 100) + (p50 * 0.8 if i % 97 == 0 else 0.0), 4)
               for i in range(400)]
    s = sorted(samples)
    doc = {
        "schema": "edgeq.deploy/1", "edgeq_version": "0.3.0", "host": host, "started_at": "2026-11-22T23:00:00Z",
        "duration_s": 3.2, "model": {"name": "digits-int8.tflite", "sha256": "ab" * 32, "bytes": model_bytes},
        "device": {"arch": "aarch64", "cpu_model": "Cortex-A72", "board": "Raspberry Pi 4", "os": "Debian 12",
                   "kernel": "6.1", "python": "3.11.2", "numpy": "1.24.4", "cpu_cores": 4,
                   "mem_total_bytes": 4 << 30, "mem_available_bytes": 3 << 30, "cpu_governor": "performance",
                   "thermal_zones": [{"zone": "thermal_zone0", "type": "cpu", "celsius": 48.2}]},
        "runtime": {"name": "tflite_runtime", "version": "2.14.0", "threads": 4, "xnnpack": True},
        "settings": {"runs": 400},
        "latency_ms": {"min": s[0], "p50": s[200], "p90": s[360], "p99": s[396], "mean": sum(s) / 400,
                       "std": 0.1, "max": s[-1], "count": 400, "samples": samples},
        "load_ms": 12.0, "first_inference_ms": 4.0, "peak_rss_bytes": 48_000_000, "accuracy": accuracy, "mae": None,
        "eval": {"samples": 540},
        "agreement": {"reference_runtime": "ai_edge_litert", "reference_version": "2.3.0", "host_accuracy": 0.972,
                      "top1": 0.995, "max_abs_diff": 0.0039, "max_abs_diff_steps": 1.0, "samples": 540},
        "transfer": {"model_bytes_sent": model_bytes, "method": "sftp"},
        "delegate": {"requested": "xnnpack", "applied": True, "delegated_nodes": 6, "nodes": 6},
        "warnings": [],
    }
    if gate is not None:
        doc["gate"] = gate
    return doc


def fleet_summary() -> dict:
    """summary.json of a fleet deploy: two hosts ok, one failed (with a long name), one timed out."""
    ok = [{"name": n, "status": "ok", **{k: deploy_doc(n, p50)[k] for k in ("latency_ms", "runtime", "device")},
           "accuracy": 0.97, "activation": {"active": "ab" * 32}}
          for n, p50 in (("pi-kitchen", 1.3), ("pi-garage", 1.6))]
    bad = [{"name": "pi-" + "attic-sensor-" * 5 + "7", "status": "failed",
            "error": "connection refused by 10.0.0.9:22 (is sshd running?)"},
           {"name": "pi-shed", "status": "timeout", "error": "no answer within 120 s"}]
    return {"schema": "edgeq.fleet/1", "edgeq_version": "0.3.0", "action": "deploy", "started_at": "2026-11-22",
            "model": {"name": "digits-int8.tflite", "sha256": "ab" * 32, "bytes": 24576}, "forks": 5, "seconds": 9.5,
            "counts": {"hosts": 4, "ok": 2, "failed": 1, "timeout": 1}, "hosts": [ok[0], bad[0], ok[1], bad[1]]}


def _check_page(page_html: str, tmp: Path, name: str) -> Path:
    """Screenshot (not blank) and no overlapping or clipped SVG text; returns the screenshot."""
    page = tmp / f"{name}.html"
    page.write_text(page_html, encoding="utf-8")
    png = screenshot(page, tmp)
    assert_not_blank(png)
    boxes = text_boxes(page_html, tmp)
    assert overlaps(boxes) == [] and outside_their_chart(boxes) == [], name
    return png


def test_deploy_page_leads_with_the_verdict_and_marks_p50_p99(tmp_path):
    from edgeq.report import render_html

    gate = {"passed": False, "reasons": ["p99 2.36 ms > 2 ms"], "accuracy": 0.97, "p99_ms": 2.36, "runs": 400,
            "accuracy_min": 0.9, "p99_ms_max": 2.0}
    page = render_html(deploy_doc(gate=gate))
    body = page[page.index("<body>"):]
    assert body.index('class="vbox fail"') < body.index("<h2>"), "the verdict comes before any section"
    assert ">FAIL<" in body and "OVER the p99 budget of 2.00 ms" in body and "drop 0.20 points" in body
    boxes = text_boxes(page, tmp_path)
    texts = [b["text"] for b in boxes if b["kind"] == "text"]
    assert any(t.startswith("p50 1.") and t.endswith(" ms") for t in texts), texts
    assert any(t.startswith("p99 ") for t in texts) and "runs" in texts
    assert any(t.startswith("latency (ms)") for t in texts)
    assert "no latency budget set" in render_html(deploy_doc())
    # microseconds when the model is that fast
    fast = render_html(deploy_doc(p50=0.012))
    assert "latency (µs)" in fast and "p50 12." in fast
    _check_page(page, tmp_path, "deploy")


def test_compare_page_shows_ratios_against_the_first(tmp_path):
    from edgeq.report import compare, write_report

    a = write_report(deploy_doc(p50=1.55, model_bytes=56_000, accuracy=0.975), tmp_path / "float").directory
    b = write_report(deploy_doc(p50=1.3, model_bytes=24_346, accuracy=0.973), tmp_path / "int8").directory
    c = compare([a, b])
    page = c.html()
    assert "1.19x faster, 2.30x smaller, accuracy -0.20 points" in page
    assert page.index('class="vbox') < page.index("<h2>")
    assert c.to_dict()["ratios"][0]["speedup_p50"] == pytest.approx(1.55 / 1.3)
    _check_page(page, tmp_path, "compare")


def test_fleet_summary_links_hosts_and_marks_failures(tmp_path):
    from edgeq.report import render_fleet_html

    page = render_fleet_html(fleet_summary())
    assert 'href="pi-kitchen/report.html"' in page and 'href="pi-shed/report.json"' in page
    assert '<tr class="fail">' in page and "✗ failed" in page and "✗ timeout" in page
    assert ">FAILURES<" in page and "2 of 4 hosts ok" in page
    assert page.index('class="vbox fail"') < page.index("<table")
    _check_page(page, tmp_path, "fleet")


def test_sweep_page_renders_with_the_warning_beside_the_recommendation(tmp_path):
    page = render_sweep_html(sweep_doc())
    top = page[page.index('class="top"'):page.index("Pareto charts")]
    assert "RECOMMENDED" in top and "dynamic-int8" in top and "not the rpi4" in top
    assert "size (KiB)" in page and "latency (µs)" in page
    _check_page(page, tmp_path, "sweep")
