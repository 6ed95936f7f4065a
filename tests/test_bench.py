"""python -m bench's pieces on a tiny random Llama: no timing is asserted, only what the numbers
mean.

Oracles: FLOPs counted by hand from the config, transformers + PEFT's own loss and LoRA gradients
on the same weights and batch (every side must do the same work: plain, as train.py runs by
default, and kernels, as train.py --kernels), and the JSON keys the issue asks for.
"""
import json
import types

import pytest
import torch

import data as quotes
import lora
from bench import bench as bench_py
from bench import generation, measure, sides
from llama import until_eos
from machinery import data_files
from tiny import LLAMA3_GQA_TIED, SENTENCES, write_tiny_model

ROWS = [{"quote": s.split(" | tags: ")[0], "tags": s.split(" | tags: ")[1].split(", ")}
        for s in SENTENCES[:5]]
OURS = [pytest.param(True, id="plain"), pytest.param(False, id="kernels")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    folder = write_tiny_model(root / "model", LLAMA3_GQA_TIED)
    data = root / "quotes.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS * 8))
    return folder, data


def args_for(folder, data, *extra):
    args = bench_py.parse_args(["--model", str(folder), "--data", str(data), "--dtype", "float32",
                                "--device", "cpu", "--batch-size", "4", *extra])
    args.target_list = sides.TARGETS
    return args


def first_batch(folder, data):
    train_set, _, tokenizer, _ = data_files.load_dataset(folder, str(data), 256, 0.1, 0)
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
    assert (measure.train_flops(config, lengths, supervised, r, sides.TARGETS)
            == expected == 3393024)


def test_lm_head_adapter_adds_its_flops_at_supervised_positions_only():
    from llama import LlamaConfig
    config = LlamaConfig(vocab_size=100, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=4)
    without = measure.train_flops(config, [5], 3, 2, ["q_proj"])
    with_head = measure.train_flops(config, [5], 3, 2, ["q_proj", "lm_head"])
    assert with_head - without == 3 * 3 * 2 * 2 * (8 + 100)


# ----------------------------------------------------------------------------- the sides agree

@pytest.mark.parametrize("plain", OURS)
def test_ours_and_peft_compute_the_same_loss_and_lora_gradients(setup, plain):
    """Same weights, same batch: the same loss and the same gradient for every A and B (float32),
    on train.py's default path and on its --kernels path."""
    folder, data = setup
    args = args_for(folder, data)
    ours = sides.Ours(args, "cpu", torch.float32, plain=plain)
    assert ours.name == ("plain" if plain else "kernels")
    peft = sides.Peft(args, "cpu", torch.float32, start=sides.adapter_weights(ours.model))
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


def test_plain_and_kernels_sides_give_the_same_loss_and_gradients(setup):
    """speed/kernels.py's hand-written backward passes (the kernels side) against autograd
    differentiating llama.py's formulas (the plain side): the same weights and starting A, B."""
    folder, data = setup
    batch = first_batch(folder, data)
    both = [sides.Ours(args_for(folder, data), "cpu", torch.float32, plain=plain)
            for plain in (True, False)]
    assert isinstance(both[1].model, sides.kernels.Llama)
    assert not isinstance(both[0].model, sides.kernels.Llama)  # llama.py's own, as written
    losses = []
    for side in both:
        side.model.train()
        loss = side.loss_sum(batch)
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    grads = [[p.grad for p in lora.lora_parameters(s.model)] for s in both]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("plain", OURS)
def test_ours_and_peft_generate_the_same_greedy_tags(setup, plain):
    """sample.py's generation (plain: llama.generate; kernels: the packed one) against
    transformers' generate on PEFT's merged model."""
    folder, data = setup
    args = args_for(folder, data)
    ours = sides.Ours(args, "cpu", torch.float32, plain=plain)
    peft = sides.Peft(args, "cpu", torch.float32, start=sides.adapter_weights(ours.model))
    prompts = [[0, 5, 9, 14], [0, 7, 3, 3, 12, 40, 41]]  # different lengths: padding on HF's side
    assert ours.generate(prompts, 6) == peft.generate(prompts, 6)
    no_stop = ours.generate(prompts, 6, ignore_eos=True)
    assert (no_stop == peft.generate(prompts, 6, ignore_eos=True)
            and [len(n) for n in no_stop] == [6, 6])


def test_padding_mask_and_until_eos():
    batch = {"input_tokens": torch.zeros(2, 4, dtype=torch.long), "lengths": torch.tensor([4, 2])}
    assert sides.padding_mask(batch).tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert until_eos([5, 6, 2, 7], [2, 9]) == [5, 6]
    assert until_eos([5, 6], [2]) == [5, 6]


def test_quantile_interpolates():
    assert measure.quantile([4, 1, 3, 2], 0.5) == 2.5
    assert measure.quantile([1, 2, 3, 4, 5], 0.25) == 2


# ----------------------------------------------------------------------------- --sides and ratios

def test_sides_default_to_all_three_and_are_ordered_ours_first():
    assert bench_py.parse_args([]).sides == ["plain", "kernels", "peft"]
    assert bench_py.parse_args(["--sides", "peft, kernels"]).sides == ["kernels", "peft"]
    assert bench_py.parse_args(["--sides", "kernels"]).sides == ["kernels"]


@pytest.mark.parametrize("text", ["peft", "plain,plain", "plain,hf", "", "ours,peft"])
def test_bad_sides_are_refused_naming_the_flag(capsys, text):
    with pytest.raises(SystemExit) as e:
        bench_py.parse_args(["--sides", text])
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"python -m bench: error: argument --sides: {text!r}: a comma list of plain, kernels, "
        "nf4, nf4-dq, peft, each once, with one of ours among them")


def test_the_ratios_are_those_of_the_sides_that_ran():
    """Oracle: the quotients by hand. Steps of 1, 2, 4, 2 ms (plain, kernels, peft, nf4) after one
    warmup step; kernels has no memory figures (a memory child gives both, the training peak and
    the load peak), so its ratios have none; nf4 is held against plain."""
    args = types.SimpleNamespace(warmup=1)
    times = {"plain": [9, 0.001, 0.001], "kernels": [9, 0.002, 0.002], "peft": [9, 0.004, 0.004],
             "nf4": [9, 0.002, 0.002]}
    result = {"plain": {"tokens_per_s": 400.0, "peak_mem_mb": 50.0, "load_peak_mb": 40.0},
              "kernels": {"tokens_per_s": 200.0},
              "peft": {"tokens_per_s": 100.0, "peak_mem_mb": 200.0, "load_peak_mb": 160.0},
              "nf4": {"tokens_per_s": 200.0, "peak_mem_mb": 25.0, "load_peak_mb": 10.0}}
    ratios = bench_py.ratios(result, times, ["plain", "kernels", "peft"], args)
    assert ratios == {
        "plain/peft": {"speedup": 4.0, "speedup_median_step": 4.0, "memory_ratio": 0.25,
                       "load_memory_ratio": 0.25},
        "kernels/peft": {"speedup": 2.0, "speedup_median_step": 2.0, "memory_ratio": None,
                         "load_memory_ratio": None},
        "kernels/plain": {"speedup": 0.5, "speedup_median_step": 0.5, "memory_ratio": None,
                          "load_memory_ratio": None}}
    assert list(bench_py.ratios(result, times, ["kernels", "peft"], args)) == ["kernels/peft"]
    assert bench_py.ratios(result, times, ["kernels"], args) == {}
    assert bench_py.ratios(result, times, ["plain", "nf4"], args) == {
        "nf4/plain": {"speedup": 0.5, "speedup_median_step": 0.5, "memory_ratio": 0.5,
                      "load_memory_ratio": 0.25}}


# ----------------------------------------------------------------------------- the whole run

def test_json_line_has_the_three_sides_their_ratios_and_the_checks_pass(setup, capsys,
                                                                       tmp_path, monkeypatch):
    """A tiny run of all three sides (the default --sides), memory children included: each side's
    numbers, the three ratios (each the quotient of the sides' own numbers), each side's
    generation, and every check passed. Nothing timed is asserted beyond being positive. Run
    from another folder: the memory children (python -m bench) run from the repository's."""
    folder, data = setup
    monkeypatch.chdir(tmp_path)
    code = bench_py.main(["--model", str(folder), "--data", str(data), "--dtype", "float32",
                          "--device", "cpu", "--batch-size", "4", "--steps", "2", "--warmup", "1",
                          "--val-batches", "1", "--mem-batches", "1", "--gen-quotes", "4",
                          "--gen-tokens", "3", "--json"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0, result["checks"]
    assert {"model", "device", "dtype", "batch_size", "plain", "kernels", "peft", "ratios",
            "generate", "checks"} <= set(result)
    for side in ("plain", "kernels", "peft"):
        assert {"tokens_per_s", "step_ms", "peak_mem_mb", "load_peak_mb", "mfu",
                "val_loss"} <= set(result[side])
        assert result[side]["peak_mem_mb"] > 0 and 0 < result[side]["mfu"] < 1
        assert 0 < result[side]["load_peak_mb"]
        assert result["generate"][side]["tokens_per_s"] > 0
    assert set(result["ratios"]) == {"plain/peft", "kernels/peft", "kernels/plain"}
    for pair, r in result["ratios"].items():
        a, b = pair.split("/")
        assert set(r) == {"speedup", "speedup_median_step", "memory_ratio", "load_memory_ratio"}
        assert r["speedup"] == pytest.approx(result[a]["tokens_per_s"] / result[b]["tokens_per_s"])
        assert r["memory_ratio"] == pytest.approx(
            result[a]["peak_mem_mb"] / result[b]["peak_mem_mb"])
        assert r["load_memory_ratio"] == pytest.approx(
            result[a]["load_peak_mb"] / result[b]["load_peak_mb"])
        assert r["speedup_median_step"] > 0
    # plain, the first side, against each other one
    assert set(result["checks"]) == {f"same_{what}_plain_{other}" for other in ("kernels", "peft")
                                     for what in ("first_loss", "training_result", "generations")}
    assert all(check["ok"] for check in result["checks"].values())
    assert result["generate"]["peft"]["same_completions_as_plain"] == "4/4"
    assert result["generate"]["kernels"]["same_first_token_as_plain"] == "4/4"


@pytest.mark.parametrize("plain", OURS)
def test_recompute_gives_the_same_loss_and_gradients(setup, plain):
    """Llama.recompute (activation checkpointing) trades time for memory, never the result. bench
    switches it on in all our sides (--recompute's help says so), plain as well as kernels."""
    folder, data = setup
    batch = first_batch(folder, data)
    grads = []
    for recompute in (False, True):
        side = sides.Ours(args_for(folder, data, *(["--recompute"] if recompute else [])),
                          "cpu", torch.float32, plain=plain)
        assert side.model.recompute == recompute
        side.loss_sum(batch).backward()
        grads.append([p.grad for p in lora.lora_parameters(side.model)])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_compile_takes_an_optional_backend():
    """--compile alone is inductor (what a GPU session measures); --compile eager only traces
    the layers, which the CPU dry run of gpu_check/run.sh uses to check the path in
    seconds."""
    assert bench_py.parse_args([]).compile is None
    assert bench_py.parse_args(["--compile"]).compile == "inductor"
    assert bench_py.parse_args(["--compile", "eager", "--steps", "3"]).compile == "eager"


def test_kernels_side_compiled_with_the_eager_backend_gives_the_same_loss_and_gradients(setup):
    folder, data = setup
    batch = first_batch(folder, data)
    grads, losses = [], []
    for flags in ([], ["--compile", "eager"]):
        side = sides.Ours(args_for(folder, data, *flags), "cpu", torch.float32, plain=False)
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

    monkeypatch.setattr(measure.torch, "randn", randn)
    monkeypatch.setattr(measure, "sync", lambda device: None)
    monkeypatch.setattr(measure, "time",
                        types.SimpleNamespace(perf_counter=lambda: clock[0]))
    assert measure.matmul_peak(device, torch.bfloat16) == pytest.approx(rate)
    assert tried == sizes


def test_generations_agree_asks_whole_completions_in_float32_and_first_tokens_in_16_bit():
    """Greedy completions that part after a near-tie: in float32 half must be identical, in a
    16-bit dtype half must start with the same token."""
    mine = [[1, 2, 3], [4, 5, 6], [7, 8, 9], [1, 1, 1]]
    parted = [[1, 2, 0], [4, 0, 0], [7, 8, 9], [2, 1, 1]]  # 1 identical, 3 same first token
    assert generation.generations_agree(mine, parted, torch.float32) == (False, 1, 3)
    assert generation.generations_agree(mine, parted, torch.bfloat16) == (True, 1, 3)
    assert generation.generations_agree(mine, parted, torch.float16) == (True, 1, 3)
    other = [[9, 2, 3], [9, 5, 6], [7, 8, 9], [2, 1, 1]]  # 1 identical, 1 same first token
    assert generation.generations_agree(mine, other, torch.bfloat16) == (False, 1, 1)
    assert generation.generations_agree(mine, mine, torch.float32) == (True, 4, 4)
