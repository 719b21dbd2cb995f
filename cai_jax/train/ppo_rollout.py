"""PPO on the fit loop: the rollout source and the update (Bai et al. 2022, sec. 4).

    source = RolloutSource(steps, ref_params, reward_fn, score_norm, cfg, stream=PromptStream(ids, ...), ...)
    update = functools.partial(update_on_rollout, update=steps.update, cfg=cfg, seed=seed)
    state = fit(source, update, state, ..., fetch_late=False, unit="iteration")   # train.fit

`RolloutSource.next(state, it)` is iteration `it`'s experience: `rollout_batch_size` prompts from
a seeded, resumable `PromptStream`; one response each from the KV-cache sampler under the
current policy params (key fold_in(state.rng, it), temperature from the config, stop at EOS);
raw scores from the PM (`pm_reward.PMReward`) or a `reward_fn(prompt_ids, response_ids,
lengths) -> [B]`, checked finite before anything trains on them; teacher-forced policy,
reference and value outputs; rewards = normalised score at the last token - beta * per-token
KL (optional missing-EOS penalty), GAE and whitening. Its position (`state()`) is the stream's
plus the KL coefficient beta, which the adaptive controller moves after each rollout, so a
resume continues both. `update_on_rollout` is the update: `ppo_epochs` passes, each in the order
default_rng([seed, it, epoch]), of minibatch updates (the jitted `ppo_steps.ppo_update`).

Each iteration's metrics row (`METRIC_NAMES`) joins the update's means and the rollout's
statistics; every `sample_every` iterations (and at the first) its first `num_samples_logged`
(prompt, response, score) rows are attached for `samples.jsonl`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from cai_jax.rl_losses import adaptive_kl_update
from cai_jax.sampling import STOP_EOS, generate
from cai_jax.sharding import allgather_rows, local_copy, process_shard, to_host
from cai_jax.text import encode_prompt
from cai_jax.train.fit import Step
from cai_jax.train.loop import EpochBatcher
from cai_jax.train.pm_reward import PMReward, chunks
from cai_jax.train.ppo_steps import PPOConfig
from cai_jax.train.state import TrainState

__all__ = ["METRIC_NAMES", "PromptStream", "layout", "Rollout", "RolloutSource", "Sampled", "update_on_rollout"]

RewardFn = Callable[[Sequence[Sequence[int]], np.ndarray, np.ndarray], np.ndarray]
METRIC_NAMES = (
    "objective/scores",  # mean raw reward (PM score or reward_fn output) of the rollout batch
    "objective/kl",  # mean over responses of the summed per-token KL estimate to the reference, nats
    "objective/entropy",  # mean per-token entropy of the rollout policy on its responses, nats
    "objective/rlhf_reward",  # mean over responses of sum_t R_t (normalised score - penalty - beta KL)
    "objective/kl_coef",  # beta used for this iteration's rewards
    "policy/approxkl",  # mean over updates of 0.5 E[(logp - old_logp)^2]
    "policy/clipfrac",  # fraction of tokens whose ratio was clipped, mean over updates
    "loss/policy",
    "loss/value",
    "val/clipfrac",
    "loss",  # total loss, mean over updates
    "grad_norm",
    "lr",
    "rollout/logprob_diff",  # max |sampler log-prob - teacher-forced log-prob| over response tokens
    "response/length_mean",  # generated tokens per response (EOS included)
    "response/no_eos_frac",  # fraction of responses cut at max_new_tokens
    "time/rollout",  # seconds sampling
    "time/scoring",  # seconds for PM / reward, teacher-forced forwards and advantages
    "time/train",  # seconds for the ppo_epochs of updates
)


class PromptStream(EpochBatcher):
    """Seeded epochs over the prompts in batches of indices (`EpochBatcher`: a partial batch is dropped)."""

    def __init__(self, prompts: Sequence[Sequence[int]], *, batch_size: int, seed: int = 0):
        if len(prompts) < batch_size:
            raise ValueError(f"{len(prompts)} prompts cannot fill one rollout batch of {batch_size}")
        self.prompts, self.batch_size, self.seed = list(prompts), int(batch_size), int(seed)
        self.epoch, self.index = 0, 0

    def _epoch_len(self, epoch: int) -> int:
        return len(self.prompts)

    def next(self) -> tuple[list[int], str]:
        """The prompt indices of the next batch and its id "epoch E index I"; advances the position."""
        rows, batch_id = self._next_items(len(self.prompts))
        return [int(i) for i in rows], batch_id


def layout(prompts, responses_BN, lengths_B, prompt_len: int, pad: int):
    """Rows of prompt (left-padded to `prompt_len`) + response (N): tokens, mask [B, P+N], resp_mask [B, N]."""
    b, n = responses_BN.shape
    tokens = np.full((b, prompt_len + n), pad, np.int32)
    mask = np.zeros((b, prompt_len + n), bool)
    resp_mask = np.arange(n)[None, :] < np.asarray(lengths_B)[:, None]
    for r, ids in enumerate(prompts):
        tokens[r, prompt_len - len(ids) : prompt_len] = ids
        mask[r, prompt_len - len(ids) : prompt_len] = True
    tokens[:, prompt_len:] = np.where(resp_mask, responses_BN, pad)
    mask[:, prompt_len:] = resp_mask
    return tokens, mask, resp_mask


def _encode_prompts(prompts, tokenizer, rendering: str | None) -> tuple[list[list[int]], list | None]:
    """(token ids, conversations or None) of the prompts: conversations are encoded with `encode_prompt`."""
    texts = [
        p for p in prompts if isinstance(p, (str, list)) and (isinstance(p, str) or (p and isinstance(p[0], dict)))
    ]
    if texts and len(texts) != len(prompts):
        raise ValueError("prompts must be all conversations or all token-id lists")
    if texts:
        if tokenizer is None or rendering is None:
            raise ValueError("text prompts need the policy's tokenizer and a rendering (chat | transcript)")
        ids = [encode_prompt(tokenizer, p, rendering) for p in prompts]
        return ids, list(prompts)
    ids = [[int(t) for t in (p.tolist() if hasattr(p, "tolist") else p)] for p in prompts]
    for i, p in enumerate(ids):
        if not p:
            raise ValueError(f"prompt {i} is empty")
    return ids, None


class Rollout(NamedTuple):
    """One iteration's experience: what `update_on_rollout` trains on."""

    batch: dict  # "tokens", "mask" [B, P+N]; "resp_mask", "old_logp", "old_values", "advantages", "returns" [B, N]
    stats: dict  # the rollout's metrics (scores, KL, entropy, lengths, kl_coef, times)
    iteration: int  # 0-based


class Sampled(NamedTuple):
    """One batch of responses, scored and teacher-forced (`RolloutSource.sample_and_score`)."""

    prompts: list  # the rows' prompt ids
    conversations: list | None  # the rows' prompt texts (None for token-id prompts)
    responses: np.ndarray  # [B, N] sampled ids
    lengths: np.ndarray  # [B] generated tokens (EOS included)
    sampler_logp: np.ndarray  # [B, N] the sampler's log-probs
    ended: np.ndarray  # [B] stopped at EOS
    tokens: np.ndarray  # [B, P+N] prompt + response layout
    mask: np.ndarray  # [B, P+N]
    resp_mask: np.ndarray  # [B, N]
    scores: np.ndarray  # [B] raw rewards
    forwards: dict  # `steps.forward`'s per-row outputs, concatenated ("logp", "ref_logp", ...)
    entropy: float  # mean per-token entropy of the sampling policy on the responses
    seconds_rollout: float  # sampling time
    started: float  # perf_counter at the start


class RolloutSource:
    """PPO's `fit.Source`: a `Rollout` per iteration (module docstring); position = stream + beta.

    Args:
      steps: `ppo._Steps` (the jitted `forward` and `advantages`).
      ref_params: the frozen reference's params, on the mesh (None under LoRA: the policy's base).
      reward_fn: a `PMReward` or a user `reward_fn(prompt_ids, response_ids, lengths) -> [B]`.
      score_norm: (mean, std) the raw scores are normalised by.
      cfg: the PPO config.
      stream: the encoded prompts (`PromptStream`, batches of `cfg.rollout_batch_size`).
      conversations: the prompts' texts, in the stream's order (None for token-id prompts).
      width: prompt columns P.
      pad: padding id.
      policy: the policy being trained (its model and tokenizer; params come from the state).
      sampler: `sampling.generate` or a stand-in with its signature (tests).
      merge: params["policy"] -> the plain params the sampler takes (`rl_lora.merged_policy`
        under LoRA); None: as they are.
    """

    def __init__(
        self,
        steps: Any,
        ref_params: Any,
        reward_fn: PMReward | RewardFn,
        score_norm: tuple,
        cfg: PPOConfig,
        *,
        stream: PromptStream,
        conversations: Sequence[Any] | None,
        width: int,
        pad: int,
        policy: Any,
        sampler: Callable = generate,
        merge: Callable | None = None,
    ):
        self.steps, self.ref_params, self.reward_fn, self.score_norm = steps, ref_params, reward_fn, score_norm
        self.cfg, self.stream, self.conversations = cfg, stream, conversations
        self.width, self.pad, self.policy, self.sampler = width, pad, policy, sampler
        self.merge = merge or (lambda p: p)
        self.beta = float(np.float32(cfg.kl_coef))
        self.iteration = 0

    def state(self) -> dict:
        return {**self.stream.state(), "kl_coef": self.beta, "iteration": self.iteration}

    def restore(self, data_state) -> None:
        self.stream.restore(data_state)
        self.beta = float(data_state["kl_coef"])
        self.iteration = int(data_state["iteration"])

    def sample_and_score(self, state: TrainState, it: int, rows: Sequence[int], batch_id: Any) -> Sampled:
        """Samples a response to each of the stream's prompts `rows` under `state.params`, scores them
        and runs the teacher-forced forwards (`steps.forward`, in micro-batches): what PPO's and
        RLOO's iterations share. Raises FloatingPointError on non-finite or malformed rewards."""
        cfg, policy = self.cfg, self.policy
        prompts_b = [self.stream.prompts[i] for i in rows]
        convs_b = None if self.conversations is None else [self.conversations[i] for i in rows]
        t0 = time.perf_counter()
        # Each process samples its share of the rows on its own devices (one process: all of them),
        # drawing as one process would (`row_offset`); every process then holds the whole batch.
        lo, hi = process_shard(len(prompts_b))
        out = self.sampler(
            policy,
            prompts_b[lo:hi],
            rng=jax.random.fold_in(local_copy(state.rng), it),
            params=local_copy(self.merge(state.params["policy"])),
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            stop_at_eos=True,
            batch_size=cfg.generation_batch_size or None,
            row_offset=lo,
        )
        mine = (out.tokens, out.lengths, out.logprobs, out.stop_reason)
        responses, lengths, sampler_logp, reason = allgather_rows([np.asarray(x) for x in mine])
        ended = reason == STOP_EOS
        t1 = time.perf_counter()

        tokens, mask, resp_mask = layout(prompts_b, responses, lengths, self.width, self.pad)
        if isinstance(self.reward_fn, PMReward):
            scores = self.reward_fn(convs_b, prompts_b, responses, lengths, ended)
        else:
            scores = self.reward_fn(prompts_b, responses, lengths)
        scores = np.asarray(scores, np.float32).reshape(-1)
        if scores.shape != (len(prompts_b),) or not np.all(np.isfinite(scores)):
            raise FloatingPointError(
                f"non-finite or malformed rewards at iteration {it + 1} (batch {batch_id}; got {scores.tolist()}); "
                "not trained on"
            )
        fwd = []
        for chunk, _ in chunks({"t": tokens, "m": mask, "r": resp_mask}, cfg.micro_batch_size):  # never padded
            out = self.steps.forward(state.params, self.ref_params, chunk["t"], chunk["m"], chunk["r"])
            fwd.append(to_host(out))
        entropy = sum(float(f["entropy_sum"]) for f in fwd) / max(sum(float(f["tokens"]) for f in fwd), 1.0)
        keys = [k for k in fwd[0] if k not in ("entropy_sum", "tokens")]
        return Sampled(
            prompts_b, convs_b, responses, lengths, sampler_logp, ended, tokens, mask, resp_mask, scores,
            {k: np.concatenate([f[k] for f in fwd]) for k in keys}, entropy, t1 - t0, t0,
        )  # fmt: skip

    def rollout_stats(self, s: Sampled, logp: np.ndarray, kl_sum, reward, beta: float) -> dict:
        """The metrics every RL objective's rollout reports (`METRIC_NAMES` minus the update's)."""
        return {
            "objective/scores": float(np.mean(s.scores)),
            "objective/kl": float(np.mean(kl_sum)),
            "objective/entropy": s.entropy,
            "objective/rlhf_reward": float(np.mean(reward)),
            "objective/kl_coef": beta,
            "rollout/logprob_diff": float(np.max(np.abs(s.sampler_logp - logp) * s.resp_mask)),
            "response/length_mean": float(np.mean(s.lengths)),
            "response/no_eos_frac": float(np.mean(~s.ended)),
            "time/rollout": s.seconds_rollout,
            "time/scoring": time.perf_counter() - s.started - s.seconds_rollout,
        }

    def next(self, state: TrainState, it: int) -> Step:
        """Iteration `it`'s rollout under `state.params`. Raises FloatingPointError on bad rewards."""
        cfg = self.cfg
        rows, batch_id = self.stream.next()
        s = self.sample_and_score(state, it, rows, batch_id)
        cat = s.forwards
        beta = self.beta
        adv = self.steps.advantages(
            s.scores, cat["logp"], cat["ref_logp"], cat["values"], s.resp_mask, s.ended, np.float32(beta),
            *self.score_norm,
        )  # fmt: skip
        adv = jax.device_get(adv)
        batch = {
            "tokens": s.tokens,
            "mask": s.mask,
            "resp_mask": s.resp_mask,
            "old_logp": cat["logp"],
            "old_values": cat["values"],
            "advantages": adv["advantages"],
            "returns": adv["returns"],
        }
        stats = self.rollout_stats(s, cat["logp"], adv["kl_sum"], adv["reward_sum"], beta)
        if cfg.adaptive_kl:
            kl = stats["objective/kl"]
            self.beta = float(adaptive_kl_update(beta, kl, cfg.kl_target, cfg.kl_horizon, cfg.rollout_batch_size))
        self.iteration = it + 1
        samples = []
        if cfg.sample_every and (it == 0 or (it + 1) % cfg.sample_every == 0):
            samples = self._samples(it, s, adv["kl_sum"])
        extra = {"iteration": it + 1, "batch_id": batch_id}
        return Step(Rollout(batch, stats, it), extra, {"samples": samples})

    def _samples(self, it: int, s: Sampled, kl_sum) -> list[dict]:
        """The first `num_samples_logged` rollouts as samples.jsonl rows (decoded when there is a tokenizer)."""
        tok = getattr(self.policy, "tokenizer", None)
        rows = []
        for i in range(min(self.cfg.num_samples_logged, len(s.prompts))):
            response = s.responses[i, : s.lengths[i]].tolist()
            prompt = s.prompts[i] if s.conversations is None else s.conversations[i]
            rows.append({
                "iteration": it + 1,
                "prompt": tok.decode(prompt) if tok is not None and s.conversations is None else prompt,
                "response": tok.decode(response, skip_special_tokens=True) if tok is not None else response,
                "score": float(s.scores[i]),
                "kl": float(kl_sum[i]),
                "ended": bool(s.ended[i]),
                "length": int(s.lengths[i]),
            })  # fmt: skip
        return rows


def update_on_rollout(state: TrainState, rollout: Rollout, *, update: Callable, cfg: PPOConfig, seed: int):
    """PPO's update on one rollout: `ppo_epochs` shuffled passes of minibatch `update`s (state donated).

    Returns:
      (state, metrics): the means over the updates of `ppo_update`'s metrics, the rollout's
      statistics and "time/train" (the updates are waited for, so it is their device time).
    """
    t0 = time.perf_counter()
    b, k = cfg.rollout_batch_size, cfg.minibatch_size // cfg.micro_batch_size
    updates = []
    for epoch in range(cfg.ppo_epochs):
        order = np.random.default_rng([seed, rollout.iteration, epoch]).permutation(b)
        for start in range(0, b, cfg.minibatch_size):
            idx = order[start : start + cfg.minibatch_size]
            mb = {name: v[idx].reshape(k, cfg.micro_batch_size, *v.shape[1:]) for name, v in rollout.batch.items()}
            state, metrics = update(state, mb)
            updates.append(metrics)
    updates = jax.device_get(updates)
    row = {name: float(np.mean([u[name] for u in updates])) for name in updates[0]}
    return state, {**row, **rollout.stats, "time/train": time.perf_counter() - t0}
