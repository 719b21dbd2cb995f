"""PM evaluation: hand-computed metrics, calibration of synthetic predictors, and a PM that learns.

The learning test is the issue's "a PM trained on a small synthetic task with known soft targets
becomes calibrated, and beats hard-label training on that task's log-loss".
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cai_jax.eval.pm import pm_metrics, reliability_table, reward_stats
from cai_jax.models import ScalarModel, tiny_config
from cai_jax.train.state import TrainState, make_optimizer
from cai_jax.train.steps import eval_pm_batch, pm_step
from tests.defaults import optim_config

HAND_RTOL = 1e-12  # float64 host arithmetic against float64 hand formulas
ECE_DELTA = 0.01  # a perfectly calibrated predictor exceeds `ece_noise_bound` with probability < 1%


def ece_noise_bound(n: int, n_bins: int, delta: float = ECE_DELTA) -> float:
    """ECE that a perfectly calibrated predictor stays below w.p. >= 1 - delta, on N Bernoulli labels.

    With labels y ~ Bernoulli(q) the ECE is sum_b |sum_{i in b} (q_i - y_i)| / N. Its mean is at
    most sum_b sqrt(n_b / 4) / N <= 0.5 sqrt(K / N) (variance <= 1/4 per label, then
    Cauchy-Schwarz over the K bins), and changing one label moves it by at most 1 / N, so by
    McDiarmid P(ECE > mean + t) <= exp(-2 N t^2): t = sqrt(log(1 / delta) / (2 N)).
    """
    return 0.5 * math.sqrt(n_bins / n) + math.sqrt(math.log(1.0 / delta) / (2.0 * n))


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


# ---------------------------------------------------------------- hand-computed metrics

# Margins r_a - r_b chosen so that q = sigmoid(margin) is 0.7, 0.3, 0.9, 0.5, 0.1 (away from the
# bin edges, so no rounding decides a bin).
_Q = np.array([0.7, 0.3, 0.9, 0.5, 0.1])
_P = np.array([1.0, 0.5, 0.6, 0.0, 0.0])


def _hand_scores():
    margin = np.log(_Q / (1 - _Q))
    r_b = np.array([0.2, -1.0, 3.0, 0.0, 0.5])
    return r_b + margin, r_b


def test_hand_computed_accuracy_log_loss_brier():
    r_a, r_b = _hand_scores()
    m = pm_metrics(r_a, r_b, _P, n_bins=4)
    # Pair 2 (p = 0.5) is excluded; pairs 1, 3, 5 agree with p; pair 4 is a score tie (half right).
    assert m["n"] == 5 and m["n_p_half"] == 1
    assert m["accuracy"] == pytest.approx(3.5 / 4, rel=HAND_RTOL)
    terms = [
        -math.log(0.7),
        -(0.5 * math.log(0.3) + 0.5 * math.log(0.7)),
        -(0.6 * math.log(0.9) + 0.4 * math.log(0.1)),
        -math.log(0.5),
        -math.log(0.9),
    ]
    assert m["log_loss"] == pytest.approx(sum(terms) / 5, rel=1e-9)
    assert m["brier"] == pytest.approx((0.09 + 0.04 + 0.09 + 0.25 + 0.01) / 5, rel=1e-9)


def test_hand_computed_reliability_bins_and_ece_folded():
    r_a, r_b = _hand_scores()
    m = pm_metrics(r_a, r_b, _P, n_bins=4)
    # Folded to q >= 0.5: (0.7, 1), (0.7, 0.5), (0.9, 0.6), (0.5, 0), (0.9, 1); edges 0.5 .. 1 by 0.125.
    bins = m["bins"]
    np.testing.assert_allclose(bins["edges"], [0.5, 0.625, 0.75, 0.875, 1.0], rtol=HAND_RTOL)
    np.testing.assert_array_equal(bins["count"], [1, 2, 0, 2])
    np.testing.assert_allclose(bins["mean_pred"], [0.5, 0.7, np.nan, 0.9], rtol=1e-9)
    np.testing.assert_allclose(bins["mean_target"], [0.0, 0.75, np.nan, 0.8], rtol=1e-9)
    assert m["ece"] == pytest.approx((1 * 0.5 + 2 * 0.05 + 2 * 0.1) / 5, rel=1e-9)


def test_hand_computed_reliability_bins_unfolded():
    r_a, r_b = _hand_scores()
    m = pm_metrics(r_a, r_b, _P, n_bins=4, fold=False)
    # Raw q over [0, 1] by 0.25: 0.1 | 0.3 | 0.7, 0.5 | 0.9.
    np.testing.assert_allclose(m["bins"]["edges"], [0.0, 0.25, 0.5, 0.75, 1.0], rtol=HAND_RTOL)
    np.testing.assert_array_equal(m["bins"]["count"], [1, 1, 2, 1])
    np.testing.assert_allclose(m["bins"]["mean_pred"], [0.1, 0.3, 0.6, 0.9], rtol=1e-9)
    np.testing.assert_allclose(m["bins"]["mean_target"], [0.0, 0.5, 0.5, 0.6], rtol=1e-9)
    assert m["ece"] == pytest.approx((0.1 + 0.2 + 2 * 0.1 + 0.3) / 5, rel=1e-9)


def test_folded_metrics_do_not_depend_on_which_side_is_a():
    rng = np.random.default_rng(0)
    r_a, r_b, p = rng.normal(size=(3, 200))
    p = _sigmoid(2 * p)
    swap = rng.random(200) < 0.5
    r_a2, r_b2, p2 = np.where(swap, r_b, r_a), np.where(swap, r_a, r_b), np.where(swap, 1 - p, p)
    m, m2 = pm_metrics(r_a, r_b, p), pm_metrics(r_a2, r_b2, p2)
    for key in ("accuracy", "log_loss", "brier", "ece"):
        assert m2[key] == pytest.approx(m[key], rel=1e-9, abs=1e-12), key
    np.testing.assert_array_equal(m2["bins"]["count"], m["bins"]["count"])


def test_large_margins_are_finite():
    m = pm_metrics([1000.0, -1000.0], [0.0, 0.0], [0.0, 0.0])
    assert m["log_loss"] == pytest.approx(500.0, rel=1e-12)  # (1000 + ~0) / 2
    assert m["accuracy"] == 0.5 and np.isfinite(m["ece"])


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pm_metrics([0.0], [0.0], [1.5])
    with pytest.raises(ValueError, match="one shape"):
        pm_metrics([0.0, 1.0], [0.0], [0.5, 0.5])
    with pytest.raises(ValueError, match="non-finite"):
        pm_metrics([np.nan], [0.0], [0.5])
    with pytest.raises(ValueError, match="no pairs"):
        pm_metrics([], [], [])
    with pytest.raises(ValueError, match="non-finite"):
        reward_stats([1.0, np.inf])


def test_all_half_targets_give_nan_accuracy():
    m = pm_metrics([1.0, 2.0], [0.0, 0.0], [0.5, 0.5])
    assert math.isnan(m["accuracy"]) and m["n_p_half"] == 2


def test_reward_stats_hand_computed():
    s = reward_stats(np.array([[1.0, 2.0], [3.0, 4.0]]))
    assert s == {"mean": pytest.approx(2.5, rel=HAND_RTOL), "std": pytest.approx(math.sqrt(1.25), rel=HAND_RTOL)}


def test_reliability_table_lists_every_bin():
    r_a, r_b = _hand_scores()
    table = reliability_table(pm_metrics(r_a, r_b, _P, n_bins=4))
    lines = table.splitlines()
    assert lines[0].startswith("| bin | count | mean predicted | mean target | gap |")
    assert lines[2] == "| [0.50, 0.62) | 1 | 0.500 | 0.000 | +0.500 |"
    assert lines[4] == "| [0.75, 0.88) | 0 | - | - | - |"
    assert lines[5] == "| [0.88, 1.00] | 2 | 0.900 | 0.800 | +0.100 |"
    assert "ECE = 0.1600" in lines[-1] and "N = 5" in lines[-1]


# ---------------------------------------------------------------- synthetic predictors


@pytest.mark.parametrize("fold", [True, False])
def test_calibrated_predictor_has_small_ece_and_miscalibrated_large(fold):
    n, k = 20_000, 10
    rng = np.random.default_rng(1)
    q = rng.random(n)
    y = (rng.random(n) < q).astype(np.float64)  # labels drawn from the predictor's own q
    logit = lambda x: np.log(x / (1 - x))
    calibrated = pm_metrics(logit(q), np.zeros(n), y, n_bins=k, fold=fold)
    bound = ece_noise_bound(n, k)  # ~0.022
    assert calibrated["ece"] < bound
    # q^3 under-predicts A wherever 0 < q < 1; mean (q - q^3) over U(0, 1) is 1/4.
    q3 = np.clip(q**3, 1e-12, 1 - 1e-12)
    miscalibrated = pm_metrics(logit(q3), np.zeros(n), y, n_bins=k, fold=fold)
    assert miscalibrated["ece"] > 5 * bound


# ---------------------------------------------------------------- a PM that learns

_VOCAB = 16  # items = token ids; each response is the single token of its item
_HELD_OUT = 30  # of the 120 unordered item pairs, never trained on
_STEPS = 300
_BATCH = 64  # pairs per step
_EVAL_N = 8192  # held-out (pair, Bernoulli label) draws for the sampled-label ECE
_N_BINS = 10


def _pairs_batch(a, b, p=None):
    mask = np.ones((len(a), 1), bool)
    batch = {"tokens_a": a[:, None].astype(np.int32), "mask_a": mask, "tokens_b": b[:, None].astype(np.int32)}
    batch["mask_b"] = mask
    if p is not None:
        batch["p"] = p.astype(np.float32)
    return batch


@pytest.fixture(scope="module")
def synthetic_pm_runs():
    """Trains the same tiny PM twice, on soft targets and on hard labels round(p); scores held-out pairs.

    True utilities u(t) are a fixed permutation of linspace(-2, 2, 16): held-out targets
    p = sigmoid(u(a) - u(b)) span 0.02 .. 0.98, and |p - 0.5| >= 0.066, so round(p) has no ties.
    A 1-layer, 32-wide model: the task only needs a score per token, and it keeps the test short on
    2 shared CPU cores (one compile serves both runs).
    """
    rng = np.random.default_rng(0)
    u = rng.permutation(np.linspace(-2.0, 2.0, _VOCAB))
    pairs = np.array([(i, j) for i in range(_VOCAB) for j in range(i + 1, _VOCAB)])
    pairs = pairs[rng.permutation(len(pairs))]
    held, train = pairs[:_HELD_OUT], pairs[_HELD_OUT:]
    assert set(train.reshape(-1)) == set(range(_VOCAB))  # every item's score is trained

    cfg = tiny_config(
        vocab_size=_VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=16,
        max_position_embeddings=8,
    )
    model = ScalarModel(cfg)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])
    optimizer = make_optimizer(optim_config(lr=3e-3, b2=0.99, schedule="constant", updates=_STEPS), params)
    step = jax.jit(functools.partial(pm_step, model=model, optimizer=optimizer))
    score = jax.jit(functools.partial(eval_pm_batch, model=model))

    # Held-out eval draws: a held-out pair in a random orientation and a label y ~ Bernoulli(p).
    ev = np.random.default_rng(2)
    idx = ev.integers(0, _HELD_OUT, _EVAL_N)
    swap = ev.random(_EVAL_N) < 0.5
    a = np.where(swap, held[idx, 1], held[idx, 0])
    b = np.where(swap, held[idx, 0], held[idx, 1])
    p_eval = _sigmoid(u[a] - u[b])
    y_eval = (ev.random(_EVAL_N) < p_eval).astype(np.float64)

    out = {"p": p_eval, "y": y_eval, "ideal": (u[a], u[b])}
    for name, hard in (("soft", False), ("hard", True)):
        state = TrainState.create(params, optimizer, jax.random.key(0))
        data = np.random.default_rng(1)  # both runs see the same pairs, in the same order
        for _ in range(_STEPS):
            chosen = train[data.integers(0, len(train), _BATCH)]
            flip = data.random(_BATCH) < 0.5
            ta, tb = np.where(flip, chosen[:, 1], chosen[:, 0]), np.where(flip, chosen[:, 0], chosen[:, 1])
            p = _sigmoid(u[ta] - u[tb])
            state, metrics = step(state, _pairs_batch(ta, tb, np.round(p) if hard else p))
        assert np.isfinite(float(metrics["loss"]))
        scores = score(state.params, _pairs_batch(a, b))
        out[name] = (np.asarray(scores["r_a"], np.float64), np.asarray(scores["r_b"], np.float64))
    return out


def test_soft_trained_pm_is_calibrated_on_held_out_pairs(synthetic_pm_runs):
    runs = synthetic_pm_runs
    bound = ece_noise_bound(_EVAL_N, _N_BINS)  # 0.5 sqrt(10 / 8192) + sqrt(ln 100 / 16384) = 0.0342
    soft_vs_p = pm_metrics(*runs["soft"], runs["p"], n_bins=_N_BINS)
    soft_vs_y = pm_metrics(*runs["soft"], runs["y"], n_bins=_N_BINS)
    # Against sampled labels: what a perfectly calibrated PM meets w.p. >= 99%. Against the known p
    # there is no label noise, so the same bound leaves all of it to the PM's own miscalibration.
    assert soft_vs_y["ece"] < bound, reliability_table(soft_vs_y)
    assert soft_vs_p["ece"] < bound, reliability_table(soft_vs_p)
    assert soft_vs_p["accuracy"] == 1.0
    # The bound is not vacuous: hard-label training on the same pairs is overconfident.
    hard_vs_y = pm_metrics(*runs["hard"], runs["y"], n_bins=_N_BINS)
    assert hard_vs_y["ece"] > bound, reliability_table(hard_vs_y)


def test_soft_training_beats_hard_labels_on_log_loss(synthetic_pm_runs):
    runs = synthetic_pm_runs
    soft = pm_metrics(*runs["soft"], runs["p"])
    hard = pm_metrics(*runs["hard"], runs["p"])
    floor = pm_metrics(*runs["ideal"], runs["p"])["log_loss"]  # mean entropy of p: the true utilities
    assert soft["log_loss"] < hard["log_loss"]
    assert soft["log_loss"] - floor < 0.01  # within 0.01 nats of the best any PM can do
    # Hard labels push margins to the extremes: confident beyond the targets.
    assert np.mean(np.abs(runs["hard"][0] - runs["hard"][1])) > np.mean(np.abs(runs["ideal"][0] - runs["ideal"][1]))
