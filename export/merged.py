"""The merged export: a plain Hugging Face model folder with alpha * B @ A folded into each W,
which any Llama loader (transformers, vLLM, llama.cpp's converter) runs without knowing LoRA.

    python -m export --adapter out --format merged --out out-merged [--dtype float32]

What rounding costs. The update alpha * B @ A is small next to W: entries of about 0.001 where
W's are about 0.1. bfloat16 keeps 8 significant bits, so W + update, stored in bf16, moves in steps
of 0.4% to 0.8% of W, as large as the update's entries. On the SmolLM2 adapter of docs/adapters.md,
a bf16 merge loses 16% of the update at the median and 31% at worst, float16 2% and 4%, float32
2e-6. So the export is float32 unless --dtype says otherwise, and it prints what the chosen dtype
kept:

    update_lost = ||stored(W + update) - (W + update)|| / ||update||

per adapted weight (W the base's own numbers, all in float64): the part of alpha * B @ A that the
file does not hold. 0 keeps all of it; 1 loses as much as the update is.
"""
import json
import re
import shutil
import statistics
from pathlib import Path

import torch
from safetensors.torch import save_file

import lora
from machinery import json_out
from machinery.out_folder import write_atomic

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_DTYPE = "float32"  # the only one of the three that keeps the update (docs/adapters.md)
WEIGHT_FILES = re.compile(r".*\.(safetensors|bin|pth|pt|gguf)"
                          r"|model\.safetensors\.index\.json|config\.json")


def merged_tensors(model):
    """(name, float32 tensor) for every weight of the merged model, one at a time (a float32 copy
    of all of them at once would double the model's memory): W + alpha * B @ A for each LoRA
    module, the other weights as they are. A tied lm_head without LoRA is yielded once, as
    model.embed_tokens.weight; with LoRA it is yielded as lm_head.weight too (merging unties it).
    The GGUF export (export/gguf.py) reads the model through this too."""
    modules = lora.lora_modules(model)
    for name, m in modules.items():
        yield f"{name}.weight", m.merged_weight(torch.float32)
    for name, p in model.named_parameters():  # yields a tied lm_head.weight not at all
        if ".lora_module." not in name and ".original_module." not in name:
            yield name, p.detach().float()


def update_lost(module, stored):
    """||stored - (W + alpha B A)|| / ||alpha B A|| for a LoraModule and what a file holds of its
    merged weight (any dtype, (out, in)), in float64. 0.0 for an update that is exactly zero."""
    W = module.original_module.weight.detach().double()
    update = module.alpha * (module.B.detach().double() @ module.A.detach().double())
    size = update.norm()
    if size == 0:
        return 0.0
    return ((stored.double() - W - update).norm() / size).item()


def describe_lost(lost, what):
    """One line for a list of update_lost values, e.g. 'bfloat16 keeps alpha * B @ A up to 18%
    (median), 33% (worst) of its size over 211 adapted weights'."""
    if not lost:
        return f"{what}: no adapted weight"
    median, worst = statistics.median(lost), max(lost)
    return (f"{what} loses {median:.2g} (median), {worst:.2g} (worst) of alpha * B @ A "
            f"over {len(lost)} adapted weights (||stored - (W + update)|| / ||update||)")


def export_merged(model, out_dir, dtype=DEFAULT_DTYPE):
    """Write a plain Hugging Face folder with LoRA folded into the weights, stored in dtype
    ('float32', 'bfloat16' or 'float16'); the model itself is left as it is. Returns the
    update_lost of each adapted weight (a list, model order). ValueError without
    model.model_dir (the base's folder: config, tokenizer) or for another dtype."""
    model_dir = getattr(model, "model_dir", None)
    if model_dir is None or not (Path(model_dir) / "config.json").is_file():
        raise ValueError("export_merged needs model.model_dir, "
                         "the base's HF folder (config, tokenizer)")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    model_dir = Path(model_dir)
    modules = lora.lora_modules(model)
    tensors, lost = {}, []
    for name, weight in merged_tensors(model):
        tensors[name] = weight.to("cpu", DTYPES[dtype]).contiguous()
        module = modules.get(name.removesuffix(".weight"))
        if module is not None:
            lost.append(update_lost(module, tensors[name]))
    config = json.loads((model_dir / "config.json").read_text())
    # Still tied only if lm_head.weight is still the embedding (merging LoRA into it unties it).
    config["tie_word_embeddings"] = "lm_head.weight" not in tensors
    config["dtype"] = dtype
    config.pop("torch_dtype", None)  # the older spelling of "dtype"

    def write(tmp):
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json_out.dumps(config, indent=2) + "\n")
        for f in model_dir.iterdir():  # tokenizer, generation config, license go with the weights
            if f.is_file() and not WEIGHT_FILES.fullmatch(f.name):
                shutil.copy(f, tmp / f.name)
    write_atomic(out_dir, write, folder=True)
    return lost
