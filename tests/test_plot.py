"""loss.png: python -m machinery plot draws it from an --out folder's metrics.jsonl, train.py
--plot at the end of a run.

Oracles: the PNG signature of the file written; the messages as written for users (the path it
wrote, a folder without a run, matplotlib missing: python -m machinery plot in a fresh interpreter
without it, and train.py --plot refused before any work); matplotlib's own layout, where the
legend's window extent overlaps no axes. The folder plotted is the three_epochs run of
conftest.py.
"""
import shutil
import sys

import pytest

from machinery import checkpoint
import train
from tiny_run import run_script, train_args

pytestmark = pytest.mark.usefixtures("one_thread")  # one_thread, setup, three_epochs: conftest.py


# ------------------------------------------------------------------------ python -m machinery plot

def test_plot_cli_names_the_file_it_wrote(three_epochs, tmp_path):
    out, _ = three_epochs
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "loss.png").unlink()
    done = run_script(["-m", "machinery", "plot", copy])
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"wrote {copy / 'loss.png'}\n"
    assert (copy / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("make, message", [
    (lambda d: None, "{d}: no such folder (a train.py --out)"),
    (lambda d: d.mkdir(), "{d}/metrics.jsonl: no such file; is {d} a train.py --out folder?"),
], ids=["missing", "not_a_run"])
def test_plot_cli_refuses_a_folder_without_a_run_in_one_line(tmp_path, make, message):
    folder = tmp_path / "missing"
    make(folder)
    done = run_script(["-m", "machinery", "plot", folder])
    assert done.returncode == 2
    assert done.stderr == f"python -m machinery plot: error: {message.format(d=folder)}\n"


def test_plot_legend_does_not_cover_the_curves(three_epochs, tmp_path, monkeypatch):
    """The legend sits outside the axes: nothing it covers can be a curve."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    out, _ = three_epochs
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    figures, real_savefig = [], Figure.savefig

    def savefig(fig, *args, **kwargs):
        figures.append(fig)
        return real_savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    (copy / "loss.png").unlink()
    assert checkpoint.plot(str(copy)) == copy / "loss.png"  # an --out folder, without training
    assert (copy / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig, = figures  # closed by plot(): drawn again on a canvas of its own
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    legend = fig.legends[0].get_window_extent(renderer)
    for ax in fig.axes:
        assert not legend.overlaps(ax.get_window_extent(renderer))


NO_MATPLOTLIB = """
import runpy, sys
sys.modules["matplotlib"] = None  # as if it were not installed: importing it fails
sys.argv = ["python -m machinery", *sys.argv[1:]]
runpy.run_module("machinery", run_name="__main__")
"""


def test_plot_without_matplotlib_names_the_package_in_one_line(three_epochs, tmp_path,
                                                               setup, capsys, monkeypatch):
    out, _ = three_epochs
    done = run_script(["-c", NO_MATPLOTLIB, "plot", out])
    assert done.returncode == 2
    assert done.stderr == ("python -m machinery plot: error: needs matplotlib: "
                           "pip install matplotlib\n")
    # train.py --plot: refused before any work, not after hours of training
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit) as exit_:
        train.main(train_args(*setup, tmp_path / "out", "--plot"))
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "train.py: error: --plot needs matplotlib: pip install matplotlib")
    assert not (tmp_path / "out").exists()
