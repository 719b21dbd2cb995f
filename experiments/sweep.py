"""Expands a config's `sweep()` into runs that share the stages their configs have in common.

    python -m experiments.sweep --config configs/ablate_labels.py --root runs/ablate_labels
    python -m experiments.sweep --config configs/ablate_labels.py --root runs/ablate_labels --print-commands

Each sweep entry is a dict of dotted config fields -> values (and an optional "name"); run i goes
to `<root>/<name>`. Before a run starts, every stage whose hash equals a finished stage of an
earlier run of the sweep is linked to it, so a sweep over label types computes the revisions, SFT
and (for the same feedback settings) every upstream stage once. Runs go in turn locally; with
--print-commands the runner prints one `experiments.launch` command per run instead, for a
cluster (run the first one to the end first if the others should reuse its shared stages: each
command links what is finished when it starts, via --reuse-from the first run's workdir).
`--reuse-from WORKDIR` (repeatable) links the finished stages of runs outside the sweep as well,
e.g. a baseline run whose revisions and SFT every run of a label sweep shares.

A config may define `SWEEP_STAGES` (the stages its figure needs, default all) and `SWEEP_FIGURE`
(which cross-run figure `experiments.report.sweep_report` draws: revisions, principles,
critique, labels, pmp or kl).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

if __name__ == "__main__":  # before anything heavy is imported: the process may be replaced
    from experiments import entry as _entry

    _entry.reexec()

from experiments import entry as process  # noqa: E402
from experiments.config_util import ConfigError, apply_overrides, load_config, load_config_module, resolve_auto  # noqa: E402
from experiments.pipeline import run_pipeline  # noqa: E402
from experiments.stages import REGISTRY  # noqa: E402
from experiments.wandb_log import wandb_run  # noqa: E402


def _run_name(i: int, entry: dict) -> str:
    if "name" in entry:
        return str(entry["name"])
    parts = [f"{k.split('.')[-1]}={v}" for k, v in entry.items()]
    return f"{i:02d}-" + ",".join(parts).replace("/", "_").replace(" ", "")


def expand(spec: str, overrides=()) -> list[tuple[str, object, dict]]:
    """[(run name, ConfigDict, its sweep entry)] of the config's sweep, overrides applied to all."""
    module = load_config_module(spec)
    if not hasattr(module, "sweep"):
        raise ConfigError(f"--config {spec}: defines no sweep()")
    _, _, arg = spec.partition(":")
    base = load_config(spec, overrides)
    runs, names = [], set()
    for i, entry in enumerate(module.sweep(arg or None)):
        entry = dict(entry)
        name = _run_name(i, entry)
        if name in names:
            raise ConfigError(f"sweep of {spec}: two runs are named {name!r}")
        names.add(name)
        fields = [(k, v) for k, v in entry.items() if k != "name"]
        try:
            cfg = resolve_auto(apply_overrides(base, fields))
        except ConfigError as e:
            raise ConfigError(f"sweep of {spec}, run {name!r}: {e}") from None
        runs.append((name, cfg, entry))
    if not runs:
        raise ConfigError(f"sweep of {spec}: sweep() returned no runs")
    return runs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="configs/<ablation>.py[:arg] with a sweep()")
    p.add_argument("--root", required=True, help="folder holding one workdir per run")
    p.add_argument("--stages", default=None, help="stages per run (default: the config's SWEEP_STAGES, else all)")
    p.add_argument("--print-commands", action="store_true", help="print one launch command per run and exit")
    p.add_argument("--overwrite", action="store_true", help="allow changed configs in existing run folders")
    p.add_argument(
        "--reuse-from",
        action="append",
        default=[],
        help="also link finished stages with the same hash from this workdir",
    )
    process.add_distributed_flags(p)
    args, rest = p.parse_known_args(argv)
    try:
        process.start(args)  # the runs of a sweep compile the same programs: the cache compiles each once
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    bad = [r for r in rest if not r.startswith("--config.")]
    if bad:
        p.error(f"unrecognized arguments {bad} (overrides look like --config.sft.num_steps=10)")
    overrides = [r[len("--config.") :] for r in rest]
    root = Path(args.root)
    try:
        module = load_config_module(args.config)
        stages = args.stages or getattr(module, "SWEEP_STAGES", None)
        runs = expand(args.config, overrides)
        if args.print_commands:
            first = root / runs[0][0]
            for i, (name, _, entry) in enumerate(runs):
                cmd = ["python", "-m", "experiments.launch", "--config", args.config, "--workdir", str(root / name)]
                cmd += [f"--config.{o}" for o in overrides]
                cmd += [
                    f"--config.{k}={v!r}" if isinstance(v, str) else f"--config.{k}={v}"
                    for k, v in entry.items()
                    if k != "name"
                ]
                if stages:
                    cmd += ["--stages", stages]
                for source in args.reuse_from + ([str(first)] if i else []):
                    cmd += ["--reuse-from", str(source)]
                print(shlex.join(cmd))
            return 0
        finished: list[Path] = [Path(r) for r in args.reuse_from]
        for name, cfg, _ in runs:
            print(f"[sweep] run {name}", flush=True)
            with wandb_run(cfg, root / name):
                run_pipeline(
                    cfg, root / name, registry=REGISTRY, stages=stages, overwrite=args.overwrite, reuse_from=finished
                )
            finished.append(root / name)
        from experiments.report import sweep_report

        out = sweep_report(root, [(n, c) for n, c, _ in runs], getattr(module, "SWEEP_FIGURE", None))
        print(f"[sweep] {len(runs)} runs done; summary in {out}")
    except (Exception, KeyboardInterrupt) as e:  # one line, as the launcher's (experiments/failures.py)
        import logging

        from experiments.failures import failure_line

        logging.getLogger("experiments.sweep").debug("the sweep failed", exc_info=e)
        print(failure_line(e, None, [("--root", str(args.root))]), file=sys.stderr, flush=True)
        return 130 if isinstance(e, KeyboardInterrupt) else 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
