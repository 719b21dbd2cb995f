"""Importers: the CAI paper's released prompt files, and the {"constitutions", "system_chat"} layout.

Each importer takes already-parsed JSON and returns the pieces of a Constitution; format detection
and file reading live in `cai_jax.cai.constitution`. The parsing rules are documented there and in
constitutions/README.md.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from cai_jax.cai._constitution_schema import ROLE_ALIASES, Loc, mapping
from cai_jax.cai._constitution_types import (
    ConstitutionError,
    FeedbackFewShot,
    FeedbackPrinciple,
    SLFewShot,
    SLPrinciple,
    SLRound,
)

# The released files, in the order a folder import reads them (principles before the few-shots
# that refer to them).
PAPER_FILES = (
    "CritiqueRevisionInstructions.json",
    "CritiqueRevisionFewShotPrompts.json",
    "RLMadisonInstructions.json",
    "RLMadisonFewShotPrompts.json",
    "RLMadisonPrecogFewShotPrompts.json",
)

# "\n\nCritiqueRequest: <text>\n\nCritique:" -> <text> (and the same for revisions).
_CRITIQUE_FRAME = re.compile(r"^\s*CritiqueRequest:\s*(.*?)(?:\s*\n\s*Critique:)?\s*$", re.S)
_REVISION_FRAME = re.compile(r"^\s*RevisionRequest:\s*(.*?)(?:\s*\n\s*Revision:)?\s*$", re.S)
_OPTIONS_SUFFIX = re.compile(r"\s*Options:\s*$")
# A role marker after a blank line (or at the start); a bare "Critique:" mid-turn is content.
_SL_MARKER = re.compile(r"(?:^|\n\n)(Human|Assistant|CritiqueRequest|Critique|RevisionRequest|Revision):")
_CHAT_MARKER = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_ROUND_TAGS = ("CritiqueRequest", "Critique", "RevisionRequest", "Revision")
_TAG_ROLE = {"Human": "user", "Assistant": "assistant", "H": "user", "A": "assistant"}
# Chain-of-thought ("Precog") prompt pieces.
_COT_HEADER = re.compile(r"Consider the following conversation[^\n]*\n")
_COT_OPTIONS = re.compile(r"\(([AB])\)\s*\[\[\[(.*?)\]\]\]", re.S)
_COT_TURN = re.compile(r"(?:^|\n\n)(H|A):")
_COT_REASONING = re.compile(r"Let.s think step by step:(.*?)(?:\n\nHuman:|$)", re.S)
_COT_ANSWER = re.compile(r"answer is:?\s*\(?([AB])\)?\s*$")


def _unframe(value: Any, frame: re.Pattern, loc: Loc, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        loc.fail(f"expected a non-empty string, got {value!r}", field=field)
    m = frame.match(value)
    out = (m.group(1) if m else value).strip()
    if not out:
        loc.fail("empty text once the framing is removed", field=field)
    return out


def paper_sl_principles(data: Any, path: Path) -> list[SLPrinciple]:
    """CritiqueRevisionInstructions.json: {id: {"prompt": [critique, ...], "edit_request": revision}}.

    Ids keep the file's keys; a key with several critique prompts gives ids "<key>.<j>".
    """
    if not isinstance(data, dict):
        Loc(path).fail(f"expected a mapping of principle id -> entry, got {type(data).__name__}")
    out = []
    for key, raw in data.items():
        loc = Loc(path, f"entry {key!r}")
        mapping(raw, loc, ("prompt", "edit_request"), ("prompt", "edit_request"))
        prompts = raw["prompt"] if isinstance(raw["prompt"], list) else [raw["prompt"]]
        if not prompts:
            loc.fail("empty list", field="prompt")
        revision = _unframe(raw["edit_request"], _REVISION_FRAME, loc, "edit_request")
        for j, prompt in enumerate(prompts):
            ident = str(key) if len(prompts) == 1 else f"{key}.{j}"
            out.append(SLPrinciple(ident, _unframe(prompt, _CRITIQUE_FRAME, loc, f"prompt[{j}]"), revision))
    return out


def _principle_for(critique_request: str, principles: list[SLPrinciple]) -> str | None:
    # A round names a principle when its critique request is exactly that principle's; its own
    # texts are kept regardless (the paper's few-shots reuse critiques with reworded revisions).
    return next((p.id for p in principles if p.critique_request == critique_request), None)


def paper_sl_few_shots(data: Any, path: Path, principles: list[SLPrinciple]) -> list[SLFewShot]:
    """CritiqueRevisionFewShotPrompts.json: a list of raw transcripts with critique/revision blocks."""
    if not isinstance(data, list):
        Loc(path).fail(f"expected a list of transcripts, got {type(data).__name__}")
    out = []
    for i, raw in enumerate(data):
        loc = Loc(path, f"[{i}]")
        if not isinstance(raw, str):
            loc.fail(f"expected a transcript string, got {type(raw).__name__}")
        pieces = _SL_MARKER.split(raw)
        if pieces[0].strip():
            loc.fail(f"text before the first role marker: {pieces[0].strip()[:60]!r}")
        blocks = [(tag, body.strip()) for tag, body in zip(pieces[1::2], pieces[2::2])]
        if blocks and blocks[-1] == ("Human", ""):
            blocks.pop()  # the paper ends each example with an open "\n\nHuman:" turn
        first = next((j for j, (tag, _) in enumerate(blocks) if tag in _ROUND_TAGS), len(blocks))
        convo = [{"role": _TAG_ROLE[tag], "content": body} for tag, body in blocks[:first]]
        if any(tag not in _TAG_ROLE for tag, _ in blocks[:first]) or not convo or convo[-1]["role"] != "assistant":
            loc.fail("expected Human/Assistant turns ending with an Assistant turn before the first CritiqueRequest")
        rest, rounds = blocks[first:], []
        while rest:
            tags = tuple(tag for tag, _ in rest[:4])
            if tags != _ROUND_TAGS or any(not body for _, body in rest[:4]):
                loc.fail(f"round {len(rounds)}: expected non-empty {' / '.join(_ROUND_TAGS)} blocks, got {list(tags)}")
            (_, creq), (_, crit), (_, rreq), (_, rev) = rest[:4]
            rounds.append(SLRound(creq, crit, rreq, rev, _principle_for(creq, principles)))
            rest = rest[4:]
        if not rounds:
            loc.fail("no CritiqueRequest/Critique/RevisionRequest/Revision round")
        out.append(SLFewShot(f"paper_sl_fs_{i}", convo, rounds))
    return out


def paper_feedback_principles(data: Any, path: Path) -> list[FeedbackPrinciple]:
    """RLMadisonInstructions.json: a list of instructions ending in "Options:" -> paper_fb_<i>."""
    if not isinstance(data, list):
        Loc(path).fail(f"expected a list of strings, got {type(data).__name__}")
    out = []
    for i, raw in enumerate(data):
        loc = Loc(path, f"[{i}]")
        if not isinstance(raw, str) or not raw.strip():
            loc.fail(f"expected a non-empty string, got {raw!r}")
        body = _OPTIONS_SUFFIX.sub("", raw).strip()  # the renderer prints its own "Options:"
        if not body:
            loc.fail("empty text once 'Options:' is removed")
        out.append(FeedbackPrinciple(f"paper_fb_{i}", body))
    return out


def _human_turns(prompt: str, loc: Loc) -> list[dict[str, str]]:
    """ "\\n\\nHuman: ...\\n\\nAssistant:" -> messages, dropping the open final Assistant turn."""
    pieces = _CHAT_MARKER.split(prompt)
    turns = [{"role": _TAG_ROLE[t], "content": b.strip()} for t, b in zip(pieces[1::2], pieces[2::2])]
    if turns and turns[-1] == {"role": "assistant", "content": ""}:
        turns.pop()
    if pieces[0].strip() or not turns or turns[-1]["role"] != "user" or any(not t["content"] for t in turns):
        loc.fail("expected non-empty Human/Assistant turns ending with a Human turn", field="prompt")
    return turns


def paper_feedback_few_shots(data: Any, path: Path) -> list[FeedbackFewShot]:
    """RLMadisonFewShotPrompts.json: [{"prompt", "corrects": [...], "incorrects": [...]}].

    Every (correct, incorrect) pair becomes one example; the correct option is (A) for even-numbered
    examples and (B) for odd ones, so the shown answers do not teach a position preference.
    """
    if not isinstance(data, list):
        Loc(path).fail(f"expected a list of examples, got {type(data).__name__}")
    out = []
    for i, raw in enumerate(data):
        loc = Loc(path, f"[{i}]")
        mapping(raw, loc, ("prompt", "corrects", "incorrects"), ("prompt", "corrects", "incorrects"))
        if not isinstance(raw["prompt"], str):
            loc.fail(f"expected a string, got {type(raw['prompt']).__name__}", field="prompt")
        convo = _human_turns(raw["prompt"], loc)
        for key in ("corrects", "incorrects"):
            if (
                not isinstance(raw[key], list)
                or not raw[key]
                or not all(isinstance(x, str) and x.strip() for x in raw[key])
            ):
                loc.fail("expected a non-empty list of non-empty strings", field=key)
        pairs = [(c.strip(), w.strip()) for c in raw["corrects"] for w in raw["incorrects"]]
        for j, (good, bad) in enumerate(pairs):
            k = len(out)
            ident = f"paper_fb_fs_{i}" if len(pairs) == 1 else f"paper_fb_fs_{i}.{j}"
            options, answer = ([good, bad], "A") if k % 2 == 0 else ([bad, good], "B")
            out.append(FeedbackFewShot(ident, [dict(m) for m in convo], options, answer))
    return out


def paper_cot_few_shots(data: Any, path: Path) -> list[FeedbackFewShot]:
    """RLMadisonPrecogFewShotPrompts.json: [{"prompt": full chain-of-thought example}].

    The prompt holds "H:"/"A:" turns, the "{}" principle slot, options "(A) [[[...]]]" and
    "(B) [[[...]]]", the reasoning after "Let's think step by step:", and "So the answer is: (X)".
    """
    if not isinstance(data, list):
        Loc(path).fail(f"expected a list of examples, got {type(data).__name__}")
    out = []
    for i, raw in enumerate(data):
        loc = Loc(path, f"[{i}]")
        mapping(raw, loc, ("prompt",), ("prompt",))
        prompt = raw["prompt"]
        if not isinstance(prompt, str):
            loc.fail(f"expected a string, got {type(prompt).__name__}", field="prompt")
        header, first_option = _COT_HEADER.search(prompt), re.search(r"\(A\)\s*\[\[\[", prompt)
        if header is None or first_option is None or first_option.start() < header.end():
            loc.fail("expected 'Consider the following conversation...' then '(A) [[[...]]]' options", field="prompt")
        body = prompt[header.end() : first_option.start()].strip()
        if body.endswith("{}"):  # the slot the principle is formatted into
            body = body[:-2].strip()
        pieces = _COT_TURN.split(body)
        convo = [{"role": _TAG_ROLE[t], "content": b.strip()} for t, b in zip(pieces[1::2], pieces[2::2])]
        if pieces[0].strip() or not convo or convo[-1]["role"] != "user" or any(not m["content"] for m in convo):
            loc.fail("expected non-empty 'H:'/'A:' turns ending with an 'H:' turn", field="prompt")
        options = _COT_OPTIONS.findall(prompt)
        if [label for label, _ in options] != ["A", "B"] or any(not text.strip() for _, text in options):
            loc.fail("expected exactly one non-empty (A) [[[...]]] and one (B) [[[...]]] option", field="prompt")
        reasoning, answer = _COT_REASONING.search(prompt), _COT_ANSWER.search(prompt)
        if reasoning is None or not reasoning.group(1).strip():
            loc.fail('no reasoning after "Let\'s think step by step:"', field="prompt")
        if answer is None:
            loc.fail("no final 'So the answer is: (A|B)'", field="prompt")
        out.append(
            FeedbackFewShot(
                f"paper_cot_fs_{i}",
                convo,
                [text.strip() for _, text in options],
                answer.group(1),
                reasoning=reasoning.group(1).strip(),
            )
        )
    return out


def _message(raw: Any, loc: Loc) -> dict[str, str]:
    mapping(raw, loc, tuple(raw) if isinstance(raw, dict) else (), ("role", "content"))
    role, content = raw["role"], raw["content"]
    if not isinstance(role, str) or role.lower() not in ROLE_ALIASES:
        loc.fail(f"unknown role {role!r}", field="role")
    if not isinstance(content, str) or not content.strip():
        loc.fail(f"expected non-empty text, got {content!r}", field="content")
    return {"role": ROLE_ALIASES[role.lower()], "content": content.strip()}


def chat_layout(data: Any, path: Path) -> tuple[list[SLPrinciple], list[SLFewShot]]:
    """{"constitutions": [{"critic", "revision"}], "system_chat": [[{role, content}, ...]]}.

    A bare list of {"critic", "revision"} entries is read as the "constitutions" part alone.
    Principle ids: the entry's own "id" or "name" when present, else "sl_<i>". Transcripts are split
    into conversation + rounds by the rule in the module docstring of `cai_jax.cai.constitution`.
    """
    root = Loc(path)
    if isinstance(data, list):
        data = {"constitutions": data}
    mapping(data, root, tuple(data) if isinstance(data, dict) else (), ("constitutions",))
    entries = data["constitutions"]
    if not isinstance(entries, list):
        root.fail(f"expected a list, got {type(entries).__name__}", field="constitutions")
    principles, seen = [], set()
    for i, raw in enumerate(entries):
        loc = Loc(path, f"constitutions[{i}]")
        mapping(raw, loc, tuple(raw) if isinstance(raw, dict) else (), ("critic", "revision"))
        ident = raw.get("id", raw.get("name", f"sl_{i}"))
        if not isinstance(ident, str) or not ident.strip() or ident in seen:
            loc.fail(f"missing, empty or duplicate id {ident!r}", field="id")
        seen.add(ident)
        texts = []
        for key in ("critic", "revision"):
            if not isinstance(raw[key], str) or not raw[key].strip():
                loc.fail(f"expected non-empty text, got {raw[key]!r}", field=key)
            texts.append(raw[key].strip())
        principles.append(SLPrinciple(ident, *texts))

    chats = data.get("system_chat") or []
    if not isinstance(chats, list):
        root.fail(f"expected a list of transcripts, got {type(chats).__name__}", field="system_chat")
    shots = [_chat_shot(chat, Loc(path, f"system_chat[{i}]"), i, principles) for i, chat in enumerate(chats)]
    return principles, shots


def _chat_shot(chat: Any, loc: Loc, i: int, principles: list[SLPrinciple]) -> SLFewShot:
    if not isinstance(chat, list) or not chat:
        loc.fail(f"expected a non-empty list of messages, got {type(chat).__name__}")
    msgs = [_message(m, loc.at(f"[{j}]")) for j, m in enumerate(chat)]
    n_sys = next((j for j, m in enumerate(msgs) if m["role"] != "system"), len(msgs))
    turns = msgs[n_sys:]
    expected = ["user" if j % 2 == 0 else "assistant" for j in range(len(turns))]
    if not turns or [m["role"] for m in turns] != expected or len(turns) % 2:
        loc.fail("expected optional system messages, then alternating user/assistant turns ending with assistant")
    critics = {p.critique_request for p in principles}
    start = next((j for j in range(2, len(turns), 2) if turns[j]["content"] in critics), None)
    if start is None:
        # No turn quotes a listed critique: a transcript of 6+ turns ends with one round.
        start = len(turns) - 4 if len(turns) >= 6 else len(turns)
    elif (len(turns) - start) % 4:
        loc.fail(
            f"the critique turn at message {n_sys + start} starts rounds of 4 turns, but {len(turns) - start} remain"
        )
    rounds = []
    for j in range(start, len(turns), 4):
        creq, crit, rreq, rev = (m["content"] for m in turns[j : j + 4])
        rounds.append(SLRound(creq, crit, rreq, rev, _principle_for(creq, principles)))
    return SLFewShot(f"system_chat_{i}", msgs[: n_sys + start], rounds)


def no_paper_files(folder: Path) -> ConstitutionError:
    return ConstitutionError(
        f"no CAI paper prompt files found (expected some of: {', '.join(PAPER_FILES)})", path=folder
    )
