"""Take an adapter out of this project: PEFT's adapter format, or a merged Hugging Face model.

    python lora.py export --adapter out --format peft --out out-peft
    python lora.py export --adapter out --format merged --out out-merged

PEFT (Hugging Face's adapter library) stores A and B as `base_model.model.<module>.lora_A.weight`
(r, in) and `.lora_B.weight` (out, r) and scales by lora_alpha / r, so our alpha is lora_alpha / r
(reading that format back is in lora.py, beside our own). A merged model has alpha * B @ A folded
into W, so any Llama loader runs it without knowing about LoRA.
"""
import argparse
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

from lora import _adapter_of_model, load_adapter, lora_modules, read_adapter

def check_out_dir(out_dir):
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir}: exists and is not empty; refusing to overwrite it")


@contextmanager
def _new_folder(out_dir):
    """Yield a temp folder next to out_dir, renamed to out_dir once complete: never a half export."""
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        yield tmp
        for path in [tmp, *tmp.iterdir()]:  # mkdtemp (and safetensors) make them private to us
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        os.rename(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export_peft(source, out_dir, base_model=None):
    """Write a PEFT adapter folder from a model with LoRA or from an adapter path (no base needed)."""
    tensors, meta = read_adapter(source) if isinstance(source, (str, Path)) else _adapter_of_model(source)
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", r=meta["r"], lora_alpha=meta["alpha"] * meta["r"],
                  target_modules=meta["targets"], base_model_name_or_path=base_model or meta["base_model"] or None,
                  bias="none", use_dora=False, use_rslora=False, fan_in_fan_out=False, lora_dropout=0.0,
                  init_lora_weights=True, inference_mode=True)
    peft = {}
    for key, t in tensors.items():
        name, i = re.fullmatch(r"(.+)\.lora_module\.([01])\.weight", key).groups()
        peft[f"base_model.model.{name}.lora_{'AB'[int(i)]}.weight"] = t.to("cpu").contiguous()
    with _new_folder(out_dir) as tmp:
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(peft, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
    return Path(out_dir)


# ----------------------------------------------------------------------------- merged HF export

WEIGHT_FILES = re.compile(r".*\.(safetensors|bin|pth|pt|gguf)|model\.safetensors\.index\.json|config\.json")


def export_merged(model, out_dir, dtype=None):
    """Write a plain Hugging Face folder with LoRA folded into the weights: any Llama loader
    (transformers, vLLM, llama.cpp's converter) reads it without knowing about LoRA. The model
    itself is left as it is. dtype defaults to the base checkpoint's."""
    model_dir = getattr(model, "model_dir", None)
    if model_dir is None or not (Path(model_dir) / "config.json").is_file():
        raise ValueError("export_merged needs model.model_dir, the base's HF folder (config, tokenizer)")
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    saved = getattr(torch, str(config.get("dtype") or config.get("torch_dtype")), None)
    dtype = dtype or (saved if isinstance(saved, torch.dtype) else next(model.parameters()).dtype)
    # One tensor at a time into the saved dtype: a float32 copy of every merged weight would
    # double the memory of the float32 model.
    tensors = {f"{name}.weight": m.merged_weight().to("cpu", dtype).contiguous()
               for name, m in lora_modules(model).items()}
    for name, p in model.named_parameters():  # yields a tied lm_head.weight not at all
        if ".lora_module." not in name and ".original_module." not in name:
            tensors[name] = p.detach().to("cpu", dtype).contiguous()
    # Still tied only if lm_head.weight is still the embedding (merging LoRA into it unties it).
    config["tie_word_embeddings"] = "lm_head.weight" not in tensors
    config["dtype"] = str(dtype).removeprefix("torch.")
    config.pop("torch_dtype", None)
    with _new_folder(out_dir) as tmp:
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for f in model_dir.iterdir():  # tokenizer, generation config, license travel with the weights
            if f.is_file() and not WEIGHT_FILES.fullmatch(f.name):
                shutil.copy(f, tmp / f.name)
    return Path(out_dir)


# ----------------------------------------------------------------------------- command line

def main(argv=None):
    parser = argparse.ArgumentParser(prog="lora.py", description="Tools for LoRA adapters made by train.py.")
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="convert an adapter to PEFT or to a merged HF model folder",
                                 description="Convert an adapter to a PEFT adapter folder or a merged HF model.")
    export.add_argument("--adapter", required=True,
                        help="train.py's --out folder, an adapter .safetensors file, or a PEFT adapter folder")
    export.add_argument("--format", required=True, choices=["peft", "merged"],
                        help="peft: adapter_config.json + adapter_model.safetensors for peft.PeftModel; "
                             "merged: a full HF model folder with LoRA folded into the weights")
    export.add_argument("--out", required=True, help="folder to create (must not exist or be empty)")
    export.add_argument("--model", help="base model (hub id or local folder); default: the one the "
                                        "adapter records. For peft it only sets base_model_name_or_path")
    args = parser.parse_args(argv)
    try:
        check_out_dir(args.out)  # before loading a 1B model, not after
        if args.format == "peft":
            export_peft(args.adapter, args.out, base_model=args.model)
        else:
            base = args.model or read_adapter(args.adapter)[1]["base_model"]
            if not base:
                raise ValueError(f"{args.adapter} does not record its base model; pass --model")
            from llama import Llama  # only the merged export needs the model
            model = Llama.from_pretrained(base, dtype=torch.float32)  # merge in float32, save in the base's dtype
            load_adapter(model, args.adapter)
            export_merged(model, args.out)
    except (ValueError, TypeError, OSError, RuntimeError) as e:
        parser.exit(2, f"lora.py: error: {' '.join(str(e).split())}\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
