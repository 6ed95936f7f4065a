"""python -m machinery plot OUT: loss.png for a train.py run, finished or not."""
import argparse
import sys
from pathlib import Path

from machinery.checkpoint import plot
from machinery.cli import DEFAULT_OUT
from machinery.plots import can_plot

PROG = "python -m machinery"


def main(argv=None):
    p = argparse.ArgumentParser(prog=PROG, description="Tools for train.py's runs.")
    commands = p.add_subparsers(dest="command", required=True)
    plot_it = commands.add_parser("plot", help="draw loss.png for a run, finished or not",
                                  description="Draw OUT/loss.png from OUT/metrics.jsonl: train "
                                  "and validation loss, and alpha, over the steps.")
    plot_it.add_argument("out", nargs="?", default=DEFAULT_OUT, metavar="OUT",
                         help="a train.py --out folder (default: %(default)s)")
    args = p.parse_args(argv)
    out = Path(args.out)
    if not out.is_dir():
        p.exit(2, f"{PROG} plot: error: {out}: no such folder (a train.py --out)\n")
    if not (out / "metrics.jsonl").is_file():
        p.exit(2, f"{PROG} plot: error: {out / 'metrics.jsonl'}: no such file; is {out} "
               "a train.py --out folder?\n")
    if not can_plot():
        p.exit(2, f"{PROG} plot: error: needs matplotlib: pip install matplotlib\n")
    print(f"wrote {plot(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
