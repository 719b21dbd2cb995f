"""The paper's figures from plain Python data (report.md and its tables: experiments/markdown.py).

Each `fig_*` function draws one analogue of a figure of Bai et al. 2022 (arXiv 2212.08073) to a PNG
and returns its path; inputs are lists and dicts (what the stages write as JSON), never arrays of
the accelerator. A score may be None or NaN: a series with no finite value is left out and named in
a note on the plot, and NaN points break a line rather than crash it. Malformed inputs raise a
ValueError that names the argument.

Figures are drawn on matplotlib's Agg canvas through the object API (no pyplot, so no global
backend or figure state is touched by importing or calling this module).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = [
    "fig_calibration",
    "fig_critique_vs_direct",
    "fig_principles",
    "fig_revisions",
    "fig_rl_training",
    "fig_rl_objectives",
]

_DPI = 120


def _png_path(path) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"path must end in .png, got {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _values(arg: str, values) -> np.ndarray:
    """A 1-D float64 array of a list of numbers; None becomes NaN."""
    if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, (Sequence, np.ndarray)):
        raise ValueError(f"{arg} must be a list of numbers, got {type(values).__name__}")
    try:
        return np.array([np.nan if v is None else float(v) for v in values], np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{arg} must be a list of numbers, got {list(values)!r}") from None


def _mapping(arg: str, m) -> Mapping:
    if not isinstance(m, Mapping):
        raise ValueError(f"{arg} must be a dict, got {type(m).__name__}")
    return m


def _figure(nrows: int = 1, ncols: int = 1, figsize=None):
    fig = Figure(figsize=figsize or (5.5 * ncols, 4.0 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=_DPI, format="png")
    return path


def _note(ax, lines: list[str]) -> None:
    if lines:
        ax.text(0.02, 0.02, "\n".join(lines), transform=ax.transAxes, fontsize=8, color="0.35", va="bottom")


def _lines(ax, x_by_name: dict, y_by_name: dict, err_by_name: dict | None = None) -> tuple[list[str], dict]:
    """Plots one line per series; returns notes for the series it skipped and each line's colour."""
    skipped, colors = [], {}
    for name, y in y_by_name.items():
        x = x_by_name[name]
        if not np.isfinite(y).any():
            skipped.append(str(name))
            continue
        err = None if err_by_name is None else err_by_name.get(name)
        if err is not None:
            colors[name] = ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=str(name)).lines[0].get_color()
        else:
            colors[name] = ax.plot(x, y, marker="o", label=str(name))[0].get_color()
    if colors:
        ax.legend()
    return ([f"no data: {', '.join(skipped)}"] if skipped else []), colors


def _round_series(arg: str, scores, errors) -> tuple[dict, dict | None]:
    """Validates {series: [score per round]} and matching {series: [error per round]}."""
    ys = {name: _values(f"{arg}[{name!r}]", v) for name, v in _mapping(arg, scores).items()}
    if errors is None:
        return ys, None
    errs = {}
    for name, e in _mapping("errors", errors).items():
        if name not in ys:
            raise ValueError(f"errors[{name!r}] has no series in {arg} (series: {list(ys)})")
        errs[name] = _values(f"errors[{name!r}]", e)
        if errs[name].shape != ys[name].shape:
            raise ValueError(f"errors[{name!r}] has {errs[name].size} values, {arg}[{name!r}] has {ys[name].size}")
    return ys, errs


def _by_round(ax, ys: dict, errs: dict | None, title: str, ylabel: str) -> None:
    notes, _ = _lines(ax, {k: np.arange(y.size) for k, y in ys.items()}, ys, errs)
    if not ys:
        notes = ["no data"]
    _note(ax, notes)
    ax.set_xlabel("Number of revisions")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)


def fig_revisions(scores_by_round: Mapping[str, Sequence[float]], path, errors=None, *, ylabel="PM score") -> Path:
    """Fig. 5: mean PM score of the responses after each round of critique and revision.

    Args:
      scores_by_round: {series: [mean score at round 0 (the initial response), 1, ..., n]}, series
        e.g. "harmlessness" and "helpfulness" (one PM each).
      path: the .png to write (parent folders are created).
      errors: optional {series: [standard error per round]}, drawn as error bars.
      ylabel: the y-axis label.
    """
    path = _png_path(path)
    ys, errs = _round_series("scores_by_round", scores_by_round, errors)
    fig = _figure()
    _by_round(fig.add_subplot(), ys, errs, "PM score vs number of revisions", ylabel)
    return _save(fig, path)


def fig_critique_vs_direct(scores: Mapping[str, Sequence[float]], path, errors=None, *, ylabel="Harmlessness PM score"):
    """Fig. 7: harmlessness score by revision round, critiqued revisions against direct revisions.

    Args:
      scores: {"critique": [score per round 0..n], "direct": [score per round 0..n]} (either key may
        be missing).
      path: the .png to write.
      errors: optional {key: [standard error per round]}.
    """
    path = _png_path(path)
    bad = set(_mapping("scores", scores)) - {"critique", "direct"}
    if bad:
        raise ValueError(f"scores keys must be 'critique' and/or 'direct', got {sorted(map(str, bad))}")
    ys, errs = _round_series("scores", scores, errors)
    names = {"critique": "critiqued revision", "direct": "direct revision"}
    ys = {names[k]: v for k, v in ys.items()}
    errs = None if errs is None else {names[k]: v for k, v in errs.items()}
    fig = _figure()
    _by_round(fig.add_subplot(), ys, errs, "Critiqued vs direct revisions", ylabel)
    return _save(fig, path)


def fig_principles(scores: Mapping[int, Mapping[str, Sequence[float] | float]], path, *, ylabel="PM score") -> Path:
    """Fig. 6: scores of revised responses by the number of constitutional principles available.

    Args:
      scores: {n_principles: {series: [score per round 0..n] or a float}}; one panel per series.
        Within a series, lists draw one line per n_principles against the revision round (the
        paper's layout); floats (e.g. the final round's score) draw the score against
        n_principles on a log2 axis. A series may not mix the two.
      path: the .png to write.
    """
    path = _png_path(path)
    table: dict[str, dict[int, object]] = {}
    for n, by_series in _mapping("scores", scores).items():
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"scores keys must be numbers of principles (int >= 1), got {n!r}")
        for name, v in _mapping(f"scores[{n}]", by_series).items():
            scalar = v is None or isinstance(v, (int, float, np.number))
            val = np.nan if v is None else float(v) if scalar else _values(f"scores[{n}][{name!r}]", v)
            table.setdefault(str(name), {})[int(n)] = val
    fig = _figure(1, max(1, len(table)))
    if not table:
        ax = fig.add_subplot()
        _note(ax, ["no data"])
        ax.set_title("Score vs number of principles")
        return _save(fig, path)
    for k, (name, by_n) in enumerate(table.items()):
        ax = fig.add_subplot(1, len(table), k + 1)
        kinds = {isinstance(v, float) for v in by_n.values()}
        if len(kinds) > 1:
            raise ValueError(f"scores: series {name!r} mixes floats and per-round lists across n_principles")
        ns = sorted(by_n)
        if kinds == {True}:
            y = np.array([by_n[n] for n in ns])
            notes, _ = _lines(ax, {name: np.array(ns)}, {name: y})
            ax.set_xscale("log", base=2)
            ax.set_xticks(ns, [str(n) for n in ns])
            ax.set_xlabel("Number of constitutional principles")
        else:
            ys = {f"{n} principle{'s' * (n > 1)}": by_n[n] for n in ns}
            notes, _ = _lines(ax, {k: np.arange(y.size) for k, y in ys.items()}, ys)
            ax.set_xlabel("Number of revisions")
            ax.xaxis.get_major_locator().set_params(integer=True)
        _note(ax, notes)
        ax.set_ylabel(f"{name} {ylabel}")
        ax.set_title(f"{name}: varying number of principles")
        ax.grid(alpha=0.3)
    return _save(fig, path)


def fig_rl_training(steps: Sequence[int], series: Mapping[str, Sequence[float]], path, ci=None, *, ylabel="Elo"):
    """Fig. 8: harmlessness and helpfulness (Elo or PM score) of RL-CAI snapshots over PPO steps.

    Args:
      steps: the PPO step of each snapshot, e.g. [0, 100, 200].
      series: {name: [value per step]}, e.g. {"harmlessness Elo": [...], "helpfulness Elo": [...]}.
      path: the .png to write.
      ci: optional {name: ([lower per step], [upper per step])}, drawn as a shaded band (e.g. the
        bootstrap interval of `cai_jax.eval.elo.elo_scores`).
      ylabel: the y-axis label.
    """
    path = _png_path(path)
    x = _values("steps", steps)
    ys = {}
    for name, v in _mapping("series", series).items():
        ys[name] = _values(f"series[{name!r}]", v)
        if ys[name].size != x.size:
            raise ValueError(f"series[{name!r}] has {ys[name].size} values for {x.size} steps")
    bands = {}
    for name, band in _mapping("ci", ci or {}).items():
        if name not in ys:
            raise ValueError(f"ci[{name!r}] has no series in series (series: {list(ys)})")
        if isinstance(band, (str, Mapping)) or not isinstance(band, Sequence) or len(band) != 2:
            raise ValueError(f"ci[{name!r}] must be a pair (lower list, upper list)")
        bands[name] = _values(f"ci[{name!r}][0]", band[0]), _values(f"ci[{name!r}][1]", band[1])
        if bands[name][0].size != x.size or bands[name][1].size != x.size:
            raise ValueError(f"ci[{name!r}] bounds must have {x.size} values each")
    fig = _figure()
    ax = fig.add_subplot()
    notes, colors = _lines(ax, dict.fromkeys(ys, x), ys) if ys else (["no data"], {})
    for name, (lo, hi) in bands.items():
        if name in colors:  # a band without its line is left out with the line
            ax.fill_between(x, lo, hi, alpha=0.2, color=colors[name], label=f"{name} interval")
    if bands:
        ax.legend()
    _note(ax, notes)
    ax.set_xlabel("PPO steps")
    ax.set_ylabel(ylabel)
    ax.set_title("RL-CAI training")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _bins_rows(arg: str, bins) -> list[dict]:
    """Rows {"mean_pred", "mean_target", "count"} from pm_metrics output, its "bins", or a list of rows."""
    if isinstance(bins, Mapping) and "bins" in bins:
        bins = bins["bins"]
    if isinstance(bins, Mapping):
        missing = {"count", "mean_pred", "mean_target"} - set(bins)
        if missing:
            raise ValueError(f"{arg} lacks {sorted(missing)} (expected pm_metrics' 'bins' dict)")
        cols = {k: _values(f"{arg}[{k!r}]", bins[k]) for k in ("count", "mean_pred", "mean_target")}
        if len({c.size for c in cols.values()}) != 1:
            raise ValueError(f"{arg}: count, mean_pred and mean_target must have one length")
        return [{k: cols[k][i] for k in cols} for i in range(cols["count"].size)]
    if isinstance(bins, (str, bytes)) or not isinstance(bins, Sequence):
        raise ValueError(f"{arg} must be pm_metrics output, its 'bins' dict, or a list of bin dicts")
    rows = []
    for i, row in enumerate(bins):
        if not isinstance(row, Mapping) or not {"count", "mean_pred", "mean_target"} <= set(row):
            raise ValueError(f"{arg}[{i}] must be a dict with count, mean_pred and mean_target")
        vals = _values(f"{arg}[{i}]", [row["count"], row["mean_pred"], row["mean_target"]])
        rows.append(dict(zip(("count", "mean_pred", "mean_target"), vals)))
    return rows


def fig_calibration(bins, path, label: str = "PM", *, title: str = "Calibration") -> Path:
    """Fig. 9: reliability diagram, mean predicted probability against observed frequency per bin.

    The observed frequency is the bin's mean target ("mean_target"): the fraction preferred for
    hard labels, the mean soft label otherwise. Counts are printed by each point and drawn as bars.

    Args:
      bins: `cai_jax.eval.pm.pm_metrics` output, or its "bins" dict {"edges", "count",
        "mean_pred", "mean_target"} (lists or arrays), or a list of {"count", "mean_pred",
        "mean_target"} dicts; or {label: any of those} to overlay several curves (e.g. labels with
        and without chain of thought). Empty bins (count 0 or NaN means) are skipped.
      path: the .png to write.
      label: the legend label of a single curve.
      title: the plot title.
    """
    path = _png_path(path)
    single = not isinstance(bins, Mapping) or bool({"bins", "count"} & set(bins))
    curves = (
        {label: _bins_rows("bins", bins)} if single else {k: _bins_rows(f"bins[{k!r}]", v) for k, v in bins.items()}
    )
    fig = _figure(figsize=(5.5, 5.5))
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    notes, lo = [], 1.0
    for name, rows in curves.items():
        rows = [r for r in rows if r["count"] > 0 and np.isfinite(r["mean_pred"]) and np.isfinite(r["mean_target"])]
        if not rows:
            notes.append(f"no data: {name}")
            continue
        pred = np.array([r["mean_pred"] for r in rows])
        obs = np.array([r["mean_target"] for r in rows])
        count = np.array([r["count"] for r in rows])
        lo = min(lo, float(pred.min()), float(obs.min()))
        (line,) = top.plot(pred, obs, marker="o", label=f"{name} (N={int(count.sum())})")
        for p, o, c in zip(pred, obs, count):
            top.annotate(f"{int(c)}", (p, o), textcoords="offset points", xytext=(4, -10), fontsize=7)
        bottom.bar(pred, count, width=0.02, alpha=0.6, color=line.get_color())
    lo = 0.5 if lo >= 0.5 else 0.0  # pm_metrics folds pairs onto q >= 0.5 by default
    top.plot([lo, 1.0], [lo, 1.0], "k--", lw=1, label="perfect calibration")
    top.set(xlim=(lo - 0.02, 1.02), ylim=(lo - 0.02, 1.02), ylabel="Observed frequency", title=title)
    top.legend(loc="upper left")
    top.grid(alpha=0.3)
    _note(top, notes)
    bottom.set(xlabel="Predicted probability", ylabel="Count")
    return _save(fig, path)


def fig_rl_objectives(curves: Mapping[str, tuple[Sequence[int], Sequence[float]]], path, *, ylabel="PM score (raw)"):
    """Fig. 8 per objective: the PM score of each RL-CAI objective's policy over its training.

    Args:
      curves: {objective: (steps, scores)}: PPO / RLOO iterations or DPO / IPO steps and the mean
        PM score of the samples at each (each objective's own metrics.jsonl rows).
      path: the .png to write.
      ylabel: the y-axis label.

    The x-axis is the fraction of each run's steps done, so runs of different lengths (PPO
    iterations, DPO updates) share it.
    """
    path = _png_path(path)
    xs, ys = {}, {}
    for name, pair in _mapping("curves", curves).items():
        if not isinstance(pair, Sequence) or len(pair) != 2:
            raise ValueError(f"curves[{name!r}] must be a pair (steps, scores)")
        steps, scores = _values(f"curves[{name!r}][0]", pair[0]), _values(f"curves[{name!r}][1]", pair[1])
        if steps.size != scores.size:
            raise ValueError(f"curves[{name!r}] has {steps.size} steps and {scores.size} scores")
        xs[name] = steps / max(float(np.nanmax(steps)), 1.0) if steps.size else steps
        ys[name] = scores
    fig = _figure()
    ax = fig.add_subplot()
    notes, _ = _lines(ax, xs, ys) if ys else (["no data"], {})
    _note(ax, notes)
    ax.set(xlabel="fraction of training done", ylabel=ylabel, title="RL-CAI objectives")
    ax.grid(alpha=0.3)
    return _save(fig, path)
