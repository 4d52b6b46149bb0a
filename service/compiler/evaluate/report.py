"""Writing an evaluation report: JSON-safe values, ``report.json`` and ``report.html`` side by side."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from .report_html import render_html


def json_safe(value):
    """NaN / inf -> None, recursively (PostgreSQL JSON and strict clients refuse them); tuples -> lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_report(report: dict, out_dir: str | os.PathLike) -> dict:
    """``report`` made JSON-safe, written as ``out_dir/report.json`` and ``out_dir/report.html``."""
    report = json_safe(report)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.html").write_text(render_html(report))
    return report


__all__ = ["json_safe", "write_report"]
