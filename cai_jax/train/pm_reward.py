"""PPO's reward: the preference model's score of a rollout, read exactly as PM training encoded it.

    reward = PMReward(pm, policy, rendering="chat")
    raw_B = reward(conversations, prompt_ids, response_ids_BN, lengths_B, ended_B)

Every rollout gets exactly `pm.score_texts([conversation], [decoded response])`: the PM reads the
same token layout it was trained on (`text.encode_exchange`, cut to the PM's `seq_len` by
`text.fit_exchange`), with its score at the end-of-turn token that closes the response. A response
cut at `max_new_tokens` is closed too, as the feedback stage's cut-off samples were closed in the
PM's training data (the PM has never read an open exchange); PPO's missing-EOS penalty, not the
PM, is what says that it did not end.

Two ways to build the PM's input rows, chosen once:

* the policy's own token ids, when the PM shares the policy's vocabulary and rendering (the
  usual case: both start from one checkpoint). The prompt ids are `encode_prompt` of the
  conversation, so prompt + response is the exchange; the stop token is replaced by the
  rendering's end-of-turn token (a sampler may stop on another end-of-turn id, SmolLM2's
  `<|endoftext|>` instead of `<|im_end|>`, that the PM never saw closing a turn), and a
  response cut off gets that token appended.
* re-encoding text otherwise (`retokenize=True`, a PM with another vocabulary or rendering): the
  response is decoded with the policy's tokenizer (its stop token dropped) and the (conversation,
  response) pair is encoded with the PM's own tokenizer and rendering, chat markers included.

A PM without a tokenizer (tiny test models) reads the policy's ids as they are.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cai_jax.models import ScalarModel
from cai_jax.sharding import (
    DEFAULT_RULES,
    batch_sharding,
    from_host,
    make_mesh,
    param_shardings,
    shard_params,
    to_host,
    with_rules,
)
from cai_jax.text import bucket_length, end_of_turn_id, fit_exchange

__all__ = ["PMReward", "same_vocabulary", "same_rendering", "chunks"]


def same_vocabulary(tok_a: Any, cfg_a: Any, tok_b: Any, cfg_b: Any) -> bool:
    """Whether token ids mean the same tokens: equal token -> id maps (or, with no tokenizers, sizes)."""
    if tok_a is None and tok_b is None:
        return cfg_a.vocab_size == cfg_b.vocab_size
    if tok_a is None or tok_b is None:
        return False
    return tok_a is tok_b or tok_a.get_vocab() == tok_b.get_vocab()


def same_rendering(a: str | None, b: str | None) -> bool:
    """Renderings equal up to the name "raw" for "transcript"; an unrecorded one (None) matches any."""
    norm = {"raw": "transcript"}
    return a is None or b is None or norm.get(a, a) == norm.get(b, b)


def chunks(arrays: dict, size: int):
    """Splits [B, ...] host arrays into row chunks of `size`, the last padded by repeating row 0."""
    b = len(next(iter(arrays.values())))
    for start in range(0, b, size):
        chunk = {k: v[start : start + size] for k, v in arrays.items()}
        short = size - len(next(iter(chunk.values())))
        if short:
            chunk = {k: np.concatenate([v, np.repeat(v[:1], short, 0)]) for k, v in chunk.items()}
        yield chunk, size - short


@functools.lru_cache(maxsize=4)
def _pm_scores(pm_cfg) -> Callable:
    """Jitted PM scores [B] at the last real token, one per PM config (compiled once per process)."""
    model = ScalarModel(pm_cfg)
    return jax.jit(lambda params, tokens, mask: model.apply({"params": params}, tokens, mask))


class PMReward:
    """Raw PM scores of rollouts (module docstring); rows are scored `batch_size` at a time.

    Args:
      pm: a `LoadedPM` (or anything with .params, .config, .tokenizer, .rendering, .seq_len).
      policy: the policy being trained (.tokenizer, .config).
      rendering: how the policy's prompts were encoded ("chat" | "transcript"; None for token-id
        prompts, which must already be laid out as the PM expects).
      retokenize: allow the text path; False makes a mismatch an error.
      batch_size: rows per PM call.
      mesh, rules: where the PM's params are placed.
    """

    def __init__(
        self,
        pm: Any,
        policy: Any,
        *,
        rendering: str,
        retokenize: bool = True,
        batch_size: int = 8,
        mesh=None,
        rules=None,
    ):
        self.pm, self.batch_size = pm, int(batch_size)
        self.policy_tokenizer = getattr(policy, "tokenizer", None)
        self.pm_tokenizer = getattr(pm, "tokenizer", None)
        self.pm_rendering = getattr(pm, "rendering", None)
        self.seq_len = getattr(pm, "seq_len", None) or pm.config.max_position_embeddings
        vocab = same_vocabulary(self.policy_tokenizer, policy.config, self.pm_tokenizer, pm.config)
        self.same = vocab and same_rendering(self.pm_rendering, rendering)
        if not self.same:
            if not retokenize:
                raise ValueError(
                    f"the PM reads another {'rendering' if vocab else 'vocabulary'} than the policy (PM rendering "
                    f"{self.pm_rendering!r}, policy {rendering!r}); set ppo.pm_retokenize=True to re-encode responses "
                    "as text for the PM, or use a PM trained on the policy's tokenizer and rendering"
                )
            if self.policy_tokenizer is None or self.pm_tokenizer is None or self.pm_rendering is None:
                raise ValueError(
                    "re-encoding responses for the PM needs the policy's tokenizer and the PM's tokenizer and "
                    "rendering (a PM folder of pm.json version 2)"
                )
        tokenizer = self.pm_tokenizer if self.pm_tokenizer is not None else self.policy_tokenizer
        self.end_id = None
        if self.same and tokenizer is not None and (self.pm_rendering or rendering):
            self.end_id = end_of_turn_id(tokenizer, self.pm_rendering or rendering)
        self.pad = int(pm.config.pad_token_id or 0)
        self._mesh, self._rules = mesh or make_mesh(), rules or DEFAULT_RULES
        sample = jax.ShapeDtypeStruct((self.batch_size, 16), jnp.int32)
        self.params = shard_params(pm.params, param_shardings(ScalarModel(pm.config), sample, self._mesh, self._rules))
        self._fn = _pm_scores(pm.config)

    def sequences(self, conversations, prompt_ids, response_ids, lengths, ended) -> list[list[int]]:
        """The PM's input token ids for each rollout (see the module docstring)."""
        response_ids, lengths, ended = np.asarray(response_ids), np.asarray(lengths), np.asarray(ended, bool)
        out = []
        for r, (ids, n) in enumerate(zip(prompt_ids, lengths)):
            tail = response_ids[r, :n].tolist()
            if self.same:
                if self.end_id is not None:
                    tail = (tail[:-1] if ended[r] else tail) + [self.end_id]
                out.append(fit_exchange(ids, tail, self.seq_len)[0])
            else:
                if conversations is None:
                    raise ValueError("re-encoding responses for the PM needs the prompts as text (conversations)")
                text = self.policy_tokenizer.decode(tail[:-1] if ended[r] else tail, skip_special_tokens=True)
                out.append(self.pm.encode(conversations[r], text))
        return out

    def rows(self, conversations, prompt_ids, response_ids, lengths, ended) -> tuple[np.ndarray, np.ndarray]:
        """Right-padded (tokens, mask) [B, L] of `sequences`, L bucketed to a multiple of 16."""
        seqs = self.sequences(conversations, prompt_ids, response_ids, lengths, ended)
        width = bucket_length(max(map(len, seqs)), 16)
        tokens = np.full((len(seqs), width), self.pad, np.int32)
        mask = np.zeros((len(seqs), width), bool)
        for r, s in enumerate(seqs):
            tokens[r, : len(s)], mask[r, : len(s)] = s, True
        return tokens, mask

    def __call__(
        self,
        conversations: Sequence[Any] | None,
        prompt_ids: Sequence[Sequence[int]],
        response_ids,
        lengths,
        ended,
    ) -> np.ndarray:
        """Raw scores float32 [B]."""
        tokens, mask = self.rows(conversations, prompt_ids, response_ids, lengths, ended)
        out = []
        with with_rules(self._mesh, self._rules):
            for chunk, n in chunks({"t": tokens, "m": mask}, self.batch_size):
                rows = from_host((chunk["t"], chunk["m"]), batch_sharding(self._mesh))  # several processes: split
                out.append(to_host(self._fn(self.params, *rows))[:n])
        return np.concatenate(out).astype(np.float32)
