"""What merging means for an adapter trained on a 4-bit base: measured.

    python -m qlora.merge_check --adapter out --data quotes.jsonl --n 100

The adapter learned B A against the dequantized W, not the stored one. This writes greedy tags
for the run's held-out quotes three ways and compares them:

    4-bit       what training saw: the NF4 base, the adapter beside it (sample.py --quantize)
    original    merged into the stored weights: W + alpha B A (export --base original)
    dequantized merged into the weights rebuilt from the codes: dequant(W) + alpha B A (export's
                default, --base dequantized)

For each: tag F1 against the true tags, and how many completions equal the 4-bit one's.
"""
import argparse
import json
import sys
from types import SimpleNamespace

import torch

import lora
from data import QuoteTokenizer
from llama import Llama, generate
from machinery import adapters, data_files, scoring
from machinery.checkpoint import run_beside
from qlora.load import dequantize_base, from_pretrained


def greedy(model, prompts, eos_ids, batch_size=16):
    out = []
    for i in range(0, len(prompts), batch_size):
        out += generate(model, prompts[i:i + batch_size], 32, eos_ids=eos_ids)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m qlora.merge_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", required=True, help="train.py --out of a --quantize run")
    p.add_argument("--data", required=True, help="the run's --data")
    p.add_argument("--n", type=int, default=100, help="held-out quotes compared")
    args = p.parse_args(argv)
    tensors, meta = adapters.read(args.adapter)
    quantize, base = meta.get("base_quantize", "none"), meta["base_model"]
    if quantize == "none":
        sys.exit(f"python -m qlora.merge_check: error: {args.adapter}: "
                 "not trained on a 4-bit base")
    run = run_beside(args.adapter)[1]
    split = SimpleNamespace(data=args.data, max_len=run["max_len"], seed=run["seed"],
                            val_fraction=run["val_fraction"], format=run.get("format"),
                            train_on_input=False)
    four_bit = from_pretrained(base, quantize, dtype=torch.bfloat16)
    _, val_set, _, _ = data_files.training_split(four_bit.model_dir, split)
    val_set = val_set[:args.n]
    prompts = [s["input_tokens"][:s["sep_token_index"] + 1] for s in val_set]  # as eval.py
    tokenizer = QuoteTokenizer.from_model_dir(four_bit.model_dir)
    eos = sorted(set(four_bit.config.eos_token_ids) | {tokenizer.eos_id})

    results = {}
    adapters.load(four_bit, (tensors, meta))
    with torch.autocast("cpu", torch.bfloat16):
        results["4-bit"] = greedy(four_bit, prompts, eos)
    del four_bit
    for name in ("original", "dequantized"):
        model = Llama.from_pretrained(base, dtype=torch.float32)
        if name == "dequantized":
            dequantize_base(model, quantize)
        adapters.load(model, (tensors, meta))
        lora.merge_lora(model)
        results[name] = greedy(model.to(torch.bfloat16), prompts, eos)  # export's dtype, bf16
    texts = {k: [tokenizer.decode(c) for c in v] for k, v in results.items()}
    rows = {}
    for name, completions in texts.items():
        f1 = scoring.tag_scores(completions, [s["tags"] for s in val_set])["f1"]
        same = sum(a == b for a, b in zip(results[name], results["4-bit"]))
        rows[name] = {"f1": round(f1, 4), "same_as_4bit": f"{same}/{len(prompts)}"}
        print(f"{name:12} tag F1 {f1:.3f}, completions equal to the 4-bit one's: "
              f"{same}/{len(prompts)}")
    print(json.dumps({"adapter": args.adapter, "quantize": quantize, "n": len(prompts), **rows},
                     allow_nan=False))


if __name__ == "__main__":
    main()
