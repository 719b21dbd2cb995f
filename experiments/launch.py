"""Runs a Constitutional AI pipeline, or some of its stages, from a config file.

    python -m experiments.launch --config configs/demo.py --workdir runs/demo
    python -m experiments.launch --config configs/base.py:arg --workdir runs/x --stages revisions,sft \
        --config.sft.num_steps=20 --config.revisions.num_revisions=2

Stages (docs/design.md): revisions, sft, feedback, pm, ppo, eval, report. Finished stages whose
config hash matches are skipped; an interrupted stage resumes where it stopped when the same
command is run again. A workdir holding a different config's run is refused unless --overwrite
(rerun the stages the change touches) or --fork NEW_WORKDIR (new folder, finished shared stages
linked). Multi-host: set up `jax.distributed` (the usual cluster environment variables, or
--coordinator/--num-processes/--process-id) and run the same command on every host.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

if __name__ == "__main__":  # before anything heavy is imported: the process may be replaced
    from experiments import entry

    entry.reexec()

from experiments import entry  # noqa: E402
from experiments.config_util import load_config, parse_known_overrides  # noqa: E402
from experiments.failures import failure_line  # noqa: E402
from experiments.pipeline import run_pipeline  # noqa: E402
from experiments.stages import REGISTRY  # noqa: E402
from experiments.wandb_log import wandb_run  # noqa: E402


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    names = ",".join(s.name for s in REGISTRY)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="Overrides: --config.<a>.<b>=<value>")
    p.add_argument("--config", required=True, help="configs/<name>.py[:arg]")
    p.add_argument("--workdir", required=True, help="run folder (created; resumable)")
    p.add_argument("--stages", default="all", help=f"comma-separated subset of: {names} (default all)")
    p.add_argument("--overwrite", action="store_true", help="allow a changed config in an existing workdir")
    p.add_argument("--fork", default=None, help="run in this new folder, reusing the workdir's shared stages")
    p.add_argument(
        "--reuse-from", action="append", default=[], help="link finished stages with the same hash from this workdir"
    )
    entry.add_distributed_flags(p)
    return parse_known_overrides(p, argv)


def main(argv=None) -> int:
    """The launch; every failure is one `error: <what>, <where>` line on stderr and exit code 2
    (130 for Ctrl-C), with the traceback logged only at --log-level DEBUG (experiments/failures.py)."""
    args, overrides = parse_args(argv)
    cfg = None
    try:
        entry.start(args)
        cfg = load_config(args.config, overrides)
        with wandb_run(cfg, args.fork or args.workdir):
            run_pipeline(
                cfg,
                args.workdir,
                registry=REGISTRY,
                stages=args.stages,
                overwrite=args.overwrite,
                fork=args.fork,
                reuse_from=args.reuse_from,
            )
    except (Exception, KeyboardInterrupt) as e:
        logging.getLogger("experiments.launch").debug("the launch failed", exc_info=e)
        flags = [("--workdir", args.workdir), ("--fork", args.fork), ("--config", args.config.split(":")[0])]
        flags += [("--reuse-from", r) for r in args.reuse_from]
        print(failure_line(e, cfg, [(k, v) for k, v in flags if v]), file=sys.stderr, flush=True)
        return 130 if isinstance(e, KeyboardInterrupt) else 2
    return 0


def _exit(code: int) -> None:
    """Exits with `code`; after a failure without running interpreter shutdown, where threads of a
    failed checkpoint writer (orbax, tensorstore) would print tracebacks under the error line."""
    sys.stdout.flush()
    sys.stderr.flush()
    if code:
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    _exit(main())
