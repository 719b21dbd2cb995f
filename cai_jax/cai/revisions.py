"""SL-CAI data engine: initial response, then N rounds of critique -> revision (paper sec. 3.1).

For each red-team prompt the helpful model answers; then, round after round, it is asked to
critique its latest answer under a principle sampled from the constitution and to revise it. The
dialogue grows: round r sees the prompt, the initial answer and every earlier critique and
revision. Every round is kept, so SL-CAI-n can train on revisions 1..n.

Renderings (`rendering`):

* "transcript" (base models; the paper's framing): the dialogue is one text,
  "\\n\\nHuman: {prompt}\\n\\nAssistant: {response}\\n\\nCritiqueRequest: {request}\\n\\nCritique:
  {critique}\\n\\nRevisionRequest: {request}\\n\\nRevision: {revision}" ..., generation continues after
  the next label ("\\n\\nAssistant:", "\\n\\nCritique:" or "\\n\\nRevision:") and stops at the next
  label. Few-shot transcripts from the constitution are prepended, rendered the same way.
* "chat" (chat models): the same steps as chat turns; requests are user turns, the prompt's
  answer, critiques and revisions are assistant turns, rendered with the tokenizer's chat template.
  Few-shot transcripts are prepended as earlier turns of the same chat.

Modes: "critique" (critique request -> critique -> revision request -> revision) and "direct"
(revision request -> revision, no critique step; the revision request then follows the answer or
the previous revision directly, so the prompt text differs from the critique mode's).

Determinism and resume: the run is a `cai_jax.jobs.ShardedJob`. Prompts are split into fixed
batches of `batch_size` (per process); each finished batch is written atomically as its own JSONL
shard, so a killed run loses at most the batch in flight, and a rerun skips finished shards; a
`meta.json` fingerprint refuses a folder made with other settings, model, constitution or
prompts. A batch's samples depend only on (seed, process index, batch index) and each prompt's
principles only on (seed, the prompt's global index), so the resumed output equals an
uninterrupted run's. `cleanup-p<process>.json` counts the clean-up fixes per batch. The progress
bar ticks after every generate call (answer, critique, revision). The folder loads with
`load_revisions` (or `datasets.load_dataset("json", data_files=...)`) as one dataset across
processes.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from cai_jax import atomic
from cai_jax.cai.constitution import Constitution, SLPrinciple, sample_sl_principles
from cai_jax.cai.prompts import Prompt
from cai_jax.jobs import Batch, ShardedJob, shard_files
from cai_jax.sampling import generate
from cai_jax.text import encode_text, render_chat

# (kind, transcript label, chat role)
_TURNS = {
    "human": ("Human", "user"),
    "assistant": ("Assistant", "assistant"),
    "critique_request": ("CritiqueRequest", "user"),
    "critique": ("Critique", "assistant"),
    "revision_request": ("RevisionRequest", "user"),
    "revision": ("Revision", "assistant"),
}
TRANSCRIPT_STOPS = tuple(f"\n\n{label}:" for label, _ in _TURNS.values())
_ECHO = re.compile(r"^\s*(?:revision|revised response|critique|assistant|response)\s*:\s*", re.IGNORECASE)
_BOILERPLATE = re.compile(
    r"^\s*(?:sure|okay|ok|certainly|of course)?[,!. ]*(?:here is|here's|below is)\s+(?:a|the|my)\s+"
    r"(?:revised|rewritten|new|updated)\s+(?:version of the\s+)?(?:response|answer|reply|version)[^:\n]*:\s*",
    re.IGNORECASE,
)


@dataclasses.dataclass(frozen=True)
class RevisionSettings:
    """Knobs of the revision engine. No field has a default: `configs/base.py`'s `revisions` section
    is their one home (the revisions stage builds them: experiments/stages/revisions.py)."""

    num_revisions: int  # critique -> revision rounds per prompt
    num_principles: int | None  # sample from the first k SL principles; None = all
    mode: str  # critique | direct
    num_few_shots: int  # constitution few-shot transcripts prepended; 0 = none
    temperature: float  # sampling temperature (paper: T = 1)
    top_p: float  # nucleus mass; 1 disables
    max_new_tokens: int  # per generated step (answer, critique or revision)
    rendering: str  # chat (chat template) | transcript (paper's raw framing)
    seed: int  # principles and samples follow (seed, prompt / batch index)
    batch_size: int  # prompts per generate call and per output shard

    def __post_init__(self):
        if self.mode not in ("critique", "direct"):
            raise ValueError(f"revisions.mode={self.mode!r}; expected critique or direct")
        if self.rendering not in ("chat", "transcript"):
            raise ValueError(f"revisions.rendering={self.rendering!r}; expected chat or transcript")
        if self.num_revisions < 0 or self.num_few_shots < 0 or self.batch_size < 1:
            raise ValueError("revisions: num_revisions and num_few_shots must be >= 0, batch_size >= 1")


# ---------------------------------------------------------------- rendering


def dialogue_turns(prompt: str, response: str | None, rounds: Sequence[dict]) -> list[tuple[str, str]]:
    """The (kind, text) turns of a prompt's dialogue so far."""
    turns = [("human", prompt)]
    if response is not None:
        turns.append(("assistant", response))
    for r in rounds:
        if r.get("critique_request") is not None:
            turns.append(("critique_request", r["critique_request"]))
        if r.get("critique") is not None:
            turns.append(("critique", r["critique"]))
        if r.get("revision_request") is not None:
            turns.append(("revision_request", r["revision_request"]))
        if r.get("revision") is not None:
            turns.append(("revision", r["revision"]))
    return turns


def _few_shot_turns(constitution: Constitution, n: int, mode: str) -> list[tuple[str, str]]:
    turns: list[tuple[str, str]] = []
    for shot in constitution.sl_few_shots[:n]:
        for m in shot.conversation:
            turns.append(("human" if m["role"] in ("user", "system") else "assistant", m["content"]))
        for r in shot.rounds:
            if mode == "critique":
                turns += [("critique_request", r.critique_request), ("critique", r.critique)]
            turns += [("revision_request", r.revision_request), ("revision", r.revision)]
    return turns


def render_step(tokenizer, turns: list[tuple[str, str]], next_kind: str, rendering: str) -> str:
    """Text fed to the model to generate the turn `next_kind` after `turns`."""
    if rendering == "transcript":
        text = "".join(f"\n\n{_TURNS[k][0]}: {t}" for k, t in turns)
        return text + f"\n\n{_TURNS[next_kind][0]}:"
    messages = [{"role": _TURNS[k][1], "content": t} for k, t in turns]
    return render_chat(tokenizer, messages, add_generation_prompt=True)


def clean_text(text: str, counts: collections.Counter) -> str:
    """Cuts at the next role label and strips echoed labels / boilerplate; counts each fix."""
    cut = min((i for i in (text.find(s) for s in TRANSCRIPT_STOPS) if i >= 0), default=-1)
    if cut >= 0:
        text = text[:cut]
        counts["cut_at_role_label"] += 1
    stripped = _ECHO.sub("", text, count=1)
    if stripped != text:
        counts["echoed_label"] += 1
    text = _BOILERPLATE.sub("", stripped, count=1)
    if text != stripped:
        counts["boilerplate_prefix"] += 1
    return text.strip()


# ---------------------------------------------------------------- the engine


def _fingerprint_inputs(settings: RevisionSettings, constitution: Constitution, prompts: Sequence[Prompt], lm) -> dict:
    """What the rows depend on besides the seed (which `settings` holds): the folder's fingerprint."""
    return {
        "settings": dataclasses.asdict(settings),
        "model": [str(getattr(lm, "path", None)), repr(lm.config)],
        "constitution": [dataclasses.asdict(p) for p in constitution.sl_principles],
        "few_shots": [dataclasses.asdict(s) for s in constitution.sl_few_shots[: settings.num_few_shots]],
        "prompts": [(p.id, p.text) for p in prompts],
    }


def _steps(settings: RevisionSettings) -> int:
    """Generate calls per prompt: the answer, then a critique (critique mode) and a revision per round."""
    return 1 + settings.num_revisions * (2 if settings.mode == "critique" else 1)


def _check_prompts(prompts: Sequence[Prompt], lm, constitution: Constitution, settings: RevisionSettings):
    """Empty prompts, and prompts whose whole dialogue could outgrow the context, name their id."""
    if not prompts:
        raise ValueError("revisions: the prompt list is empty")
    context = lm.config.max_position_embeddings
    steps = _steps(settings)
    shots = _few_shot_turns(constitution, settings.num_few_shots, settings.mode)
    for p in prompts:
        if not p.text.strip():
            raise ValueError(f"revisions: prompt {p.id!r} is empty")
        # The first step's full text (few-shots and template included), then every generated
        # step and its request: 64 tokens is a generous bound for a request turn.
        first = render_step(lm.tokenizer, shots + [("human", p.text)], "assistant", settings.rendering)
        n = len(encode_text(lm.tokenizer, first, settings.rendering))
        need = n + steps * (settings.max_new_tokens + 64)
        if need > context:
            raise ValueError(
                f"revisions: prompt {p.id!r} renders to {n} tokens; with {steps} generated steps of up to "
                f"{settings.max_new_tokens} tokens the dialogue could reach {need}, more than the model's "
                f"context of {context}"
            )


def _generate_step(lm, texts: list[str], key, settings: RevisionSettings) -> list[str]:
    ids = [encode_text(lm.tokenizer, t, settings.rendering) for t in texts]
    stops = TRANSCRIPT_STOPS if settings.rendering == "transcript" else ()
    out = generate(
        lm,
        ids,
        rng=key,
        max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature,
        top_p=settings.top_p,
        stop_strings=stops,
    )
    return out.texts(lm.tokenizer)


def revise_batch(
    lm,
    constitution: Constitution,
    prompts: Sequence[Prompt],
    indices: Sequence[int],
    key,
    settings,
    counts,
    tick: Callable[[], None] = lambda: None,
) -> list[dict]:
    """Runs the initial answer and every round for one batch; returns its rows. `tick()` follows
    each generate call (the progress bar)."""
    principles: list[list[SLPrinciple]] = [
        sample_sl_principles(
            constitution, settings.num_revisions, np.random.default_rng([settings.seed, i]), k=settings.num_principles
        )
        if settings.num_revisions
        else []
        for i in indices
    ]
    shots = _few_shot_turns(constitution, settings.num_few_shots, settings.mode)
    render = lambda turns, kind: render_step(lm.tokenizer, shots + turns, kind, settings.rendering)  # noqa: E731
    step = iter(range(1_000_000))
    responses = _generate_step(
        lm, [render(dialogue_turns(p.text, None, []), "assistant") for p in prompts], jax.random.fold_in(key, next(step)), settings
    )  # fmt: skip
    responses = [clean_text(r, counts) for r in responses]
    tick()
    rounds: list[list[dict]] = [[] for _ in prompts]

    def run(new: list[dict], kind: str) -> None:
        """Generates `kind` (critique or revision) for every prompt into its round dict `new[j]`."""
        texts = [
            render(dialogue_turns(p.text, responses[j], rounds[j] + [new[j]]), kind) for j, p in enumerate(prompts)
        ]
        for rd, text in zip(new, _generate_step(lm, texts, jax.random.fold_in(key, next(step)), settings)):
            rd[kind] = clean_text(text, counts)
        tick()

    for r in range(settings.num_revisions):
        new = [{"principle_id": pr[r].id, "critique_request": None, "critique": None} for pr in principles]
        if settings.mode == "critique":
            for rd, pr in zip(new, principles):
                rd["critique_request"] = pr[r].critique_request
            run(new, "critique")
        for rd, pr in zip(new, principles):
            rd["revision_request"] = pr[r].revision_request
        run(new, "revision")
        for j, rd in enumerate(new):
            rounds[j].append(rd)
    return [
        {
            "id": p.id,
            "prompt": p.text,
            "initial_response": resp,
            "rounds": rds,
            "seed": settings.seed,
            "settings": dataclasses.asdict(settings),
        }
        for p, resp, rds in zip(prompts, responses, rounds)
    ]


def _write_stats(path: Path, per_batch: dict) -> None:
    total: collections.Counter = collections.Counter()
    for c in per_batch.values():
        total.update(c)
    atomic.write_json(path, {"total": dict(total), "batches": per_batch}, indent=2, sort_keys=True)


def run_revisions(
    lm: Any,
    prompts: Sequence[Prompt],
    constitution: Constitution,
    settings: RevisionSettings,
    out_dir: str | os.PathLike,
    *,
    process_index: int = 0,
    process_count: int = 1,
    progress: bool = True,
) -> Path:
    """Generates the SL-CAI revision data for `prompts` into `out_dir` (resumable; see module doc).

    Args:
      lm: the helpful model (`LoadedModel`) that answers, critiques and revises.
      prompts: red-team prompts (`cai_jax.cai.prompts.Prompt`), the same list on every process.
      constitution: supplies the SL principles and few-shot transcripts.
      settings: RevisionSettings.
      out_dir: output folder; rows go to `rows-p<process>-b<batch>.jsonl`.
      process_index / process_count: this host's shard of the prompts (strided).
      progress: a bar that ticks per generate call.

    Returns:
      out_dir. A `DONE-p<process>` file marks this process's shard as finished.
    """
    # Fails early on a bad k; checks the SL principles only (restrict() would also bound k by the
    # feedback principles, which this stage does not use).
    if settings.num_revisions or settings.num_principles is not None:
        sample_sl_principles(constitution, 0, 0, k=settings.num_principles)
    if settings.num_few_shots > len(constitution.sl_few_shots):
        raise ValueError(
            f"revisions.num_few_shots={settings.num_few_shots}, but the constitution has only "
            f"{len(constitution.sl_few_shots)} SL few-shot transcripts"
        )
    _check_prompts(prompts, lm, constitution, settings)
    job = ShardedJob(
        out_dir,
        kind="revision",
        inputs=_fingerprint_inputs(settings, constitution, prompts, lm),
        meta={"settings": dataclasses.asdict(settings), "num_prompts": len(prompts)},
        num_items=len(prompts),
        batch_size=settings.batch_size,
        seed=settings.seed,
        process_index=process_index,
        process_count=process_count,
        steps_per_item=_steps(settings),
        progress=progress,
    )
    job.claim()
    # Clean-up counts per batch, kept across resumed runs: {"total": {...}, "batches": {b: {...}}}.
    stats_path = job.folder / f"cleanup-p{process_index:03d}.json"
    per_batch = json.loads(stats_path.read_text()).get("batches", {}) if stats_path.exists() else {}
    if not stats_path.exists():  # also written when this process gets no prompts
        _write_stats(stats_path, per_batch)

    def batch_rows(batch: Batch) -> list[dict]:
        counts: collections.Counter = collections.Counter()
        ps = [prompts[i] for i in batch.indices]
        rows = revise_batch(lm, constitution, ps, batch.indices, batch.key, settings, counts, batch.tick)
        # Counts first, then the shard: a kill in between reruns the batch, which recounts the same.
        per_batch[str(batch.index)] = dict(counts)
        _write_stats(stats_path, per_batch)
        return rows

    return job.run(batch_rows)


def revision_files(out_dir: str | os.PathLike) -> list[str]:
    """The JSONL shards of a revisions folder, every process's, in (process, batch) order."""
    return shard_files(out_dir, "revision")


def load_revisions(out_dir: str | os.PathLike):
    """The revision rows of every process as one `datasets.Dataset`."""
    import datasets

    return datasets.load_dataset("json", data_files=revision_files(out_dir), split="train")
