"""The resumable sharded job (`cai_jax.jobs`) and the atomic writer (`cai_jax.atomic`): fingerprint
refusal that names what changed, resume that skips finished shards and ignores half-written ones,
the per-process split, batch keys, progress that ticks per step, cached results, and writes that
leave the old file or the new one."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest

from cai_jax import atomic, jobs
from cai_jax.jobs import Progress, ShardedJob, cached_json, read_shards, shard_files

INPUTS = {"settings": {"seed": 3, "mode": "critique"}, "model": ["m", "cfg"], "prompts": ["a", "b", "c", "d", "e"]}
META = {"settings": INPUTS["settings"], "num_prompts": 5}


def job(folder, *, inputs=INPUTS, meta=META, num_items=5, batch_size=2, process_index=0, process_count=1, steps=1):
    return ShardedJob(
        folder,
        kind="thing",
        inputs=inputs,
        meta=meta,
        num_items=num_items,
        batch_size=batch_size,
        seed=inputs["settings"]["seed"],
        process_index=process_index,
        process_count=process_count,
        steps_per_item=steps,
        progress=False,
    )


def rows_of(batch) -> list[dict]:
    """Rows that depend on the batch's items and key only (as the engines' do)."""
    key = np.asarray(jax.random.key_data(batch.key)).ravel().tolist()
    return [{"item": i, "batch": batch.index, "key": key, "text": "é"} for i in batch.indices]


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_meta_fingerprint_and_shards(tmp_path):
    j = job(tmp_path)
    assert j.fingerprint == jobs.fingerprint(INPUTS) and len(j.fingerprint) == 16
    assert j.batches == [[0, 1], [2, 3], [4]]
    j.run(rows_of)
    meta = (tmp_path / "meta.json").read_text()
    assert meta == json.dumps({"fingerprint": j.fingerprint, **META}, indent=2)  # fingerprint first, no newline
    assert (tmp_path / "DONE-p000").read_text() == j.fingerprint
    assert [Path(f).name for f in shard_files(tmp_path, "thing")] == [jobs.shard_name(0, b) for b in range(3)]
    first = (tmp_path / "rows-p000-b000000.jsonl").read_text(encoding="utf-8")
    assert first == "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in read_shards(tmp_path, "thing")[:2])
    assert [r["item"] for r in read_shards(tmp_path, "thing")] == [0, 1, 2, 3, 4]
    with pytest.raises(FileNotFoundError, match="no thing shards"):
        shard_files(tmp_path / "nowhere", "thing")


def test_batch_keys_depend_on_seed_process_and_batch_only(tmp_path):
    seen = {}

    def record(batch, p):
        seen[p, batch.index] = batch.key
        return rows_of(batch)

    for p in (0, 1):
        job(tmp_path / str(p), process_index=p, process_count=2).run(lambda batch, p=p: record(batch, p))
    for (p, b), key in seen.items():
        expected = jax.random.fold_in(jax.random.fold_in(jax.random.key(3), p), b)
        assert np.array_equal(jax.random.key_data(key), jax.random.key_data(expected))
    assert len({tuple(np.asarray(jax.random.key_data(k)).ravel()) for k in seen.values()}) == len(seen)


def test_other_inputs_are_refused_naming_what_changed(tmp_path):
    job(tmp_path).run(rows_of)
    before = files(tmp_path)
    seed4 = {**INPUTS, "settings": {**INPUTS["settings"], "seed": 4}}
    with pytest.raises(ValueError, match=rf"{tmp_path}: holds things made with other inputs .*settings\.seed: 3 -> 4"):
        job(tmp_path, inputs=seed4, meta={**META, "settings": seed4["settings"]}).run(rows_of)
    with pytest.raises(ValueError, match=r"fingerprint .*num_prompts: 5 -> 4"):
        job(tmp_path, inputs={**INPUTS, "prompts": list("abcd")}, meta={**META, "num_prompts": 4}).run(rows_of)
    # The recorded fields agree: the message names the inputs that are not recorded.
    with pytest.raises(ValueError, match=r"recorded settings, num_prompts agree, so one of model, prompts differs"):
        job(tmp_path, inputs={**INPUTS, "model": ["other", "cfg"]}).run(rows_of)
    assert files(tmp_path) == before  # nothing touched
    job(tmp_path).run(rows_of)  # the same inputs: fine, nothing runs
    assert files(tmp_path) == before


def test_resume_skips_finished_shards_and_ignores_half_written_ones(tmp_path):
    job(tmp_path / "a").run(rows_of)
    calls = []

    def killed_on_third(batch):
        calls.append(batch.index)
        if batch.index == 2:
            raise KeyboardInterrupt("simulated kill")
        return rows_of(batch)

    with pytest.raises(KeyboardInterrupt):
        job(tmp_path / "b").run(killed_on_third)
    b = tmp_path / "b"
    assert [p.name for p in b.glob("rows-*.jsonl")] == ["rows-p000-b000000.jsonl", "rows-p000-b000001.jsonl"]
    assert not (b / "DONE-p000").exists()
    # Half-written shards of this process (either temporary name) and one of another process.
    (b / "rows-p000-b000002.tmp").write_text('{"item": 4, "tru')
    (b / "rows-p000-b000002.jsonl.77-deadbeef.tmp").write_text('{"item": 4, "tru')
    (b / "rows-p001-b000000.jsonl.78-deadbeef.tmp").write_text('{"item": 1, "tru')
    assert [r["item"] for r in read_shards(b, "thing")] == [0, 1, 2, 3]
    calls.clear()
    job(b).run(lambda batch: (calls.append(batch.index), rows_of(batch))[1])
    assert calls == [2]  # only the missing batch ran
    assert sorted(p.name for p in b.glob("*.tmp")) == ["rows-p001-b000000.jsonl.78-deadbeef.tmp"]
    (b / "rows-p001-b000000.jsonl.78-deadbeef.tmp").unlink()
    assert files(b) == files(tmp_path / "a")  # byte-identical to the uninterrupted run


@pytest.mark.parametrize("num_items", [0, 1, 5, 7])
@pytest.mark.parametrize("process_count", [1, 2, 3])
def test_processes_cover_every_item_once(tmp_path, num_items, process_count):
    seen = []
    for p in range(process_count):
        job(tmp_path, num_items=num_items, process_index=p, process_count=process_count).run(
            lambda b: (seen.extend(b.indices), rows_of(b))[1]
        )
        assert (tmp_path / f"DONE-p{p:03d}").exists()
    assert sorted(seen) == list(range(num_items))
    if num_items:
        rows = read_shards(tmp_path, "thing")  # (process, batch) order: process p holds p, p + n, ...
        assert [r["item"] for r in rows] == [
            i for p in range(process_count) for i in range(p, num_items, process_count)
        ]


def test_progress_ticks_per_step_and_counts_resumed_work(tmp_path, monkeypatch):
    states = []
    real = Progress.tick

    def recording_tick(self, n=1):
        real(self, n)
        if n:
            states.append(self.done)

    monkeypatch.setattr(Progress, "tick", recording_tick)

    def three_steps(batch):
        for _ in range(3):
            batch.tick()
        batch.tick(5)  # past the batch's share: dropped
        return rows_of(batch)

    j = job(tmp_path / "a", steps=3)
    j.run(three_steps)
    assert states == [2, 4, 6, 8, 10, 12, 13, 14, 15]  # 3 steps x (2, 2, 1) items, a tick per step

    states.clear()
    job(tmp_path / "b", steps=3).run(lambda batch: (batch.tick(), rows_of(batch))[1])  # ticks 1 of 3
    assert states == [2, 6, 8, 12, 13, 15]  # the job ticks what a batch left when its shard is written

    seen = []
    (tmp_path / "a" / "rows-p000-b000001.jsonl").unlink()
    monkeypatch.setattr(
        jobs, "Progress", lambda total, **kw: seen.append((total, kw["initial"])) or Progress(total, **kw)
    )
    job(tmp_path / "a", steps=3).run(three_steps)
    assert seen == [(15, 9)]  # batches 0 and 2 were done: (2 + 1) items x 3 steps


def test_cached_json_computes_once_and_returns_what_it_reads(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"a": (1, 2), 3: np.float32(0.5)}

    path = tmp_path / "parts" / "x.json"
    fresh = cached_json(path, compute, indent=1, default=float)
    again = cached_json(path, compute, indent=1, default=float)
    assert calls == [1] and fresh == again == {"a": [1, 2], "3": 0.5}
    assert path.read_text() == json.dumps({"a": [1, 2], "3": 0.5}, indent=1)

    def killed():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cached_json(tmp_path / "y.json", killed)
    assert not list(tmp_path.glob("y.json*"))


def test_atomic_writes_leave_the_old_file_or_the_new_one(tmp_path, monkeypatch):
    path = tmp_path / "f.json"
    atomic.write_json(path, {"b": 1, "a": "é"}, indent=2, ensure_ascii=False)
    assert path.read_bytes() == json.dumps({"b": 1, "a": "é"}, indent=2, ensure_ascii=False).encode()
    atomic.write_jsonl(tmp_path / "r.jsonl", [{"x": "é"}, {"y": 2}])
    assert (tmp_path / "r.jsonl").read_bytes() == '{"x": "é"}\n{"y": 2}\n'.encode()

    with pytest.raises(TypeError):  # fails while serialising: nothing written
        atomic.write_json(path, {"x": object()})
    with pytest.raises(RuntimeError), atomic.replacing(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed while writing")
    synced = []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd))
    atomic.write_text(path, "new")
    assert path.read_text() == "new" and len(synced) == 2  # the file, then its folder
    atomic.write_text(path, "newer", fsync=False)
    assert path.read_text() == "newer" and len(synced) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json", "r.jsonl"]  # no temporary left

    # Two writers of one file at once use their own temporaries.
    with atomic.replacing(path) as a, atomic.replacing(path) as b:
        assert a != b and a.name.endswith(".tmp") and a.name.startswith("f.json.")
        a.write_text("A")
        b.write_text("B")
    assert path.read_text() == "A"  # the last rename wins, whole
