"""Self-contained HTML: every user string escaped, images inline as data URIs, and a Content
Security Policy that lets only the report's own script run (by its hash), so even a string that
escaped escaping could not execute."""

from __future__ import annotations

import base64
import hashlib
import html
import io
from collections.abc import Iterable, Sequence
from typing import Any

from PIL import Image

STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1400px}
h1{font-size:1.5em}h2{margin-top:1.6em;border-bottom:1px solid #ddd}
.meta{color:#555;font-size:.9em}
.cards{display:flex;flex-wrap:wrap;gap:.8em}
.card{border:1px solid #ddd;border-radius:6px;padding:.6em .9em;min-width:11em}
.card b{display:block;font-size:1.4em}.card span{color:#555;font-size:.85em}
.gallery{display:flex;flex-wrap:wrap;gap:1em}
.pair{border:1px solid #ddd;border-radius:6px;padding:.5em;width:300px;margin:0}
.shot{display:inline-block;text-align:center;margin-right:4px}.shot small{display:block;color:#666}
.pair img{width:140px;height:140px;object-fit:contain;image-rendering:pixelated;background:#f4f4f4}
.pair figcaption{font-size:.8em;word-wrap:break-word}
.label-matching_verbatim{color:#b00}.label-retrieved_verbatim{color:#a60}.label-template_verbatim{color:#36c}
table{border-collapse:collapse;font-size:.85em}th,td{border:1px solid #ddd;padding:.25em .5em;text-align:left}
th{cursor:pointer;background:#f4f4f4;user-select:none}th[aria-sort=ascending]::after{content:" ▲"}
th[aria-sort=descending]::after{content:" ▼"}tr.flagged{background:#fff0f0}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.plots img{max-width:100%;border:1px solid #eee}
"""

SORT_SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  var heads = table.tHead.rows[0].cells;
  Array.prototype.forEach.call(heads, function (th, col) {
    th.addEventListener("click", function () {
      var asc = th.getAttribute("aria-sort") !== "ascending";
      Array.prototype.forEach.call(heads, function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", asc ? "ascending" : "descending");
      var numeric = th.dataset.type === "number";
      var rows = Array.prototype.slice.call(table.tBodies[0].rows);
      rows.sort(function (a, b) {
        var x = a.cells[col].dataset.value, y = b.cells[col].dataset.value;
        var c = numeric ? (parseFloat(x) - parseFloat(y)) || 0 : x.localeCompare(y);
        return asc ? c : -c;
      });
      rows.forEach(function (r) { table.tBodies[0].appendChild(r); });
    });
  });
  table.dataset.sortable = "ready";
});
"""


def esc(value: Any) -> str:
    """Text for HTML content and attribute values (quotes escaped too)."""
    return html.escape("" if value is None else str(value), quote=True)


def png_data_uri(data: bytes | None, max_side: int = 256) -> str | None:
    """An image as a PNG data URI, shrunk to ``max_side``; None when it cannot be decoded."""
    if not data:
        return None
    try:
        with Image.open(io.BytesIO(data)) as image:
            image = image.convert("RGB")
            image.thumbnail((max_side, max_side))
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
    except Exception:  # noqa: BLE001 - a broken image shows as missing, never breaks the report
        return None
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def file_data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if value != value else f"{value:.{digits}f}"  # NaN shows empty
    return str(value)


def sortable_table(table_id: str, columns: Sequence[tuple[str, str]], rows: Iterable[dict[str, Any]],
                   row_class: str | None = None) -> str:
    """``columns``: (key, heading); numeric cells sort as numbers, others as text."""
    rows = list(rows)
    numeric = {key for key, _ in columns if rows and all(isinstance(r.get(key), (int, float)) for r in rows)}
    head = "".join(f'<th data-type="{"number" if key in numeric else "text"}">{esc(title)}</th>'
                   for key, title in columns)
    body = []
    for r in rows:
        cls = f' class="{esc(row_class)}"' if row_class and r.get(row_class) else ""
        cells = "".join(
            f'<td class="num" data-value="{esc(r.get(key))}">{esc(fmt(r.get(key)))}</td>' if key in numeric
            else f'<td data-value="{esc(r.get(key))}">{esc(fmt(r.get(key)))}</td>' for key, _ in columns)
        body.append(f"<tr{cls}>{cells}</tr>")
    return (f'<table id="{esc(table_id)}" class="sortable"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table>')


def page(title: str, body: str) -> str:
    digest = base64.b64encode(hashlib.sha256(SORT_SCRIPT.encode()).digest()).decode()
    policy = f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'sha256-{digest}'"
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{esc(policy)}">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{STYLE}</style></head>"
            f"<body>{body}<script>{SORT_SCRIPT}</script></body></html>\n")
