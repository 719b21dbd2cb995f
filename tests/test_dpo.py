"""DPO / IPO (rl_losses' preference section, cai_jax.train.dpo): hand-computed losses and the trainer."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cai_jax.rl_losses import ipo_loss, preference_log_ratio, soft_dpo_loss

# Set once: float32 arithmetic against float64 closed forms.
F32_RTOL, F32_ATOL = 1e-5, 1e-6

# Two rows of (log pi(a), log pi(b), log ref(a), log ref(b)), then the targets p_a.
LOGPS = np.array([[-3.0, -5.0, -4.0, -4.5], [-7.0, -2.0, -6.5, -3.0]], np.float64)
P = np.array([0.9, 0.25])
BETA = 0.5


def _d() -> np.ndarray:
    return (LOGPS[:, 0] - LOGPS[:, 2]) - (LOGPS[:, 1] - LOGPS[:, 3])  # [1.5, -1.5]


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


# ---------------------------------------------------------------- the losses, by hand


def test_log_ratio_margin_by_hand():
    d = preference_log_ratio(*(jnp.asarray(LOGPS[:, k], jnp.float32) for k in range(4)))
    np.testing.assert_allclose(np.asarray(d), [1.5, -1.5], rtol=F32_RTOL, atol=F32_ATOL)
    assert d.dtype == jnp.float32


def test_soft_dpo_loss_and_stats_by_hand():
    loss, stats = soft_dpo_loss(jnp.asarray(_d(), jnp.float32), jnp.asarray(P, jnp.float32), BETA)
    # row 0: z = 0.75, p = 0.9; row 1: z = -0.75, p = 0.25.
    want = [
        -(0.9 * _log_sigmoid(0.75) + 0.1 * _log_sigmoid(-0.75)),
        -(0.25 * _log_sigmoid(-0.75) + 0.75 * _log_sigmoid(0.75)),
    ]
    np.testing.assert_allclose(np.asarray(loss), want, rtol=F32_RTOL, atol=F32_ATOL)
    np.testing.assert_allclose(np.asarray(stats["margin"]), [0.75, -0.75], rtol=F32_RTOL)
    np.testing.assert_array_equal(np.asarray(stats["accuracy"]), [1.0, 1.0])  # d > 0 with p > 1/2; d < 0 with p < 1/2
    _, wrong = soft_dpo_loss(jnp.asarray([1.0, -1.0, 0.0]), jnp.asarray([0.2, 0.5, 0.9]), BETA)
    np.testing.assert_array_equal(np.asarray(wrong["accuracy"]), [0.0, 0.5, 0.5])  # disagree; tie p; tie d


def test_hard_label_is_standard_dpo():
    d = np.array([[1.5, -1.5, 0.0], [4.0, -0.2, 30.0]])  # a [2, 3] batch
    loss, _ = soft_dpo_loss(jnp.asarray(d, jnp.float32), jnp.ones((2, 3)), BETA)
    want = [[-_log_sigmoid(BETA * x) for x in row] for row in d]
    np.testing.assert_allclose(np.asarray(loss), want, rtol=F32_RTOL, atol=F32_ATOL)
    big, _ = soft_dpo_loss(jnp.asarray([-400.0, 400.0]), jnp.asarray([1.0, 1.0]), BETA)
    np.testing.assert_allclose(np.asarray(big), [200.0, 0.0], rtol=F32_RTOL, atol=F32_ATOL)  # stable log_sigmoid


def test_ipo_loss_by_hand():
    loss, stats = ipo_loss(jnp.asarray(_d(), jnp.float32), jnp.asarray(P, jnp.float32), BETA)
    want = [(1.5 - 0.4 / BETA) ** 2, (-1.5 + 0.25 / BETA) ** 2]
    np.testing.assert_allclose(np.asarray(loss), want, rtol=F32_RTOL, atol=F32_ATOL)
    np.testing.assert_allclose(np.asarray(stats["margin"]), [0.75, -0.75], rtol=F32_RTOL)
    hard, _ = ipo_loss(jnp.asarray([0.0, 1.0]), jnp.asarray([1.0, 1.0]), BETA)
    np.testing.assert_allclose(np.asarray(hard), [(1 / (2 * BETA)) ** 2, (1 - 1 / (2 * BETA)) ** 2], rtol=F32_RTOL)


def test_soft_labels_are_the_expected_hard_label_losses():
    """Linear in p for DPO; IPO up to the constant 4 p (1 - p) c^2, c = 1 / (2 beta) (see ipo_loss)."""
    d = jnp.asarray([[1.5, -1.5, 0.3], [-4.0, 0.0, 2.0]], jnp.float32)
    p = jnp.asarray([[0.9, 0.25, 0.5], [0.0, 0.7, 1.0]], jnp.float32)
    ones = jnp.ones_like(p)
    dpo, _ = soft_dpo_loss(d, p, BETA)
    mix = p * soft_dpo_loss(d, ones, BETA)[0] + (1 - p) * soft_dpo_loss(-d, ones, BETA)[0]
    np.testing.assert_allclose(np.asarray(dpo), np.asarray(mix), rtol=F32_RTOL, atol=F32_ATOL)
    ipo, _ = ipo_loss(d, p, BETA)
    mix = p * ipo_loss(d, ones, BETA)[0] + (1 - p) * ipo_loss(-d, ones, BETA)[0]
    c = 1 / (2 * BETA)
    np.testing.assert_allclose(np.asarray(ipo), np.asarray(mix - 4 * p * (1 - p) * c**2), rtol=F32_RTOL, atol=1e-5)


def test_swapping_the_sides_gives_the_same_loss():
    d, p = jnp.asarray([[1.5, -1.5, 0.3], [-4.0, 0.0, 2.0]]), jnp.asarray([[0.9, 0.25, 0.5], [0.0, 0.7, 1.0]])
    swapped = preference_log_ratio(*(jnp.asarray(LOGPS[:, k]) for k in (1, 0, 3, 2)))
    np.testing.assert_allclose(np.asarray(swapped), -_d(), rtol=F32_RTOL)  # a <-> b negates d
    for fn in (soft_dpo_loss, ipo_loss):
        np.testing.assert_allclose(np.asarray(fn(d, p, BETA)[0]), np.asarray(fn(-d, 1 - p, BETA)[0]), rtol=F32_RTOL)


def _grad(fn, d, p):
    """d loss_i / d d_i, one row at a time (the losses are per example)."""
    return np.asarray(jax.vmap(jax.grad(lambda x, q: fn(x, q, BETA)[0]))(jnp.asarray(d), jnp.asarray(p)))


def test_gradients_match_the_closed_forms_and_vanish_at_the_optimum():
    d = np.array([1.5, -1.5, 0.3, -4.0, 0.0, 2.0], np.float32)
    p = np.array([0.9, 0.25, 0.5, 0.1, 0.7, 1.0], np.float32)
    want = [BETA * (_sigmoid(BETA * x) - q) for x, q in zip(d.tolist(), p.tolist())]
    np.testing.assert_allclose(_grad(soft_dpo_loss, d, p), want, rtol=F32_RTOL, atol=F32_ATOL)
    want = [2 * (x - (q - 0.5) / BETA) for x, q in zip(d.tolist(), p.tolist())]
    np.testing.assert_allclose(_grad(ipo_loss, d, p), want, rtol=F32_RTOL, atol=F32_ATOL)

    soft = np.array([0.9, 0.25, 0.5, 0.1, 0.7], np.float32)
    at_dpo = np.array([_logit(q) / BETA for q in soft.tolist()], np.float32)  # sigmoid(beta d) = p
    np.testing.assert_allclose(_grad(soft_dpo_loss, at_dpo, soft), 0.0, atol=F32_ATOL)
    at_ipo = (soft - 0.5) / BETA
    np.testing.assert_allclose(_grad(ipo_loss, at_ipo, soft), 0.0, atol=F32_ATOL)
    assert np.all(np.abs(_grad(soft_dpo_loss, at_dpo + 0.5, soft)) > 1e-3)  # and only there


def test_an_even_label_is_minimised_at_zero_margin():
    grid = jnp.linspace(-6.0, 6.0, 1201)
    loss, _ = soft_dpo_loss(grid, jnp.full_like(grid, 0.5), BETA)
    assert float(grid[int(jnp.argmin(loss))]) == pytest.approx(0.0, abs=1e-6)
    np.testing.assert_allclose(float(loss.min()), math.log(2.0), rtol=F32_RTOL)
    assert float(_grad(soft_dpo_loss, np.zeros(1, np.float32), np.full(1, 0.5, np.float32))[0]) == 0.0
