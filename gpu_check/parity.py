"""Our Llama against transformers' on one device in one dtype: the logits of a few quotes.

    python -m gpu_check.parity --model DIR --data quotes.jsonl --device cuda --dtype bfloat16

Four models hold the same weights: transformers' LlamaForCausalLM in float32 (the oracle),
transformers' in DTYPE (its weights in DTYPE, as its users run it), and ours in DTYPE twice (the
frozen base stored in DTYPE, under autocast): as train.py and sample.py run it by default,
llama.py's formulas as written ("ours"), and with the speed chapter ("ours --kernels",
speed/kernels.py on). Each quote (bos, the quote, " | tags:") goes through each model alone,
without padding. For the DTYPE models it reports the largest logit error against the oracle, in
units of DTYPE's eps times the largest logit (tests/devices.py's normwise measure), and how often
their top token is the oracle's. Ours passes (exit 0) when both of its errors are at most twice
transformers' own, or 8 eps: rounding in DTYPE is no worse here than there. A last line holds
the numbers as JSON ("ours", "ours_kernels").
"""
import argparse
import sys
from pathlib import Path

import torch

import data
from machinery import json_out
from machinery.cli import positive
from machinery.rows import read_quotes
from machinery.device import autocast, pick_device
from machinery.hub import resolve_model_dir
from llama import Llama
from speed import kernels


def prompts(model_dir, quotes_file, n):
    """Token ids of n prompts: the first n quotes of the file as sample.py prompts them."""
    tokenizer = data.QuoteTokenizer.from_model_dir(model_dir)
    pairs, _ = read_quotes(quotes_file)
    return [[tokenizer.bos_id] + tokenizer.encode(data.prompt_text(quote))
            for quote, _ in pairs[:n]]


def logits_of(run, ids, device):
    """Each prompt's logits at every position, (sum of lengths, vocab) float32."""
    with torch.no_grad():
        return torch.cat([run(torch.tensor([p], device=device))[0].float() for p in ids])


def compare(got, oracle, dtype):
    error = (got - oracle).abs().max().item() / oracle.abs().max().item()
    same_top = (got.argmax(-1) == oracle.argmax(-1)).float().mean().item()
    return {"error_eps": error / torch.finfo(dtype).eps, "same_top_token": same_top}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m gpu_check.parity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="local HF folder of a Llama model")
    p.add_argument("--data", required=True, help="quotes JSONL file")
    p.add_argument("--device", default="auto", help="auto, cuda, cuda:N, mps or cpu")
    p.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    p.add_argument("--quotes", type=positive(int), default=8, help="prompts to compare")
    args = p.parse_args(argv)
    try:
        device = pick_device(args.device)
    except ValueError as e:
        p.error(str(e))  # one line and exit 2, as every script's
    dtype = getattr(torch, args.dtype)
    from transformers import AutoModelForCausalLM  # the oracle: test and benchmark only

    model_dir = resolve_model_dir(args.model)
    ids = prompts(model_dir, args.data, args.quotes)

    def hf(d):
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=d).to(device).eval()

    oracle_model = hf(torch.float32)
    oracle = logits_of(lambda t: oracle_model(t).logits, ids, device)
    del oracle_model
    theirs_model = hf(dtype)
    theirs = compare(logits_of(lambda t: theirs_model(t).logits, ids, device), oracle, dtype)
    del theirs_model
    rows = {"transformers": theirs}
    for name in ("ours", "ours --kernels"):  # llama.py as written, and with the speed chapter
        ours_model = Llama.from_pretrained(model_dir, dtype=dtype, device=device)
        if name.endswith("--kernels"):
            kernels.use(ours_model)

        def ours_run(tokens):
            with autocast(device, dtype):
                return ours_model(tokens)
        rows[name] = compare(logits_of(ours_run, ids, device), oracle, dtype)
        del ours_model
    ours = rows["ours"]
    ok = all(rows[n]["error_eps"] <= max(2 * theirs["error_eps"], 8)
             for n in ("ours", "ours --kernels"))
    tokens = sum(len(i) for i in ids)
    print(f"{Path(model_dir).name} on {device} in {args.dtype}, {len(ids)} quotes ({tokens} "
          "positions), against transformers in float32:")
    print("| model | largest logit error (eps of the largest logit) | same top token |")
    print("| --- | --- | --- |")
    for name, r in rows.items():
        print(f"| {name} in {args.dtype} | {r['error_eps']:.2f} | {r['same_top_token']:.1%} |")
    print(f"parity {args.dtype}: {'ok' if ok else 'FAILED'} (ours within twice transformers' "
          "error, or 8 eps)")
    print(json_out.dumps({"model": Path(model_dir).name, "device": device, "dtype": args.dtype,
                          "positions": tokens, "transformers": theirs, "ours": ours,
                          "ours_kernels": rows["ours --kernels"], "ok": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
