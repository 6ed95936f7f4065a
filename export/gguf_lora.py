"""The adapter alone as a GGUF LoRA, for llama.cpp's `--lora` and Ollama's `ADAPTER`.

    python -m export --adapter out --format lora-gguf --out out-lora [--type f32|f16|bf16]

A few MB that run on a base GGUF left as it is: export/gguf.py's file of the base (--no-adapter),
or any llama.cpp conversion of the same weights. The file holds the metadata general.type
"adapter", adapter.type "lora" and adapter.lora.alpha, and for each adapted weight two tensors
named as in export/gguf.py plus a suffix: `blk.0.attn_q.weight.lora_a`, A (r, in), and
`.lora_b`, B (out, r). llama.cpp adds (adapter.lora.alpha / r) * B (A x), PEFT's scale, so the
file stores our alpha times r. B's rows of q_proj and k_proj are reordered as the base's rows are
(export/gguf.py, section 2): they are rows of the output, as W's are; A's are inputs.

The tied lm_head. With tie_word_embeddings the base GGUF has no output.weight: llama.cpp reads
token_embd.weight for the head too. A LoRA on lm_head has nothing to attach to. Named
output.weight, llama.cpp refuses the file ("LoRA tensor 'output.weight' does not exist in base
model") and llama-cpp-python 0.3.36 crashes on it; named token_embd.weight, llama.cpp would add
it to the input embeddings too, which our adapter leaves alone. Dropping it changes what the
adapter writes (17 of 20 held-out quotes' tags, on the SmolLM2 adapter of docs/adapters.md). So
such an adapter is refused, by name: train with --targets leaving lm_head out, or export
--format gguf, which merges the head into an untied output.weight.
"""
from pathlib import Path

import lora
from machinery import adapters
from machinery.out_folder import write_atomic
from data import QuoteTokenizer
from export.gguf import (decode, encode, gguf_name, heads_of, hf_name, modelfile,
                         require_gguf, rope_pairs_adjacent, rope_pairs_split)

ADAPTER_GGUF = "adapter.gguf"
BASE_GGUF = "base.gguf"  # the Modelfile's FROM: the user puts the base's GGUF there
LORA_TYPES = ("f32", "f16", "bf16")  # q8_0 packs rows by 32 numbers; B's rows are r long
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def check_tied_head(targets, tied):
    """ValueError when the adapter has a LoRA on lm_head and the base ties lm_head to the
    embedding: llama.cpp has no separate head weight for it (this file's docstring)."""
    if "lm_head" in targets and tied:
        kept = [t for t in LINEARS if t in targets] or LINEARS
        raise ValueError("the adapter has a LoRA on lm_head, which this base ties to "
                         "embed_tokens: a llama.cpp LoRA cannot adapt a tied head (the base GGUF "
                         "has no output.weight) and llama-cpp-python crashes on one that tries; "
                         f"train with --targets {','.join(kept)}, or export --format gguf "
                         "(the head merged, untied)")


def export_lora_gguf(model, out_dir, weight_type="f32"):
    """Write out_dir/adapter.gguf from a model with LoRA (export/gguf.py's names, B's q and k
    rows reordered, alpha * r) and out_dir/Modelfile (FROM ./base.gguf, ADAPTER
    ./adapter.gguf). ValueError for a LoRA on a tied lm_head, or another type."""
    gguf = require_gguf()
    if weight_type not in LORA_TYPES:
        raise ValueError(f"a LoRA GGUF stores A and B as {', '.join(LORA_TYPES)} "
                         f"(--type {weight_type} packs rows by 32 numbers, and B's are r long)")
    tensors, meta = adapters.adapter_of_model(model)
    config = model.config
    check_tied_head(meta["targets"], config.tie_word_embeddings)
    eos_texts = [QuoteTokenizer.from_model_dir(model.model_dir).tokenizer.id_to_token(i)
                 for i in config.eos_token_ids]

    def write(tmp):
        writer = gguf.GGUFWriter(tmp / ADAPTER_GGUF, "llama")
        writer.add_string("general.type", "adapter")
        writer.add_string("general.name", f"{Path(str(model.name_or_path)).name} LoRA")
        writer.add_string("adapter.type", "lora")
        writer.add_float32("adapter.lora.alpha", meta["alpha"] * meta["r"])
        for key, t in tensors.items():
            name, _, half = key.rpartition(".lora_module.")  # half: "0.weight" (A), "1.weight" (B)
            t = t.detach().float().cpu()
            heads = heads_of(f"{name}.weight", config)
            if half == "1.weight" and heads:
                t = rope_pairs_adjacent(t, heads)
            suffix = ".lora_a" if half == "0.weight" else ".lora_b"
            array, ggml_type = encode(t, weight_type, gguf, key)
            writer.add_tensor(gguf_name(f"{name}.weight") + suffix, array, raw_dtype=ggml_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        (tmp / "Modelfile").write_text(modelfile(BASE_GGUF, eos_texts, adapter=ADAPTER_GGUF))
    return write_atomic(out_dir, write, folder=True)


def read_lora_gguf(path, config):
    """(tensors, metadata) of a GGUF LoRA, in lora.py's names and alpha: what adapters.load
    takes. config: the base's LlamaConfig (the file has no head counts; B's q and k rows go back
    to HF's order with them)."""
    gguf = require_gguf()
    reader = gguf.GGUFReader(path)
    fields = reader.fields
    if fields["general.type"].contents() != "adapter" or \
            fields["adapter.type"].contents() != "lora":
        raise ValueError(f"{path}: not a GGUF LoRA adapter")
    tensors = {}
    for t in reader.tensors:
        weight, _, half = t.name.rpartition(".")  # half: lora_a or lora_b
        name = hf_name(weight).removesuffix(".weight")
        value = decode(t.data, t.tensor_type, gguf)
        heads = heads_of(f"{name}.weight", config)
        if half == "lora_b" and heads:
            value = rope_pairs_split(value, heads)
        tensors[f"{name}.lora_module.{'0' if half == 'lora_a' else '1'}.weight"] = value
    r = next(t for k, t in tensors.items() if k.endswith(".0.weight")).shape[0]
    meta = dict(r=r, alpha=fields["adapter.lora.alpha"].contents() / r, init="zero",
                base_config={}, base_model="",
                targets=sorted({k.split(".lora_module.")[0].rsplit(".", 1)[-1] for k in tensors}))
    return tensors, meta
