"""What an adapter learned: each update dW = alpha B A taken apart, as the LoRA paper does.

    python -m anatomy out                       # a table, one line per adapted module
    python -m anatomy out --json                # every number, for scripts
    python -m anatomy out --plot anatomy.png    # heatmaps: layers x projections

For each adapted Linear, W (out, in) frozen and dW = alpha B A with B (out, r), A (r, in):

    relative size    ||dW||_F / ||W||_F: how far the update moves W.
    singular values  s_1 >= ... >= s_r of dW, and its stable rank (s_1^2 + ... + s_r^2) / s_1^2,
                     between 1 and r: how many of the r directions carry the update (the
                     stable rank of Rudelson and Vershynin 2007, a rank that noise cannot lift).
    amplification    ||dW||_F / ||U^T W V||_F, with dW = U diag(s) V^T, U (out, r) and V (in, r):
                     how much larger dW is along its own directions than W was there.

The last is the "feature amplification factor" of Hu et al. 2021, "LoRA: Low-Rank Adaptation of
Large Language Models" (arXiv 2106.09685), section 7.3 and appendix H.4. The paper projects W onto
the r-dimensional subspace of dW, "U^T W V^T" with its V^T holding the right singular vectors as
rows (U^T W V here, V's columns being those vectors: an r x r matrix), and compares that matrix's
Frobenius norm with ||W||_F. Its Table 7, for W_q in layer 48 of GPT-3 (||W_q||_F = 61.95): at
r = 4, ||dW_q||_F = 6.91 while W carries only 0.32 along dW's directions, against 21.67 along W's
own top 4 directions and 0.02 along random ones. The update amplifies directions W does not
emphasise, by 6.91 / 0.32 = 21.5. At r = 64 the factor is about 2 (3.57 / 1.90): most of the extra
directions are not amplified (appendix H.4). Beside dW's directions, this file also measures W
along its own top directions and along random ones: Table 7's two other columns. For random
directions it takes the root mean square, ||W||_F k / sqrt(out in) for k directions: 0.020 for
Table 7's W_q (12,288 x 12,288) at k = 4, the paper's 0.02.
"""
import argparse
import math
import re
import statistics
import sys

import torch

import lora
from machinery import json_out
from machinery.loading import model_with_adapter
from machinery.cli import DEFAULT_OUT, HelpFormatter
from machinery.plots import can_plot, plot_path_problem, pyplot, save_figure
from machinery.progress import progress
from export.peft import read_any

# The heatmap's columns, in the order a layer computes them; lm_head comes after the last layer.
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
               "lm_head"]


# ----------------------------------------------------------------------------- one update

def top_singular_values(W, k):
    """The k largest singular values of W (out, in), largest first, in W's dtype (float64 here).

    W = U diag(s) V^T gives W^T W = V diag(s^2) V^T: the singular values are the square roots of
    the eigenvalues of the Gram matrix, taken on the smaller side (W^T W, in x in, when in <= out;
    else W W^T). For lm_head that is 576 x 576 on SmolLM2, 2,048 x 2,048 on Llama-3.2-1B, where
    an SVD of W itself (49,152 x 576, 128,256 x 2,048) works on a copy of W as large as W, 2 GB
    in float64 for Llama's, and took twice as long for SmolLM2's here. Each eigenvalue is off by
    about 1e-16 times the largest, s_1^2: the top singular values come as exact as from an SVD;
    only those below about 1e-8 s_1 lose their digits. Rounding can leave a zero eigenvalue
    slightly negative: clamped to 0 before the root."""
    gram = W.T @ W if W.shape[1] <= W.shape[0] else W @ W.T
    eigenvalues = torch.linalg.eigvalsh(gram)  # ascending
    return eigenvalues.flip(0)[:k].clamp(min=0).sqrt()


@torch.no_grad()
def update_anatomy(W, A, B, alpha):
    """The numbers of one update dW = alpha B A on W: W (out, in), A (r, in), B (out, r).

    Returns a dict of floats: w_norm ||W||_F, dw_norm ||dW||_F, relative (their ratio),
    singular_values (the r values of dW, largest first), stable_rank, w_along_dw ||U^T W V||_F
    (W in dW's directions), w_along_top (W in its own top directions, as many as dW has),
    w_along_random (root mean square along as many random directions: ||W||_F k / sqrt(out in),
    since a random k-dimensional projection keeps k / n of each side's squared norm on average)
    and amplification (dW_norm / w_along_dw, section 7.3). A zero update gives zeros throughout.
    """
    W, A, B = W.double(), A.double(), B.double()
    # dW has rank <= r: its SVD comes from r x r pieces, never from the (out, in) matrix dW
    # itself (lm_head is 49,152 x 576 on SmolLM2). B = Qb Rb and A^T = Qa Ra with orthonormal
    # columns in Qb (out, r) and Qa (in, r), so dW = Qb (alpha Rb Ra^T) Qa^T, and the SVD of that
    # r x r core, Uc diag(s) Vc^T, gives dW = (Qb Uc) diag(s) (Qa Vc)^T: exact singular values
    # and vectors.
    Qb, Rb = torch.linalg.qr(B)
    Qa, Ra = torch.linalg.qr(A.T)
    Uc, s, Vc_T = torch.linalg.svd(alpha * Rb @ Ra.T)
    U, V = Qb @ Uc, Qa @ Vc_T.T  # (out, r), (in, r)
    # Directions with s = 0 (B or A of lower rank than r, or zero) are not dW's: any vector fits.
    # The tolerance is torch.linalg.matrix_rank's: s_1 * max(out, in) * machine epsilon.
    k = int((s > s[0] * max(W.shape) * torch.finfo(s.dtype).eps).sum()) if s[0] > 0 else 0
    w_norm, dw_norm = W.norm().item(), s.norm().item()
    w_along_dw = (U[:, :k].T @ W @ V[:, :k]).norm().item()  # (k, k): W in dW's subspace
    w_along_top = top_singular_values(W, k).norm().item()  # W's Gram: no SVD of W either
    return dict(w_norm=w_norm, dw_norm=dw_norm, relative=dw_norm / w_norm,
                singular_values=s.tolist(),
                stable_rank=dw_norm ** 2 / s[0].item() ** 2 if k else 0.0,
                w_along_dw=w_along_dw, w_along_top=w_along_top,
                w_along_random=w_norm * k / math.sqrt(W.shape[0] * W.shape[1]),
                amplification=dw_norm / w_along_dw if k else 0.0)


# ----------------------------------------------------------------------------- a whole model

def model_anatomy(model):
    """[update_anatomy of each LoraModule, with its module name, layer (None for lm_head) and
    projection (q_proj, ..., lm_head)], in model order: by layer."""
    rows = []
    modules = lora.lora_modules(model)
    for name, m in progress(modules.items(), "taking the updates apart (modules)", len(modules)):
        layer = re.search(r"layers\.(\d+)\.", name)
        rows.append(dict(module=name, layer=int(layer[1]) if layer else None,
                         projection=name.rsplit(".", 1)[-1], r=m.r, alpha=m.alpha,
                         **update_anatomy(m.original_module.weight, m.A, m.B, m.alpha)))
    return rows


def summary(rows):
    """Medians over the modules: one line of numbers for a whole adapter (the README's rank
    sweep compares them)."""
    keys = ["relative", "stable_rank", "amplification", "w_along_dw", "w_along_random"]
    return {k: statistics.median(row[k] for row in rows) for k in keys}


def table(rows):
    """The rows as text, one line per module: layer and projection, then the numbers."""
    lines = [f"{'layer':>5} {'projection':<10} {'|dW|/|W|':>9} {'stable r':>8} {'|U^T W V|':>9} "
             f"{'W top-k':>8} {'random':>7} {'amplif.':>8}  singular values of dW"]
    for row in rows:
        values = " ".join(f"{s:.3g}" for s in row["singular_values"][:6])
        more = " ..." if len(row["singular_values"]) > 6 else ""
        layer = "head" if row["layer"] is None else row["layer"]
        lines.append(f"{layer:>5} {row['projection']:<10} {row['relative']:>9.4f} "
                     f"{row['stable_rank']:>8.2f} {row['w_along_dw']:>9.4f} "
                     f"{row['w_along_top']:>8.3f} {row['w_along_random']:>7.4f} "
                     f"{row['amplification']:>8.2f}  {values}{more}")
    median = summary(rows)
    lines.append(f"{'median':>5} {'':<10} {median['relative']:>9.4f} "
                 f"{median['stable_rank']:>8.2f} {median['w_along_dw']:>9.4f} {'':>8} "
                 f"{median['w_along_random']:>7.4f} {median['amplification']:>8.2f}")
    return "\n".join(lines)


def plot(rows, path, title):
    """Three heatmaps side by side, layers down and projections across (lm_head in a last row of
    its own): relative size, stable rank, amplification. Returns the path."""
    import matplotlib
    plt = pyplot()

    layers = max([row["layer"] for row in rows if row["layer"] is not None], default=-1) + 1
    shown = [("relative", "|dW|_F / |W|_F"), ("stable_rank", "stable rank of dW"),
             ("amplification", "amplification |dW|_F / |U^T W V|_F")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 2 + 0.22 * layers), layout="constrained")
    for ax, (key, label) in zip(axes, shown):
        grid = torch.full((layers + 1, len(PROJECTIONS)), float("nan"))  # NaN: not adapted
        for row in rows:
            if row["projection"] in PROJECTIONS:
                grid[layers if row["layer"] is None else row["layer"],
                     PROJECTIONS.index(row["projection"])] = row[key]
        cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
        image = ax.imshow(grid.numpy(), aspect="auto", cmap=cmap, interpolation="nearest")
        fig.colorbar(image, ax=ax, shrink=0.8)
        ax.set_title(label, fontsize=10)
        ax.set_xticks(range(len(PROJECTIONS)),
                      [p.removesuffix("_proj") for p in PROJECTIONS], rotation=90)
        ax.set_yticks(range(layers + 1), [*map(str, range(layers)), "head"], fontsize=6)
        ax.set_ylabel("layer")
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


# ----------------------------------------------------------------------------- command line

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m anatomy", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("adapter", nargs="?", default=DEFAULT_OUT, metavar="ADAPTER",
                   help="train.py --out folder, adapter file or PEFT folder "
                   f"(default: {DEFAULT_OUT})")  # HelpFormatter adds defaults to flags only
    p.add_argument("--model", default=None,
                   help="the base, hub id or HF folder (default: the one the adapter records)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object: every module's numbers and their medians")
    p.add_argument("--plot", metavar="PNG", default=None,
                   help="also draw the heatmaps into this PNG (needs matplotlib; default: none)")
    p.set_defaults(alpha=None, attention="sdpa")  # what model_with_adapter reads
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.plot and not can_plot():  # before loading a model
            raise ValueError("--plot needs matplotlib: pip install matplotlib")
        if args.plot and (problem := plot_path_problem(args.plot)):  # not after the numbers
            raise ValueError(f"--plot {args.plot}: {problem}")
        # float32: the base's own numbers (a bf16 checkpoint converts exactly); the sums that
        # make the norms are float64 in update_anatomy.
        model, _ = model_with_adapter(args, args.adapter, "cpu", torch.float32,
                                      "python -m anatomy", read_any)
        rows = model_anatomy(model)
        if not rows:
            raise ValueError(f"{args.adapter}: the adapter holds no LoRA module")
    except (ValueError, TypeError, OSError) as e:
        print(f"python -m anatomy: error: {e}", file=sys.stderr)
        return 2
    title = f"{args.adapter}: r={rows[0]['r']}, alpha {rows[0]['alpha']:g}"
    if args.json:
        print(json_out.dumps({"adapter": args.adapter, "modules": rows,
                              "median": summary(rows)}))
    else:
        print(f"{title}, {len(rows)} adapted modules")
        print(table(rows))
    if args.plot:  # after the numbers are out: a plot that fails (a full disk) loses none
        sys.stdout.flush()
        try:
            print(f"wrote {plot(rows, args.plot, title)}", file=sys.stderr)
        except (ValueError, TypeError, OSError) as e:
            print(f"python -m anatomy: error: --plot {args.plot}: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
