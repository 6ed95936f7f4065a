"""anatomy/ (`python -m anatomy ADAPTER`): the numbers of each
update dW = alpha B A.

Oracles: values computed by hand for a hand-built W and a rank-1 update; numpy's SVD of the dense
dW (the plain formula, never the QR shortcut anatomy takes); zeros for a zero update.
"""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import anatomy
from anatomy import update_anatomy
from export.peft import export_peft
from lora import LoraModule, add_lora, lora_modules
from tiny import randomize_b
from tiny_run import HANG, ROOT
from machinery import adapters


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- one update

# W (3, 4) with singular values 3, 2, 1 along the axes; dW = 0.5 * b a^T with b = (0, 3, 4),
# a = (0, 2, 0, 0): ||b|| = 5, ||a|| = 2, so dW has one singular value 0.5 * 5 * 2 = 5, left
# direction u = b / 5 = (0, 0.6, 0.8), right direction v = a / 2 = e_2.
W = torch.tensor([[3.0, 0, 0, 0], [0, 2, 0, 0], [0, 0, 1, 0]])
B1 = torch.tensor([[0.0], [3], [4]])  # (out, r = 1)
A1 = torch.tensor([[0.0, 2, 0, 0]])  # (r = 1, in)
BY_HAND = dict(w_norm=math.sqrt(14),  # sqrt(9 + 4 + 1)
               dw_norm=5.0,
               relative=5 / math.sqrt(14),
               stable_rank=1.0,  # 5^2 / 5^2
               w_along_dw=1.2,  # u^T W v = (0, 0.6, 0.8) . (W e_2 = (0, 2, 0)) = 1.2
               w_along_top=3.0,  # W's largest singular value
               w_along_random=math.sqrt(14) / math.sqrt(12),  # ||W|| * k / sqrt(out * in)
               amplification=5 / 1.2)


def test_a_rank_one_update_gives_the_values_computed_by_hand():
    got = update_anatomy(W, A1, B1, alpha=0.5)
    assert got["singular_values"] == pytest.approx([5.0], abs=1e-12)
    for key, value in BY_HAND.items():
        assert got[key] == pytest.approx(value, rel=1e-12), key


def test_a_rank_one_update_in_a_rank_two_adapter_counts_one_direction():
    """B's second column zero: dW is still rank 1. Its second singular direction is arbitrary,
    so it must not enter W's projection, nor the random baseline."""
    A2 = torch.cat([A1, torch.tensor([[0.3, -1.0, 0.7, 2.0]])])  # (2, 4)
    B2 = torch.cat([B1, torch.zeros(3, 1)], dim=1)  # (3, 2)
    got = update_anatomy(W, A2, B2, alpha=0.5)
    assert got["singular_values"] == pytest.approx([5.0, 0.0], abs=1e-12)
    for key, value in BY_HAND.items():
        assert got[key] == pytest.approx(value, rel=1e-12), key


def test_a_zero_update_reports_zeros():
    module = LoraModule(torch.nn.Linear(6, 5), r=3, alpha=2.0, init="zero")  # B = 0
    got = update_anatomy(module.original_module.weight, module.A, module.B, module.alpha)
    assert got["singular_values"] == [0.0, 0.0, 0.0]
    for key in ("dw_norm", "relative", "stable_rank", "w_along_dw", "w_along_top",
                "w_along_random", "amplification"):
        assert got[key] == 0.0, key
    assert got["w_norm"] == pytest.approx(module.original_module.weight.norm().item())


@pytest.mark.parametrize("out_features, in_features, r", [(7, 5, 3), (40, 9, 4), (6, 30, 6)])
def test_random_updates_match_numpy_svd_of_the_dense_product(out_features, in_features, r):
    g = torch.Generator().manual_seed(out_features + r)
    Wt = torch.randn(out_features, in_features, generator=g)
    A, B = torch.randn(r, in_features, generator=g), torch.randn(out_features, r, generator=g)
    got = update_anatomy(Wt, A, B, alpha=0.3)
    w, dw = Wt.double().numpy(), 0.3 * B.double().numpy() @ A.double().numpy()
    U, s, Vt = np.linalg.svd(dw)
    U, s, V = U[:, :r], s[:r], Vt[:r].T  # dW has rank r: its r directions
    np.testing.assert_allclose(got["singular_values"], s, rtol=1e-10)
    assert got["dw_norm"] == pytest.approx(np.linalg.norm(dw), rel=1e-10)
    assert got["relative"] == pytest.approx(np.linalg.norm(dw) / np.linalg.norm(w), rel=1e-10)
    assert got["stable_rank"] == pytest.approx((s ** 2).sum() / s[0] ** 2, rel=1e-10)
    projected = np.linalg.norm(U.T @ w @ V)
    assert got["w_along_dw"] == pytest.approx(projected, rel=1e-10)
    assert got["amplification"] == pytest.approx(np.linalg.norm(dw) / projected, rel=1e-10)
    top = np.linalg.svd(w, compute_uv=False)[:r]
    assert got["w_along_top"] == pytest.approx(np.sqrt((top ** 2).sum()), rel=1e-6)


def test_the_random_baseline_is_the_mean_over_random_subspaces():
    """E ||U^T W V||_F^2 over random r-dimensional U, V is ||W||_F^2 r^2 / (out in): checked by
    sampling 4000 pairs of random orthonormal bases."""
    g = torch.Generator().manual_seed(0)
    Wt, r = torch.randn(12, 8, generator=g).double(), 3
    U = torch.linalg.qr(torch.randn(4000, 12, r, generator=g).double())[0]
    V = torch.linalg.qr(torch.randn(4000, 8, r, generator=g).double())[0]
    mean_square = (U.mT @ Wt @ V).square().sum((1, 2)).mean().item()
    A, B = torch.randn(r, 8, generator=g), torch.randn(12, r, generator=g)
    rms = update_anatomy(Wt, A, B, alpha=1.0)["w_along_random"]
    assert rms ** 2 == pytest.approx(mean_square, rel=0.03)


@pytest.mark.parametrize("shape", [(40, 9), (9, 40), (12, 12)])
def test_top_singular_values_match_svdvals(shape):
    """W's top singular values from its smaller Gram matrix, tall, wide or square."""
    Wt = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[0])).double()
    for k in (1, 4, min(shape)):
        torch.testing.assert_close(anatomy.top_singular_values(Wt, k),
                                   torch.linalg.svdvals(Wt)[:k], rtol=1e-12, atol=0)


def test_top_singular_values_of_a_rank_one_w_are_zeros_past_the_first():
    """The Gram's zero eigenvalues come out of eigvalsh a rounding error off, some negative:
    their roots must be 0, not NaN."""
    g = torch.Generator().manual_seed(1)
    Wt = torch.outer(torch.randn(30, generator=g), torch.randn(7, generator=g)).double()
    got = anatomy.top_singular_values(Wt, 7)
    assert not got.isnan().any()
    assert got[0].item() == pytest.approx(torch.linalg.svdvals(Wt)[0].item(), rel=1e-12)
    assert got[1:].max().item() < 1e-7 * got[0].item()


def test_no_svd_of_an_out_by_in_matrix(monkeypatch):
    """lm_head is 128,256 x 2,048 on Llama-3.2-1B: every SVD update_anatomy takes is of an r x r
    core, whatever W's size."""
    shapes = []

    def recorded(real):
        def run(x, *args, **kwargs):
            shapes.append(tuple(x.shape))
            return real(x, *args, **kwargs)
        return run
    for name in ("svd", "svdvals"):
        monkeypatch.setattr(torch.linalg, name, recorded(getattr(torch.linalg, name)))
    g = torch.Generator().manual_seed(2)
    Wt, r = torch.randn(50, 8, generator=g), 3
    update_anatomy(Wt, torch.randn(r, 8, generator=g), torch.randn(50, r, generator=g), 0.5)
    assert shapes and all(max(shape) <= r for shape in shapes), shapes


# ----------------------------------------------------------------------------- a whole adapter

@pytest.fixture(scope="module")
def adapter(base_models, tiny_dirs, tmp_path_factory):
    """(our adapter file, a PEFT export of it, the model that wrote it): r=2 on q, v, lm_head of
    the tied tiny model, with random B."""
    import copy
    model = copy.deepcopy(base_models["tied"])
    add_lora(model, r=2, alpha=0.75, targets=["q_proj", "v_proj", "lm_head"])
    randomize_b(model)
    root = tmp_path_factory.mktemp("anatomy")
    path = adapters.save(model, root / "adapter.safetensors", base_model=str(tiny_dirs["tied"]))
    export_peft(path, root / "peft")
    return path, root / "peft", model


def inspect(*argv):
    """python -m anatomy ARGV, as a user runs it from the repository."""
    return subprocess.run([sys.executable, "-m", "anatomy", *map(str, argv)], cwd=ROOT,
                          capture_output=True, text=True, timeout=HANG)


def test_cli_json_gives_each_modules_numbers_from_the_adapter_tensors(adapter):
    path, _, model = adapter
    done = inspect(path, "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    modules = lora_modules(model)
    assert [row["module"] for row in report["modules"]] == list(modules)
    for row in report["modules"]:
        m = modules[row["module"]]
        expected = update_anatomy(m.original_module.weight, m.A, m.B, m.alpha)
        for key, value in expected.items():
            assert row[key] == pytest.approx(value, rel=1e-6), (row["module"], key)
    assert [(row["layer"], row["projection"]) for row in report["modules"][:2]] == [
        (0, "q_proj"), (0, "v_proj")]
    assert report["modules"][-1]["layer"] is None  # lm_head, after the last layer
    amplification = sorted(row["amplification"] for row in report["modules"])
    assert report["median"]["amplification"] == pytest.approx(
        np.median(amplification), rel=1e-12)


def test_cli_reads_a_peft_folder_alike(adapter):
    path, peft_dir, _ = adapter
    ours, peft = inspect(path, "--json"), inspect(peft_dir, "--json")
    assert peft.returncode == 0, peft.stderr
    rows = [json.loads(done.stdout)["modules"] for done in (ours, peft)]
    assert len(rows[0]) == len(rows[1])
    for a, b in zip(*rows):
        assert a["module"] == b["module"]
        assert a["singular_values"] == pytest.approx(b["singular_values"], rel=1e-6)
        assert a["amplification"] == pytest.approx(b["amplification"], rel=1e-6)


def test_cli_table_has_a_line_per_module_and_plot_writes_a_png(adapter, tmp_path):
    path, _, model = adapter
    done = inspect(path, "--plot", tmp_path / "anatomy.png")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    n = len(lora_modules(model))
    assert lines[0] == f"{path}: r=2, alpha 0.75, {n} adapted modules"
    assert len(lines) == 1 + 1 + n + 1  # title, header, the modules, the medians
    assert lines[-2].split()[:2] == ["head", "lm_head"]
    assert lines[-1].startswith("median")
    assert done.stderr.strip() == f"wrote {tmp_path / 'anatomy.png'}"
    assert (tmp_path / "anatomy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_refuses_a_missing_adapter_in_one_line(tmp_path):
    done = inspect(tmp_path / "missing")
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"python -m anatomy: error: {tmp_path / 'missing'}: no such adapter file or folder"]


def test_plot_without_matplotlib_is_refused_before_loading(adapter, monkeypatch, capsys):
    path, _, _ = adapter
    monkeypatch.setattr(anatomy, "can_plot", lambda: False)
    monkeypatch.setattr(anatomy, "model_with_adapter", lambda *a: pytest.fail("loaded a model"))
    assert anatomy.main([str(path), "--plot", "x.png"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "python -m anatomy: error: --plot needs matplotlib: pip install matplotlib"]


@pytest.mark.parametrize("where, problem", [
    ("missing/anatomy.png", "no such folder {tmp}/missing"),
    (".", "is a folder; name the PNG file to write in it"),
], ids=["no_folder", "a_folder"])
def test_a_plot_path_that_cannot_be_written_is_refused_before_loading(
        adapter, tmp_path, monkeypatch, capsys, where, problem):
    path, _, _ = adapter
    monkeypatch.setattr(anatomy, "model_with_adapter", lambda *a: pytest.fail("loaded a model"))
    png = tmp_path / where
    assert anatomy.main([str(path), "--plot", str(png)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"python -m anatomy: error: --plot {png}: {problem.format(tmp=tmp_path)}"]


@pytest.mark.parametrize("as_json", [False, True], ids=["table", "json"])
def test_a_plot_that_fails_keeps_the_numbers(adapter, tmp_path, monkeypatch, capsys, as_json):
    """A plot that fails after the numbers (a full disk): they are printed all the same."""
    path, _, model = adapter

    def full_disk(rows, png, title):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(anatomy, "plot", full_disk)
    png = tmp_path / "anatomy.png"
    assert anatomy.main([str(path), "--plot", str(png), *["--json"] * as_json]) == 2
    out, err = capsys.readouterr()
    n = len(lora_modules(model))
    if as_json:
        assert len(json.loads(out)["modules"]) == n
    else:
        assert len(out.splitlines()) == 1 + 1 + n + 1  # title, header, the modules, the medians
    assert err.splitlines() == [
        f"python -m anatomy: error: --plot {png}: [Errno 28] No space left on device"]


def test_help_shows_the_adapters_default():
    done = inspect("--help")
    assert done.returncode == 0
    assert done.stdout.startswith("usage: python -m anatomy ")
    help_text = " ".join(done.stdout.split())
    assert "ADAPTER train.py --out folder, adapter file or PEFT folder (default: out)" in help_text


def test_lora_py_run_as_a_command_points_to_python_m_anatomy():
    """lora.py is the lesson, and given arguments it runs no tool: `python lora.py inspect` says
    where the anatomy is, in a few lines, with no traceback."""
    done = subprocess.run([sys.executable, "lora.py", "inspect", "out"], cwd=ROOT,
                          capture_output=True, text=True, timeout=HANG)
    assert done.returncode == 2 and done.stdout == ""
    assert "Traceback" not in done.stderr
    assert "python -m anatomy out     (what an adapter learned)" in done.stderr
