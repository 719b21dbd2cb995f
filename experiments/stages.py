"""The stage functions of the launcher: config -> library calls -> artifacts in the stage folder.

Each `stage_<name>(ctx)` reads the resolved config and the folders of the stages it depends on,
writes into `ctx.dir`, resumes from what an interrupted attempt left there, and returns a small
JSON summary (kept in the stage's DONE marker and the report). The heavy lifting lives in the
library (`cai_jax.cai.revisions`, `cai_jax.train.sft`, ...); this file only wires it to a config.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import jax
import numpy as np

from experiments.pipeline import StageContext

log = logging.getLogger(__name__)

# Per-stage constants folded into the run seed, so stages draw independent randomness.
SEED_OFFSETS = {"revisions": 0, "sft": 1, "feedback": 2, "pm": 3, "ppo": 4, "eval": 5, "feedback_helpful": 6}


def stage_seed(ctx: StageContext, name: str | None = None) -> int:
    return int(ctx.cfg.seed) * 1000 + SEED_OFFSETS[name or ctx.name]


# ---------------------------------------------------------------- shared loading


def load_base_model(ctx: StageContext, name: str | None = None):
    """The configured starting model (pretrained, or random weights of `model.random_config`)."""
    from cai_jax.models import LoadedModel, Transformer, init_params, load_pretrained, load_tokenizer
    from cai_jax.models.loading import resolve_model_path

    m = ctx.cfg.model
    name = name or m.name
    key = ("base", name)
    if key in ctx.cache:
        return ctx.cache[key]
    if m.init == "pretrained":
        lm = load_pretrained(name, dtype=m.dtype, param_dtype=m.param_dtype)
    elif m.init == "random":
        tokenizer = load_tokenizer(resolve_model_path(name))
        cfg = random_model_config(m, tokenizer)
        params = init_params(cfg, jax.random.key(int(ctx.cfg.seed)))
        lm = LoadedModel(Transformer(cfg), params, tokenizer, cfg, None)
    else:
        raise ValueError(f"config model.init={m.init!r}; expected pretrained or random")
    ctx.cache[key] = lm
    return lm


def random_model_config(m, tokenizer):
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
        **m.random_config.to_dict(),
    )


def load_exported(ctx: StageContext, folder: Path):
    """An HF-format folder written by a stage (e.g. sft/export), with the run's dtypes."""
    from cai_jax.models import load_pretrained

    key = ("exported", str(folder))
    if key not in ctx.cache:
        m = ctx.cfg.model
        ctx.cache[key] = load_pretrained(folder, dtype=m.dtype, param_dtype=m.param_dtype)
    return ctx.cache[key]


def load_constitution_from(ctx: StageContext):
    from cai_jax.cai.constitution import default_constitution, load_constitution

    return load_constitution(ctx.cfg.constitution) if ctx.cfg.constitution else default_constitution()


def load_helpful_constitution(ctx: StageContext):
    """The helpfulness questions (`feedback.helpful_constitution`: a shipped name or a file)."""
    from cai_jax.cai.constitution import load_constitution

    c = load_constitution(ctx.cfg.feedback.helpful_constitution)
    if not c.feedback_principles:
        raise ValueError(
            f"config feedback.helpful_constitution={ctx.cfg.feedback.helpful_constitution!r} has no feedback principles"
        )
    return c


def load_judge(ctx: StageContext, settings):
    """The judge of `feedback_model.name`: "" = the starting model, a model name/folder, or
    "python:<module>:<callable>" (`cai.judge`); LM judges read the settings' rendering."""
    from cai_jax.cai.judge import PYTHON_PREFIX, LMJudge, load_callable

    name = ctx.cfg.feedback_model.name
    key = ("judge", name, settings.rendering, settings.scoring_batch_size)
    if key not in ctx.cache:
        if name.startswith(PYTHON_PREFIX):
            ctx.cache[key] = load_callable(name)
        else:
            lm = load_base_model(ctx, name or None)
            rendering, batch = settings.rendering, settings.scoring_batch_size
            ctx.cache[key] = LMJudge(lm, rendering=rendering, batch_size=batch, name=name or ctx.cfg.model.name)
    return ctx.cache[key]


def load_prompt_split(ctx: StageContext, kind: str) -> tuple[list, list, dict]:
    """(train, eval, counts) of the configured red_team or helpful prompts."""
    from cai_jax.cai.prompts import load_prompts, prepare_prompts, shipped_prompts

    p = ctx.cfg.prompts
    source = p[kind]
    limit = int(p.num_red_team if kind == "red_team" else p.num_helpful)
    key = ("prompts", kind, source, limit)
    if key in ctx.cache:
        return ctx.cache[key]
    if source.startswith("shipped:"):
        prompts = shipped_prompts(source.split(":", 1)[1])
    else:
        prompts = load_prompts(source)
    train, evals, report = prepare_prompts(
        prompts, eval_fraction=float(p.eval_fraction), max_chars=int(p.max_chars), seed=int(ctx.cfg.seed)
    )
    if limit:
        # Cap each side in proportion, so the held-out share stays eval_fraction.
        n_eval = round(limit * float(p.eval_fraction))
        train, evals = train[: limit - n_eval], evals[:n_eval]
    ctx.cache[key] = (train, evals, report)
    return ctx.cache[key]


def stage_optim(cfg, stage: str):
    """The optimizer config of a training stage (sft | pmp | pm | ppo), its schedule derived from the
    stage's own number of optimizer updates where `optim.total_steps` is 0."""
    from cai_jax.train.ppo_steps import PPOConfig
    from cai_jax.train.state import OptimConfig

    if stage == "ppo":
        c = cfg.ppo
        ppo = PPOConfig.from_config({k: v for k, v in c.items() if k not in ("num_iterations", "optim")})
        return OptimConfig.from_config(c.optim, updates=int(c.num_iterations) * ppo.updates_per_iteration)
    section = {"sft": cfg.sft, "pmp": cfg.pm.pmp, "pm": cfg.pm}[stage]
    return OptimConfig.from_config(section.optim, updates=int(section.num_steps) // int(section.optim.grad_accum_steps))


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=_json_default))
    tmp.replace(path)


def _json_default(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


# ---------------------------------------------------------------- 1. revisions


def stage_revisions(ctx: StageContext) -> dict:
    from cai_jax.cai.revisions import RevisionSettings, load_revisions, run_revisions

    r = ctx.cfg.revisions
    lm = load_base_model(ctx)
    constitution = load_constitution_from(ctx)
    red_train, _, red_report = load_prompt_split(ctx, "red_team")
    help_train, _, help_report = load_prompt_split(ctx, "helpful")
    if int(r.num_prompts):
        red_train = red_train[: int(r.num_prompts)]
    common = dict(
        temperature=float(r.temperature),
        top_p=float(r.top_p),
        rendering=r.rendering,
        seed=stage_seed(ctx),
        batch_size=int(r.batch_size),
    )
    settings = RevisionSettings(
        num_revisions=int(r.num_revisions),
        num_principles=int(r.num_principles) or None,
        mode=r.mode,
        num_few_shots=int(r.num_few_shots),
        max_new_tokens=int(r.max_new_tokens),
        **common,
    )
    # Helpful samples: the same model's answers to helpfulness prompts, no revisions (paper sec. 3.1).
    helpful = RevisionSettings(num_revisions=0, max_new_tokens=int(r.helpful_max_new_tokens), **common)
    kw = dict(process_index=jax.process_index(), process_count=jax.process_count(), progress=ctx.cfg.log.progress)
    run_revisions(lm, red_train, constitution, settings, ctx.dir / "red_team", **kw)
    run_revisions(lm, help_train, constitution, helpful, ctx.dir / "helpful", **kw)
    return {
        "red_team_rows": len(load_revisions(ctx.dir / "red_team")),
        "helpful_rows": len(load_revisions(ctx.dir / "helpful")),
        "red_team_prompts": red_report,
        "helpful_prompts": help_report,
    }


# ---------------------------------------------------------------- 2. sft


def stage_sft(ctx: StageContext) -> dict:
    from cai_jax.cai.revisions import load_revisions
    from cai_jax.cai.sft_data import build_sft_examples
    from cai_jax.checkpoints.train_state import CheckpointConfig
    from cai_jax.train.sft import train_sft

    s = ctx.cfg.sft
    lm = load_base_model(ctx)
    red = list(load_revisions(ctx.dep("revisions") / "red_team"))
    helpful = list(load_revisions(ctx.dep("revisions") / "helpful"))
    examples = build_sft_examples(
        red,
        lm.tokenizer,
        revision_round=None if int(s.revision_round) < 0 else int(s.revision_round),
        final_only=bool(s.final_only),
        helpful_rows=helpful,
        helpful_ratio=float(s.helpful_ratio),
        rendering=s.rendering,
        seed=stage_seed(ctx),
    )
    if not examples:
        raise ValueError("sft: no training examples (revisions.num_revisions=0 and no helpful samples?)")
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    rows = len(examples)
    if s.packing:
        from cai_jax.train.sft import SFTBatcher

        probe = SFTBatcher(
            examples, batch_size=1, seq_len=int(s.seq_len), seed=stage_seed(ctx), pad_id=pad, packing=True
        )
        rows = min(len(probe.rows(epoch)) for epoch in range(4))  # packed row counts vary a little by epoch
    batch_size = min(int(s.batch_size), rows)  # tiny runs have fewer rows than a batch
    train_sft(
        lm.model,
        lm.params,
        examples,
        optim_cfg=stage_optim(ctx.cfg, "sft"),
        ckpt_cfg=CheckpointConfig(
            directory=str((ctx.dir / "checkpoints").resolve()),
            save_every_steps=int(ctx.cfg.checkpoint.save_every_steps),
            keep_last=int(ctx.cfg.checkpoint.keep_last),
        ),
        mesh_cfg=ctx.cfg.mesh,
        num_steps=int(s.num_steps),
        batch_size=batch_size,
        seq_len=int(s.seq_len),
        seed=stage_seed(ctx),
        workdir=ctx.dir,
        pad_id=pad,
        export_dir=ctx.dir / "export",
        tokenizer=lm.tokenizer,
        **({"packing": True} if s.packing else {}),
    )
    metrics = read_jsonl(ctx.dir / "metrics.jsonl")
    last = metrics[-1] if metrics else {}
    return {
        "examples": len(examples),
        "by_source": _count(e.source for e in examples),
        "final_loss": last.get("loss"),
        "first_loss": metrics[0].get("loss") if metrics else None,
        "steps": len(metrics),
    }


# ---------------------------------------------------------------- 3. feedback


def feedback_settings(ctx: StageContext):
    """FeedbackSettings from the `feedback` section; the policy reads prompts as SFT rendered them."""
    from cai_jax.cai.feedback import FeedbackSettings

    return FeedbackSettings.from_config(ctx.cfg.feedback, policy_rendering=ctx.cfg.sft.rendering)


def _label_summary(ds) -> dict:
    p = np.asarray(ds["p_a"], np.float64)
    return {
        "comparisons": len(ds),
        "mean_p_a": float(p.mean()),
        "mean_confidence": float(np.abs(p - 0.5).mean() + 0.5),
        "frac_confident_0.8": float(np.mean(np.maximum(p, 1 - p) >= 0.8)),
    }


def stage_feedback(ctx: StageContext) -> dict:
    """AI labels of SL-CAI response pairs: red-team prompts under the constitution's feedback
    principles (`comparisons/`) and, with `feedback.label_helpful`, helpful prompts under the
    helpfulness questions (`helpful/`), the helpfulness half of the PM's mix."""
    from cai_jax.cai.feedback import load_comparisons_dataset, run_feedback

    f = ctx.cfg.feedback
    settings = feedback_settings(ctx)
    policy = load_exported(ctx, ctx.dep("sft") / "export")
    judge = load_judge(ctx, settings)
    common = dict(settings=settings, batch_size=int(f.batch_size), progress=bool(ctx.cfg.log.progress))
    red_train, _, _ = load_prompt_split(ctx, "red_team")
    prompts = red_train[: int(f.num_prompts)] if int(f.num_prompts) else red_train
    constitution = load_constitution_from(ctx)
    run_feedback(policy, judge, prompts, constitution, ctx.dir / "comparisons", seed=stage_seed(ctx), **common)
    summary = _label_summary(load_comparisons_dataset(ctx.dir / "comparisons"))
    if f.label_helpful:
        help_train, _, _ = load_prompt_split(ctx, "helpful")
        helpful = help_train[: int(f.num_helpful_prompts)] if int(f.num_helpful_prompts) else help_train
        seed = stage_seed(ctx, "feedback_helpful")
        run_feedback(policy, judge, helpful, load_helpful_constitution(ctx), ctx.dir / "helpful", seed=seed, **common)
        summary["helpful"] = _label_summary(load_comparisons_dataset(ctx.dir / "helpful"))
    return summary


# ---------------------------------------------------------------- 4. pm


def _ckpt(ctx: StageContext, sub: str = ""):
    from cai_jax.checkpoints.train_state import CheckpointConfig

    return CheckpointConfig(
        directory=str((ctx.dir / sub / "checkpoints").resolve()),
        save_every_steps=int(ctx.cfg.checkpoint.save_every_steps),
        keep_last=int(ctx.cfg.checkpoint.keep_last),
    )


def split_by_prompt(rows: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Held-out comparisons by a hash of the prompt text, so a prompt's pairs stay on one side."""
    import hashlib

    train, held = [], []
    for row in rows:
        digest = hashlib.sha256(f"{seed}\x00{row['prompt']}".encode()).digest()
        (held if int.from_bytes(digest[:8], "big") / 2**64 < eval_fraction else train).append(row)
    if not train or (eval_fraction > 0 and not held):
        # Tiny runs: fall back to a positional split rather than an empty side.
        k = max(1, round(len(rows) * eval_fraction)) if eval_fraction > 0 else 0
        train, held = rows[: len(rows) - k], rows[len(rows) - k :]
    return train, held


def stage_pm(ctx: StageContext) -> dict:
    """PMP (optional) then the PM fine-tune on the AI comparisons, both from the starting model."""
    from cai_jax.cai.feedback import load_comparisons_dataset
    from cai_jax.cai.pmp import build_pmp_pairs, load_pmp_questions, shipped_pmp_sample
    from cai_jax.train.pm import load_comparisons, mix_comparisons, train_pm

    p = ctx.cfg.pm
    # The paper's PMs start from pretrained LMs of the policy's size, not from the SL-CAI policy.
    lm = load_base_model(ctx)
    keep = ("prompt", "response_a", "response_b", "p_a")

    def labelled(folder: str) -> list[dict]:
        return [{k: r[k] for k in keep} for r in load_comparisons_dataset(ctx.dep("feedback") / folder)]

    train_rows, eval_rows = split_by_prompt(labelled("comparisons"), float(p.eval_fraction), stage_seed(ctx))
    if p.helpful_source:
        if p.helpful_source == "feedback":
            if not ctx.cfg.feedback.label_helpful:
                raise ValueError(
                    "config pm.helpful_source='feedback' mixes in the feedback stage's helpfulness labels, but "
                    "feedback.label_helpful is False: turn it on, or set pm.helpful_source to a file or ''"
                )
            helpful_train, helpful_eval = split_by_prompt(labelled("helpful"), float(p.eval_fraction), stage_seed(ctx))
            eval_rows = eval_rows + helpful_eval
        else:
            helpful_train = load_comparisons(p.helpful_source)
        train_rows = mix_comparisons(train_rows, helpful_train, float(p.helpful_fraction), seed=stage_seed(ctx))
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    if not train_rows:
        raise ValueError(f"pm: no training comparisons in {ctx.dep('feedback')} (feedback.num_prompts too small?)")
    common = dict(
        mesh_cfg=ctx.cfg.mesh,
        seq_len=int(p.seq_len),
        seed=stage_seed(ctx),
        tokenizer=lm.tokenizer,
        rendering=p.rendering,
        pad_id=pad,
        n_bins=int(ctx.cfg.eval.calibration_bins),
    )
    params, summary = lm.params, {}
    if p.pmp.enabled:
        source = p.pmp.source
        questions = shipped_pmp_sample() if source == "shipped" else load_pmp_questions(source)
        pairs = build_pmp_pairs(
            questions, max_pairs_per_question=int(p.pmp.max_pairs_per_question), seed=stage_seed(ctx)
        )
        pmp = train_pm(
            lm.config,
            params,
            pairs,
            optim_cfg=stage_optim(ctx.cfg, "pmp"),
            ckpt_cfg=_ckpt(ctx, "pmp"),
            num_steps=int(p.pmp.num_steps),
            batch_size=min(int(p.batch_size), len(pairs)),
            workdir=ctx.dir / "pmp",
            **common,
        )
        params = jax.device_get(pmp.state.params)
        summary["pmp"] = {"pairs": len(pairs), "reward_mean": pmp.report["reward_mean"]}
    result = train_pm(
        lm.config,
        params,
        train_rows,
        optim_cfg=stage_optim(ctx.cfg, "pm"),
        ckpt_cfg=_ckpt(ctx),
        num_steps=int(p.num_steps),
        batch_size=min(int(p.batch_size), len(train_rows)),  # tiny runs have fewer pairs than a batch
        workdir=ctx.dir,
        centering=float(p.centering),
        eval_comparisons=eval_rows or None,
        export_dir=ctx.dir / "export",
        **common,
    )
    r = result.report
    summary.update(
        train_pairs=len(train_rows),
        eval_pairs=len(eval_rows),
        reward_mean=r["reward_mean"],
        reward_std=r["reward_std"],
        eval={k: r["eval"][k] for k in ("n", "accuracy", "log_loss", "brier", "ece")} if r["eval"] else None,
    )
    return summary


# ---------------------------------------------------------------- 5. ppo


def ppo_snapshot_iterations(ctx: StageContext) -> list[int]:
    """PPO iterations whose policy is exported for the evals: eval.elo_snapshots (-1 = the last)."""
    n = int(ctx.cfg.ppo.num_iterations)
    steps = {n if int(k) < 0 else int(k) for k in ctx.cfg.eval.elo_snapshots}
    return sorted({k for k in steps if 0 < k <= n} | {n})


def stage_ppo(ctx: StageContext) -> dict:
    """PPO of the SL-CAI policy against the PM, exporting the policy at each snapshot iteration.

    The stage trains to each snapshot in turn; `train_ppo` resumes from its own checkpoint, so the
    result equals one uninterrupted run of `num_iterations` (checkpoints are forced at snapshots).
    """
    from cai_jax.checkpoints.pm import load_pm
    from cai_jax.train.ppo import PPOConfig, train_ppo

    c = ctx.cfg.ppo
    policy = load_exported(ctx, ctx.dep("sft") / "export")
    pm = load_pm(ctx.dep("pm") / "export")
    ppo_cfg = PPOConfig.from_config({k: v for k, v in c.items() if k not in ("num_iterations", "optim")})
    # RL prompts: the training red-team and helpfulness prompts (paper sec. 4.1 uses both).
    red, _, _ = load_prompt_split(ctx, "red_team")
    helpful, _, _ = load_prompt_split(ctx, "helpful")
    prompts = [p.text for p in red + helpful]
    for k in ppo_snapshot_iterations(ctx):
        folder = ctx.dir / "snapshots" / f"iter_{k}"
        if (folder / "config.json").is_file():
            continue
        train_ppo(
            policy,
            policy,
            pm,
            prompts,
            ppo_cfg=ppo_cfg,
            optim_cfg=stage_optim(ctx.cfg, "ppo"),
            ckpt_cfg=_ckpt(ctx),
            mesh_cfg=ctx.cfg.mesh,
            num_iterations=k,
            seed=stage_seed(ctx),
            workdir=ctx.dir,
            export_dir=folder,
            rendering=ctx.cfg.sft.rendering,
        )
    rows = read_jsonl(ctx.dir / "metrics.jsonl")
    last = rows[-1] if rows else {}
    keys = ("objective/scores", "objective/kl", "objective/rlhf_reward", "response/length_mean", "response/no_eos_frac")
    return {"iterations": int(c.num_iterations), "prompts": len(prompts), **{k: last.get(k) for k in keys}}


def _count(items) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return out


def _stage_fns() -> dict:
    from experiments.eval_stage import stage_eval
    from experiments.report import stage_report

    return {
        "revisions": stage_revisions,
        "sft": stage_sft,
        "feedback": stage_feedback,
        "pm": stage_pm,
        "ppo": stage_ppo,
        "eval": stage_eval,
        "report": stage_report,
    }
