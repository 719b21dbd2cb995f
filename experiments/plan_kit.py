"""What the stage planners of `experiments/plan_stages.py` are made of: held buffers, compiled steps
and the helpers that lower a sampler, an option scorer or a train step on abstract arrays.
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

from cai_jax.models import ModelConfig, init_cache
from cai_jax.planning import ExecutableCost, bytes_per_device, compile_cost
from cai_jax.sampling import abstract_decode_step, abstract_sample_call, call_shapes
from cai_jax.sharding import DEFAULT_RULES, batch_sharding
from cai_jax.text import bucket_length, pad_batch_size
from cai_jax.train.loop import abstract_train_state, jit_train_step

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
