"""Two processes on localhost (jax.distributed, gloo CPU collectives) train like one process."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

WORKER = Path(__file__).with_name("_multiprocess_worker.py")
TOL = 1e-5  # same maths over 4 devices in 2 processes vs 2 devices in 1; only reduction order differs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    single = tmp_path / "single.json"
    subprocess.run([sys.executable, str(WORKER), "0", "1", "0", str(single)], check=True, timeout=300)
    port, multi = str(_free_port()), tmp_path / "multi.json"
    procs = [
        subprocess.Popen([sys.executable, str(WORKER), str(i), "2", port, str(multi)], stderr=subprocess.PIPE)
        for i in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-3000:]
    one, two = json.loads(single.read_text()), json.loads(multi.read_text())
    assert one["devices"] == 2 and two["devices"] == 4
    np.testing.assert_allclose(two["loss"], one["loss"], rtol=TOL)
    np.testing.assert_allclose(two["grad_norm"], one["grad_norm"], rtol=TOL)
    assert one["loss"][2] < one["loss"][0]  # the steps really train
