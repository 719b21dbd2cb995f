"""Two processes on localhost (jax.distributed, gloo CPU collectives) train like one process."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

WORKER = Path(__file__).with_name("_multiprocess_worker.py")
TOL = 1e-5  # same maths over 4 devices in 2 processes vs 2 devices in 1; only reduction order differs
# Params after 16 Adam updates of lr 1e-3: Adam divides each gradient by its own scale, so an entry
# whose gradient is a near-cancelling sum (reduction order changes its low bits) can move by a
# fraction of lr differently; observed 2e-5 at most (embedding rows), most entries within 1e-6.
PARAM_ATOL = 1e-4  # a tenth of one update
TIMING = ("time/", "rollout/logprob_diff")  # wall clock, and the max of a float32 noise difference
# PPO's metrics after an update, as tests/test_ppo_sharded.py bounds a sharded PPO against one
# device: objective/kl is a mean of log-prob differences whose float32 error scales with the
# log-probs (~5 nats), not with the small KL; measured here 1.3e-6 absolute (2.2e-5 relative) at step 2.
PPO_RTOL, PPO_ATOL = 1e-4, 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run_two(job: str, out: Path, *extra: str) -> list[str]:
    """Runs `job` in two worker processes; their stderr texts."""
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), job, str(i), "2", port, str(out), *extra], stderr=subprocess.PIPE
        )
        for i in range(2)
    ]
    errs = []
    for p in procs:
        _, err = p.communicate(timeout=300)
        errs.append(err.decode())
        assert p.returncode == 0, errs[-1][-3000:]
    return errs


def test_two_processes_match_one(tmp_path):
    single = tmp_path / "single.json"
    subprocess.run([sys.executable, str(WORKER), "sft", "0", "1", "0", str(single)], check=True, timeout=300)
    multi = tmp_path / "multi.json"
    _run_two("sft", multi)
    one, two = json.loads(single.read_text()), json.loads(multi.read_text())
    assert one["devices"] == 2 and two["devices"] == 4
    np.testing.assert_allclose(two["loss"], one["loss"], rtol=TOL)
    np.testing.assert_allclose(two["grad_norm"], one["grad_norm"], rtol=TOL)
    assert one["loss"][2] < one["loss"][0]  # the steps really train


def _rows(folder: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (folder / name).read_text().splitlines()]


def test_ppo_in_two_processes_resumed_matches_one_process(tmp_path):
    """PPO (rollouts split by process, PM scoring and updates on the 4-device mesh), stopped after
    iteration 1 and resumed from its checkpoint, ends where one process's uninterrupted run does."""
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, str(WORKER), "ppo", "0", "1", "0", str(one)], check=True, timeout=300)
    errs = _run_two("ppo", two, "resume")
    assert "PPO: resumed from iteration 1" in errs[0]  # the second call continued the first
    assert json.loads((one / "devices.json").read_text()) == {"devices": 2, "processes": 1}
    assert json.loads((two / "devices.json").read_text()) == {"devices": 4, "processes": 2}
    rows_one, rows_two = _rows(one, "metrics.jsonl"), _rows(two, "metrics.jsonl")
    assert [r["step"] for r in rows_two] == [1, 2]
    for a, b in zip(rows_one, rows_two, strict=True):
        assert a.keys() == b.keys()
        for key, value in a.items():
            if key.startswith(TIMING):
                continue
            if isinstance(value, str):
                assert value == b[key], key
                continue
            np.testing.assert_allclose(b[key], value, rtol=PPO_RTOL, atol=PPO_ATOL, err_msg=f"step {a['step']} {key}")
    samples_one, samples_two = _rows(one, "samples.jsonl"), _rows(two, "samples.jsonl")
    assert [s["response"] for s in samples_two] == [s["response"] for s in samples_one]  # the same draws
    np.testing.assert_allclose([s["score"] for s in samples_two], [s["score"] for s in samples_one], rtol=TOL)
    p_one, p_two = np.load(one / "params.npz"), np.load(two / "params.npz")
    assert sorted(p_one) == sorted(p_two) and any("value" in k for k in p_one)
    for key in p_one:
        np.testing.assert_allclose(p_two[key], p_one[key], rtol=0, atol=PARAM_ATOL, err_msg=key)
    close = np.mean(np.concatenate([np.abs(p_two[k] - p_one[k]).ravel() <= 1e-6 for k in p_one]))
    assert close > 0.99, close
    assert rows_one[1]["objective/kl"] > 0  # the policy really moved
