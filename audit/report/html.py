"""Renders the report and compare pages from Jinja2 templates (``templates/*.html.j2``).

Why templates: every ``{{ value }}`` is HTML-escaped by Jinja2's autoescaping, so no code path can
forget to escape a prompt, caption or key; StrictUndefined turns a misspelt field into an error
instead of a silently empty cell. Images are inline data URIs, and the page's Content Security
Policy lets only the report's own sorting script run (by its hash), so even a string that
escaped escaping could not execute.
"""

from __future__ import annotations

import base64
import hashlib
import io
from collections.abc import Iterable, Sequence
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup
from PIL import Image

# Kept here, not in a template: the policy allows it by the SHA-256 of exactly this text.
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
SCRIPT_DIGEST = base64.b64encode(hashlib.sha256(SORT_SCRIPT.encode()).digest()).decode()

ENV = Environment(
    loader=PackageLoader("audit.report", "templates"),
    autoescape=True,  # every template here is HTML
    undefined=StrictUndefined,
    finalize=lambda value: "" if value is None else value,  # a missing value shows empty, not "None"
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
)


def render(template: str, title: str, **context: Any) -> str:
    """A whole page: ``template`` (which extends ``base.html.j2``) with ``context``."""
    return ENV.get_template(template).render(title=title, script=Markup(SORT_SCRIPT), script_digest=SCRIPT_DIGEST,
                                             **context)


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
    """A PNG file's bytes as a data URI (the page loads nothing from outside itself)."""
    return "data:image/png;base64," + base64.b64encode(data).decode()


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell's text: floats to ``digits`` places, NaN and None empty."""
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if value != value else f"{value:.{digits}f}"
    return str(value)


def sortable_table(table_id: str, columns: Sequence[tuple[str, str]], rows: Iterable[dict[str, Any]],
                   row_class: str | None = None, gaps: bool = False) -> dict[str, Any]:
    """What the ``sortable_table`` macro draws. ``columns``: (key, heading); a column whose values
    are all numbers sorts as numbers, others as text; rows where ``row_class`` is truthy get that
    CSS class (e.g. "flagged"). With ``gaps`` (a table whose numbers may be missing, such as a
    screened run's prompts, most of them never audited) a column also sorts as numbers when its
    only other values are missing, a missing number sorts below every number and a boolean as
    0 or 1."""
    rows = list(rows)
    numeric = {key for key, _ in columns if rows and all(isinstance(r.get(key), (int, float)) for r in rows)}
    if gaps:
        numeric |= {key for key, _ in columns if any(isinstance(r.get(key), (int, float)) for r in rows)
                    and all(r.get(key) is None or isinstance(r.get(key), (int, float)) for r in rows)}
    return {
        "id": table_id,
        "headings": [{"title": title, "type": "number" if key in numeric else "text"} for key, title in columns],
        "rows": [{"css_class": row_class if row_class and r.get(row_class) else None,
                  "cells": [{"numeric": key in numeric, "value": _sort_value(r.get(key), gaps and key in numeric),
                             "text": fmt(r.get(key))} for key, _ in columns]} for r in rows],
    }


def _sort_value(value: Any, numeric_gaps: bool) -> str:
    """A cell's ``data-value``, what the script sorts by."""
    if numeric_gaps:
        if value is None or (isinstance(value, float) and value != value):
            return "-Infinity"  # parseFloat reads it: below every number
        if isinstance(value, bool):
            return str(int(value))
    return "" if value is None else str(value)
