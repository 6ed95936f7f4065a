"""Time the LoRA training step (and generation), ours beside transformers + PEFT on the same job.

    python -m bench --model HuggingFaceTB/SmolLM2-135M-Instruct --data data.jsonl --json

A step is what train.py does once: forward, the cross-entropy after the separator, backward, AdamW.
The sides (--sides): "plain", train.py's default (llama.py and lora.py as written); "kernels",
train.py --kernels (the speed chapter); "nf4" and "nf4-dq", train.py --quantize (the qlora
chapter: the base in 4 bits); and "peft", transformers + PEFT, with the same
weights, LoRA targets, rank, alpha, starting A and B, dtype and batches. The sides take turns step
by step in one process, so a busy machine slows all alike; medians of many steps shrug off the odd
slow one. Peak memory is measured
in a fresh process per side, running the largest of the same batches, so neither side pays for
the other's model. MFU is the useful work (matrix products a LoRA step needs, see train_flops) per
second over the best matmul speed measured in this very run on the same device and dtype.
Before any number counts, the two sides must agree: the same loss on the first batch, and a
validation loss after the timed steps within noise of each other (the checks at the end). The two
sides and their step live in bench/sides.py, the FLOP count, matmul peak, peak memory and step
statistics in bench/measure.py, the timed generation in bench/generation.py; this file times,
measures and reports.
"""
import argparse
import json
import os
import subprocess
import sys

import torch

import data
import lora
from bench.generation import generations_agree, time_generation
from bench.measure import (matmul_peak, peak_memory_mb, quantile, reset_peak_memory, summarize,
                           train_flops)
from bench.sides import (TARGETS, Ours, Peft, adapter_weights, copy_adapter, train_step,
                         validation_loss)
from machinery import adapters, data_files, json_out
from machinery.cli import LR, HelpFormatter, positive, seed
from machinery.device import dtype_choice, pick_device
from machinery.hub import resolve_model_dir

SIDES = ("plain", "kernels", "nf4", "nf4-dq", "peft")
QUANTIZED = ("nf4", "nf4-dq")

def count(text):
    """A whole number, 0 included: --warmup, --val-batches, --mem-batches."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number (0, 1, 2, ...)")
    return int(text)


def sides(text):
    """--sides: a comma list of plain, kernels, nf4, nf4-dq and peft, each once, at least one of
    ours."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in SIDES]
    if bad or not names or len(set(names)) < len(names) or names == ["peft"]:
        raise argparse.ArgumentTypeError(f"{text!r}: a comma list of {', '.join(SIDES)}, each "
                                         "once, with one of ours among them")
    return sorted(names, key=SIDES.index)  # ours first: the sides the others are held against


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct",
                   help="hub repo id or local HF folder")
    p.add_argument("--data", default=data_files.DEFAULT_DATASET,
                   help="hub dataset id or local quotes JSONL file")
    p.add_argument("--device", default="auto", help="auto, cuda, cuda:N, mps or cpu")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
                   help="compute dtype: the frozen base is stored in it and autocast runs in it "
                        "(float16 with train.py's loss scaling); auto as train.py")
    p.add_argument("--batch-size", type=positive(int), default=8, help="quotes per step")
    p.add_argument("--steps", type=positive(int), default=20, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=count, default=2,
                   help="untimed steps first (allocator, oneDNN kernels)")
    p.add_argument("--r", type=positive(int), default=8, help="LoRA rank")
    p.add_argument("--alpha", type=positive(float), default=0.125,
                   help="our alpha; PEFT's lora_alpha is alpha * r")
    p.add_argument("--lr", type=positive(float), default=LR,
                   help="AdamW learning rate (train.py's)")
    p.add_argument("--targets", default=",".join(TARGETS),
                   help="comma list of Linear names to adapt")
    p.add_argument("--max-len", type=positive(int), default=256,
                   help="as train.py: longer quotes are cut")
    p.add_argument("--seed", type=seed, default=0,
                   help="seeds LoRA init, the split and the batches")
    p.add_argument("--sides", type=sides, default=["plain", "kernels", "peft"],
                   help="comma list of plain (train.py's default), kernels (train.py --kernels), "
                   "nf4 and nf4-dq (train.py --quantize) and peft (transformers + PEFT); ratios "
                   "divide by peft, and by plain (default: plain,kernels,peft)")
    p.add_argument("--recompute", action="store_true",
                   help="activation checkpointing in our sides (Llama.recompute): less "
                   "memory, one more forward")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the kernels side's decoder layers (compile time "
                   "reported); BACKEND 'eager' only traces them, in seconds, to check the path "
                   "(default inductor)")
    p.add_argument("--threads", type=positive(int), default=None,
                   help="torch.set_num_threads (default: torch's)")
    p.add_argument("--val-batches", type=count, default=4,
                   help="validation batches for the training-result check")
    p.add_argument("--mem-batches", type=count, default=3,
                   help="largest timed batches run again for peak memory (0: skip)")
    p.add_argument("--gen-quotes", type=int, default=32,
                   help="held-out quotes to write tags for (0: skip)")
    p.add_argument("--gen-tokens", type=positive(int), default=32, help="max new tokens per quote")
    p.add_argument("--gen-batch-size", type=positive(int), default=16,
                   help="prompts per generate call")
    p.add_argument("--gen-ignore-eos", action="store_true",
                   help="always write --gen-tokens tokens "
                        "(a model with random weights stops at once or never)")
    p.add_argument("--adapter", default=None,
                   help="generate with this trained adapter (train.py --out; same --targets and "
                        "--r) instead of the few steps trained here, so completions are real tags "
                        "that end with eos")
    p.add_argument("--profile", action="store_true",
                   help="print torch.profiler's top operators of each side")
    p.add_argument("--json", action="store_true", help="make the last line one JSON object")
    # the child processes
    p.add_argument("--memory-of", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--batch-ids", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- peak memory

def memory_child(args, device, dtype, train_batches):
    """Run in a fresh process: load one side, then the given batches; print its peaks as JSON."""
    if args.memory_of == "peft":
        side = Peft(args, device, dtype)
    else:
        side = make_ours(args, args.memory_of, device, dtype)
    # On the CPU a checkpoint's tensors may stay mapped from the file, counted in memory only
    # once read: read every weight once, so that the load peak counts the whole model.
    with torch.no_grad():
        for t in [*side.model.parameters(), *side.model.buffers()]:
            t.sum()  # reads every element, allocates one number
    load_peak = peak_memory_mb(device)
    reset_peak_memory(device)
    for i in map(int, args.batch_ids.split(",")):
        train_step(side, to(train_batches[i], device), device, dtype)
    print(json_out.dumps({"peak_mem_mb": peak_memory_mb(device), "load_peak_mb": load_peak}))


def make_ours(args, name, device, dtype):
    """One of our sides: plain, kernels, nf4 or nf4-dq (plain formulas on a 4-bit base)."""
    quantize = name if name in QUANTIZED else None
    return Ours(args, device, dtype, plain=name != "kernels", quantize=quantize)


def measure_memory(args, which, batch_ids):
    """Peak memory of one side in its own process (a shared process would count both models)."""
    argv = [a for a in args.argv if a not in ("--json", "--profile")]
    cmd = [sys.executable, "-m", "bench", *argv, "--memory-of", which,
           "--batch-ids", ",".join(map(str, batch_ids))]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where -m finds bench
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=root)
    if done.returncode != 0:
        raise RuntimeError(f"memory run of {which} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- the run

def to(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


def check(name, ok, detail, checks):
    checks[name] = {"ok": bool(ok), "detail": detail}
    print(f"check {name}: {'ok' if ok else 'FAILED'} ({detail})", file=sys.stderr)


def log(*parts):
    print(*parts, file=sys.stderr, flush=True)


def bench(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    dtype, why = dtype_choice(args.dtype, device)
    args.target_list = [t.strip() for t in args.targets.split(",") if t.strip()]
    model_dir = resolve_model_dir(args.model)
    train_set, val_set, tokenizer, _ = data_files.load_dataset(model_dir, args.data,
                                                               args.max_len, 0.1, args.seed)
    all_batches = data.batches(train_set, args.batch_size, tokenizer.eos_id, seed=args.seed,
                               epoch=0)
    train_batches = [b for _, b in zip(range(args.warmup + args.steps), all_batches)]
    if len(train_batches) < args.warmup + args.steps:
        raise ValueError(f"{args.data}: {len(train_batches)} batches of {args.batch_size} quotes, "
                         f"fewer than --warmup {args.warmup} + --steps {args.steps}")
    if args.memory_of:
        return memory_child(args, device, dtype, train_batches)

    # Peak memory first, each side in a fresh process of its own, while this one holds no model:
    # three float32 copies of Llama-3.2-1B here (15 GB) would leave a child no room.
    names = args.sides
    largest = sorted(range(len(train_batches)),
                     key=lambda i: -train_batches[i]["input_tokens"].numel())
    memory = {}
    for name in names if args.mem_batches > 0 else []:
        log(f"peak memory of {name}: a fresh process ...")
        memory[name] = measure_memory(args, name, sorted(largest[:args.mem_batches]))
        log(f"peak memory of {name}: {memory[name]['peak_mem_mb']:,.0f} MB")

    sides = [make_ours(args, name, device, dtype) for name in names if name != "peft"]
    if "peft" in names:
        sides.append(Peft(args, device, dtype, start=adapter_weights(sides[0].model)))
    log(f"{args.model}: {args.steps} timed steps of {args.batch_size} quotes, "
        f"{device} {str(dtype)[6:]} ({why}), LoRA r={args.r} on {','.join(args.target_list)}; "
        f"sides: {', '.join(s.name for s in sides)}")
    result = {"model": args.model, "device": device, "dtype": str(dtype).removeprefix("torch."),
              "dtype_reason": why,
              "batch_size": args.batch_size, "steps": args.steps, "checks": {}}
    times, losses = time_training(sides, train_batches, args, device, dtype, result)
    if args.profile:
        profile(sides, [to(b, device) for b in train_batches[:3]], device, dtype)
    val_batches = [to(b, device) for _, b in zip(range(args.val_batches),
                                                 data.batches(val_set, args.batch_size,
                                                              tokenizer.eos_id, shuffle=False))]
    for s in sides:
        result[s.name]["val_loss"] = validation_loss(s, val_batches, device, dtype)
    check_training(sides, losses, result)

    for s in sides:
        result[s.name].update(memory.get(s.name, {}))

    if args.gen_quotes > 0:
        prompts = [s["input_tokens"][:s["sep_token_index"] + 1] for s in val_set[:args.gen_quotes]]
        bench_generation(sides, prompts, args, device, dtype, result)
        log("example: " + tokenizer.decode(prompts[0]) + "|"
            + tokenizer.decode(result.pop("_example")))

    result["ratios"] = ratios(result, times, names, args)
    report(result, names)
    if args.json:
        print(json_out.dumps(result))  # strict JSON: a time not finite is null, with a reason
    return 0 if all(c["ok"] for c in result["checks"].values()) else 1


def ratios(result, times, names, args):
    """{"plain/peft": ..., "kernels/peft": ..., "kernels/plain": ...} for the sides that ran: the
    tokens/s ratio, the median of the per-step time ratios, and the peak memory ratio."""
    out = {}
    pairs = [("plain", "peft"), ("kernels", "peft"), ("kernels", "plain"),
             ("nf4", "plain"), ("nf4-dq", "plain")]
    for a, b in pairs:
        if a not in names or b not in names:
            continue
        per_step = [tb / ta for ta, tb in zip(times[a][args.warmup:], times[b][args.warmup:])]
        memory = load = None
        if "peak_mem_mb" in result[a] and "peak_mem_mb" in result[b]:
            memory = result[a]["peak_mem_mb"] / result[b]["peak_mem_mb"]
            load = result[a]["load_peak_mb"] / result[b]["load_peak_mb"]
        out[f"{a}/{b}"] = {"speedup": result[a]["tokens_per_s"] / result[b]["tokens_per_s"],
                           "speedup_median_step": quantile(per_step, 0.5),
                           "memory_ratio": memory, "load_memory_ratio": load}
    return out


def time_training(sides, train_batches, args, device, dtype, result):
    """Every batch through every side, the order alternating; the warmup steps are not counted.
    Fills result[side] with the summary; returns each side's step times and losses."""
    peak = matmul_peak(device, dtype)
    times, losses = {s.name: [] for s in sides}, {s.name: [] for s in sides}
    tokens, flops, config = [], [], sides[0].model.config
    for i, batch in enumerate(train_batches):
        batch = to(batch, device)
        for s in sides if i % 2 == 0 else sides[::-1]:
            loss, seconds = train_step(s, batch, device, dtype)
            times[s.name].append(seconds)
            losses[s.name].append(loss)
        if i >= args.warmup:
            tokens.append(int(batch["lengths"].sum()))
            flops.append(train_flops(config, batch["lengths"].tolist(),
                                     data.count_supervised(batch), args.r, args.target_list))
        log(f"step {i + 1}/{len(train_batches)} T={batch['input_tokens'].shape[1]} " +
            " ".join(f"{s.name} {times[s.name][-1] * 1000:.0f} ms loss {losses[s.name][-1]:.4f}"
                     for s in sides))
    peak = max(peak, matmul_peak(device, dtype))  # before and after: the better of two tries
    result["matmul_peak_tflops"] = peak / 1e12
    result["compile"] = args.compile  # the backend, or None
    result["compile_s"] = times["kernels"][0] if args.compile and "kernels" in times else None
    for s in sides:
        result[s.name] = summarize(times[s.name][args.warmup:], tokens, flops, peak)
    return times, losses


def check_training(sides, losses, result):
    """The first side against each other one. The same weights and batch: the first loss agrees
    to bf16 rounding. After that the runs drift apart step by step (rounding differs); 2% of the
    validation loss is several times the drift seen between correct implementations, far below a
    wrong gradient's."""
    first = sides[0].name
    mine = result[first]["val_loss"]
    for other in [s.name for s in sides[1:]]:
        theirs = result[other]["val_loss"]
        # A 4-bit base is another model: NF4 rounds every weight (SmolLM2's first loss: +4%).
        first_tol, val_tol = (0.10, 0.10) if other in QUANTIZED else (0.01, 0.02)
        check(f"same_first_loss_{first}_{other}",
              abs(losses[first][0] - losses[other][0]) <= first_tol * losses[other][0],
              f"first-batch loss {first} {losses[first][0]:.4f}, {other} "
              f"{losses[other][0]:.4f}", result["checks"])
        check(f"same_training_result_{first}_{other}", abs(mine - theirs) <= val_tol * theirs,
              f"validation loss after {len(losses[first])} steps: "
              f"{first} {mine:.4f}, {other} {theirs:.4f}", result["checks"])


def bench_generation(sides, prompts, args, device, dtype, result):
    """Greedy tags with the first side's trained weights (or --adapter's), the same on every
    side: sample.py's way (plain: llama.generate; kernels: the packed one), and transformers'."""
    first = sides[0]
    if args.adapter:
        adapters.load(first.model, args.adapter)
    weights = adapter_weights(first.model)
    alpha = next(iter(lora.lora_modules(first.model).values())).alpha
    for side in sides[1:]:
        if side.name == "peft":
            from peft.tuners.lora import LoraLayer
            copy_adapter(weights, side.model)
            for m in side.model.modules():
                if isinstance(m, LoraLayer):
                    m.scaling["default"] = alpha  # PEFT's scale, lora_alpha / r, is our alpha
        else:
            adapters.load(side.model, ({f"{n}.lora_module.{i}.weight": t[i]
                                            for n, t in weights.items() for i in (0, 1)},
                                           {"r": args.r, "alpha": alpha, "base_config": {},
                                            "base_model": "", "init": "random"}))
    gen = time_generation(sides, prompts, args, device, dtype)
    g = result["generate"] = {name: {"tokens_per_s": n / seconds}
                              for name, (n, seconds, _) in gen.items()}
    result["_example"] = gen[first.name][2][0]
    n = len(prompts)
    for side in sides[1:]:
        ok, same, same_first = generations_agree(gen[first.name][2], gen[side.name][2], dtype)
        g[side.name]["same_completions_as_" + first.name] = f"{same}/{n}"
        g[side.name]["same_first_token_as_" + first.name] = f"{same_first}/{n}"
        g[side.name]["speedup_of_" + first.name] = (g[first.name]["tokens_per_s"]
                                                    / g[side.name]["tokens_per_s"])
        if side.name in QUANTIZED:  # another model (4-bit W): its own tags, counted, not held
            continue
        check(f"same_generations_{first.name}_{side.name}", ok,
              f"{same}/{n} completions identical, {same_first}/{n} same first token",
              result["checks"])


def report(result, names):
    print(f"{result['model']} | {result['device']} {result['dtype']} | "
          f"batch {result['batch_size']} | {result['steps']} timed steps | "
          f"matmul peak {result['matmul_peak_tflops'] * 1000:.0f} GFLOP/s")
    print(f"{'':8} {'tokens/s':>9} {'step ms (p25-p75)':>22} {'peak MB':>9} {'MFU':>6} "
          f"{'val loss':>9}")
    for name in names:
        r = result[name]
        spread = f"{r['step_ms']:.0f} ({r['step_ms_p25']:.0f}-{r['step_ms_p75']:.0f})"
        mem = f"{r['peak_mem_mb']:9.0f}" if "peak_mem_mb" in r else f"{'-':>9}"
        print(f"{name:8} {r['tokens_per_s']:9.1f} {spread:>22} {mem} {r['mfu']:6.1%} "
              f"{r['val_loss']:9.4f}")
    for pair, r in result["ratios"].items():
        memory = (f", memory {r['memory_ratio']:.2f}x (load {r['load_memory_ratio']:.2f}x)"
                  if r["memory_ratio"] is not None else "")
        print(f"{pair}: speed {r['speedup']:.2f}x (median per step "
              f"{r['speedup_median_step']:.2f}x){memory}")
    for name, g in result.get("generate", {}).items():
        print(f"generate {name}: {g['tokens_per_s']:.1f} tokens/s"
              + "".join(f", {k} {v}" for k, v in g.items() if k.startswith("same")))
    if result["compile_s"] is not None:
        print(f"compile: first step {result['compile_s']:.1f} s")


def profile(sides, batches, device, dtype):
    from torch.profiler import ProfilerActivity, profile as torch_profile
    for s in sides:
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for batch in batches:
                train_step(s, batch, device, dtype)
        print(f"--- {s.name}: top operators by self CPU time over {len(batches)} steps")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))


def main(argv=None):
    args = parse_args(argv)
    # for the memory runs' child processes
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return bench(args)
    except (ValueError, TypeError, OSError) as e:
        print(f"python -m bench: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
