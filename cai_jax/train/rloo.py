"""RLOO against the PM: REINFORCE with a leave-one-out baseline (Ahmadian et al. 2024; Kool et al. 2019).

    state = train_rloo(policy, reference, pm, ["How do I ...?", ...], rloo_cfg=cfg, optim_cfg=optim,
                       num_iterations=100, seed=0, workdir=f"{workdir}/ppo", rendering="chat",
                       export_at={1: f"{workdir}/ppo/snapshots/iter_1"})

An iteration samples `k` responses to each of `rollout_batch_size` prompts (the batch holds each
prompt k times in a row; the sampler prefills a repeated prompt once), scores them with the PM
(`pm_reward.PMReward`, as PPO does) or a `reward_fn`, and gives response i the sequence reward

    R_i = (score_i - mean) / std - missing-EOS penalty - beta * sum_t KL_t

(`rl_losses.ppo_rewards` summed over the response: the same reward as PPO, KL estimator included),
the advantage A_i = R_i - mean of the other k - 1 rewards of its prompt (`rl_losses.rloo_advantages`)
and the loss -mean_i A_i sum_t log pi(y_i,t). There is no value model and no clipping: this is the
paper's REINFORCE estimator, unbiased for the policy that sampled the batch. With `epochs` = 1 and
`minibatch_size` = rollout_batch_size * k it is exactly on-policy (one update per rollout); smaller
minibatches or more epochs reuse the rollout off-policy, and `policy/approxkl` (0.5 E[(log pi -
log pi_rollout)^2] per token) says how far the policy moved from the one that sampled it.

The loop is PPO's: `ppo_rollout.RolloutSource` (its prompt stream, position, resume state and
samples.jsonl rows) with `RLOOSource.next` for the rollout, on the one fit loop (`train.fit.fit`,
one step = one iteration), so exact resume, `export_at` snapshots with their completion marker
and the metrics / samples files behave as in `train.ppo`. Metrics use PPO's names
(`METRIC_NAMES`); PPO's value and clipping metrics have no counterpart here.

Params of the train state: {"policy": Transformer params}. Shape letters: B rows (= prompts x k),
P prompts, K samples per prompt, L = prompt + N response tokens, V vocabulary.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cai_jax.checkpoints.train_state import CheckpointConfig
from cai_jax.models import Transformer
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
from cai_jax.train.fit import Step
from cai_jax.train.loop import jit_train_step, state_shardings
from cai_jax.train.ppo_rollout import METRIC_NAMES as PPO_METRIC_NAMES
from cai_jax.train.ppo_rollout import RewardFn, Rollout, RolloutSource
from cai_jax.train.rl_common import policy_export, run_iterations, setup_rollouts
from cai_jax.train.rl_lora import check_reference, lora_build, lora_state, merged_policy
from cai_jax.train.rloo_steps import RLOOConfig, rloo_forward, rloo_rewards, rloo_update
from cai_jax.train.state import OptimConfig, TrainState, make_optimizer

__all__ = ["RLOOConfig", "RLOOSource", "METRIC_NAMES", "rloo_forward", "rloo_rewards", "rloo_update", "train_rloo"]

# PPO's names (one home: ppo_rollout.METRIC_NAMES), less its value-model and clipping metrics. Here
# objective/kl_coef is beta (fixed), loss = loss/policy = -mean_i A_i sum_t logp (no value or
# entropy term), policy/approxkl is 0.5 E[(logp - rollout logp)^2] per token over the updates.
METRIC_NAMES = tuple(m for m in PPO_METRIC_NAMES if m not in ("policy/clipfrac", "loss/value", "val/clipfrac"))


class _Steps(NamedTuple):
    shardings: TrainState
    ref_shardings: Any
    create: Callable  # (params, rng) -> TrainState, placed on `shardings`
    forward: Callable  # rloo_forward, jitted
    rewards: Callable  # rloo_rewards, jitted
    update: Callable  # rloo_update, jitted with the state donated


@functools.lru_cache(maxsize=8)
def _build(
    policy_cfg, ref_cfg, cfg: RLOOConfig, ocfg: OptimConfig, mesh, rules, width: int, lora: LoRAConfig | None
) -> _Steps:
    """Shardings and jitted steps for one setup, cached so repeated runs in a process compile once."""
    policy_model, ref_model = Transformer(policy_cfg), Transformer(ref_cfg)
    sample = jax.ShapeDtypeStruct((cfg.micro_batch_size, width + cfg.max_new_tokens), jnp.int32)
    abstract = {"policy": jax.eval_shape(lambda: nn.meta.unbox(policy_model.init(jax.random.key(0), sample)["params"]))}
    p_shardings = {"policy": param_shardings(policy_model, sample, mesh, rules)}
    # Under LoRA: the base stored once and frozen, adapters trained (train/rl_lora.py).
    abstract, p_shardings, ocfg = lora_build(abstract, p_shardings, ocfg, policy_cfg, None, lora, mesh, rules)
    optimizer = make_optimizer(ocfg, abstract)

    def create(params, rng):
        return TrainState.create(params, optimizer, rng)

    shardings = state_shardings(jax.eval_shape(create, abstract, jax.random.key(0)), p_shardings, mesh)
    rows_sh = batch_sharding(mesh)
    forward = jax.jit(
        functools.partial(rloo_forward, policy_model=policy_model, ref_model=ref_model, cfg=cfg, lora=lora),
        in_shardings=(shardings.params, None, rows_sh, rows_sh, rows_sh),
    )

    def forward_in_mesh(params, ref_params, *rows):  # rows: host arrays every process holds whole
        with with_rules(mesh, rules):
            return forward(params, ref_params, *from_host(rows, rows_sh))

    forward_in_mesh.jitted = forward  # for .lower(), as PPO's

    update = jit_train_step(
        functools.partial(rloo_update, policy_model=policy_model, optimizer=optimizer, cfg=cfg, lora=lora),
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
        rewards=jax.jit(functools.partial(rloo_rewards, cfg=cfg)),
        update=update,
    )


# ---------------------------------------------------------------- the rollout source and the update


class RLOOSource(RolloutSource):
    """RLOO's `fit.Source`: PPO's `RolloutSource` (stream, position, samples) with k samples per prompt.

    Constructed like `RolloutSource`, with `steps` an RLOO `_Steps` and `cfg` an `RLOOConfig`; the
    KL coefficient in its position stays `cfg.kl_coef` (no adaptive controller).
    """

    def next(self, state: TrainState, it: int) -> Step:
        """Iteration `it`'s rollout under `state.params`. Raises FloatingPointError on bad rewards."""
        cfg = self.cfg
        rows, batch_id = self.stream.next()
        rows = [i for i in rows for _ in range(cfg.k)]  # each prompt k times in a row: groups of k
        s = self.sample_and_score(state, it, rows, batch_id)
        logp, ref_logp = s.forwards["logp"], s.forwards["ref_logp"]
        beta = self.beta
        rew = jax.device_get(
            self.steps.rewards(s.scores, logp, ref_logp, s.resp_mask, s.ended, np.float32(beta), *self.score_norm)
        )
        batch = {
            "tokens": s.tokens,
            "mask": s.mask,
            "resp_mask": s.resp_mask,
            "old_logp": logp,
            "advantages": rew["advantages"],
        }
        stats = self.rollout_stats(s, logp, rew["kl_sum"], rew["reward"], beta)
        self.iteration = it + 1
        samples = []
        if cfg.sample_every and (it == 0 or (it + 1) % cfg.sample_every == 0):
            samples = self._samples(it, s, rew["kl_sum"])
        return Step(Rollout(batch, stats, it), {"iteration": it + 1, "batch_id": batch_id}, {"samples": samples})


def update_on_rollout(state: TrainState, rollout: Rollout, *, update: Callable, cfg: RLOOConfig, seed: int):
    """`epochs` passes over the rollout's rows, each in the order default_rng([seed, it, epoch]), of
    minibatch `update`s (state donated); returns (state, mean update metrics + rollout stats + time/train)."""
    t0 = time.perf_counter()
    micro = cfg.minibatch_size // cfg.micro_batch_size
    updates = []
    for epoch in range(cfg.epochs):
        order = np.random.default_rng([seed, rollout.iteration, epoch]).permutation(cfg.rows)
        for start in range(0, cfg.rows, cfg.minibatch_size):
            idx = order[start : start + cfg.minibatch_size]
            mb = {name: v[idx].reshape(micro, cfg.micro_batch_size, *v.shape[1:]) for name, v in rollout.batch.items()}
            state, metrics = update(state, mb)
            updates.append(metrics)
    updates = jax.device_get(updates)
    row = {name: float(np.mean([u[name] for u in updates])) for name in updates[0]}
    return state, {**row, **rollout.stats, "time/train": time.perf_counter() - t0}


# ---------------------------------------------------------------- the trainer


def train_rloo(
    policy: Any,
    reference: Any,
    pm: Any,
    prompts: Sequence[Sequence[int] | str],
    *,
    rloo_cfg: RLOOConfig | Any,
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
    """Trains `policy` with RLOO against `pm` (or `reward_fn`) for `num_iterations` iterations in total.

    Arguments as `train_ppo`'s (`rloo_cfg` in place of `ppo_cfg`):
      policy: LoadedModel-like (.model, .params, .tokenizer, .config): the SL-CAI model to train.
      reference: LoadedModel-like, frozen (usually the same SL-CAI model).
      pm: LoadedPM-like with reward statistics, or None when `reward_fn` is given.
      prompts: conversations (encoded with `text.encode_prompt` in `rendering`) or token-id lists.
      rloo_cfg: `RLOOConfig` or its config dict.
      optim_cfg: `OptimConfig` or its config dict; a step is one minibatch update (its schedule
        spans num_iterations * rloo_cfg.updates_per_iteration); `grad_accum_steps` must be 1.
      ckpt_cfg: where and how often (in iterations) to save; default `workdir/checkpoints`, saving
        only the end; False saves nothing.
      mesh_cfg: mesh sizes (default: all devices on the data axis).
      num_iterations: iterations (rollout + updates), counting resumed ones.
      seed: prompt order and the sampling / state rng.
      workdir: folder for metrics.jsonl and samples.jsonl (cut back to the restored iteration on resume).
      export_dir: if given, the final policy is written there as an HF-format folder.
      export_at: {iteration: folder}: the policy after that iteration, exported during this call.
      reward_fn: `reward_fn(prompt_ids, response_ids [B, N], lengths [B]) -> [B]` raw rewards
        (normalised with mean 0 / std 1), used instead of a PM.
      rendering: how text prompts are rendered for the policy ("chat" | "transcript").
      rules: logical-axis rules.
      lora: train LoRA adapters only, the policy's weights stored once as the frozen base of the
        policy and of the reference (which must then be `policy`), as `train_ppo`'s.

    Returns:
      The final train state, params {"policy"} (under LoRA {"policy": {"base", "lora"}}).

    Raises:
      FloatingPointError: a non-finite reward or loss, naming the iteration and the last good checkpoint.
    """
    cfg = rloo_cfg if isinstance(rloo_cfg, RLOOConfig) else RLOOConfig.from_config(rloo_cfg)
    ocfg = optim_cfg if isinstance(optim_cfg, OptimConfig) else OptimConfig.from_config(optim_cfg)
    setup = setup_rollouts(
        "RLOO", policy, reference, pm, prompts, cfg=cfg, optim=ocfg, rendering=rendering, seed=seed,
        mesh_cfg=mesh_cfg, rules=rules, reward_fn=reward_fn,
    )  # fmt: skip
    mesh, rules, width = setup.mesh, setup.rules, setup.width
    check_reference(lora, policy, reference)
    steps = _build(policy.config, reference.config, cfg, ocfg, mesh, rules, width, lora)
    params = {"policy": policy.params}
    if lora is not None:
        params = lora_state(policy.params, None, policy.config, None, lora, jax.random.fold_in(jax.random.key(seed), 2))
    # A copy: the first update donates the state, and the caller's params (often the reference too) must survive.
    params = jax.tree.map(lambda x: np.array(x, copy=True), jax.device_get(params))
    state = steps.create(shard_params(params, steps.shardings.params), jax.random.key(seed))
    del params
    ref_params = None if lora is not None else shard_params(reference.params, steps.ref_shardings)
    source = RLOOSource(
        steps, ref_params, setup.reward_fn, setup.score_norm, cfg, stream=setup.stream,
        conversations=setup.conversations, width=width, pad=int(policy.config.pad_token_id or 0), policy=policy,
        sampler=generate, merge=functools.partial(merged_policy, lora=lora),
    )  # fmt: skip
    update = functools.partial(update_on_rollout, update=steps.update, cfg=cfg, seed=seed)
    return run_iterations(
        "RLOO", source, update, state, policy=policy, workdir=workdir, ckpt_cfg=ckpt_cfg,
        num_iterations=num_iterations, export_at=export_at, export_dir=export_dir, export=policy_export(policy, lora),
    )  # fmt: skip
