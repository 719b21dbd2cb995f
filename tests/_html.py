"""Reads report.html back with the standard library's HTML parser (tests of experiments/explorer.py).

The page marks each row with `data-row` (revision, comparison, sample) and each of its fields with
`data-field` (text content, entities decoded; `data-value` when the element has one); a
revision's rounds are `data-round` records nested in their row.
"""

from __future__ import annotations

import html.parser
import json

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class Page(html.parser.HTMLParser):
    """`rows`: [{"kind": data-row, "attrs": {...}, "fields": {name: text}, "values": {name: json},
    "rounds": [record]}]; `tags`: every start tag with its attributes; `text`: all text."""

    def __init__(self, source: str):
        super().__init__(convert_charrefs=True)
        self.rows: list[dict] = []
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self._stack: list[tuple[str, dict | None, str | None]] = []  # (tag, record opened, field opened)
        self.feed(source)
        self.close()
        assert not self._stack, f"unclosed elements: {[t for t, _, _ in self._stack]}"

    def _record(self) -> dict | None:
        for _, rec, _ in reversed(self._stack):
            if rec is not None:
                return rec
        return None

    def _field(self) -> tuple[dict, str] | None:
        for _, _, field in reversed(self._stack):
            if field is not None:
                return self._record_of_field(), field
        return None

    def _record_of_field(self) -> dict | None:
        # the innermost record that encloses the innermost field
        seen_field = False
        for _, rec, field in reversed(self._stack):
            seen_field = seen_field or field is not None
            if seen_field and rec is not None:
                return rec
        return None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag in VOID:
            return
        rec = None
        if "data-row" in a:
            rec = {"kind": a["data-row"], "attrs": a, "fields": {}, "values": {}, "rounds": []}
            self.rows.append(rec)
        elif "data-round" in a:
            rec = {"kind": "round", "attrs": a, "fields": {}, "values": {}, "rounds": []}
            parent = self._record()
            assert parent is not None, "a data-round outside a data-row"
            parent["rounds"].append(rec)
        field = a.get("data-field")
        self._stack.append((tag, rec, field))
        if field is not None:
            owner = rec or self._record()
            assert owner is not None, f"data-field={field!r} outside a row"
            owner["fields"].setdefault(field, "")
            if "data-value" in a:
                owner["values"][field] = json.loads(a["data-value"])

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        assert self._stack and self._stack[-1][0] == tag, (
            f"</{tag}> closes {self._stack[-1][0] if self._stack else None}"
        )
        self._stack.pop()

    def handle_data(self, data):
        self.text.append(data)
        hit = self._field()
        if hit is not None and hit[0] is not None:
            rec, field = hit
            rec["fields"][field] += data

    def of(self, kind: str) -> list[dict]:
        return [r for r in self.rows if r["kind"] == kind]
