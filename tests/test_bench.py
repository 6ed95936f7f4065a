"""bench.py's pieces on a tiny random Llama: no timing is asserted, only what the numbers mean.

Oracles: FLOPs counted by hand from the config, transformers + PEFT's own loss and LoRA gradients
on the same weights and batch (the two sides must do the same work), and the JSON keys the issue
asks for.
"""
import json
import types

import pytest
import torch

import bench
import bench_measure
import bench_sides
import data as quotes
import generate
import lora
from tiny import LLAMA3_GQA_TIED, SENTENCES, write_tiny_model

ROWS = [{"quote": s.split(" | tags: ")[0], "tags": s.split(" | tags: ")[1].split(", ")}
        for s in SENTENCES[:5]]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    folder = write_tiny_model(root / "model", LLAMA3_GQA_TIED)
    data = root / "quotes.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS * 8))
    return folder, data


def args_for(folder, data, *extra):
    args = bench.parse_args(["--model", str(folder), "--data", str(data), "--dtype", "float32",
                             "--device", "cpu", "--batch-size", "4", *extra])
    args.target_list = bench_sides.TARGETS
    return args


def first_batch(folder, data):
    train_set, _, tokenizer, _ = quotes.load_dataset(folder, str(data), 256, 0.1, 0)
    return next(iter(quotes.batches(train_set, 4, tokenizer.eos_id, seed=0)))


# ----------------------------------------------------------------------------- FLOPs

def test_train_flops_by_hand():
    from llama import LlamaConfig
    config = LlamaConfig(vocab_size=384, hidden_size=64, intermediate_size=160,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16)
    r, lengths, supervised = 2, [3, 5], 4
    # (in, out) of q, k, v, o, gate, up, down: q and o are 4 heads x 16, k and v 2 heads x 16
    shapes = [(64, 64), (64, 32), (64, 32), (64, 64), (64, 160), (64, 160), (160, 64)]
    frozen = sum(2 * 2 * i * o for i, o in shapes)  # forward + backward to the input, per token
    adapters = sum(3 * 2 * r * (i + o) for i, o in shapes)  # forward, input grad, grads of A and B
    pairs = 3 * 4 // 2 + 5 * 6 // 2  # causal (query, key) pairs of a 3- and a 5-token sample
    attention = 3 * 2 * 2 * (4 * 16) * pairs  # q k^T and p v, backward twice the forward
    head = supervised * 2 * 2 * 64 * 384  # lm_head only where the loss is
    expected = 2 * (8 * (frozen + adapters) + attention) + head
    assert (bench_measure.train_flops(config, lengths, supervised, r, bench_sides.TARGETS)
            == expected == 3393024)


def test_lm_head_adapter_adds_its_flops_at_supervised_positions_only():
    from llama import LlamaConfig
    config = LlamaConfig(vocab_size=100, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=4)
    without = bench_measure.train_flops(config, [5], 3, 2, ["q_proj"])
    with_head = bench_measure.train_flops(config, [5], 3, 2, ["q_proj", "lm_head"])
    assert with_head - without == 3 * 3 * 2 * 2 * (8 + 100)


# ----------------------------------------------------------------------------- the two sides agree

def test_ours_and_peft_compute_the_same_loss_and_lora_gradients(setup):
    """Same weights, same batch: the same loss and the same gradient for every A and B (float32).
    """
    folder, data = setup
    args = args_for(folder, data)
    ours = bench_sides.Ours(args, "cpu", torch.float32)
    peft = bench_sides.Peft(args, "cpu", torch.float32,
                            start=bench_sides.adapter_weights(ours.model))
    batch = first_batch(folder, data)
    # padding and quote tokens carry no loss
    assert (batch["targets"] == quotes.IGNORE_INDEX).any()
    losses = []
    for side in (ours, peft):
        side.optimizer.zero_grad()
        loss = side.loss_sum(batch)
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    inner = peft.model.base_model.model
    for name, m in lora.lora_modules(ours.model).items():
        theirs = inner.get_submodule(name)
        torch.testing.assert_close(m.A.grad, theirs.lora_A["default"].weight.grad,
                                   rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(m.B.grad, theirs.lora_B["default"].weight.grad,
                                   rtol=1e-4, atol=1e-6)


def test_plain_path_gives_the_same_loss_and_gradients(setup):
    """kernels.py's hand-written backward passes against autograd differentiating the formulas."""
    folder, data = setup
    batch = first_batch(folder, data)
    sides = [bench_sides.Ours(args_for(folder, data), "cpu", torch.float32, plain=plain)
             for plain in (False, True)]
    for side in sides:
        side.model.train()
        side.loss_sum(batch).backward()
    grads = [[p.grad for p in lora.lora_parameters(s.model)] for s in sides]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_both_sides_generate_the_same_greedy_tags(setup):
    folder, data = setup
    args = args_for(folder, data)
    ours = bench_sides.Ours(args, "cpu", torch.float32)
    peft = bench_sides.Peft(args, "cpu", torch.float32,
                            start=bench_sides.adapter_weights(ours.model))
    prompts = [[0, 5, 9, 14], [0, 7, 3, 3, 12, 40, 41]]  # different lengths: padding on HF's side
    assert ours.generate(prompts, 6) == peft.generate(prompts, 6)
    no_stop = ours.generate(prompts, 6, ignore_eos=True)
    assert (no_stop == peft.generate(prompts, 6, ignore_eos=True)
            and [len(n) for n in no_stop] == [6, 6])


def test_padding_mask_and_until_eos():
    batch = {"input_tokens": torch.zeros(2, 4, dtype=torch.long), "lengths": torch.tensor([4, 2])}
    assert bench_sides.padding_mask(batch).tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert generate.until_eos([5, 6, 2, 7], [2, 9]) == [5, 6]
    assert generate.until_eos([5, 6], [2]) == [5, 6]


def test_quantile_interpolates():
    assert bench_measure.quantile([4, 1, 3, 2], 0.5) == 2.5
    assert bench_measure.quantile([1, 2, 3, 4, 5], 0.25) == 2


# ----------------------------------------------------------------------------- the whole run

def test_json_line_has_the_issue_keys_and_the_checks_pass(setup, capsys):
    folder, data = setup
    code = bench.main(["--model", str(folder), "--data", str(data), "--dtype", "float32",
                       "--device", "cpu", "--batch-size", "4", "--steps", "2", "--warmup", "1",
                       "--val-batches", "1", "--mem-batches", "1", "--gen-quotes", "4",
                       "--gen-tokens", "3", "--peft", "--json"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0, result["checks"]
    assert {"model", "device", "dtype", "batch_size", "ours", "peft", "speedup", "memory_ratio",
            "generate"} <= set(result)
    for side in ("ours", "peft"):
        assert {"tokens_per_s", "step_ms", "peak_mem_mb", "mfu"} <= set(result[side])
        assert result[side]["peak_mem_mb"] > 0 and 0 < result[side]["mfu"] < 1
    assert set(result["generate"]) >= {"ours_tokens_per_s", "hf_tokens_per_s", "speedup"}
    assert result["speedup"] == pytest.approx(
        result["ours"]["tokens_per_s"] / result["peft"]["tokens_per_s"])
    assert result["memory_ratio"] == pytest.approx(
        result["ours"]["peak_mem_mb"] / result["peft"]["peak_mem_mb"])
    assert all(check["ok"] for check in result["checks"].values())


def test_recompute_gives_the_same_loss_and_gradients(setup):
    """Llama.recompute (activation checkpointing) trades time for memory, never the result."""
    folder, data = setup
    batch = first_batch(folder, data)
    grads = []
    for recompute in (False, True):
        side = bench_sides.Ours(args_for(folder, data, *(["--recompute"] if recompute else [])),
                                "cpu", torch.float32)
        assert side.model.recompute == recompute
        side.loss_sum(batch).backward()
        grads.append([p.grad for p in lora.lora_parameters(side.model)])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_compile_takes_an_optional_backend():
    """--compile alone is inductor (what a GPU session measures); --compile eager only traces
    the layers, which the CPU dry run of scripts/gpu_check.sh uses to check the path in
    seconds."""
    assert bench.parse_args([]).compile is None
    assert bench.parse_args(["--compile"]).compile == "inductor"
    assert bench.parse_args(["--compile", "eager", "--steps", "3"]).compile == "eager"


def test_ours_compiled_with_the_eager_backend_gives_the_same_loss_and_gradients(setup):
    folder, data = setup
    batch = first_batch(folder, data)
    grads, losses = [], []
    for flags in ([], ["--compile", "eager"]):
        side = bench_sides.Ours(args_for(folder, data, *flags), "cpu", torch.float32)
        loss = side.loss_sum(batch)
        loss.backward()
        losses.append(loss.item())
        grads.append([p.grad for p in lora.lora_parameters(side.model)])
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("device, rate, sizes", [
    ("cpu", 1e9, [256, 512]),  # emulated bf16: 512 already takes 0.27 s
    ("cpu", 1e11, [256, 512, 1024, 2048]),  # float32 on a CPU: up to 2048, no further
    ("cuda", 1e15, [256, 512, 1024, 2048, 4096, 8192]),  # a recent GPU: up to 8192
], ids=["emulated", "cpu", "gpu"])
def test_matmul_peak_grows_the_product_until_it_takes_50_ms(monkeypatch, device, rate, sizes):
    """On a fake device that multiplies at `rate` FLOP/s: the sizes tried, and the rate found."""
    clock, tried = [0.0], []

    class Matrix:  # what torch.randn returns here: a product only moves the clock
        def __init__(self, n):
            self.n = n

        def __matmul__(self, other):
            clock[0] += 2 * self.n ** 3 / rate

    def randn(n, m, device, dtype):
        if not tried or tried[-1] != n:
            tried.append(n)
        return Matrix(n)

    monkeypatch.setattr(bench_measure.torch, "randn", randn)
    monkeypatch.setattr(bench_measure, "sync", lambda device: None)
    monkeypatch.setattr(bench_measure, "time",
                        types.SimpleNamespace(perf_counter=lambda: clock[0]))
    assert bench_measure.matmul_peak(device, torch.bfloat16) == pytest.approx(rate)
    assert tried == sizes
