"""One function per stage for `experiments.plan`: which models a stage holds, which steps it compiles, at what shapes.

    plan = PLANNERS["sft"](ctx)      # -> StagePlan: held buffers, compiled steps, FLOPs per stage step

Each function mirrors what the stage function in experiments/stages.py (and the library calls it
makes) holds on a device while it runs, and lowers the same jitted steps at the shapes the config
gives, on abstract arrays. Where a shape depends on the data (prompt lengths), it is derived from
`ctx.prompt_tokens`, an upper bound on a rendered prompt, with the bounds the stages themselves
check (`cai.revisions` bounds a dialogue by 64 tokens per request turn). Models a stage loads with
`load_pretrained` / `load_pm` sit whole on the first device (`loaded`); train states and the
copies PPO places on the mesh are sharded by the config's mesh.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from cai_jax.models import ModelConfig, ScalarModel, Transformer, init_cache
from cai_jax.planning import ExecutableCost, bytes_per_device, compile_cost
from cai_jax.sampling import abstract_decode_step, abstract_sample_call, call_shapes
from cai_jax.sharding import BATCH_AXES, DEFAULT_RULES, abstract_params, batch_sharding
from cai_jax.text import bucket_length, pad_batch_size
from cai_jax.train.loop import abstract_train_state, jit_train_step

STAGES = ("revisions", "sft", "feedback", "pm", "ppo", "eval")
_REQUEST_TOKENS = 64  # a request turn's bound, as cai.revisions checks dialogues
_QUESTION_TOKENS = 128  # a feedback question's principle and framing around the two responses (estimate)
_OPTION_TOKENS = 4  # " (A)"


@dataclasses.dataclass(frozen=True)
class Held:
    """A buffer a stage holds through all its steps, per device."""

    name: str
    params_bytes: int = 0
    opt_state_bytes: int = 0


@dataclasses.dataclass(frozen=True)
class Step:
    """A compiled step of a stage and how many times one stage step calls it."""

    cost: ExecutableCost
    calls: float = 1.0
    decode: ExecutableCost | None = None  # a sampler's decode step (FLOPs of the N - 1 further steps)
    new_tokens: int = 0

    @property
    def flops_per_call(self) -> float:
        extra = (self.new_tokens - 1) * self.decode.flops if self.decode is not None else 0.0
        return self.cost.flops + extra


@dataclasses.dataclass(frozen=True)
class StagePlan:
    """Per-device memory and FLOPs of one stage: what it holds, plus its largest step's transient."""

    name: str
    held: tuple[Held, ...]
    steps: tuple[Step, ...]
    step_unit: str  # what one "step" of this stage is, for flops_per_step

    @property
    def params_bytes(self) -> int:
        return sum(h.params_bytes for h in self.held)

    @property
    def opt_state_bytes(self) -> int:
        return sum(h.opt_state_bytes for h in self.held)

    @property
    def peak(self) -> Step:
        """The step whose transient memory is largest: the stage's peak."""
        return max(self.steps, key=lambda s: s.cost.transient_bytes)

    @property
    def kv_cache_bytes(self) -> int:
        return self.peak.cost.kv_cache_bytes

    @property
    def temp_bytes(self) -> int:
        return self.peak.cost.transient_bytes - self.kv_cache_bytes

    @property
    def total_bytes(self) -> int:
        return self.params_bytes + self.opt_state_bytes + self.peak.cost.transient_bytes

    @property
    def flops_per_step(self) -> float:
        return sum(s.flops_per_call * s.calls for s in self.steps)


@dataclasses.dataclass(frozen=True)
class PlanContext:
    """What every stage planner reads: each stage's config object, the mesh and the model shapes."""

    configs: dict  # {stage: its Config object, as the stage receives it (experiments/stages/)}
    mesh: jax.sharding.Mesh
    base: ModelConfig  # model.name as the stages build it (run dtypes)
    feedback: ModelConfig  # feedback_model.name, or the base
    prompt_tokens: int  # upper bound on a rendered prompt, tokens
    rules: tuple = DEFAULT_RULES

    @property
    def first_device(self) -> SingleDeviceSharding:
        """Where `load_pretrained` and `load_pm` put a model's params (jnp.asarray: the default device)."""
        return SingleDeviceSharding(self.mesh.devices.flat[0])

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    @property
    def pm(self) -> ModelConfig:
        """The PM as `load_pm` reads it: its config.json without the run's dtypes (fp32 throughout)."""
        return self.base.replace(dtype="float32", param_dtype="float32", activation_dtype="float32")


def _tokens(shape) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, jnp.int32)


def loaded(ctx: PlanContext, module: nn.Module, name: str) -> tuple[Any, Held]:
    """A model's params as a stage loads them: whole, on the first device."""
    tokens = jnp.zeros((1, 8), jnp.int32)
    shapes = jax.eval_shape(lambda: nn.meta.unbox(module.init(jax.random.key(0), tokens)["params"]))
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=ctx.first_device), shapes)
    return params, Held(f"{name} (loaded on device 0)", params_bytes=bytes_per_device(params))


def train_state(ctx: PlanContext, module: nn.Module, rows: int, seq_len: int, optim: Any, name: str):
    """(abstract state, shardings, optimizer, Held) of a train state on the mesh, with optimizer config `optim`."""
    state, shardings, optimizer = abstract_train_state(
        module, _tokens((rows, seq_len)), optim_cfg=optim, mesh=ctx.mesh, rules=ctx.rules
    )
    held = Held(name, bytes_per_device(state.params), bytes_per_device(state.opt_state))
    return state, shardings, optimizer, held


def _batch(shapes: dict, sharding) -> dict:
    return {k: jax.ShapeDtypeStruct(s, d, sharding=sharding) for k, (s, d) in shapes.items()}


def sampler(ctx, name, cfg: ModelConfig, params, *, rows, distinct, longest, new_tokens, sharding, calls=1.0) -> Step:
    """The `generate` call for these rows and prompts, compiled, with its decode step's FLOPs."""
    b, u, p = call_shapes(cfg, rows, distinct, longest, new_tokens)
    fn, args, kwargs = abstract_sample_call(
        cfg, params, rows=b, distinct=u, prompt_len=p, max_new_tokens=new_tokens, sharding=sharding
    )
    kv = bytes_per_device(jax.eval_shape(lambda: init_cache(cfg, b, p + new_tokens)))
    shapes = f"{b} rows ({u} prompts) x {p} + {new_tokens} tokens"
    # `generate` runs outside any mesh context (the models' logical constraints are no-ops there).
    cost = compile_cost(name, fn, *args, shapes=shapes, resident=params, kv_cache_bytes=kv, **kwargs)
    step_fn, step_args = abstract_decode_step(cfg, params, rows=b, cache_len=p + new_tokens, sharding=sharding)
    decode = compile_cost(f"{name}: decode step", step_fn, *step_args, shapes=f"{b} rows")
    return Step(cost, calls, decode, new_tokens)


def option_scorer(ctx, name, cfg: ModelConfig, params, *, questions: int, question_tokens: int, batch: int) -> Step:
    """`scoring.sequence_token_logprobs` as `option_logprobs` calls it: two options per question."""
    from cai_jax.scoring import sequence_token_logprobs

    rows = 2 * questions
    b = pad_batch_size(min(batch, rows))
    length = min(bucket_length(question_tokens + _OPTION_TOKENS, 16), cfg.max_position_embeddings)
    sds = functools.partial(jax.ShapeDtypeStruct, sharding=ctx.first_device)
    args = (params, sds((b, length), jnp.int32), sds((b, length), jnp.bool_))
    cost = compile_cost(name, sequence_token_logprobs, *args, cfg=cfg, shapes=f"{b} x {length} tokens", resident=params)
    return Step(cost, math.ceil(rows / b))


def train_step(ctx, name, step_fn, state, shardings, batch: dict) -> Step:
    """A train step jitted as the loops jit it (`jit_train_step`: sharded, state donated)."""
    step = jit_train_step(step_fn, shardings, batch_sharding(ctx.mesh), ctx.mesh, ctx.rules)
    shapes = " x ".join(map(str, next(iter(batch.values())).shape)) + " tokens"
    return Step(compile_cost(name, step.jitted, state, batch, shapes=shapes, resident=state, mesh=ctx.mesh))


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
    policy_cfg, pm_cfg = ctx.base, ctx.pm
    value_cfg = pm_cfg if cfg.value_init == "pm" else policy_cfg
    _, held_policy = loaded(ctx, Transformer(policy_cfg), "policy (sft/export)")
    _, held_pm = loaded(ctx, ScalarModel(pm_cfg), "PM (pm/export)")
    width, n, micro = bucket_length(ctx.prompt_tokens, 16), cfg.max_new_tokens, cfg.micro_batch_size
    steps = _build(policy_cfg, policy_cfg, value_cfg, cfg, c.optimizer(), ctx.mesh, ctx.rules, width)
    sample = _tokens((micro, width + n))
    params = {
        "policy": abstract_params(Transformer(policy_cfg), sample, ctx.mesh, ctx.rules),
        "value": abstract_params(ScalarModel(value_cfg), sample, ctx.mesh, ctx.rules),
    }
    if cfg.shared_backbone:
        params["value"] = {"head": params["value"]["head"]}
    state = jax.eval_shape(steps.create, params, jax.random.key(0))
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, steps.shardings)
    ref = abstract_params(Transformer(policy_cfg), sample, ctx.mesh, ctx.rules)
    pm = abstract_params(ScalarModel(pm_cfg), _tokens((micro, 16)), ctx.mesh, ctx.rules)
    held = (
        held_policy,
        held_pm,
        Held("policy + value train state", bytes_per_device(state.params), bytes_per_device(state.opt_state)),
        Held("reference (sharded)", bytes_per_device(ref)),
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
            state.params["policy"],
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
