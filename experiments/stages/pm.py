"""Stage 4, pm: preference-model pretraining (PMP, optional) then the PM on the AI labels, mixed
with helpfulness comparisons (paper sec. 4.1; PMP from Askell et al. 2021, sec. 4), both from the
starting model (the paper's PMs start from pretrained LMs, not from the SL-CAI policy).

Writes `pm/pmp` (the PMP run), `pm/metrics.jsonl`, `pm/eval.json` (held-out accuracy, calibration,
reward statistics) and `pm/export` (the PM artifact: `cai_jax.checkpoints.pm`).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from experiments.context import ModelSpec, StageContext, load_base_model, stage_seed
from experiments.typed import take


def _optimizer(optim: Mapping[str, Any], num_steps: int):
    from cai_jax.train.state import OptimConfig

    return OptimConfig.from_config(optim, updates=num_steps // int(optim["grad_accum_steps"]))


@dataclasses.dataclass(frozen=True)
class PMP:
    enabled: bool
    source: str  # shipped | a StackExchange-style file, folder or cached hub name
    max_pairs_per_question: int
    num_steps: int
    optim: Mapping[str, Any]

    def optimizer(self):
        return _optimizer(self.optim, self.num_steps)


@dataclasses.dataclass(frozen=True)
class PM:
    pmp: PMP
    helpful_source: str  # "feedback" | a comparisons file | "" (none)
    helpful_fraction: float
    centering: float
    num_steps: int
    batch_size: int
    seq_len: int
    rendering: str
    eval_fraction: float
    optim: Mapping[str, Any]

    def optimizer(self):
        return _optimizer(self.optim, self.num_steps)


@dataclasses.dataclass(frozen=True)
class HelpfulLabels:
    label_helpful: bool  # whether the feedback stage labelled helpful prompts


@dataclasses.dataclass(frozen=True)
class Calibration:
    calibration_bins: int


@dataclasses.dataclass(frozen=True)
class Config:
    seed: int
    model: ModelSpec
    feedback: HelpfulLabels
    pm: PM
    eval: Calibration

    @classmethod
    def build(cls, cfg) -> Config:
        c = take(cls, cfg, "config")
        if c.pm.helpful_source == "feedback" and not c.feedback.label_helpful:
            raise ValueError(
                "config pm.helpful_source='feedback' mixes in the feedback stage's helpfulness labels, but "
                "feedback.label_helpful is False: turn it on, or set pm.helpful_source to a file or ''"
            )
        return c

    def exports(self) -> list[str]:
        """The model folders this stage writes (the pipeline checks their completion marker on skip)."""
        return ["export"]

    def preflight(self) -> None:
        """The PMP source and a helpfulness comparisons file exist and parse (experiments/preflight.py)."""
        from experiments import preflight as pf

        if self.pm.pmp.enabled and self.pm.pmp.source != "shipped":
            pf.check_pmp_source("pm.pmp.source", self.pm.pmp.source)
        if self.pm.helpful_source not in ("", "feedback"):
            pf.check_comparisons("pm.helpful_source", self.pm.helpful_source)


def split_by_prompt(rows: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Held-out comparisons by a hash of the prompt text, so a prompt's pairs stay on one side."""
    train, held = [], []
    for row in rows:
        digest = hashlib.sha256(f"{seed}\x00{row['prompt']}".encode()).digest()
        (held if int.from_bytes(digest[:8], "big") / 2**64 < eval_fraction else train).append(row)
    if not train or (eval_fraction > 0 and not held):
        # Tiny runs: fall back to a positional split rather than an empty side.
        k = max(1, round(len(rows) * eval_fraction)) if eval_fraction > 0 else 0
        train, held = rows[: len(rows) - k], rows[len(rows) - k :]
    return train, held


def feedback_comparisons(folder: Path) -> list[dict]:
    """The comparisons of a feedback folder's shards (`cai.feedback.comparison_files`), in order.

    Each shard is validated as its own file, so a bad row is reported by shard path, line and field.
    """
    from cai_jax.cai.feedback import comparison_files
    from cai_jax.train.pm import load_comparisons

    keep = ("prompt", "response_a", "response_b", "p_a")
    return [{k: r[k] for k in keep} for path in comparison_files(folder) for r in load_comparisons(path)]


def run(ctx: StageContext, cfg: Config) -> dict:
    from cai_jax.cai.pmp import build_pmp_pairs, load_pmp_questions, shipped_pmp_sample
    from cai_jax.train.pm import load_comparisons, mix_comparisons, train_pmp_then_pm

    p, seed = cfg.pm, stage_seed(cfg.seed, "pm")
    lm = load_base_model(ctx, cfg.model, cfg.seed)

    def labelled(folder: str) -> list[dict]:
        return feedback_comparisons(ctx.dep("feedback") / folder)

    train_rows, eval_rows = split_by_prompt(labelled("comparisons"), p.eval_fraction, seed)
    if p.helpful_source:
        if p.helpful_source == "feedback":
            helpful_train, helpful_eval = split_by_prompt(labelled("helpful"), p.eval_fraction, seed)
            eval_rows = eval_rows + helpful_eval
        else:
            helpful_train = load_comparisons(p.helpful_source)
        train_rows = mix_comparisons(train_rows, helpful_train, p.helpful_fraction, seed=seed)
    if not train_rows:
        raise ValueError(f"pm: no training comparisons in {ctx.dep('feedback')} (feedback.num_prompts too small?)")
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    common = dict(
        mesh_cfg=ctx.run.mesh,
        seq_len=p.seq_len,
        seed=seed,
        tokenizer=lm.tokenizer,
        rendering=p.rendering,
        pad_id=pad,
        n_bins=cfg.eval.calibration_bins,
    )
    summary: dict = {}
    pmp = None
    if p.pmp.enabled:
        source = p.pmp.source
        questions = shipped_pmp_sample() if source == "shipped" else load_pmp_questions(source)
        pairs = build_pmp_pairs(questions, max_pairs_per_question=p.pmp.max_pairs_per_question, seed=seed)
        pmp = dict(
            optim_cfg=p.pmp.optimizer(),
            ckpt_cfg=ctx.checkpoints("pmp"),
            num_steps=p.pmp.num_steps,
            batch_size=min(p.batch_size, len(pairs)),
            workdir=ctx.dir / "pmp",
        )
    pm = dict(
        optim_cfg=p.optimizer(),
        ckpt_cfg=ctx.checkpoints(),
        num_steps=p.num_steps,
        batch_size=min(p.batch_size, len(train_rows)),  # tiny runs have fewer pairs than a batch
        workdir=ctx.dir,
        centering=p.centering,
        eval_comparisons=eval_rows or None,
        export_dir=ctx.dir / "export",
    )
    first, result = train_pmp_then_pm(
        lm.config, lm.params, pairs if pmp else None, train_rows, pmp=pmp, pm=pm, **common
    )
    if first is not None:
        summary["pmp"] = {"pairs": len(pairs), "reward_mean": first.report["reward_mean"]}
    r = result.report
    summary.update(
        train_pairs=len(train_rows),
        eval_pairs=len(eval_rows),
        reward_mean=r["reward_mean"],
        reward_std=r["reward_std"],
        eval={k: r["eval"][k] for k in ("n", "accuracy", "log_loss", "brier", "ece")} if r["eval"] else None,
    )
    return summary
