"""cai_jax.sharding: mesh config, logical rules, divisibility errors, multi-host setup, and
sharded == unsharded on 8 fake CPU devices (in a subprocess: the device count is fixed at JAX start)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from cai_jax import sharding as sh
from cai_jax.models import ScalarModel, Transformer, tiny_config

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5  # max abs difference, sharded vs single device (float32; observed ~3e-6 on logits of size ~3.5)
TOKENS = jax.ShapeDtypeStruct((8, 16), jnp.int32)


def _abstract_mesh(data, fsdp, tensor):
    return AbstractMesh((data, fsdp, tensor), sh.MESH_AXES)


# ---- mesh config ----


@pytest.mark.parametrize(
    "cfg",
    [
        {"data": -1, "fsdp": 2, "tensor": 2},
        ml_collections.ConfigDict({"data": 2, "fsdp": -1, "tensor": 2}),
        sh.MeshConfig(data=2, fsdp=2, tensor=-1),
        sh.MeshConfig(data=2, fsdp=2, tensor=2),
    ],
)
def test_mesh_shape_fills_minus_one(cfg):
    assert sh.mesh_shape(cfg, 8) == (2, 2, 2)


@pytest.mark.parametrize(
    "cfg, match",
    [
        (
            {"data": 2, "fsdp": 2, "tensor": 1},
            r"mesh sizes \{'data': 2, 'fsdp': 2, 'tensor': 1\} \(product 4\).*8 available",
        ),
        ({"data": -1, "fsdp": 3, "tensor": 1}, "cannot fill data=-1, 8 devices are not a multiple of 3"),
        ({"data": -1, "fsdp": -1, "tensor": 1}, "at most one axis"),
        ({"data": 0, "fsdp": 8, "tensor": 1}, "positive integer"),
        ({"data": 8, "fsdp": 1}, "missing 'tensor'"),
    ],
)
def test_mesh_shape_errors(cfg, match):
    with pytest.raises(ValueError, match=match):
        sh.mesh_shape(cfg, 8)


def test_make_mesh_names_sizes_and_device_count():
    mesh = sh.make_mesh()  # DATA_PARALLEL
    assert mesh.axis_names == sh.MESH_AXES and mesh.devices.shape == (jax.device_count(), 1, 1)
    with pytest.raises(ValueError, match=rf"'data': {jax.device_count() + 1}.*{jax.device_count()} available devices"):
        sh.make_mesh({"data": jax.device_count() + 1, "fsdp": 1, "tensor": 1})


# ---- rules ----


@pytest.mark.parametrize(
    "names, spec",
    [
        (("batch", "length", "embed"), P(("data", "fsdp"), None, None)),  # fsdp taken by batch
        (("batch", "length", "mlp"), P(("data", "fsdp"), None, "tensor")),
        (("batch", "length", "vocab"), P(("data", "fsdp"), None, "tensor")),
        (("vocab", "embed"), P("tensor", "fsdp")),
        (("embed", "q_heads", "head_dim"), P("fsdp", "tensor", None)),
        (("embed", "kv_heads", "head_dim"), P("fsdp", "tensor", None)),
        (("q_heads", "head_dim", "embed"), P("tensor", None, "fsdp")),
        (("mlp", "embed"), P("tensor", "fsdp")),
        (("norm",), P(None)),
        (("embed", "score"), P("fsdp", None)),
    ],
)
def test_default_rules(names, spec):
    assert nn.logical_to_mesh_axes(names, sh.DEFAULT_RULES) == spec


def test_make_rules_overrides_and_extends():
    rules = dict(sh.make_rules({"embed": None, "experts": "data"}))
    assert rules["embed"] is None and rules["experts"] == "data" and rules["vocab"] == "tensor"


def test_logical_to_sharding():
    mesh = _abstract_mesh(2, 2, 2)
    tree = {"w": P("embed", "mlp"), "b": P("norm")}
    out = sh.logical_to_sharding(tree, mesh)
    assert out["w"].spec == P("fsdp", "tensor") and out["b"].spec == P(None)


@pytest.mark.parametrize("model_cls", [Transformer, ScalarModel])
def test_param_shardings_every_param(model_cls):
    cfg = tiny_config("qwen2")  # untied lm_head and qkv biases
    shardings = sh.param_shardings(model_cls(cfg), TOKENS, _abstract_mesh(2, 2, 2))
    flat = jax.tree_util.tree_flatten_with_path(shardings)[0]
    specs = {jax.tree_util.keystr(k, simple=True, separator="/"): s.spec for k, s in flat}
    prefix = "backbone/" if model_cls is ScalarModel else ""
    assert specs[prefix + "embed_tokens/embedding"] == P("tensor", "fsdp")
    assert specs[prefix + "layers_0/self_attn/k_proj/bias"] == P("tensor", None)
    assert specs[prefix + "layers_1/mlp/down_proj/kernel"] == P("tensor", "fsdp")
    if model_cls is ScalarModel:
        assert specs["head/kernel"] == P("fsdp", None) and specs["head/bias"] == P(None)
    else:
        assert specs["lm_head/kernel"] == P("fsdp", "tensor")


def test_param_shardings_needs_a_rule_for_every_logical_axis():
    rules = [r for r in sh.DEFAULT_RULES if r[0] != "kv_heads"]
    with pytest.raises(ValueError, match=r"logical axes \['kv_heads'\] have no sharding rule"):
        sh.param_shardings(Transformer(tiny_config()), TOKENS, _abstract_mesh(1, 1, 1), rules)


# ---- divisibility ----


def test_indivisible_heads_name_the_parameter():
    # SmolLM2-135M: 9 query heads, 3 kv heads, hidden 576.
    cfg = tiny_config("llama", num_heads=9, num_kv_heads=3, head_dim=64, hidden_size=576, intermediate_size=1536)
    with pytest.raises(ValueError) as e:
        sh.param_shardings(Transformer(cfg), TOKENS, _abstract_mesh(1, 1, 2))
    msg = str(e.value)
    assert "layers_0/self_attn/q_proj/kernel: shape (576, 9, 64), dimension 1 (size 9, logical axis 'q_heads')" in msg
    assert "layers_0/self_attn/k_proj/kernel: shape (576, 3, 64), dimension 1 (size 3, logical axis 'kv_heads')" in msg
    assert "mesh axes ('tensor',) of total size 2" in msg
    assert "mlp" not in msg  # 1536 divides
    # Splitting them over fsdp instead is fine: 576 / 4.
    sh.param_shardings(Transformer(cfg), TOKENS, _abstract_mesh(1, 4, 1))


def test_check_divisible_with_partition_specs():
    params = {"a": jax.ShapeDtypeStruct((6, 4), jnp.float32)}
    sh.check_divisible(params, {"a": P("data", "tensor")}, _abstract_mesh(3, 1, 2))
    with pytest.raises(
        ValueError,
        match=r"a: shape \(6, 4\), dimension 0 \(size 6\) is split over mesh axes \('data', 'fsdp'\) of total size 4",
    ):
        sh.check_divisible(params, {"a": P(("data", "fsdp"))}, _abstract_mesh(2, 2, 1))
    with pytest.raises(ValueError, match="not in the mesh"):
        sh.check_divisible(params, {"a": P("model")}, _abstract_mesh(1, 1, 1))


def test_batch_sharding():
    assert sh.batch_sharding(_abstract_mesh(2, 2, 2)).spec == P(("data", "fsdp"))


# ---- multi-host ----


def test_process_shard_is_a_contiguous_partition():
    parts = [sh.process_shard(10, i, 3) for i in range(3)]
    assert parts == [(0, 4), (4, 7), (7, 10)]
    assert sh.process_shard(8) == (0, 8)  # this (single) process loads everything
    with pytest.raises(ValueError, match="process_index < process_count"):
        sh.process_shard(8, 3, 3)


_CLUSTER_VARS = ("COORDINATOR_ADDRESS", "NUM_PROCESSES", "PROCESS_ID", "JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID",
                 "SLURM_NTASKS", "OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
                 "TPU_PROCESS_ADDRESSES")  # fmt: skip


@pytest.fixture
def init_calls(monkeypatch):
    """Records jax.distributed.initialize calls instead of making them; clears cluster env vars."""
    for var in _CLUSTER_VARS:
        monkeypatch.delenv(var, raising=False)
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    return calls


def test_initialize_distributed_noop_on_one_process(init_calls):
    assert sh.initialize_distributed() is False
    assert sh.initialize_distributed(ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})) is False
    assert init_calls == [] and not jax.distributed.is_initialized()


@dataclasses.dataclass
class _Cfg:
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


def test_initialize_distributed_sources(init_calls, monkeypatch):
    explicit = {"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1}
    assert sh.initialize_distributed(_Cfg(**explicit)) is True
    assert sh.initialize_distributed(ml_collections.ConfigDict(explicit)) is True
    monkeypatch.setenv("COORDINATOR_ADDRESS", "host:99")
    monkeypatch.setenv("NUM_PROCESSES", "4")
    monkeypatch.setenv("PROCESS_ID", "3")
    assert sh.initialize_distributed() is True
    assert init_calls == [explicit, explicit, {"coordinator_address": "host:99", "num_processes": 4, "process_id": 3}]
    for var in ("COORDINATOR_ADDRESS", "NUM_PROCESSES", "PROCESS_ID"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert sh.initialize_distributed() is False  # a one-task Slurm job is single-process
    monkeypatch.setenv("SLURM_NTASKS", "2")
    assert sh.initialize_distributed() is True and init_calls[-1] == {}  # jax auto-detects the rest
    monkeypatch.delenv("SLURM_JOB_ID")
    assert sh.initialize_distributed({"auto_detect": True}) is True and init_calls[-1] == {}
    with pytest.raises(ValueError, match="needs coordinator_address and num_processes"):
        sh.initialize_distributed(_Cfg(process_id=0))


# ---- sharded == unsharded on 8 fake devices ----


@pytest.fixture(scope="module")
def worker():
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "_sharding_worker.py")],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"sharding worker failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout)


@pytest.mark.parametrize("mesh", ["llama-8x1x1", "llama-2x4x1", "llama-2x2x2", "qwen2-2x2x2"])
def test_sharded_matches_single_device(worker, mesh):
    r = worker["meshes"][mesh]
    assert r["init_identical"], "sharded_init differs from unsharded init"
    assert r["q_proj_spec"] == "P('fsdp', 'tensor', None)"
    fsdp, tensor = map(int, mesh.split("-")[1].split("x")[1:])
    assert r["q_proj_shards"] == fsdp * tensor
    assert r["constraints_in_hlo"] > 0, "with_rules did not turn nn.with_logical_constraint into constraints"
    assert r["logits_max_abs"] > 1.0  # the noisy params give non-trivial logits
    assert r["loss_diff"] <= TOL and r["logits_diff"] <= TOL and r["grads_diff"] <= TOL, r


def test_sharded_preference_model(worker):
    r = worker["pm"]
    assert r["init_identical"] and r["head_spec"] == "P('fsdp', None)"
    assert r["scores_diff"] <= TOL, r


def test_sharded_init_indivisible_is_a_clear_error(worker):
    msg = worker["indivisible_error"]
    assert msg is not None, "tensor=2 with 9 query / 3 kv heads did not raise"
    assert "layers_0/self_attn/k_proj/kernel: shape (64, 3, 8)" in msg and "'kv_heads'" in msg
