"""RL-CAI feedback stage: AI comparison labels of the policy's response pairs (paper sec. 4.1).

For each red-team prompt the policy (the SL-CAI model) samples two responses (`sample_pairs`), and
a judge labels the pair with the multiple-choice question of `cai_jax.cai.feedback_question`
under sampled feedback principles (`cai_jax.cai.feedback_labels.label_pairs`, which describes the
options: ensembling, A/B swap, chain of thought, clamp, hard labels); the label arithmetic is in
`cai_jax.cai.feedback_probs`, the settings in `cai_jax.cai.feedback_settings`.

Determinism and resume: the run is a `cai_jax.jobs.ShardedJob`. Prompts are split per process into
fixed batches of `batch_size`; each finished batch is one JSONL shard written atomically; a rerun
skips finished shards, and a `meta.json` fingerprint refuses a folder made with other inputs. A
batch's samples depend only on (seed, process index, batch index); a prompt's principles only on
(seed, the prompt's global index). The progress bar ticks after each batch's sampling and after
its labelling. `load_comparisons_dataset` reads the folder as one `datasets.Dataset`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from cai_jax.cai.constitution import Constitution
from cai_jax.cai.feedback_labels import as_judge, check_constitution, draw_principles, label_pairs, select_few_shots
from cai_jax.cai.feedback_question import conversation_messages
from cai_jax.cai.feedback_settings import FeedbackSettings
from cai_jax.cai.judge import LMJudge
from cai_jax.cai.prompts import Prompt
from cai_jax.jobs import Batch, ShardedJob, shard_files
from cai_jax.sampling import generate
from cai_jax.text import encode_prompt

__all__ = [
    "comparison_files",
    "feedback_batch",
    "load_comparisons_dataset",
    "prompt_messages",
    "run_feedback",
    "sample_pairs",
]

RESPONSE_STOPS = ("\n\nHuman:",)  # raw policy rendering: the next human turn ends a response
_RESAMPLES = 3  # extra draws for a sampled response that comes out empty


def prompt_messages(prompt: Prompt | str) -> list[dict[str, str]]:
    """The conversation a prompt opens: its hh-rlhf `messages` if it has them, else one user turn."""
    if isinstance(prompt, str):
        return conversation_messages(prompt)
    return conversation_messages(list(prompt.meta.get("messages") or [{"role": "user", "content": prompt.text}]))


def _prompt_id(prompt: Prompt | str, i: int) -> str:
    return prompt.id if isinstance(prompt, Prompt) else f"prompt-{i}"


def _cut(text: str, stops: Sequence[str]) -> str:
    cuts = [text.find(s) for s in stops if s in text]
    return (text[: min(cuts)] if cuts else text).strip()


def sample_pairs(policy_lm: Any, prompts: Sequence[Prompt | str], *, rng: jax.Array, settings: FeedbackSettings):
    """Two sampled responses per prompt from the policy: [(response_a, response_b)] in prompt order.

    Row 2i and 2i + 1 of one `generate` call are prompt i's two samples (so they differ by their
    per-row keys). A response that comes out empty is drawn again, up to 3 times, with fresh keys.

    Raises:
      ValueError: naming the prompt whose responses stay empty.
    """
    if not prompts:
        raise ValueError("sample_pairs: no prompts")
    tok = policy_lm.tokenizer
    ids = [encode_prompt(tok, prompt_messages(p), settings.policy_rendering) for p in prompts]
    stops = RESPONSE_STOPS if settings.policy_rendering != "chat" else ()

    def draw(rows: list[int], key) -> list[str]:
        out = generate(
            policy_lm,
            [ids[r // 2] for r in rows],
            rng=key,
            max_new_tokens=settings.max_new_tokens,
            temperature=settings.temperature,
            top_p=settings.top_p,
            stop_strings=stops,
        )
        return [_cut(t, stops) for t in out.texts(tok)]

    texts = draw(list(range(2 * len(prompts))), rng)
    for attempt in range(1, _RESAMPLES + 1):
        empty = [r for r, t in enumerate(texts) if not t]
        if not empty:
            break
        for r, t in zip(empty, draw(empty, jax.random.fold_in(rng, attempt))):
            texts[r] = t
    for r, t in enumerate(texts):
        if not t:
            raise ValueError(
                f"sample_pairs: prompt {_prompt_id(prompts[r // 2], r // 2)!r} gave an empty response "
                f"{_RESAMPLES + 1} times (raise feedback.max_new_tokens or check the policy's stop tokens)"
            )
    return [(texts[2 * i], texts[2 * i + 1]) for i in range(len(prompts))]


def _model_id(lm: Any) -> list[str]:
    if isinstance(lm, LMJudge):
        lm = lm.lm
    elif not hasattr(lm, "config"):  # a judge that is not a model: its name says which
        return [str(getattr(lm, "name", type(lm).__name__))]
    return [str(getattr(lm, "path", None)), repr(lm.config)]


def _fingerprint_inputs(settings, seed, batch_size, constitution, prompts, policy_lm, judge) -> dict:
    """What the rows depend on: the folder's fingerprint."""
    return {
        "settings": dataclasses.asdict(settings),
        "seed": seed,
        "batch_size": batch_size,
        "policy": _model_id(policy_lm),
        "feedback_model": _model_id(judge),
        "principles": [dataclasses.asdict(p) for p in constitution.feedback_principles],
        "few_shots": [dataclasses.asdict(s) for s in select_few_shots(constitution, settings)],
        "prompts": [(_prompt_id(p, i), prompt_messages(p)) for i, p in enumerate(prompts)],
    }


def _check_prompts(prompts: Sequence[Prompt | str], policy_lm: Any, settings: FeedbackSettings) -> None:
    """Empty prompts, and prompts too long to answer within the policy's context, name their id."""
    if not prompts:
        raise ValueError("feedback: the prompt list is empty")
    context = policy_lm.config.max_position_embeddings
    for i, p in enumerate(prompts):
        text = p.text if isinstance(p, Prompt) else p
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"feedback: prompt {_prompt_id(p, i)!r} is empty")
        n = len(encode_prompt(policy_lm.tokenizer, prompt_messages(p), settings.policy_rendering))
        if n + settings.max_new_tokens > context:
            raise ValueError(
                f"feedback: prompt {_prompt_id(p, i)!r} renders to {n} tokens; with max_new_tokens="
                f"{settings.max_new_tokens} it exceeds the policy's context of {context}"
            )


def feedback_batch(
    policy_lm, judge, constitution, prompts, indices, key, settings, seed, tick: Callable[[], None] = lambda: None
) -> list[dict]:
    """Samples and labels one batch: responses from `fold_in(key, 0)`, CoT from `fold_in(key, 1)`.
    `tick()` follows the sampling (the progress bar; the labelling is the batch's second step)."""
    pairs = sample_pairs(policy_lm, prompts, rng=jax.random.fold_in(key, 0), settings=settings)
    tick()
    rows = [
        {
            "prompt_id": _prompt_id(p, i),
            "index": int(i),
            "prompt": p.text if isinstance(p, Prompt) else p,
            "messages": prompt_messages(p),
            "response_a": a,
            "response_b": b,
            # A prompt's principles depend on (seed, its global index) only.
            **draw_principles(constitution, settings, np.random.default_rng([seed, int(i)])),
            "seed": seed,
        }
        for p, i, (a, b) in zip(prompts, indices, pairs)
    ]
    return label_pairs(judge, rows, constitution, settings=settings, rng=jax.random.fold_in(key, 1))


def run_feedback(
    policy_lm: Any,
    judge: Any,
    prompts: Sequence[Prompt | str],
    constitution: Constitution,
    out_dir: str | os.PathLike,
    *,
    settings: FeedbackSettings,
    seed: int,
    batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
    progress: bool = True,
) -> Path:
    """Samples response pairs and AI labels for `prompts` into `out_dir` (resumable; module doc).

    Args:
      policy_lm: the model that answers (the SL-CAI model).
      judge: what labels (`cai.judge`), or a `LoadedModel` (an `LMJudge` in the settings'
        rendering); may be the same model as `policy_lm`.
      prompts: red-team prompts (`Prompt` or plain strings), the same list on every process.
      constitution: supplies the feedback principles and few-shots.
      out_dir: output folder; rows go to `rows-p<process>-b<batch>.jsonl`.
      settings: FeedbackSettings.
      seed: seeds the responses, the principles and the reasoning samples.
      batch_size: prompts per sampling call and per shard (per process).
      process_index / process_count: this host's strided shard of the prompts (default: jax's).
      progress: a bar that ticks per step of a batch (sampling, labelling).

    Returns:
      out_dir. A `DONE-p<process>` file holding the fingerprint marks this process's shard finished.
    """
    if batch_size < 1:
        raise ValueError(f"feedback: batch_size={batch_size} must be >= 1")
    judge = as_judge(judge, settings)
    check_constitution(constitution, settings)
    _check_prompts(prompts, policy_lm, settings)
    job = ShardedJob(
        out_dir,
        kind="comparison",
        inputs=_fingerprint_inputs(settings, seed, batch_size, constitution, prompts, policy_lm, judge),
        meta={
            "settings": dataclasses.asdict(settings),
            "seed": seed,
            "batch_size": batch_size,
            "num_prompts": len(prompts),
        },
        num_items=len(prompts),
        batch_size=batch_size,
        seed=seed,
        process_index=jax.process_index() if process_index is None else process_index,
        process_count=jax.process_count() if process_count is None else process_count,
        steps_per_item=2,
        progress=progress,
    )

    def batch_rows(batch: Batch) -> list[dict]:
        ps = [prompts[i] for i in batch.indices]
        return feedback_batch(policy_lm, judge, constitution, ps, batch.indices, batch.key, settings, seed, batch.tick)

    return job.run(batch_rows)


def comparison_files(out_dir: str | os.PathLike) -> list[str]:
    """The JSONL shards of a feedback folder, every process's, in (process, batch) order."""
    return shard_files(out_dir, "comparison")


def load_comparisons_dataset(out_dir: str | os.PathLike):
    """The comparison rows of every process as one `datasets.Dataset` (schema: `label_pairs`)."""
    import datasets

    return datasets.load_dataset("json", data_files=comparison_files(out_dir), split="train")
