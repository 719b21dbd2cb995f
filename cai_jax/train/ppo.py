"""The RL-CAI PPO trainer (Bai et al. 2022, sec. 4): rollouts, PM rewards, clipped updates, exact resume.

    state = train_ppo(policy, reference, pm, ["How do I ...?", ...], ppo_cfg=cfg.ppo, optim_cfg=optim,
                      num_iterations=100, seed=0, workdir=f"{workdir}/ppo", rendering="chat",
                      export_at={1: f"{workdir}/ppo/snapshots/iter_1"})

PPO is a rollout source plus an update on the one fit loop (`train.fit.fit`, one step = one
iteration): `ppo_rollout.RolloutSource` samples a response per prompt with the current policy,
scores it with the preference model (or any `reward_fn(prompt_ids, response_ids, lengths) ->
[B]`), runs the teacher-forced policy / reference / value forwards and computes the advantages;
`ppo_rollout.update_on_rollout` runs `ppo_epochs` shuffled passes of minibatch updates. This module
checks the inputs, builds the jitted steps and the initial state, and wires them to the loop.

Writes `workdir/metrics.jsonl` (one row per iteration, see `METRIC_NAMES`), `workdir/samples.jsonl`
(prompt, response, score every `sample_every` iterations and at the first) and checkpoints holding
the train state (policy + value params, optimizer state, rng) and, as JSON, the prompt-stream
position and the KL coefficient. Called again with the same arguments it resumes from the latest
checkpoint and reproduces the uninterrupted run exactly, files included (the logs are cut back to
the restored iteration): every random draw derives from the seed and the iteration number
(sampler key fold_in(rng, iteration), minibatch order default_rng([seed, iteration, epoch])).
`export_at={k: folder}` exports the policy after iteration k in the same call (the checkpoint is
forced there), so snapshots need no restarts; on resume, a snapshot without its completion marker
(`checkpoints.hf.EXPORT_MARKER`: cut mid-write) is exported again from its iteration's checkpoint;
`export_dir` gets the final policy.

Prompts are conversations (a string is one user turn) encoded with `text.encode_prompt` in the
policy's `rendering`, or token-id lists when a `reward_fn` scores the rollouts. The PM reward is
`pm_reward.PMReward`: every rollout gets exactly `pm.score_texts([prompt], [response])` of its
decoded response, whatever the PM's vocabulary (see there). A value model
initialised from the PM (`value_init="pm"`) gets the PM's backbone and its head rescaled to reward
units, kernel / std and (bias - mean) / std, so V starts at the normalised score the returns are
built from; it reads the policy's token ids, so it needs the PM's vocabulary.

Across processes (`jax.distributed`, every process calling `train_ppo` with the same arguments):
each process samples its equal share of the rollout rows on its own devices, from a local copy of
the policy params and with the row keys one process would use (`sampling.generate(row_offset=)`),
and the shares are gathered so every process holds the whole batch on the host; the PM scores,
the teacher-forced forwards and the updates then run on the global mesh of `mesh_cfg` (each
process placing its shards of the host batch, `sharding.from_host`), like the SFT and PM steps.
So two processes draw, score and train what one process would, up to reduction order
(tests/test_multiprocess.py). Process 0 writes the logs and exports; checkpoints are orbax's.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cai_jax.checkpoints.train_state import CheckpointConfig
from cai_jax.models import ScalarModel, Transformer
from cai_jax.nn.lora import LoRAConfig
from cai_jax.sampling import generate
from cai_jax.sharding import (
    BATCH_AXES,
    DEFAULT_RULES,
    Rules,
    batch_sharding,
    from_host,
    param_shardings,
    shard_params,
    with_rules,
)
from cai_jax.train.loop import jit_train_step, state_shardings
from cai_jax.train.pm_reward import PMReward, same_vocabulary
from cai_jax.train.ppo_rollout import (
    METRIC_NAMES,
    PromptStream,
    RewardFn,
    RolloutSource,
    layout,
    update_on_rollout,
)
from cai_jax.train.ppo_steps import PPOConfig, compute_advantages, ppo_update, rollout_forward
from cai_jax.train.rl_common import policy_export, run_iterations, setup_rollouts
from cai_jax.train.rl_lora import check_reference, lora_build, lora_state, merged_policy
from cai_jax.train.state import OptimConfig, TrainState, make_optimizer

__all__ = [
    "PPOConfig",
    "PromptStream",
    "PMReward",
    "same_vocabulary",
    "layout",
    "train_ppo",
    "value_head_params",
    "METRIC_NAMES",
]


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
def _build(
    policy_cfg, ref_cfg, value_cfg, cfg: PPOConfig, ocfg: OptimConfig, mesh, rules, width: int, lora: LoRAConfig | None
) -> _Steps:
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
    # Under LoRA: bases stored once and frozen, adapters trained (train/rl_lora.py).
    abstract, p_shardings, ocfg = lora_build(
        abstract, p_shardings, ocfg, policy_cfg, value_cfg, lora, mesh, rules,
        value_from_policy=cfg.value_init == "policy",
    )  # fmt: skip
    optimizer = make_optimizer(ocfg, abstract)

    def create(params, rng):
        return TrainState.create(params, optimizer, rng)

    shardings = state_shardings(jax.eval_shape(create, abstract, jax.random.key(0)), p_shardings, mesh)
    rows_sh = batch_sharding(mesh)
    models = dict(policy_model=policy_model, value_model=value_model, cfg=cfg, lora=lora)
    forward = jax.jit(
        functools.partial(rollout_forward, ref_model=ref_model, **models),
        in_shardings=(shardings.params, None, rows_sh, rows_sh, rows_sh),
    )

    def forward_in_mesh(params, ref_params, *rows):  # rows: host arrays every process holds whole
        with with_rules(mesh, rules):
            return forward(params, ref_params, *from_host(rows, rows_sh))

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
    export_at: Mapping[int, str | os.PathLike] | None = None,
    reward_fn: RewardFn | None = None,
    rendering: str | None = None,
    rules: Rules = DEFAULT_RULES,
    lora: LoRAConfig | None = None,
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
      workdir: folder for metrics.jsonl and samples.jsonl (on resume, cut back to the restored
        iteration, then appended to).
      export_dir: if given, the final policy is written there as an HF-format folder.
      export_at: {iteration: folder}: the policy after that iteration, exported during this call
        as an HF-format folder (a checkpoint is forced there; an iteration at or before the
        restored checkpoint was exported by the run that saved it).
      reward_fn: `reward_fn(prompt_ids, response_ids [B, N], lengths [B]) -> [B]` raw rewards,
        used instead of a PM (normalised with mean 0 / std 1).
      rendering: how text prompts are rendered for the policy ("chat" | "transcript").
      rules: logical-axis rules.
      lora: train LoRA adapters only (`train.rl_lora`): the policy's weights are stored once as
        the frozen base of the policy, of the reference (which must then be `policy` itself) and
        of a value_init="policy" value model; exports are merged HF folders with the adapters
        alone in PEFT's layout in their `adapter/` subfolder.

    Returns:
      The final train state, params {"policy", "value"} (under LoRA as `rl_lora.lora_state`).

    Raises:
      FloatingPointError: a non-finite reward or loss, naming the iteration; the latest checkpoint
        is the last one saved before it.
    """
    cfg = ppo_cfg if isinstance(ppo_cfg, PPOConfig) else PPOConfig.from_config(ppo_cfg)
    ocfg = optim_cfg if isinstance(optim_cfg, OptimConfig) else OptimConfig.from_config(optim_cfg)
    if pm is None and reward_fn is not None and cfg.value_init == "pm":
        raise ValueError("value_init='pm' needs a PM; with reward_fn set ppo.value_init='policy'")
    tokenizer = getattr(policy, "tokenizer", None)
    if (
        pm is not None
        and cfg.value_init == "pm"
        and not same_vocabulary(tokenizer, policy.config, pm.tokenizer, pm.config)
    ):
        raise ValueError("value_init='pm' needs a PM with the policy's vocabulary (it reads the policy's token ids)")
    setup = setup_rollouts(
        "PPO", policy, reference, pm, prompts, cfg=cfg, optim=ocfg, rendering=rendering, seed=seed,
        mesh_cfg=mesh_cfg, rules=rules, reward_fn=reward_fn,
    )  # fmt: skip
    mesh, rules, width = setup.mesh, setup.rules, setup.width
    check_reference(lora, policy, reference)
    value_cfg = pm.config if cfg.value_init == "pm" else policy.config
    steps = _build(policy.config, reference.config, value_cfg, cfg, ocfg, mesh, rules, width, lora)
    head = _fresh_head(value_cfg, jax.random.fold_in(jax.random.key(seed), 1))
    if cfg.value_init == "pm":
        value_params = {
            "backbone": pm.params["backbone"],
            "head": value_head_params(pm.params["head"], pm.reward_mean, pm.reward_std),
        }
    else:
        value_params = {"head": head} if cfg.shared_backbone else {"backbone": policy.params, "head": head}
    params = {"policy": policy.params, "value": value_params}
    if lora is not None:
        params = lora_state(
            params["policy"], params["value"], policy.config, value_cfg, lora, jax.random.fold_in(jax.random.key(seed), 2),
            value_from_policy=cfg.value_init == "policy",
        )  # fmt: skip
    params = shard_params(_copy(params), steps.shardings.params)
    state = steps.create(params, jax.random.key(seed))
    del params
    ref_params = None if lora is not None else shard_params(reference.params, steps.ref_shardings)
    source = RolloutSource(
        steps, ref_params, setup.reward_fn, setup.score_norm, cfg, stream=setup.stream,
        conversations=setup.conversations, width=width, pad=int(policy.config.pad_token_id or 0), policy=policy,
        sampler=generate, merge=functools.partial(merged_policy, lora=lora),
    )  # fmt: skip
    update = functools.partial(update_on_rollout, update=steps.update, cfg=cfg, seed=seed)
    return run_iterations(
        "PPO", source, update, state, policy=policy, workdir=workdir, ckpt_cfg=ckpt_cfg,
        num_iterations=num_iterations, export_at=export_at, export_dir=export_dir, export=policy_export(policy, lora),
    )  # fmt: skip
