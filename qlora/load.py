"""A Llama checkpoint read into NF4, one tensor at a time: the full-precision model never sits in
memory whole.

    Llama.from_pretrained             every tensor read, then cast: the bf16 model whole (2.5 GB
                                      for Llama-3.2-1B), and for a moment the file's copy too
    qlora.load.from_pretrained        each decoder Linear weight read alone, quantized, dropped:
                                      4.127 to 4.5 bits a weight, plus one weight in float32

What stays in the compute dtype, and why:

    embed_tokens    a lookup, not a product: a row is read per token, and quantizing it saves
                    memory only; QLoRA (section 3) and bitsandbytes keep it in 16 bits.
    lm_head         tied to embed_tokens in Llama-3.2-1B and 3B: the same matrix, so it stays too.
                    An untied head stays 16-bit as well (every logit goes through it).
    the RMSNorm weights, a vector each: nothing to save.

The cost: Llama-3.2-1B's embedding is 128,256 x 2,048 = 263M weights, 525 MB in bf16, about as
much as its 973M decoder weights in NF4 (502 MB with double quantization): half of the quantized
model. docs/qlora.md has the table.
"""
import sys

import torch
import torch.nn as nn

from llama import Llama, LlamaConfig, rope_inv_freq
from machinery import hub, model_files
from machinery.device import release_freed_memory
from qlora.linear import LinearNF4
from qlora.nf4 import dequantize_nf4, quantize_nf4

QUANTIZE = ("nf4", "nf4-dq")  # litgpt's bnb.nf4 and bnb.nf4-dq, without the bnb.
DESCRIBE = {"nf4": "NF4 (4.5 bits a weight)",
            "nf4-dq": "NF4 with double quantization (4.127 bits a weight)"}


def decoder_linears(model):
    """The names of the Linear layers that get quantized: every nn.Linear in the decoder blocks
    (q, k, v, o, gate, up, down of each layer), not lm_head."""
    return [name for name, m in model.model.layers.named_modules(prefix="model.layers")
            if isinstance(m, nn.Linear)]


def from_pretrained(name_or_path, quantize, dtype=torch.bfloat16, device="cpu"):
    """Llama.from_pretrained with every decoder Linear a LinearNF4 (qlora/linear.py), quantized
    from the stored weight on `device` as it is read; the rest in `dtype`. quantize: "nf4" or
    "nf4-dq" (double quantization). The same checks as Llama.from_pretrained (ValueError naming
    the first missing, unexpected or misshapen tensor). Sets model.quantize."""
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE)}, got {quantize!r}")
    model_dir = hub.resolve_model_dir(name_or_path)
    config = LlamaConfig.from_dir(model_dir)
    shapes = model_files.safetensors_shapes(model_dir)  # name -> (shape, file), nothing read
    if config.tie_word_embeddings and "lm_head.weight" in shapes:
        # rare: a stored head beside a tie. Llama.from_pretrained decides by comparing them.
        head, embed = model_files.read_tensors(model_dir, ["lm_head.weight",
                                                           "model.embed_tokens.weight"])
        config.tie_word_embeddings = model_files.keeps_tie(
            {"lm_head.weight": head, "model.embed_tokens.weight": embed}, True, model_dir)
        del head, embed
    with torch.device("meta"):
        model = Llama(config)
    meta = {k: torch.empty(s, device="meta") for k, (s, _) in shapes.items()}
    model_files.check_state_dict(model.state_dict(), meta, config.tie_word_embeddings, model_dir)

    quantized = set(decoder_linears(model))
    rest = {}
    names = model.state_dict().keys()
    for name, tensor in model_files.each_tensor(model_dir):  # one tensor in memory at a time
        module = name.removesuffix(".weight")
        if module in quantized:
            parent, child = module.rsplit(".", 1)
            layer = LinearNF4.from_weight(tensor.to(device), double_quant=quantize == "nf4-dq",
                                          compute_dtype=dtype)
            setattr(model.get_submodule(parent), child, layer)
            release_freed_memory()  # the float32 temporaries of quantizing, between the codes
        elif name in names:
            rest[name] = tensor.to(device=device, dtype=dtype)
        del tensor
    model.load_state_dict(rest, strict=False, assign=True)
    if config.tie_word_embeddings:  # assign=True broke the tie
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(config).to(device)
    model.requires_grad_(False)
    model.name_or_path, model.model_dir = str(name_or_path), model_dir
    model.quantize = quantize
    return model.eval()


@torch.no_grad()
def dequantize_base(model, quantize):
    """Replace, in place, each decoder Linear weight W of a plain model by what the 4-bit base
    computes with: dequantize_nf4(quantize_nf4(W)), in W's dtype. For merging an adapter into
    the weights it was trained against (python -m export --base dequantized)."""
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE)}, got {quantize!r}")
    for name in decoder_linears(model):
        linear = model.get_submodule(name)
        W = linear.weight
        # train.py quantized the stored tensor; W holds it exactly (float32 holds every bf16),
        # and quantize_nf4 computes in float32 either way: the same codes
        q = quantize_nf4(W, double_quant=quantize == "nf4-dq")
        linear.weight = nn.Parameter(dequantize_nf4(q, W.dtype), requires_grad=False)


def load_base(name_or_path, quantize, dtype, device, prog=None):
    """The base model as --quantize asks: None or "none" the compute dtype (Llama.from_pretrained),
    else NF4 (from_pretrained above). With prog, one stderr line says which."""
    if quantize in (None, "none"):
        return Llama.from_pretrained(name_or_path, dtype=dtype, device=device)
    if prog:
        print(f"{prog}: the base's Linear layers in {DESCRIBE[quantize]}, the embedding in "
              f"{str(dtype).removeprefix('torch.')}", file=sys.stderr)
    return from_pretrained(name_or_path, quantize, dtype=dtype, device=device)
