"""Adapters to other formats: `python -m export --adapter out --format FORMAT --out DIR`.

    peft     PEFT's adapter folder (export/peft.py): peft.PeftModel.from_pretrained reads it
    merged   a Hugging Face model folder with LoRA folded into the weights (export/merged.py)
"""
import argparse
import sys

import torch

import lora
from checkpoint import check_out_dir
from export.merged import export_merged
from export.peft import export_peft, read_any
from llama import Llama


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", required=True, help="train.py's --out folder, "
                   "an adapter .safetensors file, or a PEFT adapter folder")
    p.add_argument("--format", required=True, choices=["peft", "merged"],
                   help="peft: adapter_config.json + adapter_model.safetensors for "
                   "peft.PeftModel; merged: a full HF model folder with LoRA folded "
                   "into the weights")
    p.add_argument("--out", required=True, help="folder to create (must not exist or be empty)")
    p.add_argument("--model", help="base model, hub id or local folder (default: the one "
                   "the adapter records); for peft it only sets base_model_name_or_path")
    return p, p.parse_args(argv)


def main(argv=None):
    parser, args = parse_args(argv)
    try:
        check_out_dir(args.out)  # before loading a 1B model, not after
        if args.format == "peft":
            export_peft(args.adapter, args.out, base_model=args.model)
        else:
            tensors, meta = read_any(args.adapter)
            base = args.model or meta["base_model"]
            if not base:
                raise ValueError(f"{args.adapter} does not record its base model; pass --model")
            # Merge in float32; export_merged saves in the base's dtype.
            model = Llama.from_pretrained(base, dtype=torch.float32)
            lora.load_adapter(model, (tensors, meta))
            export_merged(model, args.out)
    except (ValueError, TypeError, OSError, RuntimeError) as e:
        parser.exit(2, f"python -m export: error: {' '.join(str(e).split())}\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
