"""Adapters to other formats: python -m export --adapter out --format FORMAT --out DIR

    peft       PEFT's adapter folder (export/peft.py): peft.PeftModel.from_pretrained reads it
    merged     a Hugging Face model folder, LoRA folded into the weights (export/merged.py);
               --dtype float32 (default), bfloat16 or float16
    gguf       one GGUF file of the merged model and an Ollama Modelfile (export/gguf.py), for
               llama.cpp, Ollama, LM Studio; --type f32 (default), f16, bf16 or q8_0;
               --no-adapter --model M writes the base alone
    lora-gguf  the adapter alone as a GGUF LoRA (export/gguf_lora.py), for llama.cpp's --lora
               and Ollama's ADAPTER, on the base's GGUF; --type f32 (default), f16 or bf16

merged and gguf print how much of alpha * B @ A the chosen type keeps. With --data (a quotes
JSONL file), merged, gguf and lora-gguf also read the written file back and compare its greedy
tags with the adapter's on the first --check held-out quotes (export/check.py).
"""
import argparse
import sys

import torch

import lora
from machinery import adapters
from machinery.checkpoint import run_beside
from machinery.cli import HelpFormatter, positive
from machinery.out_folder import (WriteFailed, check_out_dir, lock_out, release_out_locks,
                                  remove_stale_temps)
from data import QuoteTokenizer
from export.check import agreement, greedy_completions, held_out_prompts
from export.gguf import GGUF_FILE, TYPES, export_gguf, model_from_gguf  # gguf itself: lazily
from export.gguf_lora import (ADAPTER_GGUF, BASE_GGUF, LORA_TYPES, export_lora_gguf,
                              read_lora_gguf)
from export.merged import DEFAULT_DTYPE, DTYPES, describe_lost, export_merged
from export.peft import export_peft, read_any
from llama import Llama

FORMATS = ("peft", "merged", "gguf", "lora-gguf")
CHECK = 8  # held-out quotes compared by default: about a minute for SmolLM2 on a CPU


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__,
                                formatter_class=HelpFormatter)
    add = p.add_argument
    add("--adapter", help="train.py's --out folder, an adapter .safetensors file, "
        "or a PEFT adapter folder")
    add("--no-adapter", action="store_true", help="--format gguf of the base alone "
        "(the base GGUF a lora-gguf export runs on); needs --model")
    add("--format", required=True, choices=FORMATS, help="what to write (see above)")
    add("--out", required=True, help="folder to create (must not exist or be empty)")
    add("--model", help="base model, hub id or local folder (default: the one the adapter "
        "records); for peft it only sets base_model_name_or_path")
    add("--dtype", choices=list(DTYPES), help=f"merged: the weights' dtype "
        f"(default: {DEFAULT_DTYPE}, the one that keeps the update)")
    add("--type", choices=TYPES, help="gguf, lora-gguf: the weights' GGML type "
        f"(default: f32; lora-gguf: {', '.join(LORA_TYPES)})")
    add("--base", choices=["dequantized", "original"], default="dequantized", help="an adapter "
        "trained on a 4-bit base (train.py --quantize): merge into the base it learned against, "
        "W rebuilt from its NF4 codes (dequantized, docs/qlora.md measures why), or into the "
        "stored weights (original); other adapters: the stored weights")
    add("--data", help="quotes JSONL file: compare the export's greedy tags with the "
        "adapter's on held-out quotes (the adapter's run.json gives the split)")
    add("--check", type=positive(int), default=None,
        help=f"how many held-out quotes --data compares (default: {CHECK})")
    args = p.parse_args(argv)
    if bool(args.adapter) == args.no_adapter:
        p.error("pass --adapter DIR, or --no-adapter for the base alone")
    if args.no_adapter and (args.format != "gguf" or not args.model):
        p.error("--no-adapter writes the base as GGUF: it needs --format gguf and --model")
    if args.dtype and args.format != "merged":
        p.error(f"--dtype is for --format merged; --format {args.format} takes "
                f"{'--type' if 'gguf' in args.format else 'no dtype'}")
    if args.type and "gguf" not in args.format:
        p.error(f"--type is for --format gguf and lora-gguf, not {args.format}")
    if args.format == "lora-gguf" and args.type not in (None, *LORA_TYPES):
        p.error(f"--format lora-gguf stores A and B as {', '.join(LORA_TYPES)}: --type "
                f"{args.type} packs rows by 32 numbers, and B's rows are r long")
    if (args.data or args.check) and args.format == "peft":
        p.error("--data and --check compare completions of merged, gguf and lora-gguf exports; "
                "peft writes the adapter unchanged")
    if args.check and not args.data:
        p.error("--check needs --data, the quotes file its held-out prompts come from")
    return p, args


def load_model(args):
    """The base in float32 with the adapter in, not merged (or without one: --no-adapter)."""
    if args.no_adapter:
        return Llama.from_pretrained(args.model, dtype=torch.float32)
    tensors, meta = read_any(args.adapter)
    base = args.model or meta["base_model"]
    if not base:
        raise ValueError(f"{args.adapter} does not record its base model; pass --model")
    # Merge in float32 whatever the base's dtype: the exports round once, into their own type.
    model = Llama.from_pretrained(base, dtype=torch.float32)
    quantize = meta.get("base_quantize", "none")
    if quantize != "none" and args.base == "dequantized":
        from qlora.load import dequantize_base  # the qlora chapter, for its adapters only
        dequantize_base(model, quantize)
        print(f"merging into the base the adapter learned against: its {quantize} weights, "
              "dequantized (--base original: the stored ones)", file=sys.stderr)
    adapters.load(model, (tensors, meta))
    return model


def write(model, args):
    """Write the export; returns the path whose completions check() compares."""
    if args.format == "merged":
        dtype = args.dtype or DEFAULT_DTYPE
        print(describe_lost(export_merged(model, args.out, dtype), dtype))
        return args.out
    if args.format == "gguf":
        weight_type = args.type or "f32"
        lost = export_gguf(model, args.out, weight_type)
        if not args.no_adapter:
            print(describe_lost(lost, weight_type))
        return f"{args.out}/{GGUF_FILE}"
    export_lora_gguf(model, args.out, args.type or "f32")
    print(f"the Modelfile runs it on {args.out}/{BASE_GGUF}, the base as GGUF: "
          f"python -m export --no-adapter --model {model.name_or_path} --format gguf --out DIR, "
          f"then copy DIR/model.gguf there")
    return f"{args.out}/{ADAPTER_GGUF}"


def read_back(path, args, model):
    """What the project reads from the written file: a float32 Llama to generate with."""
    if args.format == "merged":
        return Llama.from_pretrained(path, dtype=torch.float32)
    if args.format == "gguf":
        return model_from_gguf(path, model.model_dir)
    fresh = Llama.from_pretrained(model.model_dir, dtype=torch.float32)
    adapters.load(fresh, read_lora_gguf(path, fresh.config))
    return fresh


def check(model, path, args, prompts):
    """Print whether the export's greedy tags equal the adapter's on the held-out prompts."""
    if not prompts:
        print("greedy tags not compared: pass --data quotes.jsonl to compare the export's with "
              "the adapter's on held-out quotes")
        return
    tokenizer = QuoteTokenizer.from_model_dir(model.model_dir)
    expected = greedy_completions(model, tokenizer, prompts)
    got = greedy_completions(read_back(path, args, model), tokenizer, prompts)
    source = "the base's" if args.no_adapter else "the adapter's (unmerged, float32)"
    print(f"greedy tags of {len(prompts)} held-out quotes: the export's equal {source} on "
          f"{agreement(expected, got)}")


def main(argv=None):
    parser, args = parse_args(argv)
    written = False  # for Ctrl-C's line
    try:
        check_out_dir(args.out)  # before loading a 1B model, not after
        lock_out(args.out, "python -m export")  # one export at a time into --out
        remove_stale_temps(args.out, "python -m export")  # what a killed export left beside it
        if args.format == "peft":
            export_peft(args.adapter, args.out, base_model=args.model)
            print(f"wrote {args.out}")
            return 0
        model = load_model(args)
        prompts = []  # read before writing: a --data mistake costs no export
        if args.data:
            run = run_beside(args.adapter)[1] if args.adapter else {}
            prompts = held_out_prompts(model.model_dir, args.data, args.check or CHECK, run)
        path = write(model, args)
        written = True
        print(f"wrote {args.out}")
        check(model, path, args, prompts)
    except KeyboardInterrupt:  # write_atomic has removed its temp folder
        print(f"python -m export: interrupted; {args.out} "
              + ("is written whole" if written else "was not written"), file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, RuntimeError, ImportError) as e:
        # a full disk is a failure (exit 1), not bad input
        parser.exit(1 if isinstance(e, WriteFailed) else 2,
                    f"python -m export: error: {' '.join(str(e).split())}\n")
    finally:
        release_out_locks()
    return 0


if __name__ == "__main__":
    sys.exit(main())
