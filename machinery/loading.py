"""The model sample.py and eval.py run: the base from --model or the adapter's metadata, the
adapter checked and put in, attention as --attention asks.
"""
import sys
from pathlib import Path

from data import QuoteTokenizer
from llama import DEFAULT_MODEL, Llama
from machinery import adapters
from machinery.checkpoint import run_beside
from machinery.cli import DEFAULT_OUT, set_attention


def pick(args):
    """The adapter to load, or None. Without --adapter: train.py's default output, if there."""
    if args.no_adapter:
        return None
    if args.adapter:
        return args.adapter
    if (Path(DEFAULT_OUT) / adapters.ADAPTER_FILE).is_file():
        print(f"using the adapter in {DEFAULT_OUT}/ (train.py's default --out); "
              "--no-adapter for the base alone", file=sys.stderr)
        return DEFAULT_OUT
    print("no adapter given and none in out/: sampling the base model", file=sys.stderr)
    return None


def trained_format(adapter):
    """The --format an adapter was trained on, from run.json beside it; "quotes" without one
    (a PEFT folder, an adapter file of its own, no adapter)."""
    run = run_beside(adapter)[1] if adapter else {}
    return run.get("format") or "quotes"


def is_peft_folder(path):
    """A folder in PEFT's format (adapter_config.json): export/peft.py reads it, not lora.py."""
    return path is not None and (Path(path) / "adapter_config.json").is_file()


def model_with_adapter(args, adapter, device, dtype, prog, read_adapter=adapters.read):
    """The model for sample.py and eval.py: the base from --model or the adapter's metadata,
    with the adapter (a path, or None) in, read by read_adapter: machinery/adapters.py's, or
    export/peft.py's for a PEFT folder; attention as --attention asks. Returns (model,
    tokenizer)."""
    tensors, meta = read_adapter(adapter) if adapter else (None, None)
    name = args.model or (meta and meta["base_model"]) or DEFAULT_MODEL  # PEFT's may name none
    model = Llama.from_pretrained(name, dtype=dtype, device=device)
    set_attention(model, args.attention)
    if adapter:
        adapters.load(model, (tensors, meta), alpha=args.alpha)  # the shapes must fit
        if meta["base_model"] != name:  # a warning: one model goes by many names (id, a copy)
            print(f"{prog}: warning: {adapter}: trained on {meta['base_model']!r}, loading into "
                  f"{name!r}", file=sys.stderr)
    return model, QuoteTokenizer.from_model_dir(model.model_dir)

