"""train.py's step done another way trains the same adapter: cut into pieces (--grad-accum),
shared among processes (DDP under torchrun), with its activations recomputed (--recompute), or
with other formulas (--kernels, --attention written). And a run under torchrun exits 0 once its
files are written, whatever the interpreter's teardown does.

Oracle: the plain single-process run of the same flags, whose adapter each must equal up to
float32 rounding (bit for bit where the code path is the same); for DDP, the single process that
cuts the same global batch into the same two micro-batches. The method itself and what a run
prints: test_train.py.
"""
import pytest
import torch

from machinery import checkpoint
import data
import train
from tiny_run import (HANG, ROOT, RUN_FILES, adapter, hashes, metrics, run_script, same_tensors,
                      train_args, write_quotes)

pytestmark = pytest.mark.usefixtures("one_thread")  # one_thread, setup: conftest.py


# ------------------------------------------------------------------------ the same step, split

def test_grad_accumulation_equals_one_big_batch(setup, tmp_path):
    for accum in (1, 2):
        out = tmp_path / f"accum{accum}"
        argv = train_args(*setup, out, "--max-steps", 3, "--grad-accum", accum)
        assert train.main(argv) == 0
    one, two = adapter(tmp_path / "accum1"), adapter(tmp_path / "accum2")
    assert all(torch.allclose(one[k], two[k], rtol=0, atol=1e-5) for k in one)


def test_validation_reads_as_many_rows_at_once_as_a_training_piece(setup, tmp_path,
                                                                    monkeypatch):
    """--grad-accum bounds validation's memory too: its batches hold batch_size / grad_accum
    rows. The loss stays the same mean over the same tag tokens (oracle: the run without
    --grad-accum, to float32 rounding)."""
    rows, real = [], data.validation_loss

    def recording(model, samples, batch_size, *args):
        rows.append(batch_size)
        return real(model, samples, batch_size, *args)

    monkeypatch.setattr(data, "validation_loss", recording)
    for accum in (1, 4):
        out = tmp_path / f"accum{accum}"
        assert train.main(train_args(*setup, out, "--max-steps", 1, "--grad-accum", accum)) == 0
    assert rows == [4, 1]  # batches of 4 quotes (train_args), in 1 and in 4 pieces
    before = [metrics(tmp_path / f"accum{a}", "eval")[0]["val_loss"] for a in (1, 4)]
    assert before[1] == pytest.approx(before[0], rel=1e-6)


def test_recompute_trains_the_same_adapter(setup, tmp_path):
    """Activation checkpointing changes what is kept, not the arithmetic: the layers run again."""
    import llama
    calls = []

    def counting_checkpoint(*args, **kwargs):
        calls.append(1)
        return real_checkpoint(*args, **kwargs)

    real_checkpoint = llama.checkpoint
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(llama, "checkpoint", counting_checkpoint)
        for flags in ([], ["--recompute"]):
            argv = train_args(*setup, tmp_path / f"run{len(flags)}", "--max-steps", 3, *flags)
            assert train.main(argv) == 0
            # the layers went through checkpoint() only with the flag
            assert bool(calls) == bool(flags)
    kept, recomputed = adapter(tmp_path / "run0"), adapter(tmp_path / "run1")
    assert all(torch.allclose(kept[k], recomputed[k], rtol=0, atol=1e-6) for k in kept)


@pytest.mark.parametrize("flags, uses", [(["--kernels"], 1), (["--no-kernels"], 0),
                                         (["--attention", "written"], 0)],
                         ids=["kernels", "no_kernels", "attention_written"])
def test_other_formulas_train_the_same_adapter_as_the_plain_ones(setup, tmp_path, flags, uses):
    """By default the loop runs llama.py's formulas under autograd; --kernels swaps in the speed
    chapter's hand-written backward passes (speed/kernels.py's use), --attention written the
    attention formula step by step, --no-kernels (the old spelling of the default) nothing. The
    oracle: the default run's adapter, which each must equal up to rounding."""
    import llama
    from speed import kernels
    used, written = [], []

    def counted(real, calls):
        return lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "use", counted(kernels.use, used))
        mp.setattr(llama, "attention", counted(llama.attention, written))
        for name, more in (("plain", []), ("other", flags)):
            used.clear(), written.clear()
            argv = train_args(*setup, tmp_path / name, "--max-steps", 3, *more)
            assert train.main(argv) == 0
            assert len(used) == (uses if more else 0)
            assert bool(written) == ("written" in more)  # llama.attention(), step by step
    plain, other = adapter(tmp_path / "plain"), adapter(tmp_path / "other")
    assert all(torch.allclose(other[k], plain[k], rtol=0, atol=1e-5) for k in plain)
    if flags == ["--no-kernels"]:
        assert same_tensors(other, plain)  # the very same code path


def test_ddp_on_two_cpu_processes_equals_one_process(setup, tmp_path):
    """torchrun, gloo: 10 train quotes in batches of 3, so the last batch (1 row) leaves rank 1 an
    empty share. train.py checks at the end that both ranks hold the same adapter; rank 0's must
    equal a single process that splits the same global batch into the same two micro-batches."""
    model_dir, _ = setup
    data = write_quotes(tmp_path / "eleven.jsonl", n=11)
    flags = lambda out, *more: train_args(model_dir, data, out, "--batch-size", 3, *more)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    both = run_script(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", 2,
                       ROOT / "train.py", *flags(tmp_path / "ddp")], cwd=cwd, timeout=HANG)
    assert both.returncode == 0, both.stderr[-3000:]
    assert "all 2 processes end with the same adapter" in both.stderr
    assert train.main(flags(tmp_path / "single", "--grad-accum", 2)) == 0
    for name in ("adapter.safetensors", checkpoint.LAST_ADAPTER):
        ranks, single = adapter(tmp_path / "ddp", name), adapter(tmp_path / "single", name)
        assert all(torch.allclose(ranks[k], single[k], rtol=0, atol=1e-5) for k in single)
    # only rank 0 writes: one metrics row per step, nothing beside --out
    assert [r["step"] for r in metrics(tmp_path / "ddp", "step")] == [1, 2, 3, 4]
    assert set(hashes(tmp_path / "ddp")) == RUN_FILES
    assert list(cwd.iterdir()) == []


# ---------------------------------------------------------------------------- leaving torchrun

ABORTING_TEARDOWN = """
import atexit, os, runpy, sys
# The interpreter's teardown aborts, as it does with gloo's threads still running on some machines
# about one exit in four ("terminate called without an active exception").
atexit.register(os.abort)
sys.argv[0] = {train!r}
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_under_torchrun_a_finished_run_exits_0_whatever_the_teardown_does(setup, tmp_path):
    """Under torchrun, train.py leaves by os._exit once everything is written and flushed: an
    abort in the teardown it skips can no longer fail a run that went well."""
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(ABORTING_TEARDOWN.format(train=str(ROOT / "train.py")))
    out = tmp_path / "out"
    done = run_script(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", 2,
                       wrapper, *train_args(*setup, out, "--max-steps", 1)], timeout=HANG)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "all 2 processes end with the same adapter" in done.stderr
    assert done.stderr.splitlines()[-1].startswith("reached --max-steps 1")
