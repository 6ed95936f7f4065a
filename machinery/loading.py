"""The model sample.py and eval.py run: the base from --model or the adapter's metadata, the
adapter checked and put in, attention as --attention asks; the chapters the flags ask for
(a PEFT folder's reader, the 4-bit base, the speed chapter's kernels), imported only then.
"""
import sys
from pathlib import Path

import torch

from data import QuoteTokenizer
from llama import DEFAULT_MODEL, Llama
from machinery import adapters
from machinery.checkpoint import run_beside
from machinery.cli import DEFAULT_OUT, set_attention
from machinery.device import device_and_dtype


def model_for(args, adapter, prog):
    """(model, tokenizer, device, dtype) for sample.py and eval.py (prog names it in messages):
    the device and dtype of --device and --dtype; the base quantized as --quantize or the
    adapter's training says; the adapter (a path, or None) read and checked to fit, from a
    train.py file or a PEFT folder; --kernels' speed chapter on the model."""
    device, dtype = device_and_dtype(args.device, args.dtype)
    read = adapters.read
    if is_peft_folder(adapter):  # PEFT's format is the export chapter's, imported for its folders
        from export.peft import read_peft as read
    load = None
    if base_quantize(args, adapter, prog):  # --quantize, or as the adapter learned
        from qlora.load import load_base as load  # a 4-bit base: the qlora chapter
    model, tokenizer = model_with_adapter(args, adapter, device, dtype, prog, read, load)
    if args.kernels:
        from speed import kernels  # the speed chapter, imported only when asked for
        kernels.use(model)
    return model, tokenizer, device, dtype


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


def base_quantize(args, adapter, prog):
    """The base's quantization: --quantize, else the one the adapter was trained against (its
    metadata's base_quantize; a PEFT folder or an older adapter: "none"). Sets args.quantize to
    it, None for none, and returns it; a stderr line says when the base will be 4-bit or
    --quantize differs from the adapter's."""
    trained = "none"
    if adapter and not is_peft_folder(adapter):
        trained = adapters.read_metadata(adapter).get("base_quantize", "none")
    chosen = args.quantize or trained
    if args.quantize and args.quantize != trained and adapter:
        print(f"{prog}: the adapter was trained against the base in {trained}; --quantize "
              f"{args.quantize} loads it otherwise", file=sys.stderr)
    elif chosen != "none":
        print(f"{prog}: the adapter was trained against the base in {trained}: loading it so "
              "(--quantize none for the base in the compute dtype)", file=sys.stderr)
    args.quantize = None if chosen == "none" else chosen
    return args.quantize


def is_peft_folder(path):
    """A folder in PEFT's format (adapter_config.json): export/peft.py reads it, not lora.py."""
    return path is not None and (Path(path) / "adapter_config.json").is_file()


def model_with_adapter(args, adapter, device, dtype, prog, read_adapter=adapters.read,
                       load_base=None):
    """The model for sample.py and eval.py: the base from --model or the adapter's metadata,
    with the adapter (a path, or None) in, read by read_adapter: machinery/adapters.py's, or
    export/peft.py's for a PEFT folder; attention as --attention asks. load_base: the qlora
    chapter's, for args.quantize's 4-bit base (else Llama.from_pretrained). Returns (model,
    tokenizer)."""
    check_alphas_fit(args, dtype)  # before minutes of loading
    tensors, meta = read_adapter(adapter) if adapter else (None, None)
    name = args.model or (meta and meta["base_model"]) or DEFAULT_MODEL  # PEFT's may name none
    if load_base:
        model = load_base(name, args.quantize, dtype, device, prog)
    else:
        model = Llama.from_pretrained(name, dtype=dtype, device=device)
    set_attention(model, args.attention)
    if adapter:
        adapters.load(model, (tensors, meta), alpha=args.alpha)  # the shapes must fit
        if meta["base_model"] != name:  # a warning: one model goes by many names (id, a copy)
            print(f"{prog}: warning: {adapter}: trained on {meta['base_model']!r}, loading into "
                  f"{name!r}", file=sys.stderr)
    tokenizer = QuoteTokenizer.from_model_dir(model.model_dir)
    stop_at_the_samples_eos(model, tokenizer, prog)
    return model, tokenizer


def check_alphas_fit(args, dtype):
    """--alpha and --alpha-sweep within the compute dtype: LoRA adds alpha * B A x to a product in
    that dtype, and torch refuses a scale it cannot hold (float16: 65504). ValueError naming the
    flag (cli.py refused what float32 cannot hold already)."""
    largest = torch.finfo(dtype).max
    for flag, alphas in (("--alpha", [getattr(args, "alpha", None)]),
                         ("--alpha-sweep", getattr(args, "alpha_sweep", None) or [])):
        big = [a for a in alphas if a is not None and a > largest]
        if big:
            name = str(dtype).removeprefix("torch.")
            wider = "bfloat16 or float32" if name == "float16" else "float32"
            raise ValueError(f"{flag}: alpha {big[0]:g} is too large for {name}, the compute "
                             f"dtype (at most {largest:g}): pass --dtype {wider}")


def stop_at_the_samples_eos(model, tokenizer, prog):
    """Training ends every sample with the tokenizer's eos (tokenizer_config.json's eos_token);
    generation stops at config.json's and generation_config.json's eos ids. Where that eos is not
    among them, it joins them, and one warning line on stderr says which ids generation stops at:
    else the model would write the token it was taught to end with, and go on."""
    ids = list(model.config.eos_token_ids)
    if tokenizer.eos_id in ids:
        return
    model.config.eos_token_ids = ids + [tokenizer.eos_id]
    if ids:  # the files disagree (none named: the tokenizer's alone, nothing to warn about)
        token = tokenizer.tokenizer.id_to_token(tokenizer.eos_id)
        print(f"{prog}: warning: {model.model_dir}: the tokenizer's eos {token!r} (id "
              f"{tokenizer.eos_id}, tokenizer_config.json), which ends every training sample, is "
              f"not among config.json's and generation_config.json's eos ids {ids}: generation "
              f"stops at {model.config.eos_token_ids}", file=sys.stderr)

