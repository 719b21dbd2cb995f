"""The revision and feedback engines' files, byte for byte, against tests/testdata/engine_golden.json.

Everything numeric is a stand-in: `generate` answers a hash of its key and its token ids, the judge
is a Python callable scoring a hash of each option's response, and the model's config has a fixed
repr. So the bytes depend on the engines only: which prompts land in which shard, the keys each
batch and step draws from, the rendered prompts, the principles, the rows' JSON, `meta.json`, the
revision clean-up counts and the `DONE-p<process>` markers, over two processes with a short last
batch. Only the character-level tokenizer of tests/testdata/tiny-chat is real.

`python -m tests.test_engine_golden` rewrites the golden file after an intended change.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import types
from pathlib import Path

import jax
import numpy as np
import pytest

from cai_jax.cai import feedback as fb
from cai_jax.cai import revisions as rev
from cai_jax.cai.constitution import default_constitution
from cai_jax.cai.feedback import run_feedback
from cai_jax.cai.feedback_settings import FeedbackSettings
from cai_jax.cai.judge import CallableJudge
from cai_jax.cai.prompts import Prompt
from cai_jax.cai.revisions import RevisionSettings, run_revisions

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "testdata" / "engine_golden.json"
PROCESSES = 2

REVISIONS = RevisionSettings(
    num_revisions=2,
    num_principles=5,
    mode="critique",
    num_few_shots=1,
    temperature=1.0,
    top_p=0.9,
    max_new_tokens=8,
    rendering="chat",
    seed=11,
    batch_size=2,
)
FEEDBACK = FeedbackSettings(
    rendering="raw",
    policy_rendering="chat",
    temperature=1.0,
    top_p=0.95,
    max_new_tokens=8,
    num_principles=6,
    ensemble=2,
    num_few_shots=1,
    swap=True,
    swap_average="logit",
    hard=False,
    clamp=None,
    cot=False,
    cot_samples=1,
    cot_max_new_tokens=8,
    cot_temperature=1.0,
    cot_stop_strings=("\n",),
    scoring_batch_size=4,
)


@dataclasses.dataclass(frozen=True)
class StandInConfig:
    max_position_embeddings: int = 100_000


def _h(*parts) -> int:
    return int(hashlib.sha256(repr(parts).encode()).hexdigest()[:8], 16)


def _key(rng) -> tuple[int, ...]:
    return tuple(np.asarray(jax.random.key_data(rng)).ravel().tolist())


def prompts() -> list[Prompt]:
    conversation = [
        {"role": "user", "content": "Earlier question?"},
        {"role": "assistant", "content": "Earlier answer."},
        {"role": "user", "content": "And how do I pick a lock?"},
    ]
    ps = [Prompt(f"g{i}", f"Golden question {i}: how do I {w}?", "golden") for i, w in enumerate("abcd")]
    return [*ps, Prompt("g4", "And how do I pick a lock?", "golden", meta={"messages": conversation})]


def stand_in_lm():
    from cai_jax.models import load_tokenizer

    return types.SimpleNamespace(
        tokenizer=load_tokenizer(str(ROOT / "tests" / "testdata" / "tiny-chat")),
        config=StandInConfig(),
        path="stand-in",
    )


def fake_generate_step(lm, texts, key, settings):
    """`revisions._generate_step`: a hash of (key, row, text), with a label or boilerplate to clean."""
    k = _key(key)
    head = ["", " Revision:", " Sure, here is a revised response:"]
    tail = ["", "\n\nHuman: more"]
    return [f"{head[_h(k, j) % 3]} s{_h(k, j, t) % 10**6}{tail[_h(j, k) % 2]}" for j, t in enumerate(texts)]


class _Out:
    def __init__(self, texts):
        self._texts = texts

    def texts(self, tokenizer):
        return list(self._texts)


def fake_generate(lm, prompt_ids, *, rng, **kwargs):
    """`sampling.generate`: " g<hash of key, row, ids>" per row (so it follows the rng)."""
    k = _key(rng)
    return _Out([f" g{_h(k, i, tuple(ids)) % 10**6}" for i, ids in enumerate(prompt_ids)])


def hashed_judge(questions):
    return [[-(_h(r, q.principle, q.text) % 1000) / 250.0 for r in q.responses] for q in questions]


def engine_files(tmp: Path, monkeypatch) -> dict[str, dict[str, str]]:
    """Runs both engines on every process into `tmp`; {engine: {file name: text}}."""
    monkeypatch.setattr(rev, "_generate_step", fake_generate_step)
    monkeypatch.setattr(fb, "generate", fake_generate)
    lm, constitution, ps = stand_in_lm(), default_constitution(), prompts()
    judge = CallableJudge(hashed_judge, "golden-judge")
    for p in range(PROCESSES):
        kw = dict(process_index=p, process_count=PROCESSES, progress=False)
        run_revisions(lm, ps, constitution, REVISIONS, tmp / "revisions", **kw)
        run_feedback(lm, judge, ps, constitution, tmp / "feedback", settings=FEEDBACK, seed=5, batch_size=2, **kw)
    return {
        e: {f.name: f.read_text(encoding="utf-8") for f in sorted((tmp / e).iterdir())}
        for e in ("revisions", "feedback")
    }


def test_engine_files_match_the_golden_bytes(tmp_path, monkeypatch):
    golden = json.loads(GOLDEN.read_text(encoding="utf-8"))
    files = engine_files(tmp_path, monkeypatch)
    for engine in ("revisions", "feedback"):
        assert sorted(files[engine]) == sorted(golden[engine]), engine
        for name, text in golden[engine].items():
            assert files[engine][name] == text, f"{engine}/{name} differs from {GOLDEN.name}"


if __name__ == "__main__":  # rewrite the golden file
    import tempfile

    with tempfile.TemporaryDirectory() as d, pytest.MonkeyPatch.context() as mp:
        out = engine_files(Path(d), mp)
    GOLDEN.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {GOLDEN}", file=sys.stderr)
