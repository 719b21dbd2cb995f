"""Logging for the command-line entry points: our messages at the chosen level, third-party noise off.

`setup_logging(level)` is the first thing `experiments.launch`, `experiments.sweep` and
`experiments.plan` do (`python3 run.py demo` goes through the launcher). Below DEBUG it hides, without touching our own loggers or Python warnings:

* transformers' advisory warnings, e.g. "PyTorch was not found. Models won't be available ..."
  printed when transformers is imported without torch (`TRANSFORMERS_NO_ADVISORY_WARNINGS`; its
  real warnings still show);
* datasets' "Generating train split" progress bars (`HF_DATASETS_DISABLE_PROGRESS_BARS`) and its
  INFO lines ("JAX version ... available");
* INFO chatter of matplotlib ("generated new fontManager"), absl, jax, orbax, httpx and the
  Hugging Face hub client: those loggers are set to WARNING.

At `--log-level DEBUG` none of this is hidden (third-party loggers at INFO). Variables already set
in the environment win over these defaults.
"""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["THIRD_PARTY", "setup_logging"]

THIRD_PARTY = ("absl", "jax", "orbax", "httpx", "datasets", "matplotlib", "huggingface_hub", "urllib3", "filelock")
QUIET_ENV = {"TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}


def setup_logging(level: str = "INFO") -> None:
    """Configures the root logger at `level` (a logging level name) and quiets third-party output."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"--log-level {level!r}: not a logging level (DEBUG, INFO, WARNING, ERROR)")
    logging.basicConfig(level=numeric, format="%(asctime)s %(name)s: %(message)s")
    debug = numeric <= logging.DEBUG
    for name in THIRD_PARTY:
        logging.getLogger(name).setLevel(logging.INFO if debug else logging.WARNING)
    if debug:
        return
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    if "datasets" in sys.modules and os.environ.get("HF_DATASETS_DISABLE_PROGRESS_BARS") == "1":
        # Imported before us: the variable is read at import time, so switch the bars off directly.
        from datasets.utils.logging import disable_progress_bar

        disable_progress_bar()
