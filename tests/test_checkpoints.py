"""Tests for cai_jax.checkpoints: HF safetensors round trips, transformers compatibility, GGUF conversion."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from cai_jax.checkpoints.gguf import _reverse_permute, convert_gguf
from cai_jax.checkpoints.hf import (
    INDEX_NAME,
    SINGLE_NAME,
    CheckpointError,
    load_hf_params,
    params_to_hf_tensors,
    save_hf_checkpoint,
)
from cai_jax.models import ModelConfig, Transformer, load_pretrained, load_tokenizer, tiny_config

TINY_FAMILIES = ("llama", "qwen2", "mistral")
# Our fp32 forward vs transformers' eager fp32 forward of the same weights (~1e-6 in practice).
TRANSFORMERS_ATOL = 1e-4

ROUND_TRIP_CONFIGS = {
    "llama-tied": tiny_config("llama"),
    "llama-untied": tiny_config("llama", tie_word_embeddings=False),
    "qwen2-bias": tiny_config("qwen2"),
    "mistral-window": tiny_config("mistral", sliding_window=4, tie_word_embeddings=False),
}


def _assert_params_identical(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for path, g in jax.tree_util.tree_leaves_with_path(got):
        g, w = np.asarray(g), np.asarray(_at(want, path))
        assert g.dtype == w.dtype and g.shape == w.shape, jax.tree_util.keystr(path)
        assert np.array_equal(g, w), f"{jax.tree_util.keystr(path)} differs after the round trip"


def _at(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


def _header(folder: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape over every safetensors file of a folder."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "np") as s:
            for name in s.keys():
                out[name] = tuple(s.get_slice(name).get_shape())
    return out


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", ROUND_TRIP_CONFIGS)
def test_round_trip_is_exact(name, tmp_path, random_params):
    cfg = ROUND_TRIP_CONFIGS[name]
    params = random_params(cfg)
    folder = save_hf_checkpoint(tmp_path / "ckpt", cfg, params)
    assert (folder / SINGLE_NAME).exists() and not (folder / INDEX_NAME).exists()
    loaded_cfg, loaded = load_hf_params(folder)
    assert loaded_cfg == cfg
    _assert_params_identical(loaded, params)


@pytest.mark.parametrize("name", ["llama-tied", "qwen2-bias"])
def test_sharded_round_trip_is_exact(name, tmp_path, random_params):
    cfg = ROUND_TRIP_CONFIGS[name]
    params = random_params(cfg)
    folder = save_hf_checkpoint(tmp_path / "ckpt", cfg, params, max_shard_bytes=40_000)
    shards = sorted(folder.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and not (folder / SINGLE_NAME).exists()
    index = json.loads((folder / INDEX_NAME).read_text())
    tensors = params_to_hf_tensors(cfg, params)
    assert set(index["weight_map"]) == set(tensors)
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    loaded_cfg, loaded = load_hf_params(folder)
    assert loaded_cfg == cfg
    _assert_params_identical(loaded, params)

    # Saving again unsharded into the same folder removes the stale shards and index.
    save_hf_checkpoint(folder, cfg, params)
    assert not list(folder.glob("model-*-of-*.safetensors")) and not (folder / INDEX_NAME).exists()
    _assert_params_identical(load_hf_params(folder)[1], params)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_export_matches_transformers_layout(family, tmp_path, tiny_checkpoints):
    ckpt = tiny_checkpoints[family]
    cfg, params = load_hf_params(ckpt.folder)
    folder = save_hf_checkpoint(tmp_path / "export", cfg, params)
    want = dict(ckpt.shapes)
    if cfg.tie_word_embeddings:
        want.pop("lm_head.weight")  # transformers' state_dict lists the tied head; its files do not
    assert _header(folder) == want
    # Loading a transformers folder and writing it back reproduces its tensors bit for bit.
    original, exported = load_file(str(ckpt.folder / SINGLE_NAME)), load_file(str(folder / SINGLE_NAME))
    assert set(original) == set(exported)
    for name in original:
        assert np.array_equal(original[name], exported[name]), name
    assert ModelConfig.from_hf_file(folder / "config.json") == cfg


@pytest.mark.reference
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_export_loads_in_transformers(family, tmp_path, tiny_checkpoints, random_params):
    torch = pytest.importorskip(
        "torch", reason="the transformers reference check needs torch (pip install -e .[bench])"
    )
    from transformers import AutoModelForCausalLM

    ckpt = tiny_checkpoints[family]
    cfg = ModelConfig.from_hf_file(ckpt.folder / "config.json")
    params = random_params(cfg, seed=3)
    folder = save_hf_checkpoint(tmp_path / "export", cfg, params)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="eager")
    model.eval()
    ids, mask = ckpt.golden["ids"], ckpt.golden["mask"]
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        ref = model(
            input_ids=torch.from_numpy(ids.astype(np.int64)),
            attention_mask=torch.from_numpy(mask.astype(np.int64)),
            position_ids=torch.from_numpy(positions.astype(np.int64)),
        ).logits.numpy()
    ours = np.asarray(jax.jit(Transformer(cfg).apply)({"params": params}, jnp.asarray(ids), jnp.asarray(mask)))
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], ref[real], atol=TRANSFORMERS_ATOL, rtol=0)


# ---------------------------------------------------------------- checkpoint errors


@pytest.fixture
def saved(tmp_path, random_params):
    """A tiny untied llama checkpoint folder and its config."""
    cfg = ROUND_TRIP_CONFIGS["llama-untied"]
    return save_hf_checkpoint(tmp_path / "ckpt", cfg, random_params(cfg)), cfg


def test_corrupt_safetensors_names_the_file(saved):
    folder, _ = saved
    (folder / SINGLE_NAME).write_bytes(b"this is not a safetensors file")
    with pytest.raises(CheckpointError, match=SINGLE_NAME):
        load_hf_params(folder)


def test_missing_shard_is_named(tmp_path, random_params):
    cfg = ROUND_TRIP_CONFIGS["llama-untied"]
    folder = save_hf_checkpoint(tmp_path / "ckpt", cfg, random_params(cfg), max_shard_bytes=40_000)
    victim = sorted(folder.glob("model-*-of-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        load_hf_params(folder)


def test_no_weights_is_an_error(saved):
    folder, _ = saved
    (folder / SINGLE_NAME).unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_hf_params(folder)


def test_missing_tensor_is_named(saved):
    folder, _ = saved
    tensors = load_file(str(folder / SINGLE_NAME))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(folder / SINGLE_NAME))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_hf_params(folder)


# [out, in] = [64, 64] expected. [32, 128] has the right size (a reshape alone would not notice);
# [64, 32] does not reshape at all.
@pytest.mark.parametrize("shape", [(32, 128), (64, 32)])
def test_wrong_shape_is_named(saved, shape):
    folder, _ = saved
    tensors = load_file(str(folder / SINGLE_NAME))
    tensors["model.layers.0.self_attn.q_proj.weight"] = np.zeros(shape, np.float32)
    save_file(tensors, str(folder / SINGLE_NAME))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight"):
        load_hf_params(folder)


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_hf_params(tmp_path / "nope")


def test_not_a_gguf_file_names_the_path(tmp_path, monkeypatch):
    monkeypatch.setenv("CAI_JAX_CACHE", str(tmp_path / "cache"))
    fake = tmp_path / "fake.gguf"
    fake.write_text("definitely not GGUF")
    with pytest.raises(ValueError, match=str(fake)):
        convert_gguf(fake, out_dir=tmp_path / "out")
    with pytest.raises(ValueError, match=str(fake)):
        load_pretrained(fake)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- GGUF


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (HF half-split -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize(("n_head", "head_dim", "rest"), [(9, 64, (576,)), (3, 64, (576,)), (4, 16, ()), (2, 8, (5,))])
def test_reverse_permute_inverts_llama_cpp(n_head, head_dim, rest):
    w = np.random.default_rng(0).normal(size=(n_head * head_dim, *rest)).astype(np.float32)
    permuted = _llama_cpp_permute(w, n_head)
    assert not np.array_equal(permuted, w)
    assert np.array_equal(_reverse_permute(permuted, n_head), w)


def test_reverse_permute_layout():
    # One head of dim 8: GGUF stores rotary pairs interleaved (x0, x4, x1, x5, ...); HF stores halves.
    gguf_rows = np.array([0, 4, 1, 5, 2, 6, 3, 7])
    np.testing.assert_array_equal(_reverse_permute(gguf_rows, 1), np.arange(8))


@pytest.fixture(scope="module")
def converted(smollm2_gguf, tmp_path_factory) -> Path:
    """A fresh conversion of the embedded GGUF into a temporary folder (not the user cache)."""
    return convert_gguf(smollm2_gguf, out_dir=tmp_path_factory.mktemp("gguf") / "smollm2")


@pytest.mark.slow
def test_gguf_conversion_writes_hf_folder(converted, smollm2_gguf):
    from gguf import GGUFReader

    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", SINGLE_NAME, ".complete"):
        assert (converted / name).is_file(), name
    assert not converted.with_name(converted.name + ".partial").exists()
    cfg = ModelConfig.from_hf_file(converted / "config.json")
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == (30, 576, 9, 3, 49152)
    assert cfg.tie_word_embeddings and cfg.model_type == "llama"
    header = _header(converted)
    assert "lm_head.weight" not in header and header["model.embed_tokens.weight"] == (49152, 576)

    template = GGUFReader(str(smollm2_gguf)).fields["tokenizer.chat_template"].contents()
    # Written to tokenizer_config.json (read by any transformers version) and, by transformers 5,
    # to chat_template.jinja as well.
    assert json.loads((converted / "tokenizer_config.json").read_text())["chat_template"] == template
    jinja = converted / "chat_template.jinja"
    assert not jinja.exists() or jinja.read_text() == template
    tok = load_tokenizer(converted)
    assert tok.chat_template == template
    assert tok.eos_token == "<|im_end|>"


@pytest.mark.slow
def test_gguf_conversion_is_cached(converted, smollm2_gguf, monkeypatch):
    import gguf

    mtime = os.stat(converted / SINGLE_NAME).st_mtime_ns

    class Reconverted(Exception):
        pass

    def refuse(*args, **kwargs):
        raise Reconverted("conversion attempted")

    monkeypatch.setattr(gguf, "GGUFReader", refuse)
    assert convert_gguf(smollm2_gguf, out_dir=converted) == converted
    assert os.stat(converted / SINGLE_NAME).st_mtime_ns == mtime
    # force=True, or a folder without the .complete marker (a killed conversion), converts again.
    with pytest.raises(ValueError, match="conversion attempted"):
        convert_gguf(smollm2_gguf, out_dir=converted, force=True)
    partial = converted.with_name("killed")
    partial.mkdir()
    (partial / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="conversion attempted"):
        convert_gguf(smollm2_gguf, out_dir=partial)


# ---------------------------------------------------------------- completion markers


class _FailingTokenizer:
    def save_pretrained(self, folder):
        raise KeyboardInterrupt  # a kill after config.json and the weights, before the tokenizer


def test_the_export_marker_is_written_last(tmp_path, random_params):
    from cai_jax.checkpoints.hf import EXPORT_MARKER, IncompleteExportError, is_complete_export, require_complete_export

    cfg = ROUND_TRIP_CONFIGS["llama-tied"]
    folder = save_hf_checkpoint(tmp_path / "export", cfg, random_params(cfg))
    marker = json.loads((folder / EXPORT_MARKER).read_text())
    assert marker["files"] == ["config.json", SINGLE_NAME] and require_complete_export(folder) == folder
    with pytest.raises(KeyboardInterrupt):  # re-exporting over it, killed part-way
        save_hf_checkpoint(folder, cfg, random_params(cfg), tokenizer=_FailingTokenizer())
    assert (folder / "config.json").exists() and not is_complete_export(folder)
    with pytest.raises(IncompleteExportError, match=rf"incomplete export: {folder} has no {EXPORT_MARKER}"):
        require_complete_export(folder)
    with pytest.raises(IncompleteExportError, match="does not exist"):
        require_complete_export(tmp_path / "never")
    load_hf_params(folder)  # a folder from elsewhere (no marker) still loads: the check is the caller's


def test_pipeline_readers_refuse_a_half_export(tmp_path, random_params):
    import types

    from cai_jax.checkpoints.hf import EXPORT_MARKER, IncompleteExportError
    from experiments.context import ModelSpec, load_exported
    from experiments.stages.eval import snapshot_models

    cfg = ROUND_TRIP_CONFIGS["llama-tied"]
    snaps = tmp_path / "ppo" / "snapshots"
    for k in (1, 2):
        save_hf_checkpoint(snaps / f"iter_{k}", cfg, random_params(cfg))
    save_hf_checkpoint(tmp_path / "sft" / "export", cfg, random_params(cfg))
    ctx = types.SimpleNamespace(cache={}, has=lambda s: s in ("sft", "ppo"), dep=lambda s: tmp_path / s)
    assert [m["name"] for m in snapshot_models(ctx)] == ["helpful", "sl-cai", "rl-cai@1", "rl-cai@2"]
    (snaps / "iter_2" / EXPORT_MARKER).unlink()
    (snaps / "iter_2" / SINGLE_NAME).unlink()  # an export killed after its config.json
    with pytest.raises(IncompleteExportError, match=rf"incomplete export: {snaps / 'iter_2'} has no {EXPORT_MARKER}"):
        snapshot_models(ctx)
    spec = ModelSpec(name="", init="random", random_config=None, dtype="float32", param_dtype="float32")
    with pytest.raises(IncompleteExportError, match=rf"incomplete export: {snaps / 'iter_2'} has no"):
        load_exported(ctx, snaps / "iter_2", spec)
