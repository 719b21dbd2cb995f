"""What every entry point (launch, sweep, plan) does before any stage runs, in one place.

    if __name__ == "__main__":
        entry.reexec()                       # glibc malloc tunables for XLA on CPU (cai_jax/runtime.py)
    ...
    entry.start(args.log_level, compilation_cache=True, distributed=args)

`reexec` must come first, before anything heavy is imported (the process may be replaced);
`start` quiets third-party logging (experiments/quiet.py), turns on JAX's persistent compilation
cache (cai_jax/compile_cache.py) and initialises `jax.distributed` from explicit flags, the
COORDINATOR_ADDRESS / NUM_PROCESSES / PROCESS_ID variables or a detected cluster.
"""

from __future__ import annotations

from typing import Any

__all__ = ["reexec", "start", "add_distributed_flags"]


def reexec() -> None:
    from cai_jax.runtime import reexec_with_malloc_tunables

    reexec_with_malloc_tunables()


def add_distributed_flags(parser) -> None:
    parser.add_argument("--coordinator", default=None, help="jax.distributed coordinator host:port (multi-host)")
    parser.add_argument("--num-processes", type=int, default=None)
    parser.add_argument("--process-id", type=int, default=None)
    parser.add_argument(
        "--log-level", default="INFO", help="INFO (default) | DEBUG (also third-party messages) | WARNING"
    )
    parser.add_argument(
        "--no-compilation-cache",
        action="store_true",
        help="compile every program afresh (default: JAX's persistent cache, see cai_jax/compile_cache.py)",
    )


def start(args: Any) -> None:
    """Logging, the compilation cache and jax.distributed, from the flags of `add_distributed_flags`.

    Raises:
      ValueError: a bad --log-level or compilation-cache folder (the message names it).
    """
    from experiments.quiet import setup_logging

    setup_logging(args.log_level)  # before transformers / datasets are imported
    from cai_jax import compile_cache
    from cai_jax.sharding import initialize_distributed

    compile_cache.enable("0" if args.no_compilation_cache else None)
    initialize_distributed(
        {"coordinator_address": args.coordinator, "num_processes": args.num_processes, "process_id": args.process_id}
    )
