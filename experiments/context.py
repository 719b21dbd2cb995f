"""What every stage shares, below the stages: the context it runs in, the sections several stages
read (model, prompts), loaders of models, judges, prompts and constitutions, seeds and files.

A stage never sees the ConfigDict. It receives its own frozen config (built from the sections it
declares, `experiments.typed`) and a `StageContext`: the folders of its workdir, the settings that
say where and how it runs but not what it computes (mesh, checkpoint cadence, logging: left out of
every hash, so a run can move to another mesh), and a cache of loaded models shared by the stages of
one launch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import jax
import numpy as np

__all__ = [
    "RandomModel",
    "ModelSpec",
    "LoRASpec",
    "TunedModelSpec",
    "PromptsSpec",
    "MeshSpec",
    "CheckpointSpec",
    "LogSpec",
    "RunSettings",
    "StageContext",
    "stage_seed",
    "load_base_model",
    "load_exported",
    "load_judge",
    "load_constitution_file",
    "load_prompt_split",
    "read_jsonl",
    "write_json",
]

log = logging.getLogger(__name__)

# Per-stage constants folded into the run seed, so stages draw independent randomness.
SEED_OFFSETS = {"revisions": 0, "sft": 1, "feedback": 2, "pm": 3, "ppo": 4, "eval": 5, "feedback_helpful": 6}


def stage_seed(seed: int, name: str) -> int:
    return int(seed) * 1000 + SEED_OFFSETS[name]


# ---------------------------------------------------------------- sections several stages read


@dataclasses.dataclass(frozen=True)
class RandomModel:
    """`model.random_config`: ModelConfig fields of a random-init model (vocab from the tokenizer)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The `model` section: the starting model and the run's dtypes."""

    name: str
    init: str  # pretrained | random
    random_config: RandomModel
    dtype: str
    param_dtype: str

    def __post_init__(self):
        if self.init not in ("pretrained", "random"):
            raise ValueError(f"model.init={self.init!r}; expected pretrained or random")


@dataclasses.dataclass(frozen=True)
class LoRASpec:
    """`model.lora`: LoRA adapters for the stages that fine-tune the policy (sft, ppo); rank 0 = off."""

    rank: int  # 0 = full fine-tuning
    alpha: float  # the update is scaled by alpha / rank
    dropout: float  # only 0 is supported (cai_jax/nn/lora.py)
    target_modules: tuple[str, ...]  # regexes over "/"-joined param paths

    def __post_init__(self):
        if self.rank < 0:
            raise ValueError(f"model.lora.rank={self.rank} must be >= 0 (0 = full fine-tuning)")
        self.config()  # checks the other fields when LoRA is on

    def config(self):
        """The `nn.lora.LoRAConfig`, or None at rank 0."""
        from cai_jax.nn.lora import LoRAConfig

        if self.rank == 0:
            return None
        return LoRAConfig(rank=self.rank, alpha=self.alpha, dropout=self.dropout, target_modules=self.target_modules)


@dataclasses.dataclass(frozen=True)
class TunedModelSpec(ModelSpec):
    """The `model` section as the stages that fine-tune the policy read it: `ModelSpec` and `lora`
    (only these stages' hashes cover model.lora)."""

    lora: LoRASpec


@dataclasses.dataclass(frozen=True)
class PromptsSpec:
    """The `prompts` section: red-team and helpful prompt sources and their train / eval split."""

    red_team: str
    helpful: str
    num_red_team: int
    num_helpful: int
    eval_fraction: float
    max_chars: int


@dataclasses.dataclass(frozen=True)
class MeshSpec:
    data: int
    fsdp: int
    tensor: int


@dataclasses.dataclass(frozen=True)
class CheckpointSpec:
    save_every_steps: int
    keep_last: int
    keep_after_done: bool
    async_save: bool

    def config(self, folder):
        """The library's `CheckpointConfig` of this section, saving in `folder`."""
        from cai_jax.checkpoints.train_state import CheckpointConfig

        return CheckpointConfig(
            directory=str(folder),
            save_every_steps=self.save_every_steps,
            keep_last=self.keep_last,
            async_save=self.async_save,
        )


@dataclasses.dataclass(frozen=True)
class LogSpec:
    progress: bool
    tensorboard: bool
    wandb: str


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """Where and how stages run, not what they compute: never part of a stage's hash."""

    mesh: MeshSpec
    checkpoint: CheckpointSpec
    log: LogSpec

    @classmethod
    def from_config(cls, cfg) -> RunSettings:
        from experiments.typed import take

        return cls(
            take(MeshSpec, cfg.mesh, "mesh"),
            take(CheckpointSpec, cfg.checkpoint, "checkpoint"),
            take(LogSpec, cfg.log, "log"),
        )


@dataclasses.dataclass
class StageContext:
    """What a stage's `run(ctx, cfg)` gets besides its config: folders, run settings, the model cache."""

    workdir: Path
    name: str
    run: RunSettings
    cache: dict  # shared across the stages of one launch (loaded models)
    deps: list[str] = dataclasses.field(default_factory=list)  # stages read in this launch

    def has(self, name: str) -> bool:
        """Whether stage `name`'s artifacts are part of this launch (optional dependencies)."""
        return name in self.deps

    @property
    def dir(self) -> Path:
        return self.workdir / self.name

    def dep(self, name: str) -> Path:
        return self.workdir / name

    def checkpoints(self, sub: str = ""):
        """The stage's checkpoint settings, in `<stage>/<sub>/checkpoints`."""
        return self.run.checkpoint.config((self.dir / sub / "checkpoints").resolve())


# ---------------------------------------------------------------- loaders


def load_base_model(ctx: StageContext, m: ModelSpec, seed: int, name: str | None = None):
    """The starting model (or `name` with its dtypes): pretrained, or random weights of `random_config`."""
    from cai_jax.models import LoadedModel, Transformer, init_params, load_pretrained, load_tokenizer
    from cai_jax.models.loading import resolve_model_path

    name = name or m.name
    key = ("base", name, m.init, m.random_config, m.dtype, m.param_dtype, seed)  # one load for every spec kind
    if key in ctx.cache:
        return ctx.cache[key]
    if m.init == "pretrained":
        lm = load_pretrained(name, dtype=m.dtype, param_dtype=m.param_dtype)
    else:
        tokenizer = load_tokenizer(resolve_model_path(name))
        cfg = random_model_config(m, tokenizer)
        lm = LoadedModel(Transformer(cfg), init_params(cfg, jax.random.key(int(seed))), tokenizer, cfg, None)
    ctx.cache[key] = lm
    return lm


def random_model_config(m: ModelSpec, tokenizer):
    """The `ModelConfig` of `model.init=random`: `model.random_config` with the tokenizer's vocabulary."""
    from cai_jax.models import ModelConfig

    eos = tokenizer.eos_token_id
    return ModelConfig(
        vocab_size=len(tokenizer),
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        model_type="llama",
        bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
        dtype=m.dtype,
        param_dtype=m.param_dtype,
        **dataclasses.asdict(m.random_config),
    )


def load_exported(ctx: StageContext, folder: Path, m: ModelSpec):
    """An HF-format folder written by a stage (e.g. sft/export), with the run's dtypes.

    Raises:
      IncompleteExportError: the folder lacks its completion marker (`checkpoints.hf.EXPORT_MARKER`).
    """
    from cai_jax.checkpoints.hf import require_complete_export
    from cai_jax.models import load_pretrained

    key = ("exported", str(folder), m.dtype, m.param_dtype)
    if key not in ctx.cache:
        require_complete_export(folder)
        ctx.cache[key] = load_pretrained(folder, dtype=m.dtype, param_dtype=m.param_dtype)
    return ctx.cache[key]


def load_judge(ctx: StageContext, judge_name: str, m: ModelSpec, seed: int, *, rendering: str, batch_size: int):
    """The judge named by `feedback_model.name` (`cai_jax.cai.judge.load_judge`): "" = the starting
    model, a model name / folder, "python:<module>:<callable>" or "http://host:port"; LM judges
    read `rendering` ("chat" | "raw") with the run's dtypes."""
    from cai_jax.cai.judge import PYTHON_PREFIX
    from cai_jax.cai.judge_http import HTTP_PREFIXES
    from cai_jax.cai.judge_loading import load_judge as make_judge

    key = ("judge", judge_name, m, seed, rendering, batch_size)
    if key not in ctx.cache:
        lm = None
        if not judge_name.startswith((PYTHON_PREFIX, *HTTP_PREFIXES)):
            lm = load_base_model(ctx, m, seed, judge_name or None)
        ctx.cache[key] = make_judge(
            judge_name or m.name, rendering=rendering, batch_size=batch_size, lm=lm, tokenizer=None
        )
    return ctx.cache[key]


def load_constitution_file(name: str, *, helpful: bool = False):
    """A constitution: "" = the project's default; a shipped name or a file; `helpful` ones need feedback principles."""
    from cai_jax.cai.constitution import default_constitution, load_constitution

    c = load_constitution(name) if name else default_constitution()
    if helpful and not c.feedback_principles:
        raise ValueError(f"config feedback.helpful_constitution={name!r} has no feedback principles")
    return c


def load_prompt_split(ctx: StageContext, p: PromptsSpec, kind: str, seed: int) -> tuple[list, list, dict]:
    """(train, eval, counts) of the configured red_team or helpful prompts."""
    from cai_jax.cai.prompts import load_prompts, prepare_prompts, shipped_prompts

    source = p.red_team if kind == "red_team" else p.helpful
    limit = p.num_red_team if kind == "red_team" else p.num_helpful
    key = ("prompts", kind, p, seed)
    if key in ctx.cache:
        return ctx.cache[key]
    prompts = shipped_prompts(source.split(":", 1)[1]) if source.startswith("shipped:") else load_prompts(source)
    train, evals, report = prepare_prompts(prompts, eval_fraction=p.eval_fraction, max_chars=p.max_chars, seed=seed)
    if report["too_long"]:
        n = report["too_long"]
        log.warning(
            "prompts: %d %s prompt%s of %s dropped as longer than prompts.max_chars=%d characters; "
            "lift the limit with --config.prompts.max_chars=N",
            n, kind, "" if n == 1 else "s", source, p.max_chars,
        )  # fmt: skip
    if limit:
        # Cap each side in proportion, so the held-out share stays eval_fraction.
        n_eval = round(limit * p.eval_fraction)
        train, evals = train[: limit - n_eval], evals[:n_eval]
    ctx.cache[key] = (train, evals, report)
    return ctx.cache[key]


# ---------------------------------------------------------------- files


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def json_default(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def write_json(path: Path, obj: Any) -> None:
    from cai_jax import atomic

    atomic.write_json(path, obj, indent=1, default=json_default)
