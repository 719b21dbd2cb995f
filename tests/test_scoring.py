"""Teacher-forced scoring against a direct log-softmax of the full forward pass."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cai_jax.scoring import option_logprobs, score_continuations, token_logprobs
from tests.test_sampling import _tiny

TOL = 1e-5  # fp32, same computation up to padding


def _direct(lm, prefix, cont):
    seq = jnp.asarray([prefix + cont])
    logp = jax.nn.log_softmax(lm.model.apply({"params": lm.params}, seq)[0], axis=-1)
    return np.array([float(logp[len(prefix) - 1 + i, t]) for i, t in enumerate(cont)])


def test_token_logprobs_hand_computed():
    logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]]))
    got = token_logprobs(logits, jnp.array([[0, 2]]))
    np.testing.assert_allclose(got, np.log([[0.5, 0.8]]), atol=1e-6)


def test_score_continuations_equals_direct_computation():
    lm = _tiny()
    prefixes = [[5, 6, 7], [9], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28]]
    conts = [[30, 31], [40, 41, 42, 43], [50]]
    scores = score_continuations(lm, prefixes, conts, batch_size=2)
    for i, (pre, cont) in enumerate(zip(prefixes, conts)):
        ref = _direct(lm, pre, cont)
        np.testing.assert_allclose(scores.token_logprobs[i], ref, atol=TOL)
        np.testing.assert_allclose(scores.total[i], ref.sum(), atol=TOL * len(cont))
        np.testing.assert_allclose(scores.mean[i], ref.mean(), atol=TOL)


def test_option_logprobs_shape_and_values():
    lm = _tiny()
    got = option_logprobs(lm, [[5, 6], [7, 8, 9]], [[[20], [21, 22]], [[30], [31]]])
    assert got.shape == (2, 2)
    np.testing.assert_allclose(got[0, 1], _direct(lm, [5, 6], [21, 22]).sum(), atol=2 * TOL)


def test_scoring_errors():
    lm = _tiny()
    with pytest.raises(ValueError, match="no pairs"):
        score_continuations(lm, [], [])
    with pytest.raises(ValueError, match="pair 1 has an empty continuation"):
        score_continuations(lm, [[1], [2]], [[3], []])
    with pytest.raises(ValueError, match="2 prefixes but 1"):
        score_continuations(lm, [[1], [2]], [[3]])
    with pytest.raises(ValueError, match="different numbers of options"):
        option_logprobs(lm, [[1], [2]], [[[3], [4]], [[5]]])
