"""Elo scores from pairwise comparisons between model snapshots (Bai et al. 2022, sec. 4.3, fig. 8).

A comparison is a tuple (model_a, model_b, p_a): p_a in [0, 1] is the probability that model_a's
response is preferred, soft (an AI feedback model's normalised probability of its option) or hard
(0 or 1; 0.5 for a tie). Under the Bradley-Terry model each model i has a log-strength theta_i and

    P(a beats b) = sigmoid(theta_a - theta_b).

`fit_bradley_terry` maximises the soft-target log-likelihood

    sum_c [p_c log sigmoid(d_c) + (1 - p_c) log sigmoid(-d_c)] - (l2 / 2) |theta|^2,  d_c = theta_a - theta_b,

by Newton's method with backtracking (the objective is concave). The likelihood depends only on
differences, so the scores are identified up to a shift: without an anchor they are reported with
mean zero, with an anchor the anchor model is at exactly 0 (the fit itself is always mean-zero;
anchoring is a shift afterwards). The tiny L2 term (default 1e-4, against a log-likelihood summed
over comparisons) shrinks a finite MLE by about l2 * theta / (n q (1 - q)) nats for a model with n
comparisons at win probability q: 0.003 Elo for 20 comparisons at 3:1 odds. What it is for is the
case where the MLE is infinite (some models win, or lose, all their comparisons with the rest with
certainty, as hard labels easily do): the scores then stay finite but large (a 10-0 record puts about
9.6 nats, 1670 Elo, between two models) and mean only "far apart". Set l2=0 for the exact MLE;
the fit then raises where it is infinite (the Zermelo-Ford condition, checked on the data and on
each bootstrap resample).

Elo is the log-strength on the chess scale: Elo = theta * 400 / ln(10), so a difference of 400 Elo
is 10:1 odds, as in the paper. Confidence intervals are percentile intervals of a bootstrap over
comparisons, stratified by model pair: each resample redraws, with replacement, as many comparisons
of each pair as the data holds, so every resample has the data's comparison graph (an unstratified
resample can drop a rarely compared model and leave its score undefined). When comparisons come in
clusters (all model pairs judged on the same prompt), `elo_scores(..., groups=prompt_ids)`
resamples the clusters instead, so the interval carries the variation between prompts.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence

import numpy as np

__all__ = ["ELO_PER_NAT", "EloScore", "elo_scores", "elo_win_probability", "fit_bradley_terry", "win_rate"]

ELO_PER_NAT = 400.0 / math.log(10.0)  # Elo points per unit of log-strength (natural-log odds)
_MAX_NEWTON_STEPS = 100
_GRAD_TOL = 1e-10  # on the gradient per comparison; float64 Newton reaches it in a few steps
# Stop when a Newton step's predicted decrease of the objective is below float64 resolution of the
# objective itself: the line search can no longer see progress there (near-0.5 soft labels reach
# this before _GRAD_TOL), and from so close the full Newton step is exact to float precision.
_DECREMENT_TOL = 1e-14


@dataclasses.dataclass(frozen=True)
class EloScore:
    """One model's Elo with a bootstrap percentile interval [lo, hi] (NaN when n_bootstrap == 0)."""

    elo: float
    lo: float
    hi: float
    n_comparisons: int  # comparisons in which the model took part, on either side


@dataclasses.dataclass(frozen=True)
class _Pairs:
    """Comparisons grouped by unordered model pair (i < j), with p oriented as P(i beats j)."""

    names: list[str]
    i_P: np.ndarray  # int [P]
    j_P: np.ndarray  # int [P]
    p_by_pair: list[np.ndarray]  # P arrays of the targets of each pair's comparisons
    n_per_model: np.ndarray  # int [M]
    pair_C: np.ndarray  # int [C]: the pair of each comparison, in input order
    p_C: np.ndarray  # float [C]: each comparison's target oriented as P(i beats j) of its pair


def _check_comparison(c: int, comp, fn: str) -> tuple[str, str, float]:
    """Validates comparisons[c] and returns it as (model_a, model_b, p_a)."""
    if not isinstance(comp, Sequence) or isinstance(comp, str) or len(comp) != 3:
        raise ValueError(f"{fn}: comparisons[{c}] must be a (model_a, model_b, p_a) tuple, got {comp!r}")
    a, b, p = comp
    if not isinstance(a, str) or not isinstance(b, str):
        raise ValueError(f"{fn}: comparisons[{c}] model names must be str, got {a!r} and {b!r}")
    if a == b:
        raise ValueError(f"{fn}: comparisons[{c}] compares {a!r} with itself")
    try:
        p = float(p)
    except (TypeError, ValueError):
        raise ValueError(f"{fn}: comparisons[{c}] p_a must be a number, got {p!r}") from None
    if not 0.0 <= p <= 1.0:  # also rejects NaN
        raise ValueError(f"{fn}: comparisons[{c}] p_a={p} must lie in [0, 1]")
    return a, b, p


def _group(comparisons: Iterable, models: Sequence[str] | None, fn: str) -> _Pairs:
    """Validates comparisons and groups them by pair; raises ValueError on anything malformed."""
    comparisons = list(comparisons)
    if not comparisons:
        raise ValueError(f"{fn}: comparisons is empty")
    names: dict[str, int] = {} if models is None else {m: k for k, m in enumerate(models)}
    if models is not None and len(names) != len(models):
        raise ValueError(f"{fn}: models has duplicate names: {list(models)}")
    if models is not None and len(names) < 2:
        raise ValueError(f"{fn}: need at least 2 models, got models={list(models)}")
    by_pair: dict[tuple[int, int], list[float]] = {}
    key_C, p_C = [], []
    for c, comp in enumerate(comparisons):
        a, b, p = _check_comparison(c, comp, fn)
        for m in (a, b):
            if m not in names:
                if models is not None:
                    raise ValueError(f"{fn}: comparisons[{c}] names {m!r}, which is not in models {list(models)}")
                names[m] = len(names)
        i, j = names[a], names[b]
        key, p_i = ((i, j), p) if i < j else ((j, i), 1.0 - p)
        by_pair.setdefault(key, []).append(p_i)
        key_C.append(key)
        p_C.append(p_i)

    name_list = list(names)
    if len(name_list) < 2:
        raise ValueError(f"{fn}: need at least 2 models, got {name_list}")
    n_per_model = np.zeros(len(name_list), np.int64)
    for (i, j), ps in by_pair.items():
        n_per_model[i] += len(ps)
        n_per_model[j] += len(ps)
    missing = [name_list[k] for k in np.flatnonzero(n_per_model == 0)]
    if missing:
        raise ValueError(f"{fn}: models {missing} appear in no comparison")
    _check_connected(name_list, by_pair, fn)
    keys = sorted(by_pair)
    index = {k: n for n, k in enumerate(keys)}
    return _Pairs(
        names=name_list,
        i_P=np.array([k[0] for k in keys], np.int64),
        j_P=np.array([k[1] for k in keys], np.int64),
        p_by_pair=[np.asarray(by_pair[k], np.float64) for k in keys],
        n_per_model=n_per_model,
        pair_C=np.array([index[k] for k in key_C], np.int64),
        p_C=np.asarray(p_C, np.float64),
    )


def _check_connected(names: list[str], by_pair: dict, fn: str) -> None:
    """Scores are only comparable within a connected component of the comparison graph."""
    parent = list(range(len(names)))

    def root(k: int) -> int:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    for i, j in by_pair:
        parent[root(i)] = root(j)
    groups: dict[int, list[str]] = {}
    for k, name in enumerate(names):
        groups.setdefault(root(k), []).append(name)
    if len(groups) > 1:
        raise ValueError(
            f"{fn}: the comparison graph is disconnected, so scores across these groups are undefined: "
            f"{list(groups.values())}"
        )


def _newton(i_P, j_P, n_P, s_P, n_models: int, l2: float, fn: str) -> np.ndarray:
    """Maximises the penalised pair log-likelihood; n_P comparisons per pair, s_P = sum of their p."""
    theta_M = np.zeros(n_models)
    ones_M = np.ones(n_models) / n_models
    total = float(n_P.sum())

    def neg_obj(t):
        d_P = t[i_P] - t[j_P]
        nll = np.sum(s_P * np.logaddexp(0.0, -d_P) + (n_P - s_P) * np.logaddexp(0.0, d_P))
        return nll + 0.5 * l2 * float(t @ t)

    f = neg_obj(theta_M)
    for _ in range(_MAX_NEWTON_STEPS):
        d_P = theta_M[i_P] - theta_M[j_P]
        q_P = 0.5 * (1.0 + np.tanh(0.5 * d_P))  # sigmoid without overflow
        g_P = s_P - n_P * q_P  # d loglik / d d_P
        grad_M = np.zeros(n_models)
        np.add.at(grad_M, i_P, g_P)
        np.add.at(grad_M, j_P, -g_P)
        grad_M -= l2 * theta_M
        if np.max(np.abs(grad_M)) < _GRAD_TOL * total:
            return theta_M
        w_P = n_P * q_P * (1.0 - q_P)
        hess_MM = np.zeros((n_models, n_models))
        np.add.at(hess_MM, (i_P, i_P), w_P)
        np.add.at(hess_MM, (j_P, j_P), w_P)
        np.add.at(hess_MM, (i_P, j_P), -w_P)
        np.add.at(hess_MM, (j_P, i_P), -w_P)
        # The likelihood is flat along the all-ones direction; the rank-one term fixes the shift
        # (the gradient has no component along it, so the step keeps sum(theta) at 0).
        hess_MM += l2 * np.eye(n_models) + np.outer(ones_M, ones_M)
        step_M = np.linalg.solve(hess_MM, grad_M)
        if 0.5 * float(grad_M @ step_M) <= _DECREMENT_TOL * max(1.0, abs(f)):
            return theta_M + step_M
        t = 1.0
        while t > 1e-10:
            cand = theta_M + t * step_M
            f_cand = neg_obj(cand)
            if f_cand < f:
                break
            t *= 0.5
        else:  # no step decreases the objective: at the optimum to float64 precision
            return theta_M
        theta_M, f = cand, f_cand
    raise ValueError(
        f"{fn}: the Bradley-Terry fit did not converge in {_MAX_NEWTON_STEPS} Newton steps; with l2={l2} the "
        "maximum-likelihood scores may be infinite (a model wins or loses all its comparisons): use l2 > 0"
    )


def _check_mle_exists(pairs: _Pairs, fn: str) -> None:
    """Without a prior, the MLE is finite iff the "beats with p > 0" digraph is strongly connected.

    (Zermelo 1929; Ford 1957.) Otherwise some group of models wins every comparison with the rest
    with certainty, and its scores run off to infinity.
    """
    m = len(pairs.names)
    fwd: list[set[int]] = [set() for _ in range(m)]
    bwd: list[set[int]] = [set() for _ in range(m)]
    for i, j, p in zip(pairs.i_P, pairs.j_P, pairs.p_by_pair):
        if np.any(p > 0.0):  # i beats j in some comparison
            fwd[i].add(j)
            bwd[j].add(i)
        if np.any(p < 1.0):
            fwd[j].add(i)
            bwd[i].add(j)
    for adj in (fwd, bwd):
        seen, stack = {0}, [0]
        while stack:
            for k in adj[stack.pop()] - seen:
                seen.add(k)
                stack.append(k)
        if len(seen) < m:
            raise ValueError(
                f"{fn}: with l2=0 the maximum-likelihood scores are infinite: some models win (or lose) all "
                "their comparisons with the others with certainty; use l2 > 0"
            )


def _fit(pairs: _Pairs, anchor: str | None, l2: float, fn: str) -> np.ndarray:
    if l2 == 0.0:
        _check_mle_exists(pairs, fn)
    n_P = np.array([len(p) for p in pairs.p_by_pair], np.float64)
    s_P = np.array([p.sum() for p in pairs.p_by_pair])
    theta_M = _newton(pairs.i_P, pairs.j_P, n_P, s_P, len(pairs.names), l2, fn)
    theta_M = theta_M - theta_M.mean()
    if anchor is not None:
        theta_M = theta_M - theta_M[pairs.names.index(anchor)]
    return theta_M


def _check_args(pairs: _Pairs, anchor: str | None, l2: float, fn: str) -> None:
    if anchor is not None and anchor not in pairs.names:
        raise ValueError(f"{fn}: anchor {anchor!r} appears in no comparison (models: {pairs.names})")
    if not (l2 >= 0.0 and math.isfinite(l2)):
        raise ValueError(f"{fn}: l2={l2} must be finite and >= 0")


def fit_bradley_terry(
    comparisons: Iterable[tuple[str, str, float]],
    anchor: str | None = None,
    *,
    models: Sequence[str] | None = None,
    l2: float = 1e-4,
) -> dict[str, float]:
    """Maximum-likelihood Bradley-Terry log-strengths with soft targets (module docstring).

    Args:
      comparisons: (model_a, model_b, p_a) tuples, p_a = P(model_a preferred) in [0, 1].
      anchor: the model whose score is fixed at 0; None reports scores with mean zero.
      models: the models expected; each must appear in some comparison, and no other may. None
        takes the models named in the comparisons.
      l2: the penalty (l2 / 2) |theta|^2 that keeps the estimates finite; 0 for the exact MLE.

    Returns:
      {model: log-strength theta} in natural-log odds units, in order of first appearance (or of
      `models`); P(a beats b) = sigmoid(theta_a - theta_b).

    Raises:
      ValueError: on a malformed comparison, p_a outside [0, 1] or NaN, fewer than 2 models, a model
        (or the anchor) in no comparison, a disconnected comparison graph, or (l2 == 0) divergence.
    """
    fn = "fit_bradley_terry"
    pairs = _group(comparisons, models, fn)
    _check_args(pairs, anchor, l2, fn)
    theta_M = _fit(pairs, anchor, l2, fn)
    return {name: float(t) for name, t in zip(pairs.names, theta_M)}


def elo_scores(
    comparisons: Iterable[tuple[str, str, float]],
    *,
    anchor: str | None = None,
    n_bootstrap: int = 200,
    level: float = 0.95,
    seed: int = 0,
    models: Sequence[str] | None = None,
    l2: float = 1e-4,
    groups: Sequence | None = None,
) -> dict[str, EloScore]:
    """Elo scores (400 Elo = 10:1 odds) with bootstrap percentile intervals.

    Without `groups` the bootstrap is stratified by model pair (module docstring). With `groups`,
    one key per comparison (e.g. the index of the prompt it was judged on), it is a cluster
    bootstrap: each resample draws as many groups as there are, with replacement, and keeps every
    comparison of each drawn group. Comparisons on one prompt are correlated (every model answered
    the same question), so resampling them one by one treats them as independent and gives too
    narrow an interval; resampling prompts carries their variation into the interval. A resample
    that leaves a model pair without comparisons is drawn again.

    Args:
      comparisons, anchor, models, l2: as in `fit_bradley_terry`.
      groups: a cluster key per comparison (hashable), or None.
      n_bootstrap: bootstrap resamples; 0 skips the intervals (lo = hi = NaN).
      level: the interval's coverage, in (0, 1): percentiles (1 - level) / 2 and (1 + level) / 2.
      seed: seeds numpy's default_rng; the same seed and data give the same intervals.

    Returns:
      {model: EloScore(elo, lo, hi, n_comparisons)}, in the order of `fit_bradley_terry`. With an
      anchor, the anchor's interval is [0, 0] and the others' cover their difference to it.

    Raises:
      ValueError: as `fit_bradley_terry`, or on n_bootstrap < 0 or level outside (0, 1).
    """
    fn = "elo_scores"
    if not isinstance(n_bootstrap, int) or n_bootstrap < 0:
        raise ValueError(f"{fn}: n_bootstrap={n_bootstrap!r} must be an int >= 0")
    if not 0.0 < level < 1.0:
        raise ValueError(f"{fn}: level={level} must lie in (0, 1)")
    pairs = _group(comparisons, models, fn)
    _check_args(pairs, anchor, l2, fn)
    elo_M = _fit(pairs, anchor, l2, fn) * ELO_PER_NAT
    if groups is not None:
        groups = list(groups)
        if len(groups) != len(pairs.p_C):
            raise ValueError(f"{fn}: {len(groups)} groups for {len(pairs.p_C)} comparisons")
        keys = {g: n for n, g in enumerate(dict.fromkeys(groups))}
        group_C = np.array([keys[g] for g in groups], np.int64)

    lo_M = hi_M = np.full(len(pairs.names), np.nan)
    if n_bootstrap > 0:
        rng = np.random.default_rng(seed)
        boot_BM = np.empty((n_bootstrap, len(pairs.names)))
        for b in range(n_bootstrap):
            if groups is None:
                resampled = [rng.choice(p, size=p.size, replace=True) for p in pairs.p_by_pair]
            else:
                resampled = _cluster_resample(pairs, group_C, len(keys), rng, fn)
            boot_BM[b] = _fit(dataclasses.replace(pairs, p_by_pair=resampled), anchor, l2, fn) * ELO_PER_NAT
        lo_M, hi_M = np.percentile(boot_BM, [50.0 * (1.0 - level), 50.0 * (1.0 + level)], axis=0)
    return {
        name: EloScore(elo=float(e), lo=float(lo), hi=float(hi), n_comparisons=int(n))
        for name, e, lo, hi, n in zip(pairs.names, elo_M, lo_M, hi_M, pairs.n_per_model)
    }


def _cluster_resample(pairs: _Pairs, group_C: np.ndarray, n_groups: int, rng, fn: str) -> list[np.ndarray]:
    """Each pair's targets in one cluster-bootstrap resample (groups drawn with replacement)."""
    for _ in range(100):
        weight_C = np.bincount(rng.integers(0, n_groups, n_groups), minlength=n_groups)[group_C]
        out = [np.repeat(pairs.p_C[pairs.pair_C == k], weight_C[pairs.pair_C == k]) for k in range(len(pairs.i_P))]
        if all(p.size for p in out):
            return out
    raise ValueError(f"{fn}: 100 cluster resamples in a row left a model pair without comparisons; too few groups")


def elo_win_probability(elo_a: float, elo_b: float) -> float:
    """P(a beats b) implied by two Elo scores: 1 / (1 + 10^((elo_b - elo_a) / 400))."""
    return 1.0 / (1.0 + 10.0 ** ((elo_b - elo_a) / 400.0))


def win_rate(comparisons: Iterable[tuple[str, str, float]]) -> dict[str, float]:
    """Each model's mean preference probability over its comparisons (p_a as A, 1 - p_a as B).

    A model-free summary next to the Elo: it depends on whom each model happened to be compared
    with, which the Bradley-Terry fit corrects for. Validates like `fit_bradley_terry` except that
    the comparison graph need not be connected.
    """
    fn = "win_rate"
    checked = [_check_comparison(c, comp, fn) for c, comp in enumerate(comparisons)]
    if not checked:
        raise ValueError(f"{fn}: comparisons is empty")
    sums: dict[str, list[float]] = {}
    for a, b, p in checked:
        sums.setdefault(a, []).append(p)
        sums.setdefault(b, []).append(1.0 - p)
    return {name: float(np.mean(ps)) for name, ps in sums.items()}
