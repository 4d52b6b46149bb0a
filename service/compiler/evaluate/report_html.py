"""report.html: an evaluation report as one self-contained page (tables and an inline SVG chart).

Renders any report ``evaluate`` writes: the verdict and the failed thresholds, one table per section
(``data``, ``accuracy``: the quantized checkpoint vs the unquantized one, ``engine``: the engine vs
the reference runtime, and the engine's performance), and a bar chart of the agreement and ROUGE
figures of each section.
"""

from __future__ import annotations

import html

# (key in a section, label in the chart): the figures in [0, 1] worth a bar
_BARS = (("top1_agreement", "top-1 agreement"), ("greedy_identical", "greedy identical"), ("rouge1", "ROUGE-1"),
         ("rouge2", "ROUGE-2"), ("rouge_l", "ROUGE-L"))
_SECTIONS = (("accuracy", "quantized vs unquantized"), ("engine", "engine vs reference runtime"))


def _esc(v) -> str:
    return html.escape(f"{v:.4g}" if isinstance(v, float) else str(v))


def _table(title: str, rows: dict) -> str:
    body = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in rows.items()
                   if not isinstance(v, (dict, list)))
    return f"<h2>{_esc(title)}</h2><table>{body}</table>"


def _bar_chart(bars: list[tuple[str, float]]) -> str:
    rows = []
    for i, (name, v) in enumerate(bars):
        w = 300 * max(0.0, min(1.0, v))
        rows.append(f'<text x="0" y="{20 + 24 * i}">{_esc(name)}</text>'
                    f'<rect x="260" y="{8 + 24 * i}" width="{w:.1f}" height="16" fill="#3b7dd8"/>'
                    f'<text x="{268 + w:.1f}" y="{20 + 24 * i}">{v:.3f}</text>')
    return f'<svg width="640" height="{16 + 24 * len(bars)}" font-size="12" role="img">{"".join(rows)}</svg>'


def render_html(report: dict) -> str:
    failures = report.get("failures") or []
    verdict = "PASSED" if report["passed"] else "FAILED: " + "; ".join(failures)
    parts = [f"<h1>Kiln report: {_esc(report.get('model', ''))}</h1>", f"<p class=verdict>{_esc(verdict)}</p>"]
    if report.get("data"):
        parts.append(_table("data", report["data"]))
    bars: list[tuple[str, float]] = []
    for key, title in _SECTIONS:
        section = report.get(key)
        if not section:
            continue
        parts.append(_table(f"{key}: {title}", section))
        bars += [(f"{key} {label}", section[k]) for k, label in _BARS if isinstance(section.get(k), float)]
    if (report.get("engine") or {}).get("performance"):
        parts.append(_table("engine performance", report["engine"]["performance"]))
    if bars:
        parts.append("<h2>chart</h2>" + _bar_chart(bars))
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
             "th,td{border:1px solid #ccc;padding:2px 8px;text-align:left}.verdict{font-weight:bold}")
    title = "PASSED" if report["passed"] else "FAILED"
    return (f"<!doctype html><meta charset=utf-8><title>Kiln report: {title}</title><style>{style}</style>"
            f"{''.join(parts)}\n")


__all__ = ["render_html"]
