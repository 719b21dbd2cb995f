"""Entry-point logging (experiments/quiet.py): transformers' "PyTorch was not found" advisory and
third-party INFO lines are hidden by default and shown at DEBUG; our own warnings always show."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = """
import logging, sys
from experiments.quiet import setup_logging
setup_logging(sys.argv[1])
import transformers  # noqa: F401  (prints its advisory here when torch is absent)
logging.getLogger("matplotlib.font_manager").info("third-party info line")
logging.getLogger("experiments.x").warning("our own warning")
"""


def _stderr(level: str) -> str:
    env = {
        k: v for k, v in os.environ.items() if k not in ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "TRANSFORMERS_VERBOSITY")
    }
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, level], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return out.stderr


def test_quiet_by_default_and_loud_at_debug():
    try:
        import torch  # noqa: F401

        has_torch = True
    except ImportError:
        has_torch = False
    quiet, loud = _stderr("INFO"), _stderr("DEBUG")
    assert "our own warning" in quiet and "our own warning" in loud
    assert "PyTorch was not found" not in quiet and "third-party info line" not in quiet
    assert "third-party info line" in loud
    if not has_torch:
        assert "PyTorch was not found" in loud


def test_bad_level():
    from experiments.quiet import setup_logging

    with pytest.raises(ValueError, match="not a logging level"):
        setup_logging("LOUD")
