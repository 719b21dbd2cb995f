"""RLOO's leave-one-out advantages (cai_jax.rl_losses.rloo_advantages)."""

from __future__ import annotations

import numpy as np
import pytest

from cai_jax.rl_losses import rloo_advantages

# One quantity computed two ways in fp32.
SAME_MATH_ATOL = 1e-6


# ---------------------------------------------------------------- maths


def test_rloo_advantages_match_hand_computation():
    rewards = np.array([[1.0, 2.0, 6.0], [0.5, -0.5, 0.0]], np.float32)
    adv = np.asarray(rloo_advantages(rewards))
    # Row 0: 1 - (2 + 6) / 2 = -3, 2 - (1 + 6) / 2 = -1.5, 6 - (1 + 2) / 2 = 4.5; row 1 likewise.
    np.testing.assert_allclose(adv, [[-3.0, -1.5, 4.5], [0.75, -0.75, 0.0]], atol=SAME_MATH_ATOL)
    np.testing.assert_allclose(adv.sum(axis=1), 0.0, atol=SAME_MATH_ATOL)
    np.testing.assert_allclose(adv, 3 / 2 * (rewards - rewards.mean(1, keepdims=True)), atol=SAME_MATH_ATOL)
    with pytest.raises(ValueError, match="k >= 2"):
        rloo_advantages(np.ones((2, 1)))
    with pytest.raises(ValueError, match="k >= 2"):
        rloo_advantages(np.ones(6))
