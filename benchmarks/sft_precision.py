"""SFT loss curves in fp32 and in bf16 matmuls (fp32 master weights), against the run-to-run spread.

    python benchmarks/sft_precision.py --revisions runs/demo/revisions --json benchmarks/out/sft_precision.json

Trains the embedded SmolLM2-135M-Instruct with `train_sft` on a finished revisions stage's
examples (red-team revisions and helpful samples, built as the sft stage builds them), with the
sft settings of `--config` (default configs/demo.py), once per (precision, seed). The seed sets
the data order and the state rng, so two seeds of one precision are two runs of the same
experiment: their per-step loss difference is the run-to-run spread. Reported per step: the
losses, |bf16 - fp32| at the same seed (the precision's effect, same batches) and |seed a -
seed b| in fp32 (the spread); the curves overlap within the spread when the first stays below
the second. Needs no PyTorch.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if __name__ == "__main__":  # glibc malloc tunables (cai_jax/runtime.py), as the launcher uses them
    from cai_jax.runtime import reexec_with_malloc_tunables

    reexec_with_malloc_tunables()

import numpy as np  # noqa: E402

from benchmarks.bench_sampler import _commit, _machine  # noqa: E402
from cai_jax.cai.revisions import load_revisions  # noqa: E402
from cai_jax.cai.sft_data import build_sft_examples  # noqa: E402
from cai_jax.models import load_pretrained  # noqa: E402
from cai_jax.train.sft import train_sft  # noqa: E402
from experiments.config_util import load_config  # noqa: E402
from experiments.stages.sft import SFT  # noqa: E402
from experiments.typed import take  # noqa: E402


def run(model: str, dtype: str, examples, s: SFT, seed: int, steps: int) -> list[float]:
    lm = load_pretrained(model, dtype=dtype, param_dtype="float32")
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    with tempfile.TemporaryDirectory() as workdir:
        train_sft(
            lm.model, lm.params, examples, optim_cfg=s.optimizer(), num_steps=steps,
            batch_size=s.batch_size, seq_len=s.seq_len, seed=seed, workdir=workdir, pad_id=pad,
            packing=s.packing, peak_flops_per_device=None,
        )  # fmt: skip
        rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return [float(r["loss"]) for r in rows if "loss" in r]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--revisions", type=Path, required=True, help="a finished revisions stage's folder")
    ap.add_argument("--config", default="configs/demo.py", help="its sft section is used")
    ap.add_argument("--seeds", type=int, nargs=2, default=[0, 1])
    ap.add_argument("--steps", type=int, default=0, help="0 = the config's sft.num_steps")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    cfg = load_config(args.config)
    s = take(SFT, cfg.sft, "sft")
    steps = args.steps or s.num_steps
    tokenizer = load_pretrained(cfg.model.name, dtype="float32").tokenizer
    examples = build_sft_examples(
        list(load_revisions(args.revisions / "red_team")), tokenizer,
        revision_round=None if s.revision_round < 0 else s.revision_round, final_only=s.final_only,
        helpful_rows=list(load_revisions(args.revisions / "helpful")), helpful_ratio=s.helpful_ratio,
        rendering=s.rendering, seed=0,
    )  # fmt: skip
    curves = {
        (dtype, seed): run(cfg.model.name, dtype, examples, s, seed, steps)
        for dtype in ("float32", "bfloat16")
        for seed in args.seeds
    }
    a, b = args.seeds
    gap = np.abs(np.array(curves["bfloat16", a]) - np.array(curves["float32", a]))
    gap_b = np.abs(np.array(curves["bfloat16", b]) - np.array(curves["float32", b]))
    spread = np.abs(np.array(curves["float32", a]) - np.array(curves["float32", b]))
    print(f"machine: {_machine()}; commit {_commit()}; {len(examples)} examples; sft of {args.config}: "
          f"{steps} steps, batch {s.batch_size} x {s.seq_len}, lr {s.optim['lr']}")  # fmt: skip
    print(f"command: python {' '.join(sys.argv)}\n")
    head = " | ".join(f"{d[:4]} s{k}" for d, k in curves)
    print(f"| step | {head} | bf16 - fp32, seed {a} | bf16 - fp32, seed {b} | fp32 seed {a} - seed {b} |")
    print("|---:|" + "---:|" * (len(curves) + 3))
    for t in range(steps):
        vals = " | ".join(f"{c[t]:.4f}" for c in curves.values())
        print(f"| {t + 1} | {vals} | {gap[t]:.4f} | {gap_b[t]:.4f} | {spread[t]:.4f} |")
    summary = {
        "max_precision_gap": float(max(gap.max(), gap_b.max())),
        "mean_precision_gap": float((gap.mean() + gap_b.mean()) / 2),
        "mean_seed_spread": float(spread.mean()),
        "steps_gap_below_spread": int(np.sum(np.maximum(gap, gap_b) <= spread)),
    }
    print(f"\n{json.dumps(summary)}")
    if args.json:
        out = {"curves": {f"{d}/seed{k}": c for (d, k), c in curves.items()}, "summary": summary}
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
