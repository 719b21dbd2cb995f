"""RL-CAI without a PM or rollouts: DPO / IPO on the feedback stage's soft-labelled comparisons.

    state = train_dpo(policy, reference, "feedback/comparisons.jsonl", dpo_cfg=DPOConfig("dpo", 0.1),
                      optim_cfg=optim, num_steps=200, batch_size=8, seq_len=320, seed=0,
                      workdir=f"{run}/ppo", rendering="chat", export_at={100: f"{run}/ppo/snapshots/iter_100"})

The policy is trained directly on the comparisons {"prompt", "response_a", "response_b", "p_a"}
(`pm_data.load_comparisons` validates them) with `rl_losses.soft_dpo_loss` (p_a as a soft target:
Rafailov et al. 2023 for p = 1, Mitchell 2023's label smoothing for a constant p) or
`rl_losses.ipo_loss` (Azar et al. 2023). Both read one number per pair, the log-ratio margin
d = (log pi(a) - log ref(a)) - (log pi(b) - log ref(b)), where log pi(x) sums the teacher-forced
log-probs of x's response tokens: each side is the (prompt, response) exchange of
`text.encode_exchange` in the policy's rendering, the response (with the end-of-turn token that
closes it) the loss mask, as in SFT, cut from the left to `seq_len` as the PM's pairs are.

One step = one batch of pairs on the fit loop (`train.fit.fit`): `DPOSource` gives the placed
batch of `DPOBatcher` plus the frozen reference's sequence log-probs of it (one forward of the
reference params, never trained or donated); the update is the jitted `dpo_step`. So
`workdir/metrics.jsonl` (loss, margin, accuracy, rewards/chosen, rewards/rejected, log_ratio,
grad_norm, lr, param_norm, tokens/s), checkpoints with the batcher position, exact resume, the
non-finite stop, `export_at` snapshots and `export_dir` are the fit loop's, as for SFT and PPO.

With a PM, `eval_prompts` and the PPO config whose sampling settings to use (`rollout_cfg`), every
`eval_every` steps the current policy answers each eval prompt once and PPO's own rollout code
(`ppo_rollout.RolloutSource`) scores the answers with the PM and measures them against the
reference: row k gets PPO's names (`EVAL_METRIC_NAMES`) for the policy step k starts from (rows
1, 1 + eval_every, ...), as PPO's row k describes the rollout of the policy iteration k starts
from; the first answers go to `workdir/samples.jsonl`. The final policy's evaluation is
`workdir/eval.json`. Every draw derives from the seed and the step, so resume stays exact.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cai_jax.checkpoints.hf import is_complete_export
from cai_jax.checkpoints.train_state import CheckpointConfig, Checkpointer
from cai_jax.models import Transformer
from cai_jax.sampling import generate
from cai_jax.sharding import (
    DATA_PARALLEL,
    DEFAULT_RULES,
    Rules,
    batch_sharding,
    make_mesh,
    param_shardings,
    shard_params,
    with_rules,
)
from cai_jax.text import bucket_length
from cai_jax.text import pad_id as tokenizer_pad_id
from cai_jax.train.dpo_steps import (
    DPOBatcher,
    DPOConfig,
    dpo_loss_fn,
    dpo_step,
    reference_logprobs,
    sequence_logprobs,
    tokenize_dpo_pair,
)
from cai_jax.train.fit import BatcherSource, Step, default_checkpoints, fit
from cai_jax.train.flops import model_flops_per_token, resolve_peak_flops
from cai_jax.train.logs import JsonlLog, MetricsLogger
from cai_jax.train.loop import abstract_train_state, jit_train_step
from cai_jax.train.pm_data import count_pair_tokens, load_comparisons
from cai_jax.train.pm_report import write_report
from cai_jax.train.pm_reward import PMReward
from cai_jax.train.ppo_rollout import PromptStream, RolloutSource, _encode_prompts
from cai_jax.train.ppo_steps import PPOConfig, compute_advantages, rollout_forward
from cai_jax.train.sft import export_params
from cai_jax.train.state import OptimConfig, TrainState

__all__ = [
    "DPOConfig",
    "EVAL_METRIC_NAMES",
    "tokenize_dpo_pair",
    "DPOBatcher",
    "sequence_logprobs",
    "dpo_loss_fn",
    "dpo_step",
    "DPOSource",
    "train_dpo",
]

log = logging.getLogger(__name__)

EVAL_METRIC_NAMES = (  # PPO's names (ppo_rollout.METRIC_NAMES), so the two curves read alike
    "objective/scores",
    "objective/kl",
    "objective/entropy",
    "response/length_mean",
    "response/no_eos_frac",
)


def _jit_in_mesh(jitted, mesh, rules):
    """`jitted` called inside `with_rules(mesh, rules)`, so the model's logical constraints resolve."""

    def call(*args):
        with with_rules(mesh, rules):
            return jitted(*args)

    return call


class _EvalState(NamedTuple):
    """What `RolloutSource.next` reads of a PPO state: params {"policy", "value"} and the rng."""

    params: Any
    rng: jax.Array


class _EvalSteps(NamedTuple):
    """What `RolloutSource` calls of `ppo._Steps`."""

    forward: Any
    advantages: Any


class _Evaluator:
    """Samples, scores and measures the policy on the eval prompts with PPO's rollout code."""

    def __init__(self, policy, reference, ref_params, pm, prompts, rollout_cfg, *, rendering, mesh, rules, seed):
        ids, conversations = _encode_prompts(prompts, policy.tokenizer, rendering)
        n = len(ids)
        base = rollout_cfg if isinstance(rollout_cfg, PPOConfig) else PPOConfig.from_config(rollout_cfg)
        micro = math.gcd(n, base.micro_batch_size)  # the forward chunks must tile the prompts exactly
        cfg = dataclasses.replace(
            base, rollout_batch_size=n, minibatch_size=n, micro_batch_size=micro, adaptive_kl=False, sample_every=1,
            shared_backbone=True, value_init="policy",
        )  # fmt: skip
        width = bucket_length(max(map(len, ids)), 16)
        context = min(policy.config.max_position_embeddings, reference.config.max_position_embeddings)
        if width + cfg.max_new_tokens > context:
            raise ValueError(f"eval prompts of {width} tokens + max_new_tokens={cfg.max_new_tokens} exceed {context}")
        if pm.reward_mean is None or not pm.reward_std:
            raise ValueError("the PM has no reward statistics (export it with them: train_pm computes them)")
        steps = _eval_steps(policy.config, reference.config, cfg, mesh, rules)
        reward = PMReward(
            pm, policy, rendering=rendering, retokenize=cfg.pm_retokenize, batch_size=micro, mesh=mesh, rules=rules
        )
        self.stream = PromptStream(ids, batch_size=n, seed=seed)
        self.source = RolloutSource(
            steps, ref_params, reward, (np.float32(pm.reward_mean), np.float32(pm.reward_std)), cfg,
            stream=self.stream, conversations=conversations, width=width, pad=int(policy.config.pad_token_id or 0),
            policy=policy, sampler=generate,
        )  # fmt: skip
        hidden = policy.config.hidden_size  # values are not used: a zero head on the shared backbone
        self.head = {"kernel": jnp.zeros((hidden, 1), jnp.float32), "bias": jnp.zeros((1,), jnp.float32)}
        self.seed = seed

    def __call__(self, params, rng, step: int) -> tuple[dict, list[dict]]:
        """(EVAL_METRIC_NAMES stats, sample rows {"step", ...}) of the policy `params` before step `step` + 1."""
        self.stream.restore({"epoch": 0, "index": 0, "seed": self.seed})  # one prompt order for every evaluation
        out = self.source.next(_EvalState({"policy": params, "value": {"head": self.head}}, rng), step)
        stats = {k: out.batch.stats[k] for k in EVAL_METRIC_NAMES}
        samples = [{"step": r.pop("iteration"), **r} for r in out.attached["samples"]]
        return stats, samples


class DPOSource:
    """DPO's `fit.Source`: placed `DPOBatcher` batches plus the reference's log-probs; position = the batcher's.

    Every `eval_every` steps (from step 0) the row also gets the `evaluate` statistics of the
    policy that step starts from, and its samples.
    """

    def __init__(self, pairs: BatcherSource, reference, ref_params, *, evaluate=None, eval_every: int = 0):
        self.pairs, self.reference, self.ref_params = pairs, reference, ref_params
        self.evaluate, self.eval_every = evaluate, int(eval_every)

    def next(self, state: TrainState, step: int) -> Step:
        s = self.pairs.next(state, step)
        batch = {**s.batch, **self.reference(self.ref_params, s.batch)}
        if self.evaluate is None or step % self.eval_every:
            return Step(batch, s.extra)
        stats, samples = self.evaluate(state.params, state.rng, step)
        return Step(batch, {**s.extra, **stats}, {"samples": samples})

    def state(self) -> dict:
        return self.pairs.state()

    def restore(self, data_state: Mapping) -> None:
        self.pairs.restore(data_state)


class _Steps(NamedTuple):
    shardings: TrainState  # NamedShardings of the train state
    ref_shardings: Any
    create: Callable  # (params, rng) -> TrainState, placed on `shardings`
    reference: Callable  # (ref_params, batch) -> {"ref_logp_a", "ref_logp_b"}, jitted
    update: Callable  # dpo_step, jitted with the state donated


@functools.lru_cache(maxsize=8)
def _build(policy_cfg, ref_cfg, cfg: DPOConfig, ocfg: OptimConfig, mesh, rules, batch_size: int, seq_len: int):
    """Shardings and jitted steps for one setup, cached so repeated runs in a process compile once."""
    model, ref_model = Transformer(policy_cfg), Transformer(ref_cfg)
    sample = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32)
    _, shardings, optimizer = abstract_train_state(model, sample, optim_cfg=ocfg, mesh=mesh, rules=rules)
    ref_shardings = param_shardings(ref_model, sample, mesh, rules)
    rows = batch_sharding(mesh)
    reference = jax.jit(
        functools.partial(reference_logprobs, model=ref_model), in_shardings=(ref_shardings, rows), out_shardings=rows
    )
    update = functools.partial(dpo_step, model=model, optimizer=optimizer, cfg=cfg)
    return _Steps(
        shardings=shardings,
        ref_shardings=ref_shardings,
        create=jax.jit(lambda p, rng: TrainState.create(p, optimizer, rng), out_shardings=shardings),
        reference=_jit_in_mesh(reference, mesh, rules),
        update=jit_train_step(update, shardings, rows, mesh, rules),
    )


@functools.lru_cache(maxsize=8)
def _eval_steps(policy_cfg, ref_cfg, cfg, mesh, rules) -> _EvalSteps:
    """PPO's jitted rollout forward (shared backbone, zero value head) and advantages, cached likewise."""
    forward = functools.partial(
        rollout_forward, policy_model=Transformer(policy_cfg), value_model=None, ref_model=Transformer(ref_cfg), cfg=cfg
    )
    return _EvalSteps(
        _jit_in_mesh(jax.jit(forward), mesh, rules), jax.jit(functools.partial(compute_advantages, cfg=cfg))
    )


# ---------------------------------------------------------------- the trainer


def _copy(tree):
    return jax.tree.map(lambda x: np.array(x, copy=True), jax.device_get(tree))


def train_dpo(
    policy: Any,
    reference: Any,
    comparisons: Any,
    *,
    dpo_cfg: DPOConfig | Mapping,
    optim_cfg: OptimConfig | Mapping,
    ckpt_cfg: CheckpointConfig | None,
    mesh_cfg: Any,
    num_steps: int,
    batch_size: int,
    seq_len: int,
    seed: int,
    workdir: str | os.PathLike,
    rendering: str,
    export_dir: str | os.PathLike | None = None,
    export_at: Mapping[int, str | os.PathLike] | None = None,
    eval_prompts: Sequence[Any] | None = None,
    pm: Any = None,
    rollout_cfg: Any = None,
    eval_every: int = 0,
    rules: Rules = DEFAULT_RULES,
    peak_flops_per_device: float | str | None = "auto",
) -> TrainState:
    """Trains `policy` with DPO / IPO on `comparisons` for `num_steps` steps (total, counting resumed ones).

    Args:
      policy: LoadedModel-like (.params, .tokenizer, .config): the SL-CAI model to train.
      reference: LoadedModel-like, frozen (usually the same SL-CAI model; its params are only read).
      comparisons: anything `pm_data.load_comparisons` reads (rows, a .jsonl path, a datasets folder).
      dpo_cfg: `DPOConfig` or its config dict.
      optim_cfg: `OptimConfig` or its config dict (a step is one batch of pairs).
      ckpt_cfg: where and how often to save; None: `workdir/checkpoints`, saving only the end.
      mesh_cfg: mesh sizes (None: all devices on the data axis).
      num_steps, batch_size, seq_len, seed: run length, pairs per global batch, padded length of
        each side, data order / sampling rng seed.
      workdir: metrics.jsonl, samples.jsonl, eval.json and the default checkpoints go here.
      rendering: how (prompt, response) exchanges are encoded for the policy ("chat" | "transcript").
      export_dir: the final policy as an HF-format folder.
      export_at: {step: folder}: the policy after that step, exported during the run (as `train_ppo`'s
        snapshots; one cut mid-write is redone from its step's checkpoint on resume).
      eval_prompts, pm, rollout_cfg, eval_every: all or none. Conversations answered and scored by
        the LoadedPM `pm` every `eval_every` (>= 1) steps with the sampling settings (max_new_tokens,
        temperature, generation_batch_size, micro_batch_size, kl_estimator, pm_retokenize,
        num_samples_logged) of the `PPOConfig` (or its dict) `rollout_cfg`.
      rules: logical-axis rules.
      peak_flops_per_device: for "mfu" (see `train_sft`); FLOPs count the policy's training, not
        the reference forward.

    Returns:
      The final train state (the policy's params).

    Raises:
      ComparisonError: a bad comparison row (before anything compiles).
      FloatingPointError: a non-finite loss or gradient norm, naming the step and batch; the latest
        checkpoint is the last one saved before it.
    """
    cfg = dpo_cfg if isinstance(dpo_cfg, DPOConfig) else DPOConfig.from_config(dpo_cfg)
    ocfg = optim_cfg if isinstance(optim_cfg, OptimConfig) else OptimConfig.from_config(optim_cfg)
    evaluating = [x is not None for x in (eval_prompts, pm, rollout_cfg)]
    if any(evaluating) and not (all(evaluating) and eval_every >= 1):
        raise ValueError("train_dpo: evaluation needs eval_prompts, pm, rollout_cfg and eval_every >= 1 together")
    if any(evaluating) and jax.process_count() > 1:
        raise NotImplementedError("train_dpo's evaluation runs in a single process (the sampler uses local devices)")
    workdir, tokenizer = os.fspath(workdir), policy.tokenizer
    pairs, cuts = [], [0, 0, 0]
    for row in load_comparisons(comparisons, name="DPO comparisons"):
        pair, cut = tokenize_dpo_pair(tokenizer, row, seq_len=seq_len, rendering=rendering)
        pairs.append(pair)
        cuts[cut] += 1
    if cuts[1] or cuts[2]:
        log.warning("DPO: of %d comparisons, %d lost prompt tokens and %d response tokens to seq_len=%d",
                    len(pairs), cuts[1], cuts[2], seq_len)  # fmt: skip
    batcher = DPOBatcher(pairs, batch_size=batch_size, seq_len=seq_len, seed=seed, pad_id=tokenizer_pad_id(tokenizer))

    mesh = make_mesh(DATA_PARALLEL if mesh_cfg is None else mesh_cfg)
    rules = tuple((name, tuple(a) if isinstance(a, list) else a) for name, a in rules)  # hashable for _build
    steps = _build(policy.config, reference.config, cfg, ocfg, mesh, rules, batch_size, seq_len)
    state = steps.create(shard_params(_copy(policy.params), steps.shardings.params), jax.random.key(seed))
    ref_params = shard_params(reference.params, steps.ref_shardings)  # read only: never donated, never trained
    evaluate = None
    if all(evaluating):
        evaluate = _Evaluator(
            policy, reference, ref_params, pm, eval_prompts, rollout_cfg, rendering=rendering, mesh=mesh,
            rules=rules, seed=seed,
        )  # fmt: skip
    source = DPOSource(
        BatcherSource(batcher, mesh, count_pair_tokens),
        steps.reference,
        ref_params,
        evaluate=evaluate,
        eval_every=eval_every,
    )

    def export(state: TrainState, folder: str | os.PathLike) -> None:
        export_params(state.params, policy.config, folder, tokenizer)

    peak = resolve_peak_flops(peak_flops_per_device)
    logger = MetricsLogger(
        os.path.join(workdir, "metrics.jsonl"),
        flops_per_token=model_flops_per_token(policy.config, seq_len),
        peak_flops=None if peak is None else peak * mesh.devices.size,
        attachments={"samples": JsonlLog(os.path.join(workdir, "samples.jsonl"), ensure_ascii=False)},
    )
    ckpt = Checkpointer(ckpt_cfg or default_checkpoints(workdir, num_steps))
    try:
        state = fit(
            source, steps.update, state, ckpt=ckpt, logger=logger, num_steps=num_steps, export_at=export_at, export=export,
            export_done=is_complete_export, name="DPO",
        )  # fmt: skip
    finally:
        logger.close()
        ckpt.close()
    if evaluate is not None:
        stats, samples = evaluate(state.params, state.rng, num_steps)
        write_report({"step": num_steps, **stats, "samples": samples}, os.path.join(workdir, "eval.json"))
    if export_dir is not None:
        export(state, export_dir)
    return state
