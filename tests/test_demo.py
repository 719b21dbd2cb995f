"""The quickstart's main job runs end to end on the embedded model (a short version)."""

import json

import pytest

from experiments import demo_generate


@pytest.mark.slow
def test_demo_generates_text(capsys, smollm2_gguf):
    demo_generate.main(["--num-samples", "2", "--max-new-tokens", "12", "--seed", "1"])
    out = capsys.readouterr().out
    assert "prompt (" in out and "hack into my neighbor's wifi" in out
    assert out.count("--- sample") == 2
    assert "tokens/s" in out


@pytest.mark.slow
def test_make_revisions_entry_point(tmp_path, capsys, smollm2_gguf):
    from experiments import make_revisions

    args = ["--num-prompts", "2", "--num-revisions", "1", "--max-new-tokens", "8", "--batch-size", "2"]
    make_revisions.main(args + ["--out", str(tmp_path / "rev")])
    out = capsys.readouterr().out
    assert "prompts: read 2" in out and "2 rows in" in out
    row = json.loads(out[out.index("{") :])
    assert row["id"] == "rt-0001" and len(row["rounds"]) == 1 and row["rounds"][0]["critique"] is not None
