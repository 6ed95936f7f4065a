"""The pictures: loss.png of a run (train.py --plot, `python -m machinery plot OUT`), eval.py's
alpha sweep. matplotlib is optional: asked for before any work, drawn into files only.
"""
import importlib.util
import os
import sys


def can_plot():
    """matplotlib is optional: --plot and `python -m machinery plot` ask for it before any work."""
    return importlib.util.find_spec("matplotlib") is not None


def plot_path_problem(path):
    """What keeps savefig from writing `path` (a --plot PNG), or None: asked before minutes of
    work, whose numbers a failed write would otherwise lose."""
    if os.path.isdir(path):
        return "is a folder; name the PNG file to write in it"
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        return f"no such folder {folder}"
    return None


def pyplot():
    """matplotlib.pyplot, drawing into files only (the Agg backend: no window, no display): the
    one place train.py's, eval.py's and the anatomy's pictures get it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path, dpi=100):
    """Write fig to path, and free it: pyplot would keep every figure alive. Returns path."""
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


# ----------------------------------------------------------------------------- loss.png

def plot_run(rows, path):
    """Draw a run's metrics.jsonl rows into path (loss.png): train and validation loss, and alpha,
    over the steps; the validation whose adapter is kept (the best) ringed. Returns path."""
    plt = pyplot()
    steps = [r for r in rows if r["kind"] == "step"]
    evals = [r for r in rows if r["kind"] == "eval" and r.get("val_loss") is not None]
    at = [r["step"] for r in steps]
    fig, ax = plt.subplots(figsize=(8, 5), layout="constrained")
    ax.plot(at, [r["loss"] for r in steps], lw=0.6, alpha=0.6, label="train loss")
    ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-",
            label="validation loss")
    best = [r for r in evals if r.get("best")][-1:]  # the last row marked best is the kept one
    if best:
        ax.plot(best[0]["step"], best[0]["val_loss"], "o", ms=14, mfc="none", mec="C3", mew=2,
                label=f"kept adapter (epoch {best[0]['epoch']})")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy per supervised token")
    ax2 = ax.twinx()
    ax2.step(at, [r["alpha"] for r in steps], "k--", lw=1, where="post", label="alpha")
    ax2.set_ylabel("alpha")
    # Below the axes: anywhere inside them the legend would hide a stretch of some curve.
    fig.legend(loc="outside lower center", ncols=4)
    return save_figure(fig, path, dpi=120)


# ----------------------------------------------------------------------------- the alpha sweep

def plot_sweep(rows, trained, path, adapter):
    """Validation loss (top, log scale) and tag F1 with the tag-shaped share (bottom) against
    alpha, on a log axis; alpha 0 (the base) sits at a marked left edge, a quarter of the smallest
    alpha > 0. Returns the path."""
    plt = pyplot()
    import matplotlib.ticker

    positive = [r["alpha"] for r in rows if r["alpha"] > 0]
    zero_at = min(positive) / 4 if positive else 1.0
    x = [r["alpha"] or zero_at for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, layout="constrained")
    top.plot(x, [r["val_loss"] for r in rows], "o-")
    top.set_yscale("log")  # from about 2 at the best alpha to tens when it breaks
    top.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 2, 5)))  # 2, 5, 10, 20
    top.yaxis.set_major_formatter("{x:g}")  # 2, not 2 x 10^0
    top.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    top.set_ylabel("validation loss per tag token (log)")
    bottom.plot(x, [r["f1"] for r in rows], "o-", label="tag F1")
    bottom.plot(x, [r["tag_shaped"] for r in rows], "s--", label="tag-shaped share")
    bottom.set_ylabel("share")
    bottom.set_ylim(0, 1)
    bottom.legend()
    for ax in (top, bottom):
        ax.set_xscale("log")
        ax.axvline(trained, color="grey", lw=1, ls=":")  # where the adapter was trained
        if positive and zero_at in x:
            ax.axvspan(zero_at / 1.5, zero_at * 1.5, color="0.9")  # alpha 0: off the log scale
    bottom.set_xticks(x, ["0 (base)" if r["alpha"] == 0 else f"{r['alpha']:g}" for r in rows],
                      rotation=45)
    bottom.minorticks_off()
    bottom.set_xlabel(f"alpha (log scale; dotted: the adapter's own, {trained:g})")
    top.set_title(f"{adapter}: the same adapter at each alpha", fontsize=10)
    return save_figure(fig, path)


def draw_sweep(result, args):
    """eval.py --plot, after the JSON is out (a plot that fails, a full disk, loses no score):
    the sweep drawn into args.plot. Returns the exit status: 0, or 2 with one error line."""
    try:
        path = plot_sweep(result["sweep"], result["trained_alpha"], args.plot, args.adapter)
    except (ValueError, TypeError, OSError) as e:
        print(f"eval.py: error: --plot {args.plot}: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}", file=sys.stderr)
    return 0
