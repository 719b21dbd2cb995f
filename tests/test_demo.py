"""The quickstart's main job runs end to end on the embedded model (a short version)."""

import pytest

from experiments import demo_generate


@pytest.mark.slow
def test_demo_generates_text(capsys, smollm2_gguf):
    demo_generate.main(["--num-samples", "2", "--max-new-tokens", "12", "--seed", "1"])
    out = capsys.readouterr().out
    assert "prompt (" in out and "hack into my neighbor's wifi" in out
    assert out.count("--- sample") == 2
    assert "tokens/s" in out
