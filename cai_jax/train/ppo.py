"""The RL-CAI PPO loop (Bai et al. 2022, sec. 4): rollouts, PM rewards, clipped updates, exact resume.

    state = train_ppo(policy, reference, pm, ["How do I ...?", ...], ppo_cfg=cfg.ppo, optim_cfg=optim,
                      num_iterations=100, seed=0, workdir=f"{workdir}/ppo", rendering="chat")

One iteration: take `rollout_batch_size` prompts from a seeded, resumable stream; sample one
response each with the KV-cache sampler under the current policy (temperature from the config,
stop at EOS); score the prompt + response with the preference model (or any
`reward_fn(prompt_ids, response_ids, lengths) -> [B]`); compute teacher-forced policy, reference
and value outputs; rewards = normalised score at the last token - beta * per-token KL, optional
missing-EOS penalty; GAE; `ppo_epochs` shuffled passes of minibatch updates; optionally adapt beta.

Writes `workdir/metrics.jsonl` (one row per iteration, see `METRIC_NAMES`), `workdir/samples.jsonl`
(prompt, response, score every `sample_every` iterations and at the first) and checkpoints holding
the train state (policy + value params, optimizer state, rng) and, as JSON, the prompt-stream
position and the KL coefficient. Called again with the same arguments it resumes from the latest
checkpoint and reproduces the uninterrupted run exactly: every random draw derives from the seed
and the iteration number (sampler key fold_in(rng, iteration), minibatch order
default_rng([seed, iteration, epoch])).

Prompts are conversations (a string is one user turn) encoded with `text.encode_prompt` in the
policy's `rendering`, or token-id lists when a `reward_fn` scores the rollouts. The PM reward is
`pm_reward.PMReward`: every rollout gets exactly `pm.score_texts([prompt], [response])` of its
decoded response, whatever the PM's vocabulary (see there). A value model
initialised from the PM (`value_init="pm"`) gets the PM's backbone and its head rescaled to reward
units, kernel / std and (bias - mean) / std, so V starts at the normalised score the returns are
built from; it reads the policy's token ids, so it needs the PM's vocabulary.

Single-process only (the sampler runs on the local devices); the train steps are sharded over the
mesh of `mesh_cfg` like the SFT and PM steps.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cai_jax.checkpoints.train_state import CheckpointConfig, Checkpointer
from cai_jax.losses import adaptive_kl_update
from cai_jax.models import ScalarModel, Transformer
from cai_jax.sampling import STOP_EOS, generate
from cai_jax.sharding import (
    BATCH_AXES,
    DEFAULT_RULES,
    MeshConfig,
    Rules,
    batch_sharding,
    make_mesh,
    param_shardings,
    shard_params,
    with_rules,
)
from cai_jax.text import bucket_length, encode_prompt
from cai_jax.train.loop import MetricsLogger, jit_train_step, state_shardings
from cai_jax.train.pm_reward import PMReward, chunks, same_vocabulary
from cai_jax.train.ppo_steps import PPOConfig, compute_advantages, ppo_update, rollout_forward
from cai_jax.train.sft import export_params
from cai_jax.train.state import OptimConfig, TrainState, make_optimizer

__all__ = ["PPOConfig", "PromptStream", "PMReward", "same_vocabulary", "train_ppo", "value_head_params", "METRIC_NAMES"]

log = logging.getLogger(__name__)

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


class PromptStream:
    """Seeded epochs over the prompts in batches; the position is JSON (saved with checkpoints).

    Epoch e visits `default_rng([seed, e]).permutation(n)`; a final partial batch is dropped.
    """

    def __init__(self, prompts: Sequence[Sequence[int]], *, batch_size: int, seed: int = 0):
        if len(prompts) < batch_size:
            raise ValueError(f"{len(prompts)} prompts cannot fill one rollout batch of {batch_size}")
        self.prompts, self.batch_size, self.seed = list(prompts), int(batch_size), int(seed)
        self.epoch, self.index = 0, 0

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

    def restore(self, data_state: dict) -> None:
        if int(data_state["seed"]) != self.seed:
            raise ValueError(f"checkpoint prompt seed {data_state['seed']} differs from this run's seed {self.seed}")
        self.epoch, self.index = int(data_state["epoch"]), int(data_state["index"])

    def next(self) -> tuple[list[int], str]:
        """The prompt indices of the next batch and its id "epoch E index I"; advances the position."""
        if self.index + self.batch_size > len(self.prompts):
            self.epoch, self.index = self.epoch + 1, 0
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.prompts))
        rows = order[self.index : self.index + self.batch_size]
        batch_id = f"epoch {self.epoch} index {self.index}"
        self.index += self.batch_size
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


def value_head_params(head: dict, reward_mean: float, reward_std: float) -> dict:
    """A PM's score head in reward units: kernel / std, (bias - mean) / std (V = normalised score)."""
    kernel, bias = jnp.asarray(head["kernel"]), jnp.asarray(head["bias"])
    std = jnp.asarray(reward_std, kernel.dtype)
    return {"kernel": kernel / std, "bias": (bias - jnp.asarray(reward_mean, bias.dtype)) / std}


def _fresh_head(cfg, key) -> dict:
    """A value head initialised like `ScalarModel`'s: kernel N(0, 1e-3^2), bias 0."""
    kernel = 1e-3 * jax.random.normal(key, (cfg.hidden_size, 1), jnp.float32)
    return {"kernel": kernel.astype(cfg.jnp_param_dtype), "bias": jnp.zeros((1,), cfg.jnp_param_dtype)}


class _Steps(NamedTuple):
    shardings: TrainState  # NamedShardings of the train state
    ref_shardings: Any
    create: Callable  # (params, rng) -> TrainState, placed on `shardings`
    forward: Callable  # rollout_forward, jitted
    advantages: Callable  # compute_advantages, jitted
    update: Callable  # ppo_update, jitted with the state donated


@functools.lru_cache(maxsize=8)
def _build(policy_cfg, ref_cfg, value_cfg, cfg: PPOConfig, ocfg: OptimConfig, mesh, rules, width: int) -> _Steps:
    """Shardings and jitted steps for one setup, cached so repeated runs in a process compile once."""
    policy_model, ref_model = Transformer(policy_cfg), Transformer(ref_cfg)
    value_model = None if cfg.shared_backbone else ScalarModel(value_cfg)
    sample = jax.ShapeDtypeStruct((cfg.micro_batch_size, width + cfg.max_new_tokens), jnp.int32)
    value_sh = param_shardings(ScalarModel(value_cfg), sample, mesh, rules)
    p_shardings = {
        "policy": param_shardings(policy_model, sample, mesh, rules),
        "value": {"head": value_sh["head"]} if cfg.shared_backbone else value_sh,
    }
    abstract = {
        "policy": jax.eval_shape(lambda: nn.meta.unbox(policy_model.init(jax.random.key(0), sample)["params"])),
        "value": jax.eval_shape(
            lambda: nn.meta.unbox(ScalarModel(value_cfg).init(jax.random.key(0), sample)["params"])
        ),
    }
    if cfg.shared_backbone:
        abstract["value"] = {"head": abstract["value"]["head"]}
    optimizer = make_optimizer(ocfg, abstract)

    def create(params, rng):
        return TrainState.create(params, optimizer, rng)

    shardings = state_shardings(jax.eval_shape(create, abstract, jax.random.key(0)), p_shardings, mesh)
    rows_sh = batch_sharding(mesh)
    models = dict(policy_model=policy_model, value_model=value_model, cfg=cfg)
    forward = jax.jit(
        functools.partial(rollout_forward, ref_model=ref_model, **models),
        in_shardings=(shardings.params, None, rows_sh, rows_sh, rows_sh),
    )

    def forward_in_mesh(*args):
        with with_rules(mesh, rules):
            return forward(*args)

    forward_in_mesh.jitted = forward  # for .lower() (experiments/plan.py), like jit_train_step's

    update = jit_train_step(
        functools.partial(ppo_update, optimizer=optimizer, **models),
        shardings,
        NamedSharding(mesh, P(None, BATCH_AXES)),
        mesh,
        rules,
    )
    return _Steps(
        shardings=shardings,
        ref_shardings=param_shardings(ref_model, sample, mesh, rules),
        create=jax.jit(create, out_shardings=shardings),
        forward=forward_in_mesh,
        advantages=jax.jit(functools.partial(compute_advantages, cfg=cfg)),
        update=update,
    )


def _copy(tree):
    return jax.tree.map(lambda x: np.array(x, copy=True), jax.device_get(tree))


def train_ppo(
    policy: Any,
    reference: Any,
    pm: Any,
    prompts: Sequence[Sequence[int] | str],
    *,
    ppo_cfg: PPOConfig | Any,
    optim_cfg: OptimConfig | Any,
    ckpt_cfg: CheckpointConfig | None | bool = None,
    mesh_cfg: Any = None,
    num_iterations: int,
    seed: int = 0,
    workdir: str | os.PathLike,
    export_dir: str | os.PathLike | None = None,
    reward_fn: RewardFn | None = None,
    rendering: str | None = None,
    rules: Rules = DEFAULT_RULES,
) -> TrainState:
    """Trains `policy` with PPO against `pm` (or `reward_fn`) for `num_iterations` iterations in total.

    Args:
      policy: LoadedModel-like (.model, .params, .tokenizer, .config): the SL-CAI model to train.
      reference: LoadedModel-like, frozen (usually the same SL-CAI model).
      pm: LoadedPM-like (.model, .params {"backbone", "head"}, .tokenizer, .config, .reward_mean,
        .reward_std, .rendering, .seq_len), or None when `reward_fn` is given.
      prompts: conversations (a string: one user turn; or a message list ending with a user
        turn), encoded with `text.encode_prompt(policy.tokenizer, prompt, rendering)`; or token-id
        lists (with `reward_fn`, or a PM that reads the policy's ids as they are).
      ppo_cfg: `PPOConfig` or its config dict.
      optim_cfg: `OptimConfig` or its config dict (one optimizer for policy + value; a step is one
        minibatch update; `grad_accum_steps` must be 1: accumulation is `ppo_cfg.micro_batch_size`).
      ckpt_cfg: where and how often (in iterations) to save; default `workdir/checkpoints`, saving
        only the end; False saves nothing (benchmarks).
      mesh_cfg: mesh sizes (default: all devices on the data axis).
      num_iterations: PPO iterations (rollout batch + updates), counting resumed ones.
      seed: prompt order, value-head init and the sampling / state rng.
      workdir: folder for metrics.jsonl and samples.jsonl (appended to across resumes).
      export_dir: if given, the final policy is written there as an HF-format folder.
      reward_fn: `reward_fn(prompt_ids, response_ids [B, N], lengths [B]) -> [B]` raw rewards,
        used instead of a PM (normalised with mean 0 / std 1).
      rendering: how text prompts are rendered for the policy ("chat" | "transcript").
      rules: logical-axis rules.

    Returns:
      The final train state, params {"policy", "value"}.

    Raises:
      FloatingPointError: a non-finite reward or loss, naming the iteration; the latest checkpoint
        is the last one saved before it.
    """
    cfg = ppo_cfg if isinstance(ppo_cfg, PPOConfig) else PPOConfig.from_config(ppo_cfg)
    ocfg = optim_cfg if isinstance(optim_cfg, OptimConfig) else OptimConfig.from_config(optim_cfg)
    if ocfg.grad_accum_steps != 1:
        raise ValueError("PPO accumulates gradients over micro-batches itself: set optim.grad_accum_steps=1")
    if (pm is None) == (reward_fn is None):
        raise ValueError("train_ppo: pass exactly one of pm and reward_fn")
    if jax.process_count() > 1:
        raise NotImplementedError("train_ppo runs in a single process (the sampler uses the local devices)")
    if pm is None and cfg.value_init == "pm":
        raise ValueError("value_init='pm' needs a PM; with reward_fn set ppo.value_init='policy'")
    tokenizer = getattr(policy, "tokenizer", None)
    if cfg.value_init == "pm" and not same_vocabulary(tokenizer, policy.config, pm.tokenizer, pm.config):
        raise ValueError("value_init='pm' needs a PM with the policy's vocabulary (it reads the policy's token ids)")
    if pm is not None and (pm.reward_mean is None or not pm.reward_std):
        raise ValueError(
            f"the PM has no reward statistics (reward_mean={pm.reward_mean}, reward_std={pm.reward_std}); PPO's "
            "rewards are normalised PM scores: export the PM with them (train_pm computes them)"
        )
    workdir = os.fspath(workdir)
    if ckpt_cfg is None:
        ckpt_cfg = CheckpointConfig(os.path.join(workdir, "checkpoints"), save_every_steps=max(num_iterations, 1))
    prompt_ids, conversations = _encode_prompts(prompts, tokenizer, rendering)
    n, micro = cfg.max_new_tokens, cfg.micro_batch_size
    width = bucket_length(max(map(len, prompt_ids)), 16)
    context = min(policy.config.max_position_embeddings, reference.config.max_position_embeddings)
    if width + n > context:
        raise ValueError(f"prompts padded to {width} tokens + max_new_tokens={n} exceed the context of {context}")
    stream = PromptStream(prompt_ids, batch_size=cfg.rollout_batch_size, seed=seed)

    mesh = make_mesh(MeshConfig() if mesh_cfg is None else mesh_cfg)
    rules = tuple((name, tuple(a) if isinstance(a, list) else a) for name, a in rules)
    if pm is not None:  # checks the vocabularies before anything compiles
        reward_fn = PMReward(
            pm, policy, rendering=rendering, retokenize=cfg.pm_retokenize, batch_size=micro, mesh=mesh,
            rules=rules,
        )  # fmt: skip
        score_norm = (np.float32(pm.reward_mean), np.float32(pm.reward_std))
    else:
        score_norm = (np.float32(0.0), np.float32(1.0))
    value_cfg = pm.config if cfg.value_init == "pm" else policy.config
    steps = _build(policy.config, reference.config, value_cfg, cfg, ocfg, mesh, rules, width)
    head = _fresh_head(value_cfg, jax.random.fold_in(jax.random.key(seed), 1))
    if cfg.value_init == "pm":
        value_params = {
            "backbone": pm.params["backbone"],
            "head": value_head_params(pm.params["head"], pm.reward_mean, pm.reward_std),
        }
    else:
        value_params = {"head": head} if cfg.shared_backbone else {"backbone": policy.params, "head": head}
    params = shard_params(_copy({"policy": policy.params, "value": value_params}), steps.shardings.params)
    ref_params = shard_params(reference.params, steps.ref_shardings)
    state = steps.create(params, jax.random.key(seed))
    del params
    shardings = steps.shardings
    run = _Run(steps, ref_params, reward_fn, score_norm, cfg, width, int(policy.config.pad_token_id or 0), seed, policy)

    ckpt = _NoCheckpoints() if ckpt_cfg is False else Checkpointer(ckpt_cfg)
    logger = MetricsLogger(os.path.join(workdir, "metrics.jsonl"), check=False)
    beta = float(np.float32(cfg.kl_coef))
    try:
        if ckpt.latest_step() is not None:
            target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
            state, data_state = ckpt.restore(target=target)
            stream.restore(data_state)
            beta = float(data_state["kl_coef"])
            log.info("PPO: resumed from iteration %d (%s)", ckpt.latest_step(), data_state)
        start = ckpt.latest_step() or 0
        for it in range(start, int(num_iterations)):
            rows, batch_id = stream.next()
            convs_b = None if conversations is None else [conversations[i] for i in rows]
            state, row, samples = _iteration(run, it, state, [prompt_ids[i] for i in rows], convs_b, beta, ckpt)
            row["objective/kl_coef"] = beta
            if cfg.adaptive_kl:
                kl = row["objective/kl"]
                beta = float(adaptive_kl_update(beta, kl, cfg.kl_target, cfg.kl_horizon, cfg.rollout_batch_size))
            logger.push(it + 1, row, {"iteration": it + 1, "batch_id": batch_id})
            logger.flush()
            if cfg.sample_every and (it == 0 or (it + 1) % cfg.sample_every == 0):
                _dump_samples(os.path.join(workdir, "samples.jsonl"), it + 1, samples)
            data_state = {**stream.state(), "kl_coef": beta, "iteration": it + 1}
            ckpt.save(it + 1, state, data_state, force=it + 1 == num_iterations)
        ckpt.wait()
    finally:
        logger.close()
        ckpt.close()
    if export_dir is not None:
        export_params(state.params["policy"], policy.config, export_dir, tokenizer)
    return state


class _Run(NamedTuple):
    """What every iteration of one `train_ppo` call shares."""

    steps: _Steps
    ref_params: Any
    reward_fn: Any  # PMReward or a user reward_fn
    score_norm: tuple  # (mean, std) of the raw scores
    cfg: PPOConfig
    width: int  # prompt columns P
    pad: int
    seed: int
    policy: Any


def _iteration(run: _Run, it, state, prompts_b, convs_b, beta, ckpt):
    """One PPO iteration; returns (state, metrics row, sample rows). Raises on non-finite values."""
    steps, cfg, policy = run.steps, run.cfg, run.policy
    t0 = time.perf_counter()
    out = generate(
        policy,
        prompts_b,
        rng=jax.random.fold_in(state.rng, it),
        params=state.params["policy"],
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        stop_at_eos=True,
        batch_size=cfg.generation_batch_size or None,
    )
    responses, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    sampler_logp, ended = np.asarray(out.logprobs), out.stop_reason == STOP_EOS
    t1 = time.perf_counter()

    tokens, mask, resp_mask = layout(prompts_b, responses, lengths, run.width, run.pad)
    if isinstance(run.reward_fn, PMReward):
        scores = run.reward_fn(convs_b, prompts_b, responses, lengths, ended)
    else:
        scores = run.reward_fn(prompts_b, responses, lengths)
    scores = np.asarray(scores, np.float32).reshape(-1)
    if scores.shape != (len(prompts_b),) or not np.all(np.isfinite(scores)):
        ckpt.wait()
        raise FloatingPointError(
            f"non-finite or malformed rewards at iteration {it + 1} (got {scores.tolist()}); not trained on. "
            f"Last good checkpoint: {_last(ckpt)}"
        )
    fwd = []
    for chunk, _ in chunks({"t": tokens, "m": mask, "r": resp_mask}, cfg.micro_batch_size):  # never padded
        fwd.append(jax.device_get(steps.forward(state.params, run.ref_params, chunk["t"], chunk["m"], chunk["r"])))
    cat = {k: np.concatenate([f[k] for f in fwd]) for k in ("logp", "ref_logp", "values")}
    entropy = sum(float(f["entropy_sum"]) for f in fwd) / max(sum(float(f["tokens"]) for f in fwd), 1.0)
    adv = jax.device_get(
        steps.advantages(
            scores, cat["logp"], cat["ref_logp"], cat["values"], resp_mask, ended, np.float32(beta), *run.score_norm
        )
    )
    t2 = time.perf_counter()

    batch = {
        "tokens": tokens,
        "mask": mask,
        "resp_mask": resp_mask,
        "old_logp": cat["logp"],
        "old_values": cat["values"],
        "advantages": adv["advantages"],
        "returns": adv["returns"],
    }
    b, k = cfg.rollout_batch_size, cfg.minibatch_size // cfg.micro_batch_size
    updates = []
    for epoch in range(cfg.ppo_epochs):
        order = np.random.default_rng([run.seed, it, epoch]).permutation(b)
        for start in range(0, b, cfg.minibatch_size):
            idx = order[start : start + cfg.minibatch_size]
            mb = {name: v[idx].reshape(k, cfg.micro_batch_size, *v.shape[1:]) for name, v in batch.items()}
            state, metrics = steps.update(state, mb)
            updates.append(metrics)
    updates = jax.device_get(updates)
    t3 = time.perf_counter()

    row = {name: float(np.mean([u[name] for u in updates])) for name in updates[0]}
    for name in ("loss", "grad_norm"):
        if not all(math.isfinite(float(u[name])) for u in updates):
            ckpt.wait()
            raise FloatingPointError(
                f"non-finite {name} at iteration {it + 1}; not saved. Last good checkpoint: {_last(ckpt)}"
            )
    row.update({
        "objective/scores": float(np.mean(scores)),
        "objective/kl": float(np.mean(adv["kl_sum"])),
        "objective/entropy": entropy,
        "objective/rlhf_reward": float(np.mean(adv["reward_sum"])),
        "rollout/logprob_diff": float(np.max(np.abs(sampler_logp - cat["logp"]) * resp_mask)),
        "response/length_mean": float(np.mean(lengths)),
        "response/no_eos_frac": float(np.mean(~ended)),
        "time/rollout": t1 - t0,
        "time/scoring": t2 - t1,
        "time/train": t3 - t2,
    })  # fmt: skip
    tok = getattr(policy, "tokenizer", None)
    samples = []
    for i in range(min(cfg.num_samples_logged, len(prompts_b))):
        response = responses[i, : lengths[i]].tolist()
        prompt = prompts_b[i] if convs_b is None else convs_b[i]
        samples.append({
            "prompt": tok.decode(prompt) if tok is not None and convs_b is None else prompt,
            "response": tok.decode(response, skip_special_tokens=True) if tok is not None else response,
            "score": float(scores[i]),
            "kl": float(adv["kl_sum"][i]),
            "ended": bool(ended[i]),
            "length": int(lengths[i]),
        })  # fmt: skip
    return state, row, samples


class _NoCheckpoints:
    """Stands in for a `Checkpointer` when checkpointing is off."""

    directory = "(checkpointing disabled)"

    def latest_step(self):
        return None

    def save(self, *args, **kwargs) -> bool:
        return False

    def wait(self) -> None:
        pass

    close = wait


def _last(ckpt: Checkpointer) -> str:
    last = ckpt.latest_step()
    return f"iteration {last} in {ckpt.directory}" if last is not None else f"none yet in {ckpt.directory}"


def _dump_samples(path: str, iteration: int, samples: list[dict]) -> None:
    if jax.process_index() != 0:
        return
    with open(path, "a") as f:
        for s in samples:
            f.write(json.dumps({"iteration": iteration, **s}, ensure_ascii=False) + "\n")
