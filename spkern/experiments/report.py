"""The sweep report: a markdown summary and PNG figures from a sweep's results.jsonl.

Definitions (per experiment, i.e. per data / loss / optimizer / parameterization / ...):

* mean accuracy of (width, lr): final training accuracy averaged over seeds, a diverged
  seed counting as chance accuracy (1 / classes);
* optimal learning rate of a width: among the grid learning rates at which no seed
  diverged, the one with the highest mean accuracy (ties, common on easy data, go to the
  lowest mean training loss); "n/a" when every rate had a diverged seed;
* maximal stable learning rate of a width: the largest grid learning rate at which no
  seed diverged and the mean accuracy stays at or above the threshold, by default
  halfway between chance and the optimal rate's mean accuracy;
* fitted exponent: the slope b of log lr = a + b log width (least squares over the
  widths that have the rate), with a 95% confidence interval from Student's t when there
  are at least 3 widths.

Because learning rates come from a grid, a fitted exponent is only as fine as the grid
(and an optimum at the edge of the grid is flagged: the true optimum may lie beyond).
"""

import math
import os
import warnings
from collections import defaultdict

import numpy as np

from spkern.experiments.sweep import read_results

SWEPT = ("width", "lr", "seed")  # what varies inside one experiment


def _label(exp):
    d = dict(exp)
    return f"{d['loss'].upper()} {d['optim'].upper()} {d['param']}"


def experiments(rows):
    """{experiment key: {width: {lr: [run, ...]}}}."""
    out = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in rows:
        c = r["config"]
        exp = tuple(sorted((k, v) for k, v in c.items() if k not in SWEPT))
        out[exp][c["width"]][c["lr"]].append(r)
    return out


def chance_score(run):
    """The score of a run at chance (MLP: 1 / classes; GPT: minus log vocabulary)."""
    return run["chance_score"] if "chance_score" in run else 1.0 / run.get("n_classes", 10)


def _acc(run):
    """The run's score (higher is better): final training accuracy for MLP runs, minus
    the validation cross-entropy for GPT runs; chance for a diverged run."""
    score = run.get("score", run.get("train_acc"))
    if run["status"] != "ok" or score is None:
        return chance_score(run)
    return score


def lr_outcome(runs):
    """(mean score, mean training loss, whether any seed diverged) of the runs of one lr."""
    score = float(np.mean([_acc(r) for r in runs]))
    loss = float(np.mean([r["train_loss"] if r["status"] == "ok" and r.get("train_loss") is not None else np.nan
                          for r in runs]))
    return score, loss, any(r["status"] != "ok" for r in runs)


def best_index(acc, loss, diverged):
    """Index of the highest mean score among the lrs where no seed diverged (among equal
    scores, the lowest training loss); None when every lr has a diverged seed."""
    candidates = [i for i in range(len(acc)) if not diverged[i]]
    if not candidates:
        return None
    return max(candidates, key=lambda i: (acc[i], -(loss[i] if np.isfinite(loss[i]) else np.inf)))


def stable_threshold(chance, best_score, threshold=None):
    """The score a stable lr must reach: ``threshold``, or halfway from chance to the best."""
    return threshold if threshold is not None else chance + 0.5 * (best_score - chance)


def summarize(by_width, threshold=None):
    """Per width: lrs, mean accuracy and loss per lr, optimal and maximal stable lr."""
    out = {}
    for width in sorted(by_width):
        lrs = sorted(by_width[width])
        runs = [by_width[width][lr] for lr in lrs]
        chance = chance_score(runs[0][0])
        acc, loss, diverged = (np.array(v) for v in zip(*(lr_outcome(rs) for rs in runs)))
        best = best_index(acc, loss, diverged)
        thr = stable_threshold(chance, acc[best], threshold) if best is not None else None
        stable = [] if best is None else [i for i in range(len(lrs)) if not diverged[i] and acc[i] >= thr]
        out[width] = dict(lrs=lrs, acc=acc, loss=loss, diverged=diverged, runs=runs, threshold=thr,
                          opt_lr=lrs[best] if best is not None else None, opt_index=best,
                          opt_at_edge=best in (0, len(lrs) - 1),
                          max_stable_lr=lrs[max(stable)] if stable else None,
                          max_stable_index=max(stable) if stable else None,
                          max_stable_at_edge=bool(stable) and max(stable) == len(lrs) - 1)
    return out


def _module_order(name):
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def fit_exponent(widths, lrs):
    """(slope, 95% CI half-width or None, number of points) of log lr against log width."""
    pts = [(w, lr) for w, lr in zip(widths, lrs) if lr is not None]
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
    if any(not line.get_label().startswith("_") for line in ax.get_lines()):
        ax.legend(fontsize=7)


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


def _panels(plt, n, cols=4):
    """A figure with n panels, at most ``cols`` per row; (figure, flat list of axes)."""
    ncols = min(n, cols)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 4 * nrows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _plot_lr_curves(plt, exps, summaries, key, ylabel, path, logy=False):
    fig, axes = _panels(plt, len(exps))
    for ax, exp in zip(axes, exps):
        for width, s in summaries[exp].items():
            ax.plot(s["lrs"], s[key], marker="o", label=f"n={width}")
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
            lrs = [s[w][key] for w in widths]
            fit = fit_exponent(widths, lrs)
            fits[(exp, name)] = fit
            pts = [(w, lr) for w, lr in zip(widths, lrs) if lr is not None]
            if pts:
                line = ax.plot(*zip(*pts), marker=marker, linestyle="none", label=f"{name}: {_fmt_fit(fit)}")
                if fit[0] is not None:
                    xs = np.array([p[0] for p in pts], dtype=float)
                    b = fit[0]
                    a = np.mean(np.log([p[1] for p in pts])) - b * np.mean(np.log(xs))
                    ax.plot(xs, np.exp(a) * xs**b, color=line[0].get_color(), alpha=0.6)
        _log_axes(ax)
        ax.set_xlabel("width")
        ax.set_ylabel("learning rate")
        ax.set_title(_label(exp))
        _legend(ax)
    figs["exponents"] = "lr_exponents.png"
    _save(plt, fig, os.path.join(out, figs["exponents"]))

    # logit RMS against step at each width's largest stable learning rate
    fig, axes = _panels(plt, len(exps))
    for ax, exp in zip(axes, exps):
        for width, s in summaries[exp].items():
            i = s["max_stable_index"]
            if i is None:
                continue
            run = s["runs"][i][0]
            key = "logits/rms" if any("logits/rms" in h for h in run["history"]) else "train/logit_norm"
            hist = [h for h in run["history"] if h.get(key) is not None]
            if hist:
                ax.plot([h["step"] for h in hist], [h[key] for h in hist],
                        label=f"n={width}, lr={s['lrs'][i]:.3g}")
        _log_axes(ax, x=False)
        ax.set_xlabel("step")
        ax.set_ylabel("logit RMS on the probe" if rows[0].get("task") != "gpt" else "mean logit norm per token")
        ax.set_title(_label(exp) + ": largest stable lr")
        _legend(ax)
    figs["logits"] = "logit_rms.png"
    _save(plt, fig, os.path.join(out, figs["logits"]))

    # feature learning per layer against width, at each width's optimal learning rate
    stats = ("change_rms", "eff_rms", "prop_rms")
    fig, axes = plt.subplots(len(exps), len(stats), figsize=(5 * len(stats), 3.4 * len(exps)), squeeze=False)
    for row, exp in enumerate(exps):
        s = summaries[exp]
        widths = sorted(s)
        finals = {w: s[w]["runs"][s[w]["opt_index"]][0].get("final_metrics") or {} for w in widths
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
                    ax.plot(*zip(*pts), marker="o", color=f"C{i % 10}", label=module)
            _log_axes(ax)
            ax.set_xlabel("width")
            ax.set_ylabel(stat)
            ax.set_title(_label(exp) + ": optimal lr")
            _legend(ax)
    figs["features"] = "feature_learning.png"
    _save(plt, fig, os.path.join(out, figs["features"]))

    md = _markdown(rows, exps, summaries, fits, figs)
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


def _markdown(rows, exps, summaries, fits, figs):
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
    missing = [f"{_label(exp)} at width {w}" for exp in exps for w, s in summaries[exp].items()
               if s["opt_index"] is None]
    if missing:
        lines += ["", "Left out of the fits, every learning rate having a diverged seed (no optimal or maximal "
                  f"stable rate): {', '.join(missing)}."]
    lines += ["", "## Per width", "",
              "| experiment | width | optimal lr | its score | maximal stable lr | diverged lrs |",
              "|---|---|---|---|---|---|"]
    for exp in exps:
        for w, s in summaries[exp].items():
            div = sum(bool(d) for d in s["diverged"])
            msl = "none" if s["max_stable_lr"] is None else f"{s['max_stable_lr']:.3g}"
            opt, score = ("n/a", "n/a") if s["opt_index"] is None else (f"{s['opt_lr']:.3g}",
                                                                         f"{s['acc'][s['opt_index']]:.3f}")
            lines.append(f"| {_label(exp)} | {w} | {opt} | {score} | {msl} | "
                         f"{div} of {len(s['lrs'])} |")
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
              "`diverge_loss`. All statistics are RMS over the probe batch (`spkern.Tracker`).", "",
              "Parameterizations (lr of layer l = lr * (width / base_width)^-c_l):", "",
              table_markdown() if task == "MLP" else "see the table in `spkern/experiments/gpt.py`.", ""]
    return "\n".join(lines)


__all__ = ["experiments", "fit_exponent", "summarize", "write"]
