"""The merged export: a plain Hugging Face model folder with alpha * B @ A folded into each W, which
any Llama loader (transformers, vLLM, llama.cpp's converter) runs without knowing about LoRA.

    python -m export --adapter out --format merged --out out-merged
"""
import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

import lora
from checkpoint import write_atomic

WEIGHT_FILES = re.compile(r".*\.(safetensors|bin|pth|pt|gguf)"
                          r"|model\.safetensors\.index\.json|config\.json")


def export_merged(model, out_dir, dtype=None):
    """Write a plain Hugging Face folder with LoRA folded into the weights. The model itself is
    left as it is. dtype defaults to the base checkpoint's."""
    model_dir = getattr(model, "model_dir", None)
    if model_dir is None or not (Path(model_dir) / "config.json").is_file():
        raise ValueError("export_merged needs model.model_dir, "
                         "the base's HF folder (config, tokenizer)")
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    saved = getattr(torch, str(config.get("dtype") or config.get("torch_dtype")), None)
    dtype = dtype or (saved if isinstance(saved, torch.dtype) else next(model.parameters()).dtype)
    # One tensor at a time into the saved dtype: a float32 copy of every merged weight would
    # double the memory of the float32 model.
    tensors = {f"{name}.weight": m.merged_weight().to("cpu", dtype).contiguous()
               for name, m in lora.lora_modules(model).items()}
    for name, p in model.named_parameters():  # yields a tied lm_head.weight not at all
        if ".lora_module." not in name and ".original_module." not in name:
            tensors[name] = p.detach().to("cpu", dtype).contiguous()
    # Still tied only if lm_head.weight is still the embedding (merging LoRA into it unties it).
    config["tie_word_embeddings"] = "lm_head.weight" not in tensors
    config["dtype"] = str(dtype).removeprefix("torch.")
    config.pop("torch_dtype", None)

    def write(tmp):
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for f in model_dir.iterdir():  # tokenizer, generation config, license go with the weights
            if f.is_file() and not WEIGHT_FILES.fullmatch(f.name):
                shutil.copy(f, tmp / f.name)
    return write_atomic(out_dir, write, folder=True)
