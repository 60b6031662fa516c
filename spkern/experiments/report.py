"""The sweep report: a markdown summary and PNG figures from a sweep's results.jsonl.

What a run, a learning rate and a width came to (score, optimal and maximal stable rate,
regime) is defined in :mod:`spkern.experiments.results`; here, per experiment (data / loss
/ optimizer / parameterization / ...):

* fitted exponent: the slope b of log y = a + b log width (least squares over the widths
  that have y), with a 95% confidence interval from Student's t when there are at least 3
  widths, for the optimal and maximal stable rates and the two regime edges;
* regime edge at a width (:func:`boundaries`): between the stable regime and controlled
  divergence, and between controlled divergence and the catastrophic regime, the
  geometric mean of the grid rates on either side of it;
* the theory's exponents of the edges (SGD): under CE -1 and -1/2, under MSE -1 and -1.

Because learning rates come from a grid, a fitted exponent is only as fine as the grid
(and an optimum at the edge of the grid is flagged: the true optimum may lie beyond).
"""

import math
import os
import warnings
from collections import defaultdict

import numpy as np

from spkern.experiments.results import SWEPT, experiments, read_results, summarize
from spkern.regime import CATASTROPHIC, CONTROLLED, REGIMES, STABLE, Criteria


def _label(exp):
    d = dict(exp)
    return f"{d['loss'].upper()} {d['optim'].upper()} {d['param']}"


def _module_order(name):
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def fit_exponent(widths, lrs):
    """(slope, 95% CI half-width or None, number of points) of log lr against log width (the
    positive finite values only: a power law has no others)."""
    pts = [(w, lr) for w, lr in zip(widths, lrs) if lr is not None and math.isfinite(lr) and lr > 0]
    if len(pts) < 2:
        return None, None, len(pts)
    x = np.log([p[0] for p in pts])
    y = np.log([p[1] for p in pts])
    if np.ptp(x) == 0:
        return None, None, len(pts)
    slope, intercept = np.polyfit(x, y, 1)
    if len(pts) < 3:
        return float(slope), None, len(pts)
    from scipy import stats

    resid = y - (slope * x + intercept)
    se = math.sqrt(float(resid @ resid) / (len(pts) - 2) / float(((x - x.mean()) ** 2).sum()))
    return float(slope), float(stats.t.ppf(0.975, len(pts) - 2) * se), len(pts)


def _fmt_fit(fit):
    slope, ci, n = fit
    if slope is None:
        return f"n/a ({n} width{'s' if n != 1 else ''})"
    return f"{slope:+.2f}" + (f" ± {ci:.2f}" if ci is not None else " (2 widths: no interval)")


def _legend(ax):
    """The legend beside the panel, off the lines."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False)


def _width_panel(ax, widths, ylabel, title):
    """A panel against width: log axes, a tick at each width, its labels and its legend."""
    _log_axes(ax, x=False)
    _width_axis(ax, widths)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    _legend(ax)


def _width_axis(ax, widths):
    """A log width axis with a tick at each width of the sweep."""
    from matplotlib.ticker import NullLocator

    ax.set_xscale("log")
    ax.set_xticks(widths)
    ax.set_xticklabels([str(w) for w in widths], fontsize=7)
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("width")


def _log_axes(ax, x=True, y=True):
    """Log scales where the plotted data allows them (an empty panel stays linear)."""
    for on, getter, setter in ((x, "get_xdata", ax.set_xscale), (y, "get_ydata", ax.set_yscale)):
        if not on:
            continue
        values = np.concatenate([np.asarray(getattr(line, getter)(), dtype=float) for line in ax.get_lines()]
                                or [np.zeros(0)])
        if np.any(np.isfinite(values) & (values > 0)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # a flat curve: matplotlib widens the limits
                setter("log")


def _panels(plt, n, cols=3):
    """A figure with n panels, at most ``cols`` per row, room for a legend beside each;
    (figure, flat list of axes)."""
    ncols = min(n, cols)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.6 * ncols, 3.8 * nrows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _plot_lr_curves(plt, exps, summaries, key, ylabel, path, logy=False):
    """One curve per width over the learning rates; a rate where a seed diverged is a cross
    (the score at its mean with chance for the diverged seeds; the loss, which has none, at
    the top of the panel)."""
    import matplotlib.transforms as mtransforms

    fig, axes = _panels(plt, len(exps))
    for ax, exp in zip(axes, exps):
        for i, (width, s) in enumerate(summaries[exp].items()):
            color = f"C{i % 10}"
            ax.plot(s["lrs"], np.where(s["diverged"], np.nan, s[key]), marker="o", ms=3, color=color,
                    label=f"n={width}")
            bad = [j for j, d in enumerate(s["diverged"]) if d]
            if not bad:
                continue
            xs = [s["lrs"][j] for j in bad]
            if key == "acc":
                ax.plot(xs, [s[key][j] for j in bad], ls="none", marker="x", color=color)
            else:
                ax.plot(xs, [0.97] * len(xs), ls="none", marker="x", color=color, clip_on=False, scaley=False,
                        transform=mtransforms.blended_transform_factory(ax.transData, ax.transAxes))
        ax.plot([], [], ls="none", marker="x", color="0.4", label="a seed diverged")
        _log_axes(ax, y=logy)
        ax.set_xlabel("learning rate")
        ax.set_ylabel(ylabel)
        ax.set_title(_label(exp))
        _legend(ax)
    _save(plt, fig, path)


def _save(plt, fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


REGIME_COLORS = {STABLE: "tab:blue", CONTROLLED: "tab:orange", CATASTROPHIC: "tab:red"}
EDGES = ("stable | controlled divergence", "controlled divergence | catastrophic")
# The theory's width exponents of the two edges (Haas et al. 2025, SGD in SP): under CE the edge of
# stability at width^-1 and the edge of controlled divergence at width^-1/2; under MSE both at
# width^-1 (no controlled divergence).
THEORY = {"ce": (-1.0, -0.5), "mse": (-1.0, -1.0)}


def boundaries(s):
    """The two regime edges of one width's summary: (stable | controlled divergence,
    controlled divergence | catastrophic), each the geometric mean of the last grid rate
    below it and the first above it (the first rate not in the lower regime(s)); None
    where the rates run do not bracket it."""
    lrs, regimes = s["lrs"], s["regimes"]

    def edge(lower):
        first = next((i for i, r in enumerate(regimes) if r not in lower), None)
        if first is None or first == 0:
            return None
        return math.sqrt(lrs[first - 1] * lrs[first])

    return edge((STABLE,)), edge((STABLE, CONTROLLED))


def _fit_and_plot(ax, widths, values, name, marker="o", color=None, theory=None):
    """Plots (width, value) points and their fitted power law (and the theory's exponent
    through the fit at the smallest width); returns the fit."""
    fit = fit_exponent(widths, values)
    pts = [(w, v) for w, v in zip(widths, values) if v is not None and math.isfinite(v) and v > 0]
    if not pts:
        return fit
    line = ax.plot(*zip(*pts), marker=marker, linestyle="none", color=color, mfc="none", mew=1.5,
                   label=f"{name}: {_fmt_fit(fit)}")
    if fit[0] is not None:
        xs = np.array([p[0] for p in pts], dtype=float)
        a = np.mean(np.log([p[1] for p in pts])) - fit[0] * np.mean(np.log(xs))
        ax.plot(xs, np.exp(a) * xs**fit[0], color=line[0].get_color(), alpha=0.7)
        if theory is not None:
            y0 = np.exp(a) * xs[0]**fit[0]
            ax.plot(xs, y0 * (xs / xs[0])**theory, color=line[0].get_color(), ls=":", alpha=0.9,
                    label=f"theory: width^{theory:g}")
    return fit


def _plot_regime_map(plt, exps, summaries, fits, path):
    """Width x learning rate, each rate run coloured by regime (the worst of its seeds),
    the optimal and maximal stable rates marked, the two edges fitted (and the theory's
    exponents for SGD); the edges' fits are added to ``fits``."""
    fig, axes = _panels(plt, len(exps))
    for ax, exp in zip(axes, exps):
        s, d = summaries[exp], dict(exp)
        widths = sorted(s)
        for regime in REGIMES:
            pts = [(w, lr) for w in widths for lr, r in zip(s[w]["lrs"], s[w]["regimes"]) if r == regime]
            ax.plot(*(zip(*pts) if pts else ([], [])), ls="none", marker="o", ms=5, color=REGIME_COLORS[regime],
                    label=regime)
        for key, marker, name in (("opt_lr", "*", "optimal lr"), ("max_stable_lr", "s", "maximal stable lr")):
            pts = [(w, s[w][key]) for w in widths if s[w][key] is not None]
            if pts:
                ax.plot(*zip(*pts), ls="none", marker=marker, ms=12 if marker == "*" else 9, mfc="none",
                        mec="black", mew=1.2, label=name)
        edges = [boundaries(s[w]) for w in widths]
        theory = THEORY.get(d["loss"]) if d["optim"] == "sgd" else None
        for k, (name, color) in enumerate(zip(EDGES, ("tab:green", "tab:purple"))):
            fits[(exp, name)] = _fit_and_plot(ax, widths, [e[k] for e in edges], name, marker="_", color=color,
                                              theory=None if theory is None else theory[k])
        _width_panel(ax, widths, "learning rate", _label(exp) + ": regimes")
    _save(plt, fig, path)


def _logit_key(run):
    rows = run.get("history") or []
    return "logits/rms" if any(h.get("logits/rms") is not None for h in rows) else "train/logit_norm"


def _measured(run, key):
    """(steps, values) of a run's measurements of ``key``: each measured step once."""
    steps, values = [], []
    for h in run.get("history") or []:
        if h.get(key) is not None and (not steps or h["step"] > steps[-1]):
            steps.append(h["step"])
            values.append(h[key])
    return steps, values


def _final(run, key):
    m = run.get("final_metrics") or {}
    if m.get(key) is not None:
        return m[key]
    _, values = _measured(run, key)
    return values[-1] if values else None


def _along_half(s):
    """The runs along lr = c * width^-1/2, c the least-squares fit of that line to the middle
    of the controlled-divergence band (the geometric mean of its edges) at the widths that
    have it: {width: (lr, [runs], regime)} at the grid rate nearest each width's
    c * width^-1/2 (within half a grid step), or {} when no width has the band."""
    widths = sorted(s)
    middles = [(w, math.sqrt(lo * hi)) for w in widths for lo, hi in [boundaries(s[w])]
               if lo is not None and hi is not None and CONTROLLED in s[w]["regimes"]]
    if not middles:
        return {}
    c = math.exp(np.mean([math.log(m) + 0.5 * math.log(w) for w, m in middles]))
    out = {}
    for w in widths:
        lrs = np.array(s[w]["lrs"])
        target = c / math.sqrt(w)
        i = int(np.argmin(np.abs(np.log(lrs / target))))
        step = np.exp(np.median(np.diff(np.log(lrs)))) if len(lrs) > 1 else 2.0
        if abs(math.log(lrs[i] / target)) <= 0.5 * math.log(step) + 1e-9:
            out[w] = (float(lrs[i]), s[w]["runs"][i], s[w]["regimes"][i])
    return out


def _early_growth(run, early=Criteria().early_steps):
    """The largest logit RMS within the first ``early`` steps over the initial one (the
    classifier's quantity), from a run's history; None without a measurement at step 0."""
    key = _logit_key(run)
    steps, values = _measured(run, key)
    if not steps or steps[0] != 0 or not values[0]:
        return None
    grown = [v for s, v in zip(steps, values) if 0 < s <= early]
    return max(grown) / values[0] if grown else None


def _hidden_layers(run):
    """The layers with an effective update in a run's final measurement but the last (the
    readout)."""
    m = run.get("final_metrics") or {}
    layers = sorted({k.rsplit("/", 1)[0] for k in m if k.endswith("/eff_rms")}, key=_module_order)
    return layers[:-1]


def _plot_controlled_divergence(plt, along, path):
    """The paper's picture of controlled divergence: along lr = c * width^-1/2 (CE), the
    final logit RMS grows with width while each hidden layer's effective update
    rms((W_t - W_0) x_t) does not vanish."""
    exps = [e for e in along if along[e]]
    fig, axes = plt.subplots(len(exps), 2, figsize=(13.2, 3.8 * len(exps)), squeeze=False)
    for row, exp in enumerate(exps):
        points = along[exp]
        widths = sorted(points)
        ok = {w: [r for r in points[w][1] if r["status"] == "ok"] for w in widths}

        def mean(values):
            values = [v for v in values if v is not None]
            return float(np.mean(values)) if values else None

        ax = axes[row][0]
        early = [mean([_early_growth(r) for r in ok[w]]) for w in widths]
        final = [mean([_final(r, _logit_key(r)) for r in ok[w]]) for w in widths]
        _fit_and_plot(ax, widths, early, f"logit RMS / initial, first {Criteria().early_steps} steps",
                      color="tab:orange", theory=0.5)
        _fit_and_plot(ax, widths, final, "logit RMS at the end", color="tab:brown", marker="s")
        for w, y in zip(widths, final):
            if y is not None:
                ax.annotate(f"lr {points[w][0]:.2g}", (w, y), fontsize=6, textcoords="offset points", xytext=(3, 3))
        _width_panel(ax, widths, "logits", _label(exp) + ": along lr ~ width^-1/2")
        ax = axes[row][1]
        layers = sorted({n for w in widths for r in ok[w] for n in _hidden_layers(r)}, key=_module_order)
        for i, layer in enumerate(layers):
            ys = [float(np.mean([_final(r, f"{layer}/eff_rms") or np.nan for r in ok[w]])) if ok[w] else None
                  for w in widths]
            _fit_and_plot(ax, widths, [y if y is not None and np.isfinite(y) else None for y in ys], layer,
                          color=f"C{i % 10}")
        _width_panel(ax, widths, "effective update rms((W_t - W_0) x_t)", _label(exp) + ": hidden layers, same runs")
    _save(plt, fig, path)


def write(out: str, threshold=None) -> str:
    """Writes ``out/report.md`` and its figures from ``out/results.jsonl``; returns the
    markdown path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_results(out)
    if not rows:
        raise FileNotFoundError(f"no results in {out} (run a sweep first)")
    by_exp = experiments(rows)
    exps = sorted(by_exp, key=_label)
    summaries = {e: summarize(by_exp[e], threshold) for e in exps}
    figs = {}

    score_name = rows[0].get("score_name", "final training accuracy")
    figs["accuracy"] = "accuracy_vs_lr.png" if score_name == "final training accuracy" else "score_vs_lr.png"
    _plot_lr_curves(plt, exps, summaries, "acc", score_name, os.path.join(out, figs["accuracy"]))
    figs["loss"] = "loss_vs_lr.png"
    _plot_lr_curves(plt, exps, summaries, "loss", "final training loss", os.path.join(out, figs["loss"]),
                    logy=True)

    # optimal and maximal stable learning rates against width
    fits = {}
    fig, axes = _panels(plt, len(exps))
    for ax, exp in zip(axes, exps):
        s = summaries[exp]
        widths = sorted(s)
        for name, key, marker in (("optimal", "opt_lr", "o"), ("max stable", "max_stable_lr", "s")):
            fits[(exp, name)] = _fit_and_plot(ax, widths, [s[w][key] for w in widths], name, marker=marker)
        _width_panel(ax, widths, "learning rate", _label(exp))
    figs["exponents"] = "lr_exponents.png"
    _save(plt, fig, os.path.join(out, figs["exponents"]))

    figs["regimes"] = "regime_map.png"
    _plot_regime_map(plt, exps, summaries, fits, os.path.join(out, figs["regimes"]))
    along = {exp: _along_half(summaries[exp]) for exp in exps if dict(exp)["loss"] == "ce"}
    if any(along.values()):
        figs["divergence"] = "controlled_divergence.png"
        _plot_controlled_divergence(plt, along, os.path.join(out, figs["divergence"]))

    # logit RMS against step at each width's largest stable learning rate
    fig, axes = _panels(plt, len(exps))
    for ax, exp in zip(axes, exps):
        for width, s in summaries[exp].items():
            i = s["max_stable_index"]
            if i is None:
                continue
            run = s["runs"][i][0]
            key = _logit_key(run)
            steps, values = _measured(run, key)
            if steps:
                ax.plot(steps, values, marker=".", ms=3, label=f"n={width}, lr={s['lrs'][i]:.3g}")
        _log_axes(ax, x=False)
        ax.set_xlabel("step (measured steps only)")
        ax.set_ylabel("logit RMS on the probe" if rows[0].get("task") != "gpt" else "mean logit norm per token")
        ax.set_title(_label(exp) + ": largest stable lr")
        _legend(ax)
    figs["logits"] = "logit_rms.png"
    _save(plt, fig, os.path.join(out, figs["logits"]))

    # feature learning per layer against width, at each width's optimal learning rate
    stats = ("change_rms", "eff_rms", "prop_rms")
    fig, axes = plt.subplots(len(exps), len(stats), figsize=(6.2 * len(stats), 3.6 * len(exps)), squeeze=False)
    for row, exp in enumerate(exps):
        s = summaries[exp]
        finals = {w: s[w]["runs"][s[w]["opt_index"]][0].get("final_metrics") or {} for w in sorted(s)
                  if s[w]["opt_index"] is not None}
        widths = sorted(finals)
        modules = sorted({k.rsplit("/", 1)[0] for m in finals.values() for k in m if "/" in k
                          and k.endswith(tuple(f"/{st}" for st in stats))}, key=_module_order)
        for col, stat in enumerate(stats):
            ax = axes[row][col]
            for i, module in enumerate(modules):
                ys = [finals[w].get(f"{module}/{stat}") for w in widths]
                pts = [(w, y) for w, y in zip(widths, ys) if y is not None and y > 0]
                if pts:
                    ax.plot(*zip(*pts), marker="o", ms=3, color=f"C{i % 10}", label=module)
            _log_axes(ax, x=False)
            if widths:
                _width_axis(ax, widths)
            ax.set_ylabel(stat)
            ax.set_title(_label(exp) + ": optimal lr")
            _legend(ax)
    figs["features"] = "feature_learning.png"
    _save(plt, fig, os.path.join(out, figs["features"]))

    md = _markdown(rows, exps, summaries, fits, figs, along)
    path = os.path.join(out, "report.md")
    with open(path, "w") as f:
        f.write(md)
    return path


def _lr_counts(rows):
    """"16 learning rates", or with an adaptive grid "16 learning rates (5 to 9 per width)"."""
    per = defaultdict(set)
    for r in rows:
        c = r["config"]
        per[tuple(sorted((k, v) for k, v in c.items() if k not in ("lr", "seed")))].add(c["lr"])
    total = len({r["config"]["lr"] for r in rows})
    lo, hi = min(map(len, per.values())), max(map(len, per.values()))
    if lo == hi == total:
        return f"{total} learning rates"
    return f"{total} learning rates ({lo if lo == hi else f'{lo} to {hi}'} per width)"


def _edge_fit_text(fit, theory):
    text = _fmt_fit(fit)
    return text if theory is None else f"{text} (theory {theory:+g})"


def _finding(exp, s):
    """One sentence on an experiment's controlled-divergence band."""
    widths = sorted(s)
    bands = {w: boundaries(s[w]) for w in widths}
    with_band = [w for w in widths if s[w]["regimes"].count(CONTROLLED)]
    if not with_band:
        return "no controlled-divergence band: the runs go from stable to catastrophic"
    ratios = [(w, hi / lo) for w, (lo, hi) in bands.items() if lo is not None and hi is not None]
    thin = all(s[w]["regimes"].count(CONTROLLED) <= 1 for w in widths)
    text = (f"a {'thin ' if thin else ''}controlled-divergence band at {len(with_band)} of {len(widths)} widths "
            f"({', '.join(str(s[w]['regimes'].count(CONTROLLED)) + f' at n={w}' for w in with_band)} grid rates)")
    if len(ratios) >= 2:
        (w0, r0), (w1, r1) = ratios[0], ratios[-1]
        trend = ("widens with width" if r1 > 1.2 * r0 else "narrows with width" if r1 < r0 / 1.2
                 else "is as wide at every width")
        text += f"; it {trend} (edge ratio {r0:.3g} at n={w0}, {r1:.3g} at n={w1})"
    return text


def _regime_section(exps, summaries, fits, figs, along):
    lines = ["", "## Regimes", "",
             "Each run labelled online by `spkern.Regime` (see Definitions): stable, controlled divergence (the "
             "logits grow while the loss, the gradients and the hidden activations stay stable) or catastrophic. "
             "The edges between the regimes against width, with their fitted exponents (95% intervals) and, for "
             "SGD, the theory's (Haas et al. 2025: under CE the edge of stability at width^-1 and the edge of "
             "controlled divergence at width^-1/2; under MSE both at width^-1).", "",
             "| experiment | stable / controlled divergence | controlled divergence / catastrophic | found |",
             "|---|---|---|---|"]
    for exp in exps:
        d = dict(exp)
        theory = THEORY.get(d["loss"]) if d["optim"] == "sgd" else (None, None)
        lines.append(f"| {_label(exp)} | {_edge_fit_text(fits[(exp, EDGES[0])], theory[0])} | "
                     f"{_edge_fit_text(fits[(exp, EDGES[1])], theory[1])} | {_finding(exp, summaries[exp])} |")
    replayed = sum(r.get("regime") is None for exp in exps for s in summaries[exp].values() for rs in s["runs"]
                   for r in rs)
    if replayed:
        lines += ["", f"{replayed} run(s) were written before runs carried a regime label: theirs is the classifier's "
                  "over their recorded history, whose first measurement (not step 0) stands for the initial values, "
                  "so a controlled divergence reached before it goes unseen. Run the sweep again for the labels."]
    lines += ["", f"![]({figs['regimes']})"]
    if "divergence" in figs:
        lines += ["", "Controlled divergence itself: along lr = c * width^-1/2 (c fitted to the middle of the band at "
                  "the widths that have it; each width's nearest grid rate), the logits' growth in the first "
                  "20 steps (over their initial RMS; the theory: as lr * width, so width^1/2 along this line) and "
                  "their RMS at the end of training against width, and each hidden layer's effective update "
                  "rms((W_t - W_0) x_t) at the end of the same runs (a layer that keeps learning at scale: not "
                  "decaying with width):", "",
                  f"![]({figs['divergence']})"]
    return lines


def _regime_definitions():
    c = Criteria()
    return ("Regimes (`spkern.regime`, per run, online; a learning rate takes the worst of its seeds' labels): "
            "catastrophic when the loss, the logits, a hidden activation or a gradient is not finite, or the loss "
            f"is above {c.loss_limit:g}, or a hidden activation RMS "
            f"{c.act_growth:g}x the hidden activations' initial scale, or a gradient RMS {c.grad_growth:g}x its "
            "first measured value; controlled divergence when not catastrophic and the logit RMS is "
            f"{c.logit_growth:g}x its initial value (at least {c.logit_floor:g}) within the first {c.early_steps} "
            "steps; stable otherwise. Results written before runs carried a label get it from their recorded "
            "history. An edge between two regimes at a width is the geometric mean of the grid rates on either "
            "side of it.")


def _markdown(rows, exps, summaries, fits, figs, along):
    from spkern.experiments.param import table_markdown

    c0 = rows[0]["config"]
    n_div = sum(r["status"] != "ok" for r in rows)
    task = "GPT" if rows[0].get("task") == "gpt" else "MLP"
    score_name = rows[0].get("score_name", "final training accuracy")
    fixed = ", ".join(f"{k} {v}" for k, v in sorted(c0.items())
                      if k not in SWEPT + ("loss", "optim", "param", "data")
                      and all(r["config"].get(k) == v for r in rows))
    lines = [f"# Width x learning-rate sweep ({task})", "",
             f"{len(rows)} runs ({n_div} diverged) on `{c0['data']}`: widths "
             f"{sorted({r['config']['width'] for r in rows})}, "
             f"{_lr_counts(rows)}, "
             f"{len({r['config']['seed'] for r in rows})} seed(s); {fixed}.", "",
             f"Score: {score_name} (higher is better).", "",
             "## Fitted learning-rate exponents", "",
             "Slope b of log lr against log width (lr ~ width^b), with 95% confidence intervals. "
             "The paper (Haas et al. 2025) finds the maximal stable SGD learning rate under SP "
             "to scale roughly as width^-1/2 under cross-entropy and width^-1 under MSE.", "",
             "| experiment | optimal lr | maximal stable lr | widths whose optimal lr is at the grid's edge | "
             "widths stable up to the grid's top |",
             "|---|---|---|---|---|"]
    for exp in exps:
        edge = [str(w) for w, s in summaries[exp].items() if s["opt_at_edge"]]
        top = [str(w) for w, s in summaries[exp].items() if s["max_stable_at_edge"]]
        lines.append(f"| {_label(exp)} | {_fmt_fit(fits[(exp, 'optimal')])} | "
                     f"{_fmt_fit(fits[(exp, 'max stable')])} | {', '.join(edge) or 'none'} | "
                     f"{', '.join(top) or 'none'} |")
    lines += ["", "An exponent fitted where the maximal stable lr is the grid's largest only bounds it: "
              "extend the grid upwards to measure it."]
    lines += _regime_section(exps, summaries, fits, figs, along)
    missing = [f"{_label(exp)} at width {w}" for exp in exps for w, s in summaries[exp].items()
               if s["opt_index"] is None]
    if missing:
        lines += ["", "Left out of the fits, every learning rate having a diverged seed (no optimal or maximal "
                  f"stable rate): {', '.join(missing)}."]
    lines += ["", "## Per width", "",
              "| experiment | width | optimal lr | its score | maximal stable lr | diverged lrs | "
              "lrs stable / controlled divergence / catastrophic |",
              "|---|---|---|---|---|---|---|"]
    for exp in exps:
        for w, s in summaries[exp].items():
            div = sum(bool(d) for d in s["diverged"])
            msl = "none" if s["max_stable_lr"] is None else f"{s['max_stable_lr']:.3g}"
            opt, score = ("n/a", "n/a") if s["opt_index"] is None else (f"{s['opt_lr']:.3g}",
                                                                         f"{s['acc'][s['opt_index']]:.3f}")
            counts = " / ".join(str(s["regimes"].count(r)) for r in REGIMES)
            lines.append(f"| {_label(exp)} | {w} | {opt} | {score} | {msl} | "
                         f"{div} of {len(s['lrs'])} | {counts} |")
    lines += ["", "## Figures", "",
              f"{score_name[0].upper() + score_name[1:]} against learning rate, one curve per width:\n\n"
              f"![]({figs['accuracy']})", "",
              f"Final training loss against learning rate:\n\n![]({figs['loss']})", "",
              f"Optimal and maximal stable learning rate against width, with fitted exponents:\n\n"
              f"![]({figs['exponents']})", "",
              "Logit RMS on the probe batch (GPT: the mean per-token logit norm of the training batch) "
              "against step at each width's largest stable learning rate "
              "(controlled divergence: under CE the logits grow with width while the loss stays finite):"
              f"\n\n![]({figs['logits']})", "",
              "Per-layer feature change rms(h_t - h_0) and the refined coordinate check's effective "
              "rms((W_t - W_0) x_t) and propagating rms(W_0 (x_t - x_0)) updates at the end of training, "
              f"against width, at each width's optimal learning rate:\n\n![]({figs['features']})", "",
              "## Definitions", "",
              "Mean score: the score averaged over seeds (a diverged seed counts as chance: accuracy 1/classes, "
              "or minus the log of the vocabulary size). "
              "Optimal lr: among the grid lrs with no diverged seed, the one with the highest mean score (ties: the "
              "lowest training loss). Maximal stable lr: the largest grid lr "
              "with no diverged seed and mean score at or above halfway between chance and the width's best "
              "(or `--stable-threshold`). A run diverges when its training loss is NaN, infinite or above "
              "`diverge_loss`, or when the regime classifier finds it catastrophic (it is then stopped early: "
              "`stopped_early`). All statistics are RMS over the probe batch (`spkern.Tracker`).", "",
              _regime_definitions(), "",
              "Parameterizations (lr of layer l = lr * (width / base_width)^-c_l):", "",
              table_markdown() if task == "MLP" else "see the table in `spkern/experiments/gpt.py`.", ""]
    return "\n".join(lines)


__all__ = ["boundaries", "experiments", "fit_exponent", "summarize", "write"]
