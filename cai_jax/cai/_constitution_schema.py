"""The project's constitution schema: validating a parsed YAML/JSON mapping, and dumping one back.

The schema itself is documented in `cai_jax.cai.constitution` and constitutions/README.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NoReturn

from cai_jax.cai._constitution_types import (
    ANSWERS,
    ROLES,
    Constitution,
    ConstitutionError,
    FeedbackFewShot,
    FeedbackPrinciple,
    SLFewShot,
    SLPrinciple,
    SLRound,
)

TOP_KEYS = (
    "name",
    "version",
    "description",
    "sl_principles",
    "feedback_principles",
    "sl_few_shots",
    "feedback_few_shots",
    "cot_few_shots",
)
# The keys that mark a mapping as this project's schema (format detection in constitution.py).
SCHEMA_MARKERS = ("sl_principles", "feedback_principles")
# Role names accepted on load and what they are stored as ("human" is the paper's name for "user").
ROLE_ALIASES = {"human": "user", "user": "user", "assistant": "assistant", "system": "system"}


class Loc:
    """Where in which file a value sits; builds ConstitutionErrors that name file, entry and field."""

    def __init__(self, path: str | Path | None, entry: str | None = None):
        self.path, self.entry = path, entry

    def at(self, entry: str) -> Loc:
        """A location for a nested entry, e.g. "sl_few_shots[1] (id 'x') rounds[0]"."""
        return Loc(self.path, f"{self.entry} {entry}" if self.entry else entry)

    def fail(self, problem: str, field: str | None = None) -> NoReturn:
        raise ConstitutionError(problem, path=self.path, entry=self.entry, field=field)


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def mapping(value: Any, loc: Loc, keys: tuple[str, ...], required: tuple[str, ...] = ()) -> dict:
    """Checks that `value` is a mapping with only `keys`, and all of `required`."""
    if not isinstance(value, dict):
        loc.fail(f"expected a mapping, got {_type_name(value)}")
    for key in value:
        if key not in keys:
            loc.fail(f"unknown field (expected some of: {', '.join(keys)})", field=str(key))
    for key in required:
        if key not in value:
            loc.fail("missing field", field=key)
    return value


def text(d: dict, key: str, loc: Loc, *, required: bool = True) -> str | None:
    """A non-empty string field, stripped of surrounding whitespace (YAML block scalars add a newline)."""
    if key not in d or (d[key] is None and not required):
        if required:
            loc.fail("missing field", field=key)
        return None
    value = d[key]
    if not isinstance(value, str):
        loc.fail(f"expected a string, got {_type_name(value)}", field=key)
    if not value.strip():
        loc.fail("empty text", field=key)
    return value.strip()


def items(d: dict, key: str, loc: Loc, *, required: bool = False) -> list:
    """A list field (absent or null -> [] unless required)."""
    value = d.get(key)
    if value is None:
        if required:
            loc.fail("missing field", field=key)
        return []
    if not isinstance(value, list):
        loc.fail(f"expected a list, got {_type_name(value)}", field=key)
    return value


def entry_loc(loc: Loc, section: str, i: int, raw: Any) -> Loc:
    """Names entry i of a section by index, plus its id when it has a usable one."""
    ident = raw.get("id") if isinstance(raw, dict) else None
    return loc.at(f"{section}[{i}]" + (f" (id {ident!r})" if isinstance(ident, str) and ident else ""))


def unique_id(d: dict, loc: Loc, seen: dict[str, int], i: int) -> str:
    ident = text(d, "id", loc)
    if ident in seen:
        loc.fail(f"duplicate id {ident!r} (also entry {seen[ident]})", field="id")
    seen[ident] = i
    return ident


def conversation(value: Any, loc: Loc, field: str, last_role: str) -> list[dict[str, str]]:
    """A non-empty list of {role, content} messages whose last turn has role `last_role`."""
    if not isinstance(value, list) or not value:
        loc.fail(f"expected a non-empty list of messages, got {_type_name(value)}", field=field)
    out = []
    for j, m in enumerate(value):
        mloc = loc.at(f"{field}[{j}]")
        mapping(m, mloc, ("role", "content"), ("role", "content"))
        role = m["role"]
        if not isinstance(role, str) or role.lower() not in ROLE_ALIASES:
            mloc.fail(f"unknown role {role!r} (expected one of: human, {', '.join(ROLES)})", field="role")
        out.append({"role": ROLE_ALIASES[role.lower()], "content": text(m, "content", mloc)})
    if out[-1]["role"] != last_role:
        loc.fail(f"the last message must have role '{last_role}', got '{out[-1]['role']}'", field=field)
    return out


def _sl_round(raw: Any, loc: Loc, principles: dict[str, SLPrinciple]) -> SLRound:
    d = mapping(
        raw,
        loc,
        ("principle_id", "critique_request", "revision_request", "critique", "revision"),
        ("critique", "revision"),
    )
    pid = text(d, "principle_id", loc, required=False)
    principle = None
    if pid is not None:
        if pid not in principles:
            loc.fail(f"unknown SL principle id {pid!r}", field="principle_id")
        principle = principles[pid]
    requests = {}
    for key in ("critique_request", "revision_request"):
        if principle is None and key not in d:
            loc.fail("missing field (give it inline, or name a principle_id)", field=key)
        value = text(d, key, loc, required=principle is None)
        requests[key] = value if value is not None else getattr(principle, key)
    return SLRound(
        critique_request=requests["critique_request"],
        critique=text(d, "critique", loc),
        revision_request=requests["revision_request"],
        revision=text(d, "revision", loc),
        principle_id=pid,
    )


def _feedback_shot(raw: Any, loc: Loc, seen: dict, i: int, principles: dict, cot: bool) -> FeedbackFewShot:
    keys = ("id", "conversation", "prompt", "options", "answer", "principle_id") + (("reasoning",) if cot else ())
    d = mapping(raw, loc, keys, ("id", "options", "answer") + (("reasoning",) if cot else ()))
    ident = unique_id(d, loc, seen, i)
    if ("conversation" in d) == ("prompt" in d):
        loc.fail(
            "give exactly one of 'conversation' (a message list) or 'prompt' (one user turn)", field="conversation"
        )
    if "prompt" in d:
        convo = [{"role": "user", "content": text(d, "prompt", loc)}]
    else:
        convo = conversation(d["conversation"], loc, "conversation", last_role="user")
    options = d["options"]
    if not isinstance(options, list) or len(options) != 2:
        loc.fail(f"expected a list of exactly 2 strings, got {_type_name(options)}", field="options")
    for j in range(2):
        if not isinstance(options[j], str) or not options[j].strip():
            loc.fail(f"option {j} must be a non-empty string", field="options")
    if d["answer"] not in ANSWERS:
        loc.fail(f"expected 'A' or 'B', got {d['answer']!r}", field="answer")
    pid = text(d, "principle_id", loc, required=False)
    if pid is not None and pid not in principles:
        loc.fail(f"unknown feedback principle id {pid!r}", field="principle_id")
    return FeedbackFewShot(
        id=ident,
        conversation=convo,
        options=[o.strip() for o in options],
        answer=d["answer"],
        principle_id=pid,
        reasoning=text(d, "reasoning", loc) if cot else "",
    )


def parse_schema(data: Any, path: str | Path | None) -> Constitution:
    """Validates a mapping in the project's schema and builds the Constitution."""
    loc = Loc(path)
    d = mapping(data, loc, TOP_KEYS, ("name", "version", "sl_principles", "feedback_principles"))
    version = d["version"]
    if isinstance(version, bool) or not isinstance(version, (str, int, float)) or not str(version).strip():
        loc.fail(f"expected a non-empty string or number, got {version!r}", field="version")
    description = d.get("description") or ""
    if not isinstance(description, str):
        loc.fail(f"expected a string, got {_type_name(description)}", field="description")

    sl, seen = [], {}
    for i, raw in enumerate(items(d, "sl_principles", loc, required=True)):
        eloc = entry_loc(loc, "sl_principles", i, raw)
        mapping(
            raw, eloc, ("id", "critique_request", "revision_request"), ("id", "critique_request", "revision_request")
        )
        ident = unique_id(raw, eloc, seen, i)
        sl.append(SLPrinciple(ident, text(raw, "critique_request", eloc), text(raw, "revision_request", eloc)))
    fb, seen = [], {}
    for i, raw in enumerate(items(d, "feedback_principles", loc, required=True)):
        eloc = entry_loc(loc, "feedback_principles", i, raw)
        mapping(raw, eloc, ("id", "text"), ("id", "text"))
        fb.append(FeedbackPrinciple(unique_id(raw, eloc, seen, i), text(raw, "text", eloc)))

    sl_by_id, fb_by_id = {p.id: p for p in sl}, {p.id: p for p in fb}
    sl_shots, seen = [], {}
    for i, raw in enumerate(items(d, "sl_few_shots", loc)):
        eloc = entry_loc(loc, "sl_few_shots", i, raw)
        mapping(raw, eloc, ("id", "conversation", "rounds"), ("id", "conversation", "rounds"))
        ident = unique_id(raw, eloc, seen, i)
        convo = conversation(raw["conversation"], eloc, "conversation", last_role="assistant")
        rounds = items(raw, "rounds", eloc, required=True)
        parsed = [_sl_round(r, eloc.at(f"rounds[{j}]"), sl_by_id) for j, r in enumerate(rounds)]
        sl_shots.append(SLFewShot(ident, convo, parsed))
    fb_shots, seen = [], {}
    for i, raw in enumerate(items(d, "feedback_few_shots", loc)):
        fb_shots.append(_feedback_shot(raw, entry_loc(loc, "feedback_few_shots", i, raw), seen, i, fb_by_id, False))
    cot_shots, seen = [], {}
    for i, raw in enumerate(items(d, "cot_few_shots", loc)):
        cot_shots.append(_feedback_shot(raw, entry_loc(loc, "cot_few_shots", i, raw), seen, i, fb_by_id, True))

    return Constitution(
        name=text(d, "name", loc),
        version=str(version).strip(),
        sl_principles=sl,
        feedback_principles=fb,
        sl_few_shots=sl_shots,
        feedback_few_shots=fb_shots,
        cot_few_shots=cot_shots,
        description=description.strip(),
        source=str(path) if path is not None else "",
    )


def _round_dict(r: SLRound, principles: dict[str, SLPrinciple]) -> dict:
    out: dict[str, Any] = {}
    p = principles.get(r.principle_id) if r.principle_id is not None else None
    if r.principle_id is not None:
        out["principle_id"] = r.principle_id
    # Inline request text only where it differs from the named principle, so files stay short.
    if p is None or r.critique_request != p.critique_request:
        out["critique_request"] = r.critique_request
    out["critique"] = r.critique
    if p is None or r.revision_request != p.revision_request:
        out["revision_request"] = r.revision_request
    out["revision"] = r.revision
    return out


def _feedback_dict(x: FeedbackFewShot, cot: bool) -> dict:
    out: dict[str, Any] = {"id": x.id, "conversation": [dict(m) for m in x.conversation]}
    out.update(options=list(x.options), answer=x.answer)
    if x.principle_id is not None:
        out["principle_id"] = x.principle_id
    if cot:
        out["reasoning"] = x.reasoning
    return out


def to_dict(c: Constitution) -> dict:
    """The constitution as a plain mapping in the schema; `parse_schema(to_dict(c))` equals `c`.

    Raises:
      ConstitutionError: if the constitution could not be loaded back (e.g. a round naming a
        principle id the constitution lacks), so nothing invalid is ever written.
    """
    sl_by_id = {p.id: p for p in c.sl_principles}
    d: dict[str, Any] = {"name": c.name, "version": c.version}
    if c.description:
        d["description"] = c.description
    d["sl_principles"] = [
        {"id": p.id, "critique_request": p.critique_request, "revision_request": p.revision_request}
        for p in c.sl_principles
    ]
    d["feedback_principles"] = [{"id": p.id, "text": p.text} for p in c.feedback_principles]
    d["sl_few_shots"] = [
        {
            "id": s.id,
            "conversation": [dict(m) for m in s.conversation],
            "rounds": [_round_dict(r, sl_by_id) for r in s.rounds],
        }
        for s in c.sl_few_shots
    ]
    d["feedback_few_shots"] = [_feedback_dict(x, cot=False) for x in c.feedback_few_shots]
    d["cot_few_shots"] = [_feedback_dict(x, cot=True) for x in c.cot_few_shots]
    parse_schema(d, path=c.source or "<constitution being saved>")
    return d
