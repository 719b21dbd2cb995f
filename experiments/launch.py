"""Runs a Constitutional AI pipeline, or some of its stages, from a config file.

    python -m experiments.launch --config configs/demo.py --workdir runs/demo
    python -m experiments.launch --config configs/base.py:arg --workdir runs/x --stages revisions,sft \
        --config.sft.num_steps=20 --config.revisions.num_revisions=2

Stages (DESIGN.md): revisions, sft, feedback, pm, ppo, eval, report. Finished stages whose config
hash matches are skipped; an interrupted stage resumes where it stopped when the same command is
run again. A workdir holding a different config's run is refused unless --overwrite (rerun the
stages the change touches) or --fork NEW_WORKDIR (new folder, finished shared stages linked).
Multi-host: set up `jax.distributed` (the usual cluster environment variables, or
--coordinator/--num-processes/--process-id) and run the same command on every host.
"""

from __future__ import annotations

import argparse
import sys

if __name__ == "__main__":  # before anything heavy is imported: the process may be replaced
    from cai_jax.runtime import reexec_with_malloc_tunables

    reexec_with_malloc_tunables()

from experiments.config_util import ConfigError, load_config, parse_known_overrides
from experiments.pipeline import ORDER, StageError, WorkdirError, run_pipeline
from experiments.quiet import setup_logging
from experiments.wandb_log import wandb_run


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="Overrides: --config.<a>.<b>=<value>")
    p.add_argument("--config", required=True, help="configs/<name>.py[:arg]")
    p.add_argument("--workdir", required=True, help="run folder (created; resumable)")
    p.add_argument("--stages", default="all", help=f"comma-separated subset of: {','.join(ORDER)} (default all)")
    p.add_argument("--overwrite", action="store_true", help="allow a changed config in an existing workdir")
    p.add_argument("--fork", default=None, help="run in this new folder, reusing the workdir's shared stages")
    p.add_argument(
        "--reuse-from", action="append", default=[], help="link finished stages with the same hash from this workdir"
    )
    p.add_argument("--coordinator", default=None, help="jax.distributed coordinator host:port (multi-host)")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    p.add_argument("--log-level", default="INFO", help="INFO (default) | DEBUG (also third-party messages) | WARNING")
    p.add_argument(
        "--no-compilation-cache",
        action="store_true",
        help="compile every program afresh (default: JAX's persistent cache, see cai_jax/compile_cache.py)",
    )
    return parse_known_overrides(p, argv)


def main(argv=None) -> int:
    args, overrides = parse_args(argv)
    setup_logging(args.log_level)  # before transformers / datasets are imported (experiments/quiet.py)
    from cai_jax import compile_cache
    from cai_jax.sharding import initialize_distributed

    try:
        compile_cache.enable("0" if args.no_compilation_cache else None)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    # Explicit flags, else COORDINATOR_ADDRESS/NUM_PROCESSES/PROCESS_ID, else a detected cluster.
    initialize_distributed(
        {"coordinator_address": args.coordinator, "num_processes": args.num_processes, "process_id": args.process_id}
    )
    try:
        cfg = load_config(args.config, overrides)
        with wandb_run(cfg, args.fork or args.workdir):
            run_pipeline(
                cfg,
                args.workdir,
                stages=args.stages,
                overwrite=args.overwrite,
                fork=args.fork,
                reuse_from=args.reuse_from,
            )
    except (ConfigError, StageError, WorkdirError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
