"""The deploy report page (``report.html``) and what every report page shares: style, verdict box, tables.

Built only with ``edgeq.escape.tag``/``html``: every value from a document is
escaped (and its control characters dropped) unless it is markup built here.
Each page leads with its verdict: a coloured box that also says it in a word.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from edgeq.escape import Html, html_join, tag
from edgeq.report.charts import fraction_bars, latency_histogram, latency_series, samples_of
from edgeq.report.facts import OUTPUT_HEADER, Verdict, deploy_verdict, device_facts, output_rows, resize_lines
from edgeq.report.values import ReportLike, as_dict, as_list, doc_of, g, int_text, ms, nbytes, num, pct

VERDICT_CSS = """
.vbox{border:2px solid #9aa6b2;border-radius:8px;padding:10px 14px;margin:10px 0 16px;background:#f4f6f9}
.vbox.pass{border-color:#2e9e6a;background:#eaf7ef} .vbox.fail{border-color:#c62828;background:#fdecec}
.vbox .word{display:inline-block;font-weight:700;padding:1px 8px;border-radius:4px;margin-right:8px;
color:#fff;background:#5d6b7a} .vbox.pass .word{background:#1a7f37} .vbox.fail .word{background:#b42318}
.vbox ul{margin:6px 0 0;padding-left:20px} .vbox li{margin:2px 0}
"""

CSS = Html(VERDICT_CSS + """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1d2330;background:#fff}
h1{font-size:22px;margin:0 0 4px} h2{font-size:16px;margin:24px 0 8px;color:#333}
.sub{color:#667;font-size:13px;margin-bottom:16px}
.cards{display:flex;flex-wrap:wrap;gap:12px}
.card{border:1px solid #dde2ea;border-radius:8px;padding:10px 14px;min-width:120px;background:#f7f9fc}
.card b{display:block;font-size:20px;color:#1f5fbf} .card span{font-size:12px;color:#667}
table{border-collapse:collapse;font-size:13px} td,th{border-bottom:1px solid #e4e8ef;padding:4px 10px;text-align:left}
th{background:#f1f4f9} .charts{display:flex;flex-wrap:wrap;gap:18px} svg{background:#fbfcfe;border:1px solid #e4e8ef}
.warn{color:#a15c00} tr.fail td{background:#fdecec} .status-fail{color:#b42318;font-weight:700}
tr.fail a{color:#8a1c12}
table.hosts td{white-space:nowrap} table.hosts td:last-child{white-space:normal;min-width:260px}
table.hosts td:first-child{white-space:normal;overflow-wrap:anywhere;max-width:240px}
""")


def table(rows: Sequence[Sequence[Any]], header: Optional[Sequence[Any]] = None,
          row_class: Optional[Sequence[Optional[str]]] = None, class_: Optional[str] = None) -> Html:
    head = [tag("tr", *[tag("th", h) for h in header])] if header else []
    body = [tag("tr", *[tag("td", c) for c in r], class_=row_class[i] if row_class else None)
            for i, r in enumerate(rows)]
    return tag("table", *head, *body, class_=class_)


def page(title: str, *body: Any) -> str:
    """A complete, self-contained HTML document."""
    head = tag("head", Html('<meta charset="utf-8">'), tag("title", title), tag("style", CSS))
    return "<!DOCTYPE html>" + tag("html", head, tag("body", *body), lang="en") + "\n"


def verdict_box(verdict: Verdict) -> Html:
    """The box a page starts with: a word (PASS, FAIL, ...), a sentence, and the figures that decide it."""
    items = [tag("li", tag("strong", f"{k}: "), v) for k, v in verdict.items]
    return tag("div", tag("span", verdict.word, class_="word"), tag("strong", verdict.title),
               tag("ul", *items) if items else "", class_=f"vbox {verdict.css}", role="status")


def render_html(result: ReportLike) -> str:
    """A self-contained ``report.html``: verdict, cards, latency charts, accuracy/agreement, device facts."""
    doc = doc_of(result)
    lat = as_dict(doc.get("latency_ms"))
    model = as_dict(doc.get("model"))
    samples = samples_of(lat)
    ag = as_dict(doc.get("agreement"))
    cards = [("p50", ms(lat.get("p50"))), ("p90", ms(lat.get("p90"))), ("p99", ms(lat.get("p99"))),
             ("load", ms(doc.get("load_ms"))), ("first inference", ms(doc.get("first_inference_ms"))),
             ("peak RSS", nbytes(doc.get("peak_rss_bytes")))]
    if num(doc.get("accuracy")) is not None:
        cards.append(("top-1 accuracy", pct(doc.get("accuracy"))))
    if num(ag.get("top1")) is not None:
        cards.append(("agreement with host", pct(ag.get("top1"))))
    card_els = [tag("div", tag("b", v), tag("span", k), class_="card") for k, v in cards]
    acc_chart = fraction_bars([("accuracy on the device", doc.get("accuracy")),
                               (f"accuracy on the host ({ag.get('reference_runtime') or '-'})",
                                ag.get("host_accuracy")),
                               ("top-1 agreement device/host", ag.get("top1"))], "Accuracy and agreement")
    stats = table([[ms(lat.get(k)) for k in ("min", "p50", "p90", "p99", "mean", "std", "max")]
                   + [int_text(lat.get("count", len(samples)))]],
                  ["min", "p50", "p90", "p99", "mean", "std", "max", "runs"])
    extra: Any = ""
    if num(ag.get("max_abs_diff")) is not None:
        steps = num(ag.get("max_abs_diff_steps"))
        extra = tag("p", f"Largest output difference device vs host: {g(ag['max_abs_diff'])}"
                    + (f" ({g(steps)} quantization steps)" if steps is not None else "")
                    + f" over {int_text(ag.get('samples'))} samples.")
    elif ag.get("error"):
        extra = tag("p", "Agreement not measured: ", ag["error"], class_="warn")
    warns = [tag("p", "warning: ", w, class_="warn") for w in as_list(doc.get("warnings"))[:50]]
    sub = html_join([f"edgeq {doc.get('edgeq_version')} · {doc.get('started_at')} · sha256 "
                     f"{str(model.get('sha256', ''))[:16]}… · {nbytes(model.get('bytes'))} · model sent "
                     f"{nbytes(as_dict(doc.get('transfer')).get('model_bytes_sent', 0))}"])
    body = [tag("h1", f"{model.get('name')} on {doc.get('host')}"), verdict_box(deploy_verdict(doc)),
            tag("div", sub, class_="sub"), tag("div", *card_els, class_="cards"), *warns,
            tag("h2", "Latency"), stats,
            tag("div", latency_histogram(samples, lat.get("p50"), lat.get("p99")), latency_series(samples),
                class_="charts")]
    if acc_chart or extra:
        body += [tag("h2", "Accuracy"), acc_chart, extra]
    if output_rows(doc):
        body += [tag("h2", "Outputs"), table(output_rows(doc), OUTPUT_HEADER)]
    if resize_lines(doc):
        body += [tag("h2", "Input shape"), *[tag("p", line) for line in resize_lines(doc)]]
    body += [tag("h2", "Device"), table(device_facts(doc))]
    return page(f"edgeq report: {model.get('name')} on {doc.get('host')}", *body)
