"""What the PM-driven RL trainers (PPO, RLOO) share around their steps: the input checks, the
prompt stream and PM reward, and the run on the fit loop with its logs, checkpoints and exports.

    setup = setup_rollouts("PPO", policy, reference, pm, prompts, cfg=cfg, optim=ocfg, rendering=..., ...)
    ...build the steps and the state, a rollout source on setup.stream / setup.reward_fn...
    state = run_iterations("PPO", source, update, state, policy=policy, workdir=..., ...)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from cai_jax.checkpoints.hf import is_complete_export
from cai_jax.checkpoints.train_state import CheckpointConfig, Checkpointer
from cai_jax.sharding import DATA_PARALLEL, Rules, make_mesh
from cai_jax.text import bucket_length
from cai_jax.train.fit import default_checkpoints, fit
from cai_jax.train.logs import JsonlLog, MetricsLogger
from cai_jax.train.pm_reward import PMReward
from cai_jax.train.ppo_rollout import PromptStream, _encode_prompts
from cai_jax.train.rl_lora import merged_policy
from cai_jax.train.sft import export_adapters, export_params
from cai_jax.train.state import OptimConfig, TrainState

__all__ = ["RolloutSetup", "setup_rollouts", "run_iterations", "policy_export"]


class RolloutSetup(NamedTuple):
    conversations: list | None  # the prompts' texts in the stream's order (None for token ids)
    width: int  # prompt columns P
    stream: PromptStream
    mesh: Any
    rules: Rules
    reward_fn: Any  # a PMReward, or the caller's reward_fn
    score_norm: tuple  # (mean, std) the raw scores are normalised by


def setup_rollouts(
    name: str,
    policy: Any,
    reference: Any,
    pm: Any,
    prompts: Sequence[Any],
    *,
    cfg: Any,
    optim: OptimConfig,
    rendering: str | None,
    seed: int,
    mesh_cfg: Any,
    rules: Rules,
    reward_fn: Callable | None,
) -> RolloutSetup:
    """Checks the inputs of trainer `name` and builds its prompt stream, mesh and reward.

    `cfg` is the trainer's config (rollout_batch_size, max_new_tokens, micro_batch_size,
    pm_retokenize are read). Raises ValueError naming the problem.
    """
    if optim.grad_accum_steps != 1:
        raise ValueError(f"{name} accumulates gradients over micro-batches itself: set optim.grad_accum_steps=1")
    if (pm is None) == (reward_fn is None):
        raise ValueError(f"{name}: pass exactly one of pm and reward_fn")
    if cfg.rollout_batch_size % jax.process_count():
        raise ValueError(
            f"{name}: rollout_batch_size={cfg.rollout_batch_size} must divide over the {jax.process_count()} "
            "processes (each samples an equal share of the rows)"
        )
    if pm is not None and (pm.reward_mean is None or not pm.reward_std):
        raise ValueError(
            f"the PM has no reward statistics (reward_mean={pm.reward_mean}, reward_std={pm.reward_std}); {name}'s "
            "rewards are normalised PM scores: export the PM with them (train_pm computes them)"
        )
    prompt_ids, conversations = _encode_prompts(prompts, getattr(policy, "tokenizer", None), rendering)
    width = bucket_length(max(map(len, prompt_ids)), 16)
    context = min(policy.config.max_position_embeddings, reference.config.max_position_embeddings)
    if width + cfg.max_new_tokens > context:
        raise ValueError(
            f"prompts padded to {width} tokens + max_new_tokens={cfg.max_new_tokens} exceed the context of {context}"
        )
    stream = PromptStream(prompt_ids, batch_size=cfg.rollout_batch_size, seed=seed)
    mesh = make_mesh(DATA_PARALLEL if mesh_cfg is None else mesh_cfg)
    rules = tuple((n, tuple(a) if isinstance(a, list) else a) for n, a in rules)
    if pm is not None:  # checks the vocabularies before anything compiles
        reward_fn = PMReward(
            pm, policy, rendering=rendering, retokenize=cfg.pm_retokenize, batch_size=cfg.micro_batch_size, mesh=mesh,
            rules=rules,
        )  # fmt: skip
        score_norm = (np.float32(pm.reward_mean), np.float32(pm.reward_std))
    else:
        score_norm = (np.float32(0.0), np.float32(1.0))
    return RolloutSetup(conversations, width, stream, mesh, rules, reward_fn, score_norm)


def policy_export(policy: Any, lora: Any = None) -> Callable:
    """`export(state, folder)` of a policy: params["policy"] as an HF folder; under LoRA (`lora` a
    `LoRAConfig`) the adapters alone in PEFT's layout in `folder/adapter` first, then the merged
    model in `folder`, whose completion marker comes last (a folder marked complete has both)."""
    tokenizer = getattr(policy, "tokenizer", None)

    def export(state: TrainState, folder: str | os.PathLike) -> None:
        p = state.params["policy"]
        if lora is not None:
            export_adapters(p["lora"], policy.config, os.path.join(folder, "adapter"), lora)
        export_params(merged_policy(p, lora), policy.config, folder, tokenizer)

    return export


def run_iterations(
    name: str,
    source: Any,
    update: Callable,
    state: TrainState,
    *,
    policy: Any,
    workdir: str | os.PathLike,
    ckpt_cfg: CheckpointConfig | None | bool,
    num_iterations: int,
    export_at: Mapping[int, str | os.PathLike] | None,
    export_dir: str | os.PathLike | None,
    export: Callable | None = None,
) -> TrainState:
    """`num_iterations` of `source` / `update` on the fit loop: metrics.jsonl and samples.jsonl in
    `workdir` (cut back on resume), checkpoints (default `workdir/checkpoints`, only the end; False:
    none), `export_at` snapshots of params["policy"] and the final `export_dir`, each written by
    `export(state, folder)` (default: `policy_export(policy)`)."""
    workdir = os.fspath(workdir)
    export = export or policy_export(policy)

    samples = JsonlLog(os.path.join(workdir, "samples.jsonl"), key="iteration", ensure_ascii=False)
    logger = MetricsLogger(os.path.join(workdir, "metrics.jsonl"), unit="iteration", attachments={"samples": samples})
    ckpt = Checkpointer(None if ckpt_cfg is False else ckpt_cfg or default_checkpoints(workdir, num_iterations))
    try:
        state = fit(
            source,
            update,
            state,
            ckpt=ckpt,
            logger=logger,
            num_steps=num_iterations,
            export_at=export_at,
            export=export,
            export_done=is_complete_export,
            fetch_late=False,
            name=name,
            unit="iteration",
        )
    finally:
        logger.close()
        ckpt.close()
    if export_dir is not None:
        export(state, export_dir)
    return state
