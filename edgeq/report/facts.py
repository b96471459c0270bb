"""What a deploy report says, in words: the verdict, the device facts, the outputs.

Shared by the terminal text and the HTML pages, so both say the same thing in
the same units. Values from the document are untrusted text; each renderer
escapes them for its format.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from edgeq.report.values import (
    as_dict,
    as_list,
    int_text,
    g,
    ms,
    nbytes,
    num,
    pct,
    term_text,
)


@dataclass(frozen=True)
class Verdict:
    """The answer a page leads with: did it pass, and the figures that decide it.

    ``passed`` is True or False when a budget (a health gate) was set, None when
    nothing was judged; ``word`` says it in capitals (colour is never the only cue).
    ``items`` are (label, value) pairs, values untrusted text to be escaped.
    """

    passed: Optional[bool]
    word: str
    title: str
    items: tuple[tuple[str, str], ...]

    @property
    def css(self) -> str:
        return {True: "pass", False: "fail"}.get(self.passed, "info")  # type: ignore[arg-type]


def target_text(doc: dict) -> str:
    """"Raspberry Pi 4 / Cortex-A72 (aarch64)": the board the report was measured on."""
    dev = as_dict(doc.get("device"))
    what = " / ".join(term_text(v, 60) for v in (dev.get("board"), dev.get("cpu_model")) if v)
    arch = term_text(dev.get("arch"), 40) if dev.get("arch") else None
    emulated = as_dict(dev.get("emulation")).get("emulated") is True
    if arch:
        emu = ", emulated" if emulated else ""
        what = f"{what} ({arch}{emu})" if what else f"{arch}{' (emulated)' if emulated else ''}"
    return what or "-"


def deploy_verdict(doc: dict) -> Verdict:
    """Fits or not (the health gate, when one was set), precision, target, p50/p99 against the latency
    budget, accuracy and the accuracy lost on the device."""
    lat = as_dict(doc.get("latency_ms"))
    gate = as_dict(doc.get("gate"))
    ag = as_dict(doc.get("agreement"))
    model = as_dict(doc.get("model"))
    items: list[tuple[str, str]] = [("target", f"{term_text(doc.get('host'), 80)}: {target_text(doc)}")]
    if model.get("precision"):
        items.append(("precision", term_text(model.get("precision"), 40)))
    budget = num(gate.get("p99_ms_max"))
    p99 = num(lat.get("p99"))
    latency = f"p50 {ms(lat.get('p50'))}, p99 {ms(p99)}"
    if budget is None:
        latency += "; no latency budget set"
    elif p99 is not None:
        latency += f" {'within' if p99 <= budget else 'OVER'} the p99 budget of {ms(budget)}"
    items.append(("latency", latency))
    acc, host_acc = num(doc.get("accuracy")), num(ag.get("host_accuracy"))
    if acc is not None:
        accuracy = f"{pct(acc)} on the device"
        if host_acc is not None:
            accuracy += f", {pct(host_acc)} on the host: drop {(host_acc - acc) * 100:.2f} points"
        minimum = num(gate.get("accuracy_min"))
        accuracy += "; no accuracy budget set" if minimum is None else \
            f"; {'meets' if acc >= minimum else 'BELOW'} the minimum of {pct(minimum)}"
        items.append(("accuracy", accuracy))
    elif num(ag.get("top1")) is not None:
        items.append(("agreement", f"top-1 {pct(ag.get('top1'))} with the host (no labels given)"))
    else:
        items.append(("accuracy", "not measured (no evaluation data)"))
    name = term_text(model.get("name", "model"), 80)
    if doc.get("status") in ("failed", "timeout"):
        return Verdict(False, "FAILED", f"{name}: the deploy {doc['status']}: {term_text(doc.get('error'), 300)}",
                       tuple(items[:1]))
    if isinstance(gate.get("passed"), bool):
        reasons = "; ".join(term_text(r, 200) for r in as_list(gate.get("reasons"))[:10])
        if gate["passed"]:
            return Verdict(True, "PASS", f"{name} passes its health gate", tuple(items))
        return Verdict(False, "FAIL", f"{name} fails its health gate" + (f": {reasons}" if reasons else ""),
                       tuple(items))
    return Verdict(None, "MEASURED", f"{name} runs on {target_text(doc)}; no budget set", tuple(items))


def _temp(dev: dict) -> str:
    if dev.get("vcgencmd_temp"):
        return str(dev["vcgencmd_temp"]).replace("temp=", "")
    zones = [z for z in as_list(dev.get("thermal_zones"))[:2]
             if isinstance(z, dict) and num(z.get("celsius")) is not None]
    return ", ".join(f"{num(z['celsius']):.1f} °C ({z.get('type') or z.get('zone')})" for z in zones) or "-"


def temperature_text(doc: dict) -> str:
    """The SoC temperature the device reported."""
    return _temp(as_dict(doc.get("device")))


def _throttle(dev: dict) -> str:
    t = as_dict(dev.get("throttling"))
    if not t:
        return "-"
    flags = [str(k) for k, v in t.items() if v is True]
    return f"{t.get('raw', '')} " + (", ".join(flags) if flags else "none")


def device_facts(doc: dict) -> list[tuple[str, str]]:
    """The device facts table rows (label, value); values are untrusted text."""
    dev = as_dict(doc.get("device"))
    rt = as_dict(doc.get("runtime"))
    emu = as_dict(dev.get("emulation"))
    return [
        ("Host", str(doc.get("host", "-"))),
        ("Board / CPU", " / ".join(str(v) for v in (dev.get("board"), dev.get("cpu_model")) if v) or "-"),
        ("Architecture", f"{dev.get('arch', '-')}" + (" (emulated)" if emu.get("emulated") is True else "")),
        ("Cores", str(dev.get("cpu_cores", "-"))),
        ("OS", f"{dev.get('os', '-')} (kernel {dev.get('kernel', '-')})"),
        ("Python / numpy", f"{dev.get('python', '-')} / {dev.get('numpy', '-')}"),
        ("Runtime", f"{rt.get('name', '-')} {rt.get('version', '')}"),
        ("Threads / XNNPACK", f"{rt.get('threads') or 'default'} / {'requested' if rt.get('xnnpack') else 'off'}"),
        ("Memory", f"{nbytes(dev.get('mem_available_bytes'))} free of {nbytes(dev.get('mem_total_bytes'))}"),
        ("CPU governor", str(dev.get("cpu_governor") or "-")),
        ("Temperature", _temp(dev)),
        ("Throttling", _throttle(dev)),
        ("Disk free", nbytes(as_dict(dev.get("disk")).get("free_bytes"))),
        ("Delegate applied", delegate_text(doc)),
        ("Transfer", transfer_text(doc)),
    ]


def delegate_text(doc: dict) -> str:
    """What the delegate really took on the device (not the requested setting)."""
    dg = as_dict(doc.get("delegate"))
    if not dg:
        return "not reported (older runner)"
    requested = term_text(dg.get("requested") or "none", 32)
    applied = dg.get("applied")
    if applied is None:
        return f"{requested} requested; unknown (the runtime does not list its nodes)"
    taken, nodes = int_text(dg.get("delegated_nodes")), int_text(dg.get("nodes"))
    if applied is True:
        return f"{requested}: yes, {taken} of {nodes} nodes"
    return f"{requested} requested: no, 0 of {nodes} nodes (built-in kernels)" if dg.get("requested") else \
        f"none: {nodes} nodes on built-in kernels"


def transfer_text(doc: dict) -> str:
    """How the files travelled (sftp, exec channel, local copy) and how much."""
    tr = as_dict(doc.get("transfer"))
    method = tr.get("method")
    sent = num(tr.get("model_bytes_sent")) or 0
    how = term_text(method, 16) if isinstance(method, str) else "nothing sent"
    return f"{how}; model {nbytes(sent)} sent" + ("" if sent else " (already on the device)")


OUTPUT_HEADER = ["output", "kind", "samples", "labels", "accuracy (device)", "accuracy (host)",
                 "agreement device/host", "MAE vs labels", "max |diff| vs host", "SQNR dB"]


def _outputs(doc: dict) -> list[dict]:
    return [o for o in as_list(as_dict(doc.get("eval")).get("outputs"))[:256] if isinstance(o, dict)]


def output_rows(doc: dict) -> list[list[Any]]:
    """One row per model output (``OUTPUT_HEADER``): its kind and figures; only when a model has several
    outputs or one that is not a classifier (a classifier alone is the accuracy line)."""
    outs = _outputs(doc)
    if not outs or (len(outs) == 1 and outs[0].get("kind") == "classifier"):
        return []
    return [[term_text(o.get("name"), 80), term_text(o.get("kind"), 20), int_text(o.get("samples")),
             term_text(o.get("labels"), 80), pct(o.get("accuracy")), pct(o.get("host_accuracy")),
             pct(o.get("agreement")), g(o.get("label_mae"), ".5g"), g(o.get("max_abs_diff")),
             g(o.get("sqnr_db"), ".3g")] for o in outs]


def resize_lines(doc: dict) -> list[str]:
    """"input 'img' resized to 1x32x32x3 from the eval data" for each dynamic input the device resized."""
    lines = []
    for r in as_list(as_dict(doc.get("settings")).get("resized"))[:16]:
        if isinstance(r, dict):
            shape = "x".join(str(int_text(d)) for d in as_list(r.get("shape"))[:16])
            lines.append(f"input '{term_text(r.get('input'), 80)}' resized to {shape} from "
                         f"{term_text(r.get('source'), 40)}")
    return lines


def accuracy_label(doc: dict) -> str:
    """What the top-level accuracy is: "top-1" of the class head, or "pixel" accuracy, naming the output when
    the model has several."""
    outs = _outputs(doc)
    main = next((o for o in outs if num(o.get("accuracy")) is not None), None)
    if main is None:
        return "top-1"
    what = "pixel" if main.get("kind") == "segmentation" else "top-1"
    return what + (f" of output {term_text(main.get('name'), 80)}" if len(outs) > 1 else "")
