"""One function per stage for `experiments.plan`: which models a stage holds, which steps it compiles, at what shapes.

    plan = PLANNERS["sft"](ctx)      # -> StagePlan: held buffers, compiled steps, FLOPs per stage step

Each function mirrors what the stage function in experiments/stages/ (and the library calls it
makes) holds on a device while it runs, and lowers the same jitted steps at the shapes the config
gives, on abstract arrays. Where a shape depends on the data (prompt lengths), it is derived from
`ctx.prompt_tokens`, an upper bound on a rendered prompt, with the bounds the stages themselves
check (`cai.revisions` bounds a dialogue by 64 tokens per request turn). Models a stage loads with
`load_pretrained` / `load_pm` sit whole on the first device (`loaded`); train states and the
copies PPO places on the mesh are sharded by the config's mesh.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cai_jax.models import ScalarModel, Transformer
from cai_jax.planning import bytes_per_device, compile_cost
from cai_jax.sharding import BATCH_AXES, abstract_params, batch_sharding
from cai_jax.text import bucket_length
from cai_jax.train.rl_lora import abstract_lora_state, merged_policy
from experiments.plan_kit import (
    Held,
    PlanContext,
    StagePlan,
    Step,
    _batch,
    _tokens,
    loaded,
    option_scorer,
    sampler,
    train_state,
    train_step,
)

STAGES = ("revisions", "sft", "feedback", "pm", "ppo", "eval")
_REQUEST_TOKENS = 64  # a request turn's bound, as cai.revisions checks dialogues
_QUESTION_TOKENS = 128  # a feedback question's principle and framing around the two responses (estimate)


# ---------------------------------------------------------------- the stages


def plan_revisions(ctx: PlanContext) -> StagePlan:
    """The helpful model answers, critiques and revises; the last revision's prompt is the longest."""
    r = ctx.configs["revisions"].revisions
    params, held = loaded(ctx, Transformer(ctx.base), "base model")
    turns = 1 + r.num_revisions * (2 if r.mode == "critique" else 1)
    longest = ctx.prompt_tokens + (turns - 1) * (r.max_new_tokens + _REQUEST_TOKENS)
    b = r.batch_size
    step = sampler(ctx, "sampler (last round)", ctx.base, params, rows=b, distinct=b, longest=longest,
                   new_tokens=r.max_new_tokens, sharding=ctx.first_device)  # fmt: skip
    return StagePlan("revisions", (held,), (step,), "one sampler call (the last round's prompts)")


def plan_sft(ctx: PlanContext) -> StagePlan:
    from cai_jax.train.steps import sft_step

    s = ctx.configs["sft"].sft
    _, base = loaded(ctx, Transformer(ctx.base), "base model")
    module = Transformer(ctx.base)
    b, l = s.batch_size, s.seq_len
    state, shardings, opt, held = train_state(ctx, module, b, l, s.optimizer(), "train state")
    names = ("tokens", "mask", "loss_mask") + (("segment_ids", "positions") if s.packing else ())
    batch = _batch({k: ((b, l), jnp.int32) for k in names}, batch_sharding(ctx.mesh))
    step = train_step(
        ctx, "sft step", functools.partial(sft_step, model=module, optimizer=opt), state, shardings, batch
    )
    return StagePlan("sft", (base, held), (step,), "one optimizer step")


def _question_tokens(ctx: PlanContext, responses_new_tokens: int, settings) -> int:
    cot = settings.cot_max_new_tokens + 8 if settings.cot else 0
    return ctx.prompt_tokens + 2 * responses_new_tokens + _QUESTION_TOKENS + cot


def plan_feedback(ctx: PlanContext) -> StagePlan:
    """The SL-CAI policy samples two responses per prompt; the feedback model scores the options."""
    f, settings = ctx.configs["feedback"].feedback, ctx.configs["feedback"].settings()
    policy, held_policy = loaded(ctx, Transformer(ctx.base), "policy (sft/export)")
    judge, held_judge = loaded(ctx, Transformer(ctx.feedback), "feedback model")
    b = f.batch_size
    steps = [sampler(ctx, "sampler (two responses per prompt)", ctx.base, policy, rows=2 * b, distinct=b,
                     longest=ctx.prompt_tokens, new_tokens=f.max_new_tokens, sharding=ctx.first_device)]  # fmt: skip
    questions = b * settings.ensemble * (2 if settings.swap else 1) * settings.cot_samples
    question = _question_tokens(ctx, f.max_new_tokens, settings)
    if settings.cot:
        steps.append(sampler(ctx, "sampler (reasoning)", ctx.feedback, judge, rows=questions, distinct=questions,
                             longest=question, new_tokens=settings.cot_max_new_tokens, sharding=ctx.first_device))  # fmt: skip
    steps.append(option_scorer(ctx, "option scorer", ctx.feedback, judge, questions=questions,
                               question_tokens=question, batch=settings.scoring_batch_size))  # fmt: skip
    return StagePlan("feedback", (held_policy, held_judge), tuple(steps), "one batch of prompts, labelled")


def plan_pm(ctx: PlanContext) -> StagePlan:
    """PMP then the PM fine-tune: the same step shapes; the PMP train state stays alive meanwhile."""
    from cai_jax.train.steps import pm_step

    p = ctx.configs["pm"].pm
    _, base = loaded(ctx, Transformer(ctx.base), "base model")
    module = ScalarModel(ctx.base)
    b, l = p.batch_size, p.seq_len
    state, shardings, opt, held = train_state(ctx, module, b, l, p.optimizer(), "PM train state")
    held_all = [base, held]
    if p.pmp.enabled:  # stage_pm keeps the PMP result (its train state) while the PM trains
        held_all.append(train_state(ctx, module, b, l, p.pmp.optimizer(), "PMP train state (kept by the pm stage)")[3])
    shapes = {k: ((b, l), jnp.int32) for k in ("tokens_a", "mask_a", "tokens_b", "mask_b")}
    batch = _batch({**shapes, "p": ((b,), jnp.float32)}, batch_sharding(ctx.mesh))
    fn = functools.partial(pm_step, model=module, optimizer=opt, centering=p.centering)
    step = train_step(ctx, "pm step", fn, state, shardings, batch)
    return StagePlan("pm", tuple(held_all), (step,), "one optimizer step (PMP and PM alike)")


def plan_ppo(ctx: PlanContext) -> StagePlan:
    """Rollouts with the sharded policy, teacher-forced policy/reference/value passes, PM scores, updates."""
    from cai_jax.train.pm_reward import _pm_scores
    from cai_jax.train.ppo import _build

    c = ctx.configs["ppo"].ppo
    cfg = c.settings
    lora = ctx.configs["ppo"].model.lora.config()
    policy_cfg, pm_cfg = ctx.base, ctx.pm
    value_cfg = pm_cfg if cfg.value_init == "pm" else policy_cfg
    _, held_policy = loaded(ctx, Transformer(policy_cfg), "policy (sft/export)")
    _, held_pm = loaded(ctx, ScalarModel(pm_cfg), "PM (pm/export)")
    width, n, micro = bucket_length(ctx.prompt_tokens, 16), cfg.max_new_tokens, cfg.micro_batch_size
    steps = _build(policy_cfg, policy_cfg, value_cfg, cfg, c.optimizer(), ctx.mesh, ctx.rules, width, lora)
    sample = _tokens((micro, width + n))
    params = {
        "policy": abstract_params(Transformer(policy_cfg), sample, ctx.mesh, ctx.rules),
        "value": abstract_params(ScalarModel(value_cfg), sample, ctx.mesh, ctx.rules),
    }
    if cfg.shared_backbone:
        params["value"] = {"head": params["value"]["head"]}
    if lora is not None:  # one frozen base for policy, reference (and value), adapters (train/rl_lora.py)
        params = abstract_lora_state(
            params["policy"], params["value"], policy_cfg, value_cfg, lora, value_from_policy=cfg.value_init == "policy"
        )
    state = jax.eval_shape(steps.create, params, jax.random.key(0))
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, steps.shardings)
    pm = abstract_params(ScalarModel(pm_cfg), _tokens((micro, 16)), ctx.mesh, ctx.rules)
    if lora is None:
        ref = abstract_params(Transformer(policy_cfg), sample, ctx.mesh, ctx.rules)
        held_ref = Held("reference (sharded)", bytes_per_device(ref))
        sampled = state.params["policy"]
    else:  # the reference is the base; the sampler reads a merged copy of the policy
        ref = None
        sampled = jax.eval_shape(functools.partial(merged_policy, lora=lora), state.params["policy"])
        sampled = jax.tree.map(
            lambda x, b: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=b.sharding),
            sampled, state.params["policy"]["base"],
        )  # fmt: skip
        held_ref = Held("merged policy for the sampler", bytes_per_device(sampled))
    held = (
        held_policy,
        held_pm,
        Held("policy + value train state", bytes_per_device(state.params), bytes_per_device(state.opt_state)),
        held_ref,
        Held("PM (sharded by PMReward)", bytes_per_device(pm)),
    )
    rollout, chunks = cfg.rollout_batch_size, cfg.rollout_batch_size / micro
    gen = cfg.generation_batch_size or rollout
    rows = NamedSharding(ctx.mesh, P(BATCH_AXES))
    seqs = {"t": ((micro, width + n), jnp.int32), "m": ((micro, width + n), jnp.bool_), "r": ((micro, n), jnp.bool_)}
    chunk = _batch(seqs, rows)
    k = cfg.minibatch_size // micro
    mb_fields = {"tokens": jnp.int32, "mask": jnp.bool_, "resp_mask": jnp.bool_}
    mb = {
        name: ((k, micro, width + n if name in ("tokens", "mask") else n), mb_fields.get(name, jnp.float32))
        for name in ("tokens", "mask", "resp_mask", "old_logp", "old_values", "advantages", "returns")
    }
    replicated = ctx.replicated
    pm_rows = _batch({"t": ((micro, width + n), jnp.int32), "m": ((micro, width + n), jnp.bool_)}, replicated)
    plan_steps = (
        sampler(
            ctx,
            "sampler (rollouts)",
            policy_cfg,
            sampled,
            rows=gen,
            distinct=gen,
            longest=width,
            new_tokens=n,
            sharding=replicated,
            calls=math.ceil(rollout / gen),
        ),  # fmt: skip
        Step(
            compile_cost(
                "policy/reference/value forward",
                steps.forward.jitted,
                state.params,
                ref,
                chunk["t"],
                chunk["m"],
                chunk["r"],
                shapes=f"{micro} x {width + n} tokens",
                resident=(state.params, ref),
                mesh=ctx.mesh,
            ),
            chunks,
        ),  # fmt: skip
        Step(
            compile_cost(
                "PM scores",
                _pm_scores(pm_cfg),
                pm,
                pm_rows["t"],
                pm_rows["m"],
                resident=pm,
                shapes=f"{micro} x {width + n} tokens",
                mesh=ctx.mesh,
            ),
            chunks,
        ),  # fmt: skip
        Step(
            compile_cost(
                "ppo update",
                steps.update.jitted,
                state,
                _batch(mb, NamedSharding(ctx.mesh, P(None, BATCH_AXES))),
                shapes=f"{k} x {micro} x {width + n} tokens",
                resident=state,
                mesh=ctx.mesh,
            ),
            cfg.ppo_epochs * rollout // cfg.minibatch_size,
        ),  # fmt: skip
    )
    return StagePlan("ppo", held, plan_steps, "one PPO iteration")


def plan_eval(ctx: PlanContext) -> StagePlan:
    """Every compared model answers the held-out prompts (all kept loaded), PM-scored and AI-compared."""
    from cai_jax.checkpoints.pm import _score_fn

    ev = ctx.configs["eval"]
    e = ev.eval
    params, held_model = loaded(ctx, Transformer(ctx.base), "model")
    compared = 2 + len(ctx.configs["ppo"].snapshot_iterations())  # helpful, sl-cai, rl-cai snapshots
    held = [Held(f"{compared} compared models (loaded on device 0, kept)", compared * held_model.params_bytes)]
    pm, held_pm = loaded(ctx, ScalarModel(ctx.pm), "scorer PM")
    held.append(held_pm)
    judge = params
    if ev.judged.feedback_model.name:  # else the judge is the helpful model, loaded once
        judge, held_judge = loaded(ctx, Transformer(ctx.feedback), "judge (feedback model)")
        held.append(held_judge)
    n, new = e.num_prompts, e.max_new_tokens
    pm_seq_len = ctx.configs["pm"].pm.seq_len  # the scorer PM reads at most its training seq_len
    length = bucket_length(min(ctx.prompt_tokens + new, pm_seq_len), 16)  # LoadedPM.score's padded length
    sds = functools.partial(jax.ShapeDtypeStruct, sharding=ctx.first_device)
    pm_rows = 8  # stages/eval.pm_scores: pm.score_texts(batch_size=8)
    settings = ev.settings_for_elo()
    steps = (
        sampler(
            ctx,
            "sampler",
            ctx.base,
            params,
            rows=n,
            distinct=n,
            longest=ctx.prompt_tokens,
            new_tokens=new,
            sharding=ctx.first_device,
        ),  # fmt: skip
        Step(
            compile_cost(
                "PM scores",
                _score_fn(ctx.pm),
                pm,
                sds((pm_rows, length), jnp.int32),
                sds((pm_rows, length), jnp.bool_),
                shapes=f"{pm_rows} x {length} tokens",
                resident=pm,
            ),
            math.ceil(n / pm_rows),
        ),  # fmt: skip
        option_scorer(
            ctx,
            "Elo judge option scorer",
            ctx.feedback,
            judge,
            questions=n * 2,
            question_tokens=_question_tokens(ctx, new, settings),
            batch=settings.scoring_batch_size,
        ),  # fmt: skip
    )
    return StagePlan("eval", tuple(held), steps, "one model's answers to eval.num_prompts prompts, PM-scored")


PLANNERS = {
    "revisions": plan_revisions,
    "sft": plan_sft,
    "feedback": plan_feedback,
    "pm": plan_pm,
    "ppo": plan_ppo,
    "eval": plan_eval,
}
