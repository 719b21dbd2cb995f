"""Stage 2, sft: fine-tune the starting model on SL-CAI-n revisions mixed with helpful samples
(paper sec. 3.1), loss on the response tokens -> the SL-CAI model in `sft/export`.

Writes `sft/export` (HF-format folder), `sft/metrics.jsonl` and, while running, `sft/checkpoints`;
with `model.lora.rank > 0` only adapters train, `sft/export` is the merged model and `sft/adapter`
the adapters alone in PEFT's layout (adapter_config.json + adapter_model.safetensors).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from experiments.context import StageContext, TunedModelSpec, load_base_model, read_jsonl, stage_seed
from experiments.typed import take


@dataclasses.dataclass(frozen=True)
class SFT:
    revision_round: int  # SL-CAI-n: revisions of rounds 1..n (0 = the initial answers); -1 = all rounds
    final_only: bool
    helpful_ratio: float
    rendering: str
    num_steps: int
    batch_size: int
    seq_len: int
    packing: bool
    optim: Mapping[str, Any]

    def optimizer(self):
        """The `OptimConfig`, its schedule ending at this stage's last update (num_steps / accumulation)."""
        from cai_jax.train.state import OptimConfig

        return OptimConfig.from_config(self.optim, updates=self.num_steps // int(self.optim["grad_accum_steps"]))


@dataclasses.dataclass(frozen=True)
class Config:
    seed: int
    model: TunedModelSpec
    sft: SFT

    @classmethod
    def build(cls, cfg) -> Config:
        return take(cls, cfg, "config")

    def exports(self) -> list[str]:
        """The model folders this stage writes (the pipeline checks their completion marker on skip):
        the merged model, and under LoRA the adapters alone in PEFT's layout."""
        return ["export"] + (["adapter"] if self.model.lora.rank else [])

    def preflight(self) -> None:
        """The starting model (fine-tuned here) resolves (experiments/preflight.py)."""
        from experiments.preflight import check_model

        check_model("model.name", self.model.name)


def run(ctx: StageContext, cfg: Config) -> dict:
    from cai_jax.cai.revisions import load_revisions
    from cai_jax.cai.sft_data import build_sft_examples
    from cai_jax.train.sft import SFTBatcher, export_adapters, train_sft

    s, seed = cfg.sft, stage_seed(cfg.seed, "sft")
    lm = load_base_model(ctx, cfg.model, cfg.seed)
    red = list(load_revisions(ctx.dep("revisions") / "red_team"))
    helpful = list(load_revisions(ctx.dep("revisions") / "helpful"))
    examples = build_sft_examples(
        red,
        lm.tokenizer,
        revision_round=None if s.revision_round < 0 else s.revision_round,
        final_only=s.final_only,
        helpful_rows=helpful,
        helpful_ratio=s.helpful_ratio,
        rendering=s.rendering,
        seed=seed,
    )
    if not examples:
        raise ValueError("sft: no training examples (no revision rows and no helpful samples?)")
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    rows = len(examples)
    if s.packing:
        probe = SFTBatcher(examples, batch_size=1, seq_len=s.seq_len, seed=seed, pad_id=pad, packing=True)
        rows = min(len(probe.rows(epoch)) for epoch in range(4))  # packed row counts vary a little by epoch
    lora = cfg.model.lora.config()
    state = train_sft(
        lm.model,
        lm.params,
        examples,
        optim_cfg=s.optimizer(),
        ckpt_cfg=ctx.checkpoints(),
        mesh_cfg=ctx.run.mesh,
        num_steps=s.num_steps,
        batch_size=min(s.batch_size, rows),  # tiny runs have fewer rows than a batch
        seq_len=s.seq_len,
        seed=seed,
        workdir=ctx.dir,
        pad_id=pad,
        export_dir=ctx.dir / "export",
        tokenizer=lm.tokenizer,
        **({"packing": True} if s.packing else {}),
        **({"lora": lora} if lora is not None else {}),
    )
    if lora is not None:
        export_adapters(
            state.params["lora"], lm.config, ctx.dir / "adapter", lora, base_model_name_or_path=cfg.model.name
        )
    metrics = read_jsonl(ctx.dir / "metrics.jsonl")
    sources: dict[str, int] = {}
    for e in examples:
        sources[e.source] = sources.get(e.source, 0) + 1
    return {
        "examples": len(examples),
        "by_source": sources,
        "final_loss": metrics[-1].get("loss") if metrics else None,
        "first_loss": metrics[0].get("loss") if metrics else None,
        "steps": len(metrics),
    }
