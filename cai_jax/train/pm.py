"""The preference-model trainer (Bai et al. 2022, sec. 4.1; PMP from Askell et al. 2021, sec. 4).

    rows = load_comparisons("feedback/comparisons.jsonl")      # or a list of dicts, a datasets folder
    optim = OptimConfig.from_config(cfg.pm.optim, updates=1000)  # cfg: a config, e.g. configs/base.py
    result = train_pm(lm.config, lm.params, rows, tokenizer=lm.tokenizer, optim_cfg=optim,
                      num_steps=1000, batch_size=32, seq_len=512, seed=0, workdir=f"{run}/pm",
                      eval_comparisons=held_out, export_dir=f"{run}/pm/export")
    pm = load_pm(f"{run}/pm/export")                             # cai_jax.checkpoints.pm

A comparison is {"prompt", "response_a", "response_b", "p_a"}: p_a = P(A is preferred), soft for AI
feedback, 0/1 for human or PMP labels ("p" is accepted for p_a, as `cai.pmp.build_pmp_pairs`
writes it). hh-rlhf rows {"chosen", "rejected"} (full "\\n\\nHuman: ...\\n\\nAssistant: ..."
transcripts) become p_a = 1 comparisons whose prompt is the shared conversation before the last
Assistant turn. The PM is a `ScalarModel` trained with `steps.pm_step` (binary cross-entropy of
sigmoid(r_A - r_B) against p_a, plus optional reward centering).

Training is "a batcher + a step function" on the one fit loop (`train.fit.fit_batches`), as SFT
is: `workdir/metrics.jsonl` (cut back to the restored step on resume), checkpoints with the data
position, exact resume, a FloatingPointError on a non-finite loss that leaves the last good
checkpoint. At the end `workdir/eval.json` gets the held-out accuracy, log-loss, Brier score, ECE
and reliability bins (`eval.pm.pm_metrics`) and the reward mean/std of the PM's scores over both
sides of the training comparisons (`eval.pm.reward_stats`), which RL uses to normalise rewards;
`export_dir` gets the PM artifact (`checkpoints.pm.save_pm`).

PMP then PM, as `train_pmp_then_pm` chains them (the pm stage of a run calls it):

    pmp, pm = train_pmp_then_pm(cfg, lm_params, build_pmp_pairs(questions), comparisons,
                                pmp=dict(workdir=f"{run}/pm/pmp", num_steps=..., ...),
                                pm=dict(workdir=f"{run}/pm", export_dir=f"{run}/pm/export", ...), ...)

The first phase converts the LM params (drops an untied `lm_head`, initialises a fresh score head);
the second starts from the PMP `ScalarModel` params {"backbone", "head"} as they are.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cai_jax.checkpoints.train_state import CheckpointConfig
from cai_jax.models import ModelConfig, ScalarModel
from cai_jax.sharding import DEFAULT_RULES, Rules
from cai_jax.train.fit import fit_batches
from cai_jax.train.flops import model_flops_per_token
from cai_jax.train.pm_data import (
    ComparisonError,
    PMBatcher,
    count_pair_tokens,
    load_comparisons,
    mix_comparisons,
    tokenize_comparison,
    tokenize_comparisons,
    validate_comparison,
)
from cai_jax.train.pm_report import evaluate_pm, export_pm, score_pairs, write_report
from cai_jax.train.state import OptimConfig, TrainState
from cai_jax.train.steps import pm_step

__all__ = [
    "ComparisonError",
    "load_comparisons",
    "validate_comparison",
    "mix_comparisons",
    "tokenize_comparison",
    "tokenize_comparisons",
    "PMBatcher",
    "scalar_model_params",
    "score_pairs",
    "PMResult",
    "train_pm",
    "train_pmp_then_pm",
]

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- params


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(k, simple=True, separator="/"): tuple(np.shape(x)) for k, x in flat}


def scalar_model_params(params: Any, cfg: ModelConfig, *, seed: int = 0) -> dict:
    """`ScalarModel` params from LM params or from `ScalarModel` params.

    LM params (a `Transformer` tree) become the backbone, without an untied model's `lm_head`
    (a PM reads the final hidden state, never the logits), and get a fresh head initialised as
    `ScalarModel` does (kernel N(0, 1e-3^2) [E, 1] from `key(seed)`, bias 0). Params that already
    have {"backbone", "head"} (e.g. a PMP model) are returned as they are.

    Raises:
      ValueError: naming the paths that are missing, unexpected or of the wrong shape for `cfg`.
    """
    params = nn.meta.unbox(params)
    if isinstance(params, Mapping) and set(params) == {"backbone", "head"}:
        out = dict(params)
    else:
        backbone = {k: v for k, v in params.items() if k != "lm_head"}
        kernel = nn.initializers.normal(1e-3)(jax.random.key(seed), (cfg.hidden_size, 1), cfg.jnp_param_dtype)
        out = {"backbone": backbone, "head": {"kernel": kernel, "bias": jnp.zeros((1,), cfg.jnp_param_dtype)}}
    tokens = jax.ShapeDtypeStruct((1, 2), jnp.int32)
    want = _shapes(nn.meta.unbox(jax.eval_shape(ScalarModel(cfg).init, jax.random.key(0), tokens)["params"]))
    got = _shapes(out)
    problems = [f"missing {p}" for p in sorted(set(want) - set(got))]
    problems += [f"unexpected {p}" for p in sorted(set(got) - set(want))]
    problems += [
        f"{p} has shape {got[p]}, config implies {want[p]}" for p in sorted(set(got) & set(want)) if got[p] != want[p]
    ]
    if problems:
        raise ValueError(f"params do not fit ScalarModel({cfg.model_type} config): " + "; ".join(problems[:8]))
    return out


# ---------------------------------------------------------------- the trainer


@dataclasses.dataclass
class PMResult:
    """What `train_pm` returns: the final train state and the report written to eval.json."""

    state: TrainState
    report: dict


def _tokenized(rows: Any, tokenizer: Any, seq_len: int, rendering: str, name: str) -> list[dict]:
    if isinstance(rows, Sequence) and rows and isinstance(rows[0], Mapping) and "input_ids_a" in rows[0]:
        return list(rows)  # already tokenized
    if tokenizer is None:
        raise ValueError(f"{name}: text comparisons need a tokenizer (or rows with input_ids_a / input_ids_b)")
    return tokenize_comparisons(load_comparisons(rows), tokenizer, seq_len=seq_len, rendering=rendering, name=name)


def train_pm(
    model_cfg: ModelConfig,
    params: Any,
    comparisons: Any,
    *,
    optim_cfg: OptimConfig | collections.abc.Mapping,
    ckpt_cfg: CheckpointConfig | None = None,
    mesh_cfg: Any = None,
    num_steps: int,
    batch_size: int,
    seq_len: int,
    seed: int = 0,
    workdir: str | os.PathLike,
    centering: float = 0.0,
    eval_comparisons: Any = None,
    export_dir: str | os.PathLike | None = None,
    tokenizer: Any = None,
    rendering: str = "chat",
    rules: Rules = DEFAULT_RULES,
    pad_id: int | None = None,
    step_fn: Callable = pm_step,
    reward_stats_max_pairs: int | None = None,
    n_bins: int = 10,
    peak_flops_per_device: float | str | None = "auto",
) -> PMResult:
    """Trains a preference model for `num_steps` steps (total, counting resumed ones), then evaluates it.

    Args:
      model_cfg: the backbone's config; the model is `ScalarModel(model_cfg)`.
      params: LM params (converted by `scalar_model_params`), `ScalarModel` params (e.g. from PMP),
        or None for a random init.
      comparisons: anything `load_comparisons` reads (text; needs `tokenizer`), or rows already
        tokenized by `tokenize_comparison`.
      optim_cfg: `OptimConfig` or its config dict.
      ckpt_cfg: default `workdir/checkpoints`, saving only the end.
      mesh_cfg: mesh sizes (default all devices on the data axis).
      num_steps, batch_size, seq_len, seed: run length, pairs per global batch, padded length of
        each side, data order / head init / state rng seed.
      workdir: metrics.jsonl, eval.json and the default checkpoints go here.
      centering: `pm_loss`'s reward-centering coefficient.
      eval_comparisons: held-out comparisons (same forms as `comparisons`) for accuracy and
        calibration; None skips them.
      export_dir: if given, the final PM is written there with `checkpoints.pm.save_pm` (with
        the reward statistics and the eval summary).
      tokenizer: tokenizes text comparisons; saved with the export.
      rendering: "chat" (the tokenizer's chat template) or "transcript" (raw Human/Assistant).
      rules: logical-axis rules.
      pad_id: padding id (masked); default the tokenizer's pad / eos id, else 0.
      step_fn: `step(state, batch, *, model, optimizer, centering) -> (state, metrics)`.
      reward_stats_max_pairs: score at most this many training pairs (a seeded sample) for the
        reward statistics; None scores all, 0 skips them.
      n_bins: reliability bins.
      peak_flops_per_device: for "mfu" in metrics.jsonl ("auto": `train.flops.PEAK_FLOPS`; None: off).
        Model FLOPs per token count the backbone and the score head, not an LM head.

    Returns:
      `PMResult(state, report)`; `report` is what eval.json holds: {"steps", "train": {"pairs",
      "truncated_sides"}, "reward_mean", "reward_std", "reward_count", "eval": pm_metrics or None,
      "reliability_table"}.

    Raises:
      ComparisonError: a bad comparison row (before anything is trained).
      FloatingPointError: a non-finite loss or gradient norm, naming the step and batch; the latest
        checkpoint is the last one saved before it.
    """
    module = ScalarModel(model_cfg)
    workdir = os.fspath(workdir)
    if pad_id is None:
        from cai_jax.text import pad_id as tokenizer_pad_id

        pad_id = tokenizer_pad_id(tokenizer) if tokenizer is not None else int(model_cfg.pad_token_id or 0)
    train_pairs = _tokenized(comparisons, tokenizer, seq_len, rendering, "PM train")
    eval_pairs = (
        None if eval_comparisons is None else _tokenized(eval_comparisons, tokenizer, seq_len, rendering, "PM eval")
    )
    batcher = PMBatcher(train_pairs, batch_size=batch_size, seq_len=seq_len, seed=seed, pad_id=pad_id)

    if params is not None:
        params = scalar_model_params(params, model_cfg, seed=seed)
    state, mesh = fit_batches(
        module,
        params,
        batcher,
        functools.partial(step_fn, centering=centering),
        optim_cfg=optim_cfg,
        ckpt_cfg=ckpt_cfg,
        mesh_cfg=mesh_cfg,
        rules=rules,
        seed=seed,
        num_steps=num_steps,
        seq_len=seq_len,
        workdir=workdir,
        count_tokens=count_pair_tokens,
        flops_per_token=model_flops_per_token(model_cfg, seq_len, lm_head=False, score_head=True),
        peak_flops_per_device=peak_flops_per_device,
        name="PM",
    )

    report = evaluate_pm(
        state.params,
        module,
        batcher,
        eval_pairs,
        batch_size=batch_size,
        seq_len=seq_len,
        pad_id=pad_id,
        mesh=mesh,
        rules=rules,
        seed=seed,
        max_pairs=reward_stats_max_pairs,
        n_bins=n_bins,
    )
    report["steps"] = int(jax.device_get(state.step))
    write_report(report, os.path.join(workdir, "eval.json"))
    if export_dir is not None:
        export_pm(state.params, model_cfg, export_dir, tokenizer, report, rendering=rendering, seq_len=seq_len)
    return PMResult(state, report)


def train_pmp_then_pm(
    model_cfg: ModelConfig,
    lm_params: Any,
    pmp_pairs: Any,
    comparisons: Any,
    *,
    pmp: Mapping[str, Any] | None,
    pm: Mapping[str, Any],
    **common: Any,
) -> tuple[PMResult | None, PMResult]:
    """PMP on `pmp_pairs` (hard labels, e.g. `build_pmp_pairs`) from the LM, then PM fine-tuning.

    The PM phase starts from the PMP `ScalarModel` params (or from the LM when `pmp` is None);
    both phases resume independently (a finished PMP phase is restored, not retrained).

    Args:
      pmp, pm: each phase's own `train_pm` keyword arguments (`optim_cfg`, `ckpt_cfg`,
        `num_steps`, `batch_size`, `workdir`, and e.g. `eval_comparisons`, `export_dir`,
        `reward_stats_max_pairs`, `centering`); `pmp=None` skips pretraining.
      common: the `train_pm` keyword arguments both phases share (seq_len, seed, tokenizer,
        rendering, mesh_cfg, pad_id, n_bins, ...).

    Returns:
      (PMP result or None, PM result).
    """
    first, params = None, lm_params
    if pmp is not None:
        first = train_pm(model_cfg, lm_params, pmp_pairs, **common, **pmp)
        params = first.state.params  # sharded device arrays: fine on several hosts too
    return first, train_pm(model_cfg, params, comparisons, **common, **pm)
