"""Time the LoRA training step (and generation), ours beside transformers + PEFT on the same job.

    python bench.py --model HuggingFaceTB/SmolLM2-135M-Instruct --data data.jsonl --peft --json

A step is what train.py does once: forward, the cross-entropy after the separator, backward, AdamW.
With --peft the same step runs in transformers + PEFT: the same weights, LoRA targets, rank, alpha,
starting A and B, dtype and batches. The two sides alternate step by step in one process, so a busy
machine slows both alike; medians of many steps shrug off the odd slow one. Peak memory is measured
in a fresh process per side, running the largest of the same batches, so neither side pays for
the other's model. MFU is the useful work (matrix products a LoRA step needs, see train_flops) per
second over the best matmul speed measured in this very run on the same device and dtype.
Before any number counts, the two sides must agree: the same loss on the first batch, and a
validation loss after the timed steps within noise of each other (the checks at the end). The two
sides and their step live in bench_sides.py, the FLOP count, matmul peak, peak memory and step
statistics in bench_measure.py; this file times, measures and reports.
"""
import argparse
import gc
import json
import os
import subprocess
import sys
import time

import torch

import data
import export
import lora
from bench_measure import (matmul_peak, peak_memory_mb, quantile, reset_peak_memory, summarize,
                           train_flops)
from bench_sides import (TARGETS, Ours, Peft, adapter_weights, copy_adapter, train_step,
                         validation_loss)
from common import HelpFormatter, autocast, dtype_choice, pick_device, positive, seed, sync
from hub import resolve_model_dir

def count(text):
    """A whole number, 0 included: --warmup, --val-batches, --mem-batches."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number (0, 1, 2, ...)")
    return int(text)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct",
                   help="hub repo id or local HF folder")
    p.add_argument("--data", default=data.DEFAULT_DATASET,
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
    p.add_argument("--lr", type=positive(float), default=1e-3, help="AdamW learning rate")
    p.add_argument("--targets", default=",".join(TARGETS),
                   help="comma list of Linear names to adapt")
    p.add_argument("--max-len", type=positive(int), default=256,
                   help="as train.py: longer quotes are cut")
    p.add_argument("--seed", type=seed, default=0,
                   help="seeds LoRA init, the split and the batches")
    p.add_argument("--peft", action="store_true",
                   help="also run transformers + PEFT and print the ratios")
    p.add_argument("--plain", action="store_true",
                   help="also run our model without kernels.py's hand-written backward passes "
                        "(the plain path)")
    p.add_argument("--recompute", action="store_true",
                   help="activation checkpointing in our model (Llama.recompute): less memory, "
                        "one more forward")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile our decoder layers (compile time reported); BACKEND "
                        "'eager' only traces them, in seconds, to check the path (default "
                        "inductor)")
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
    p.add_argument("--memory-of", choices=["ours", "plain", "peft"], help=argparse.SUPPRESS)
    p.add_argument("--batch-ids", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- peak memory

def memory_child(args, device, dtype, train_batches):
    """Run in a fresh process: load one side, then the given batches; print its peaks as JSON."""
    if args.memory_of == "peft":
        side = Peft(args, device, dtype)
    else:
        side = Ours(args, device, dtype, plain=args.memory_of == "plain")
    load_peak = peak_memory_mb(device)
    reset_peak_memory(device)
    for i in map(int, args.batch_ids.split(",")):
        train_step(side, to(train_batches[i], device), device, dtype)
    print(json.dumps({"peak_mem_mb": peak_memory_mb(device), "load_peak_mb": load_peak}))


def measure_memory(args, which, batch_ids):
    """Peak memory of one side in its own process (a shared process would count both models)."""
    argv = [a for a in args.argv if a not in ("--peft", "--plain", "--json", "--profile")]
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--memory-of", which,
           "--batch-ids", ",".join(map(str, batch_ids))]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"memory run of {which} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- generation

def time_generation(sides, prompts, args, device, dtype):
    """Greedy tags for held-out quotes, batched like sample.py (sorted by length). Sides alternate
    batch by batch. Returns {side: (new tokens, seconds, completions)}."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    chunks = [order[i:i + args.gen_batch_size] for i in range(0, len(order), args.gen_batch_size)]
    stats = {s.name: [0, 0.0, [None] * len(prompts)] for s in sides}
    for s in sides:  # one untimed batch each: first-call costs are not generation speed
        with autocast(device, dtype):
            s.generate([prompts[i] for i in chunks[0]], 2, args.gen_ignore_eos)
    for k, chunk in enumerate(chunks):
        for s in sides if k % 2 == 0 else sides[::-1]:
            sync(device)
            t0 = time.perf_counter()
            with autocast(device, dtype):
                new = s.generate([prompts[i] for i in chunk], args.gen_tokens, args.gen_ignore_eos)
            sync(device)
            stats[s.name][1] += time.perf_counter() - t0
            stats[s.name][0] += sum(len(ids) for ids in new)
            for i, ids in zip(chunk, new):
                stats[s.name][2][i] = ids
    return stats


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
    train_set, val_set, tokenizer, _ = data.load_dataset(model_dir, args.data, args.max_len, 0.1,
                                                         args.seed)
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
    names = ["ours"] + ["plain"] * args.plain + ["peft"] * args.peft
    largest = sorted(range(len(train_batches)),
                     key=lambda i: -train_batches[i]["input_tokens"].numel())
    memory = {}
    for name in names if args.mem_batches > 0 else []:
        log(f"peak memory of {name}: a fresh process ...")
        memory[name] = measure_memory(args, name, sorted(largest[:args.mem_batches]))
        log(f"peak memory of {name}: {memory[name]['peak_mem_mb']:,.0f} MB")

    ours = Ours(args, device, dtype)
    sides = [ours]
    if args.plain:
        sides.append(Ours(args, device, dtype, plain=True))
    if args.peft:
        sides.append(Peft(args, device, dtype, start=adapter_weights(ours.model)))
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
        # The plain side has no generation of its own: let it go before the others merge.
        generating = [s for s in sides if s.name != "plain"]
        del sides[1:]
        gc.collect()
        bench_generation(generating, prompts, args, device, dtype, result)
        log("example: " + tokenizer.decode(prompts[0]) + "|"
            + tokenizer.decode(result.pop("_example")))

    result["speedup"] = result["memory_ratio"] = None
    if args.peft:
        result["speedup"] = result["ours"]["tokens_per_s"] / result["peft"]["tokens_per_s"]
        if args.mem_batches > 0:
            result["memory_ratio"] = result["ours"]["peak_mem_mb"] / result["peft"]["peak_mem_mb"]
        ratios = [p / o for o, p in zip(times["ours"][args.warmup:], times["peft"][args.warmup:])]
        result["speedup_median_step"] = quantile(ratios, 0.5)
    else:
        result["peft"] = None
    if args.plain:
        result["speedup_over_plain"] = (result["ours"]["tokens_per_s"]
                                        / result["plain"]["tokens_per_s"])
    report(result, names)
    if args.json:
        print(json.dumps(result))
    return 0 if all(c["ok"] for c in result["checks"].values()) else 1


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
    result["compile_s"] = times["ours"][0] if args.compile else None  # the first step compiles
    for s in sides:
        result[s.name] = summarize(times[s.name][args.warmup:], tokens, flops, peak)
    return times, losses


def check_training(sides, losses, result):
    """Ours against each other side. The same weights and batch: the first loss agrees to bf16
    rounding. After that the runs drift apart step by step (rounding differs); 2% of the validation
    loss is several times the drift seen between correct implementations, far below a wrong
    gradient's."""
    ours = result["ours"]["val_loss"]
    for other in [s.name for s in sides[1:]]:
        theirs = result[other]["val_loss"]
        check(f"same_first_loss_{other}",
              abs(losses["ours"][0] - losses[other][0]) <= 0.01 * losses[other][0],
              f"first-batch loss ours {losses['ours'][0]:.4f}, {other} {losses[other][0]:.4f}",
              result["checks"])
        check(f"same_training_result_{other}", abs(ours - theirs) <= 0.02 * theirs,
              f"validation loss after {len(losses['ours'])} steps: "
              f"ours {ours:.4f}, {other} {theirs:.4f}",
              result["checks"])


def bench_generation(sides, prompts, args, device, dtype, result):
    """Greedy tags with the trained weights (or --adapter's), the same on both sides."""
    ours = sides[0]
    if args.adapter:
        export.load_adapter(ours.model, args.adapter)
    if args.peft:
        from peft.tuners.lora import LoraLayer
        copy_adapter(adapter_weights(ours.model), sides[1].model)
        alpha = next(iter(lora.lora_modules(ours.model).values())).alpha
        for m in sides[1].model.modules():
            if isinstance(m, LoraLayer):
                m.scaling["default"] = alpha  # PEFT's scale, lora_alpha / r, is our alpha
    gen = time_generation(sides, prompts, args, device, dtype)
    g = result["generate"] = {"ours_tokens_per_s": gen["ours"][0] / gen["ours"][1],
                              "hf_tokens_per_s": None, "speedup": None}
    result["_example"] = gen["ours"][2][0]
    if args.peft:
        g["hf_tokens_per_s"] = gen["peft"][0] / gen["peft"][1]
        g["speedup"] = g["ours_tokens_per_s"] / g["hf_tokens_per_s"]
        same = sum(a == b for a, b in zip(gen["ours"][2], gen["peft"][2]))
        g["same_completions"] = f"{same}/{len(prompts)}"
        # greedy decoding in bf16 may flip a near-tie and diverge; most rows must still agree
        check("same_generations", same >= 0.5 * len(prompts),
              f"{same}/{len(prompts)} completions identical", result["checks"])


def report(result, names):
    print(f"{result['model']} | {result['device']} {result['dtype']} | "
          f"batch {result['batch_size']} | {result['steps']} timed steps | "
          f"matmul peak {result['matmul_peak_tflops'] * 1000:.0f} GFLOP/s")
    print(f"{'':6} {'tokens/s':>9} {'step ms (p25-p75)':>22} {'peak MB':>9} {'MFU':>6} "
          f"{'val loss':>9}")
    for name in names:
        r = result[name]
        spread = f"{r['step_ms']:.0f} ({r['step_ms_p25']:.0f}-{r['step_ms_p75']:.0f})"
        mem = f"{r['peak_mem_mb']:9.0f}" if "peak_mem_mb" in r else f"{'-':>9}"
        print(f"{name:6} {r['tokens_per_s']:9.1f} {spread:>22} {mem} {r['mfu']:6.1%} "
              f"{r['val_loss']:9.4f}")
    if result["speedup"] is not None:
        memory = (f", memory ratio {result['memory_ratio']:.2f}"
                  if result["memory_ratio"] is not None else "")
        print(f"speedup {result['speedup']:.2f}x "
              f"(median per step {result['speedup_median_step']:.2f}x){memory}")
    if "speedup_over_plain" in result:
        print(f"ours over the plain path (no kernels.py): {result['speedup_over_plain']:.2f}x")
    g = result.get("generate")
    if g:
        hf = (f", transformers {g['hf_tokens_per_s']:.1f} tokens/s, speedup {g['speedup']:.2f}x"
              if g["speedup"] else "")
        print(f"generate: ours {g['ours_tokens_per_s']:.1f} tokens/s{hf}")
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
        print(f"bench.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
