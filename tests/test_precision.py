"""model.dtype = "auto": bf16 matmuls where the hardware has bf16 dot products, fp32 elsewhere,
resolved once when a config is loaded (cai_jax/nn/precision.py, experiments/config_util.py)."""

from __future__ import annotations

from cai_jax.nn import precision
from experiments.config_util import apply_overrides, load_config, resolve_auto


def _cpuinfo(tmp_path, flags: str):
    path = tmp_path / f"cpuinfo_{abs(hash(flags))}"
    path.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
    return str(path)


def test_bf16_dot_flags_are_read_from_cpuinfo(tmp_path):
    assert precision.cpu_has_bf16_dot(_cpuinfo(tmp_path, "fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni"))
    assert precision.cpu_has_bf16_dot(_cpuinfo(tmp_path, "fpu avx512f amx_bf16 amx_tile"))
    assert not precision.cpu_has_bf16_dot(_cpuinfo(tmp_path, "fpu sse2 avx2 avx512f avx512bw"))
    assert not precision.cpu_has_bf16_dot(str(tmp_path / "missing"))


def test_auto_resolves_by_backend_and_explicit_dtypes_stay():
    assert precision.resolve_dtype("auto", backend="gpu") == "bfloat16"
    assert precision.resolve_dtype("auto", backend="tpu") == "bfloat16"
    want = "bfloat16" if precision.cpu_has_bf16_dot() else "float32"
    assert precision.resolve_dtype("auto", backend="cpu") == want
    for dtype in ("float32", "bfloat16", "float16"):
        assert precision.resolve_dtype(dtype, backend="cpu") == dtype


def test_configs_hold_the_resolved_dtype():
    """The shipped configs say "auto"; a loaded config holds what runs (so config.json and the
    stage hashes do); the test config pins fp32, and an explicit override wins."""
    from configs import base

    assert base.get_config().model.dtype == "auto"
    want = precision.resolve_dtype("auto")
    assert load_config("configs/demo.py").model.dtype == want
    assert load_config("configs/tiny.py").model.dtype == "float32"
    assert load_config("configs/demo.py", ["model.dtype=float32"]).model.dtype == "float32"
    assert resolve_auto(apply_overrides(base.get_config(), [("model.dtype", "auto")])).model.dtype == want
