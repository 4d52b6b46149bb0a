"""report.html: the evaluation report as one self-contained page (tables and an inline SVG chart)."""

from __future__ import annotations

import html


def _bar_chart(values: dict[str, float], width: int = 420) -> str:
    rows = []
    for i, (name, v) in enumerate(values.items()):
        w = max(0.0, min(1.0, v)) * (width - 140)
        y = 8 + i * 26
        rows.append(f'<text x="0" y="{y + 14}" font-size="12">{html.escape(name)}</text>'
                    f'<rect x="130" y="{y}" width="{w:.1f}" height="18" fill="#3b7dd8"/>'
                    f'<text x="{136 + w:.1f}" y="{y + 14}" font-size="12">{v:.3f}</text>')
    return f'<svg width="{width + 60}" height="{16 + 26 * len(values)}" role="img">{"".join(rows)}</svg>'


def render_html(report: dict) -> str:
    m = report["metrics"]
    metric_rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.6g}</td></tr>" for k, v in m.items())
    check_rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{'pass' if ok else 'FAIL'}</td></tr>"
                         for k, ok in report["checks"].items())
    prompt_rows = "".join(
        f"<tr><td>{i}</td><td>{'yes' if p['engine'] == p['reference'] else 'no'}</td>"
        f"<td>{p['rouge1']:.3f}</td><td>{p['rouge2']:.3f}</td><td>{p['rougeL']:.3f}</td></tr>"
        for i, p in enumerate(report["per_prompt"]))
    chart = _bar_chart({k: m[k] for k in ("top1_agreement", "greedy_identical", "rouge1", "rouge2", "rougeL")})
    verdict = "PASSED" if report["passed"] else "FAILED"
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Kiln evaluation: {verdict}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px}}</style>
</head><body><h1>Engine vs reference runtime: {verdict}</h1>
<p>engine <code>{html.escape(report['engine'])}</code>, checkpoint <code>{html.escape(report['checkpoint'])}</code>;
text: {html.escape(report['text_source'])} ({'tokenized' if report['tokenized'] else 'byte-level token ids'})</p>
<h2>Checks</h2><table><tr><th>check</th><th>result</th></tr>{check_rows}</table>
<h2>Metrics</h2><table><tr><th>metric</th><th>value</th></tr>{metric_rows}</table>
<h2>Agreement</h2>{chart}
<h2>Per prompt</h2><table><tr><th>#</th><th>greedy identical</th><th>ROUGE-1</th><th>ROUGE-2</th><th>ROUGE-L</th></tr>{prompt_rows}</table>
</body></html>
"""
