"""results.html: one self-contained page with the comparison table, where its numbers come
from, the runs that failed, and the plots embedded as data URIs."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from peftkit.record import CellRecord
from peftkit.report.rows import Row
from peftkit.report.tables import cell, failures, provenance


def html_page(title: str, rows: list[Row], metric: str, images: list[Path], records: list[CellRecord]) -> str:
    head = "".join(f"<th>{h}</th>" for h in ("strategy", "trainable", "%", f"{metric}", "n", "peak MB", "estimate MB",
                                              "est/meas", "train s", "samples/s", "tokens/s", "disk MB"))
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in (
            r.strategy, f"{r.trainable_params:,}", f"{r.trainable_percent:.3f}", r.metric_text,
            r.n, f"{r.peak_memory_mb:.0f}", f"{r.estimate_mb:.0f}" if r.estimate_mb else "-",
            f"{r.estimate_ratio:.2f}" if r.estimate_ratio else "-", f"{r.train_time_s:.0f}", cell(r.samples_per_s, 1),
            cell(r.tokens_per_s, 0), f"{r.size_on_disk_mb:.2f}")) + "</tr>"
        for r in rows)
    notes = "".join(f"<p>{html.escape(line.strip())}</p>" for line in provenance(records))
    failed = "".join(f"<p>{html.escape(line)}</p>" for line in failures(records))
    figures = "".join(f'<img alt="{p.stem}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">' for p in images)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
            "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
            "padding:4px 8px;text-align:right}img{max-width:48%;margin:1%}</style></head><body>"
            f"<h1>{html.escape(title)}</h1>{notes}<table><tr>{head}</tr>{body}</table>{failed}{figures}</body></html>\n")
