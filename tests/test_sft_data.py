"""SL-CAI fine-tuning examples: which revisions are used, the helpful mix, and the loss mask."""

import pytest

from cai_jax.cai.sft_data import build_sft_examples, tokenize_pair


def _row(i, n_rounds):
    return {
        "id": f"rt-{i}",
        "prompt": f"prompt {i}",
        "initial_response": f"answer {i}",
        "rounds": [{"revision": f"revision {i}.{r + 1}"} for r in range(n_rounds)],
    }


@pytest.fixture(scope="module")
def tok():
    from cai_jax.models import load_tokenizer
    from cai_jax.models.loading import resolve_model_path

    try:
        return load_tokenizer(resolve_model_path("smollm2-135m-instruct"))
    except FileNotFoundError as e:
        pytest.skip(f"embedded model unavailable: {e}")


def test_sl_cai_n_uses_rounds_1_to_n_or_only_the_last(tok):
    rows = [_row(i, 3) for i in range(4)]
    all_rounds = build_sft_examples(rows, tok, revision_round=2)
    assert [e.response for e in all_rounds[:2]] == ["revision 0.1", "revision 0.2"]
    assert len(all_rounds) == 8 and {e.source for e in all_rounds} == {"revision_1", "revision_2"}
    final = build_sft_examples(rows, tok, revision_round=2, final_only=True)
    assert [e.response for e in final] == [f"revision {i}.2" for i in range(4)]
    assert len(build_sft_examples(rows, tok)) == 12  # default: every round


def test_helpful_mix_ratio_and_determinism(tok):
    rows = [_row(i, 1) for i in range(4)]
    helpful = [{"id": f"hp-{i}", "prompt": f"help {i}", "initial_response": f"sure {i}"} for i in range(10)]
    mix = build_sft_examples(rows, tok, helpful_rows=helpful, helpful_ratio=0.5, seed=3)
    assert sum(e.source == "helpful" for e in mix) == 2 and len(mix) == 6
    again = build_sft_examples(rows, tok, helpful_rows=helpful, helpful_ratio=0.5, seed=3)
    assert [e.prompt for e in mix] == [e.prompt for e in again]
    capped = build_sft_examples(rows, tok, helpful_rows=helpful[:1], helpful_ratio=2.0)
    assert sum(e.source == "helpful" for e in capped) == 1


@pytest.mark.parametrize("rendering", ["chat", "transcript"])
def test_loss_mask_marks_exactly_the_response(tok, rendering):
    ids, mask = tokenize_pair(tok, "How do I boil an egg?", "Put it in boiling water for 9 minutes.", rendering)
    assert len(ids) == len(mask) and mask[0] == 0 and mask[-1] == 1
    first = mask.index(1)
    assert all(mask[first:]) and not any(mask[:first])
    response = "Put it in boiling water for 9 minutes."
    end = tok.convert_tokens_to_ids("<|im_end|>")
    if rendering == "chat":  # the response as the template writes it, closed by <|im_end|> and nothing after
        assert ids[first:] == tok(response, add_special_tokens=False)["input_ids"] + [end]
    else:  # " " + response, closed by the tokenizer's EOS
        assert ids[first:] == tok(" " + response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert "boil an egg" in tok.decode(ids[:first])


def test_sl_cai_0_fine_tunes_on_the_initial_answers(tok):
    rows = [_row(i, 2) for i in range(3)]
    for final_only in (False, True):
        examples = build_sft_examples(rows, tok, revision_round=0, final_only=final_only)
        assert [(e.response, e.source) for e in examples] == [(f"answer {i}", "revision_0") for i in range(3)]
    # Rows made with no revision rounds at all: SL-CAI-0 as well.
    assert len(build_sft_examples([_row(0, 0)], tok)) == 1


def test_bad_rows_are_named(tok):
    with pytest.raises(ValueError, match="row 1 .*'rt-1'.*missing field 'rounds'"):
        build_sft_examples([_row(0, 1), {"id": "rt-1", "prompt": "x"}], tok)
    with pytest.raises(ValueError, match="has 1 rounds, SL-CAI-2 needs 2"):
        build_sft_examples([_row(0, 1)], tok, revision_round=2)
    with pytest.raises(ValueError, match="helpful row 0"):
        build_sft_examples([_row(0, 1)], tok, helpful_rows=[{"prompt": "x"}], helpful_ratio=1.0)
