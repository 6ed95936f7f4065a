"""The merged model as one GGUF file: what llama.cpp, Ollama and LM Studio run.

    python -m export --adapter out --format gguf --out out-gguf [--type f32|f16|bf16|q8_0]
    python -m export --no-adapter --model M --format gguf --out base-gguf   # the base alone

A GGUF file is typed key-value metadata followed by named tensors, each stored in its own type.
llama.cpp reads nothing else: not config.json, not tokenizer.json. Writing one from our model
takes five translations, one section of this file each:

1. Names. HF's `model.layers.0.self_attn.q_proj.weight` is llama.cpp's `blk.0.attn_q.weight`.
2. The q and k rows. llama.py rotates dimension i of a head with i + head_dim/2; llama.cpp
   rotates neighbours 2i and 2i+1. Reordering the rows of q_proj and k_proj makes the two agree.
3. RoPE's llama3 scaling. llama.cpp divides each rotation speed by a stored factor
   (`rope_freqs.weight`); we store the factors that turn its speeds into llama.py's.
4. The tokenizer: the BPE vocabulary and merges, bos and eos, and the name of the pre-tokenizer
   that llama.cpp re-implements in C++.
5. The weight type: f32, f16, bf16, or q8_0 (blocks of 32 numbers, one scale each).

The writer and reader are the `gguf` package, llama.cpp's own Python library (pip install gguf);
it is imported only here, when a GGUF is written or read. read_gguf turns a file back into our
layout, which is how tests/test_gguf.py checks every step above against our logits; beside the
file, an Ollama Modelfile (plain completion, greedy, stopping at the model's eos tokens).
"""
import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import torch

import lora
from machinery.out_folder import write_atomic
from data import QuoteTokenizer
from export.merged import merged_tensors, update_lost
from llama import Llama, LlamaConfig, rope_inv_freq

GGUF_FILE = "model.gguf"
MODELFILE = "Modelfile"


def require_gguf():
    """The gguf package, or ImportError in one line that says what to install."""
    try:
        import gguf
    except ImportError:
        raise ImportError("the GGUF export needs the gguf package (llama.cpp's reader and "
                          "writer): pip install gguf") from None
    return gguf


# ----------------------------------------------------------------------------- 1. names

# Our (HF's) module names and llama.cpp's, for the llama architecture (gguf's TENSOR_NAMES).
GGUF_NAMES = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",  # absent when tied: llama.cpp then reads token_embd twice
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
HF_NAMES = {v: k for k, v in GGUF_NAMES.items()}
HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
GGUF_LAYER = re.compile(r"blk\.(\d+)\.(.+)")


def gguf_name(name):
    """model.layers.3.self_attn.q_proj.weight -> blk.3.attn_q.weight (any suffix after the
    module: .weight, and the LoRA GGUF's .weight.lora_a)."""
    layer = HF_LAYER.fullmatch(name)
    path = layer[2] if layer else name  # self_attn.q_proj.weight, or model.norm.weight
    for module, short in GGUF_NAMES.items():
        if path.startswith(module + "."):
            rest = path[len(module):]  # .weight
            return f"blk.{layer[1]}.{short}{rest}" if layer else short + rest
    raise ValueError(f"{name}: not a weight of a Llama model")


def hf_name(name):
    """blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight: gguf_name backwards."""
    layer = GGUF_LAYER.fullmatch(name)
    module, _, rest = (layer[2] if layer else name).partition(".")
    if module not in HF_NAMES:
        raise ValueError(f"{name}: not a tensor of a llama GGUF")
    if layer:
        return f"model.layers.{layer[1]}.{HF_NAMES[module]}.{rest}"
    return f"{HF_NAMES[module]}.{rest}"


# ----------------------------------------------------------------------------- 2. q and k rows

def rope_pairs_adjacent(w, n_heads):
    """The rows of q_proj or k_proj (or of a LoRA B on them), (n_heads * head_dim, ...), in the
    order llama.cpp's RoPE expects.

    llama.py's apply_rope turns each pair (x_i, x_{i + head_dim/2}) of a head by its angle: the
    layout HF's checkpoints use. llama.cpp (like Meta's original code) turns (x_2i, x_2i+1).
    Row i of a head moves to 2i and row i + head_dim/2 to 2i + 1: each pair is rotated by the
    same angle as before, now side by side. q and k move alike, and a score q . k is a sum over
    the dimensions, which no reordering changes; v_proj and o_proj stay as they are."""
    head_dim = w.shape[0] // n_heads
    halves = w.reshape(n_heads, 2, head_dim // 2, *w.shape[1:])  # (heads, which half, i, ...)
    return halves.transpose(1, 2).reshape(w.shape)  # (heads, i, which half, ...): 2i, 2i + 1


def rope_pairs_split(w, n_heads):
    """rope_pairs_adjacent backwards: llama.cpp's row order to HF's."""
    head_dim = w.shape[0] // n_heads
    pairs = w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:])  # (heads, i, which half, ...)
    return pairs.transpose(1, 2).reshape(w.shape)


def heads_of(hf, config):
    """How many heads the rows of weight `hf` hold if RoPE turns them (q: heads, k: kv heads),
    else None."""
    if ".self_attn.q_proj." in hf:
        return config.num_attention_heads
    if ".self_attn.k_proj." in hf:
        return config.num_key_value_heads
    return None


# ----------------------------------------------------------------------------- 3. RoPE scaling

def rope_factors(config):
    """For llama3 RoPE scaling, the factor llama.cpp divides each pair's rotation speed by,
    (head_dim/2,) float32; None for plain RoPE.

    llama.cpp computes the plain speeds base^(-2i/d) itself and stores no scaling rule for
    llama3: it divides speed i by rope_freqs.weight[i]. llama.py's rope_inv_freq applies the rule
    (slow pairs slowed by `factor`, fast ones kept, a blend between), so the factors are the plain
    speeds over ours: 1 for fast pairs, `factor` (32 for Llama-3.2) for slow ones."""
    if config.rope_scaling is None:
        return None
    plain = dataclasses.replace(config, rope_scaling=None)
    return rope_inv_freq(plain) / rope_inv_freq(config)


# ----------------------------------------------------------------------------- 4. the tokenizer

# llama.cpp re-implements each model family's pre-tokenizer (how text is cut into words before
# the BPE merges run) in C++, under a name. tokenizer.json describes its own; the three our
# models use, as (step, settings...) tuples, and llama.cpp's names for them:
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {
    (("Split", LLAMA3_SPLIT, "Isolated"), ("ByteLevel", False, False)): "llama-bpe",  # Llama-3
    (("Digits", True), ("ByteLevel", False, True)): "smollm",  # each digit alone, then GPT-2's
    (("ByteLevel", False, True),): "gpt-2",
}


def pre_tokenizer_name(tokenizer_json, where):
    """llama.cpp's name for the pre-tokenizer of a tokenizer.json (a dict). ValueError naming the
    file for one it does not know: llama.cpp would cut text into other words than training did."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = []
    for step in pre.get("pretokenizers", [pre]):
        kind = step.get("type")
        if kind == "Split":
            steps.append((kind, step.get("pattern", {}).get("Regex"), step.get("behavior")))
        elif kind == "Digits":
            steps.append((kind, step.get("individual_digits")))
        elif kind == "ByteLevel":
            steps.append((kind, step.get("add_prefix_space"), step.get("use_regex", True)))
        else:
            steps.append((kind,))
    name = PRE_TOKENIZERS.get(tuple(steps))
    if name is None:
        raise ValueError(f"{where}: a pre-tokenizer the GGUF export does not know "
                         f"({', '.join(s[0] for s in steps)}); it writes Llama-3's, SmolLM's and "
                         "GPT-2's")
    return name


def write_tokenizer(writer, model_dir, vocab_size, gguf):
    """The tokenizer.ggml.* keys: every token's text and kind, the merges, bos and eos.

    Token i of the list is token id i, for the model's vocab_size rows (Llama-3.2's tokenizer
    knows one more, <|image|>, that no row embeds). bos and eos are the ones data.py trains with,
    and add_bos_token is true whatever the tokenizer's own habit: every training sample starts
    with exactly one bos (data.py), so llama.cpp must put it before every prompt too."""
    path = Path(model_dir) / "tokenizer.json"
    tokenizer_json = json.loads(path.read_text(encoding="utf-8"))
    bpe = tokenizer_json.get("model", {})
    if bpe.get("type") != "BPE":
        raise ValueError(f"{path}: a {bpe.get('type')} tokenizer; the GGUF export writes "
                         "byte-level BPE (Llama-3, SmolLM2) only")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]  # ids no token uses, as llama.cpp names them
    kinds = [gguf.TokenType.UNUSED] * vocab_size
    for text, i in bpe["vocab"].items():
        if i < vocab_size:
            tokens[i], kinds[i] = text, gguf.TokenType.NORMAL
    for added in tokenizer_json.get("added_tokens", []):
        if added["id"] < vocab_size:  # special ones (bos, eos, <|im_start|>) are never text
            tokens[added["id"]] = added["content"]
            kinds[added["id"]] = (gguf.TokenType.CONTROL if added["special"]
                                  else gguf.TokenType.USER_DEFINED)
    # tokenizers writes each merge as "a b" or, since 0.20, as the pair ["a", "b"].
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe.get("merges", [])]
    ours = QuoteTokenizer.from_model_dir(model_dir)
    writer.add_string("tokenizer.ggml.model", "gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_string("tokenizer.ggml.pre", pre_tokenizer_name(tokenizer_json, path))
    writer.add_array("tokenizer.ggml.tokens", tokens)
    writer.add_array("tokenizer.ggml.token_type", [int(k) for k in kinds])
    writer.add_array("tokenizer.ggml.merges", merges)
    writer.add_uint32("tokenizer.ggml.bos_token_id", ours.bos_id)
    writer.add_uint32("tokenizer.ggml.eos_token_id", ours.eos_id)
    writer.add_bool("tokenizer.ggml.add_bos_token", True)
    writer.add_bool("tokenizer.ggml.add_eos_token", False)


def write_hyperparameters(writer, config):
    """The llama.* keys llama.cpp builds its graph from: config.json's numbers, renamed."""
    u32, f32 = writer.add_uint32, writer.add_float32
    u32("llama.vocab_size", config.vocab_size)
    u32("llama.context_length", config.max_position_embeddings)
    u32("llama.embedding_length", config.hidden_size)
    u32("llama.feed_forward_length", config.intermediate_size)
    u32("llama.block_count", config.num_hidden_layers)
    u32("llama.attention.head_count", config.num_attention_heads)
    u32("llama.attention.head_count_kv", config.num_key_value_heads)
    u32("llama.attention.key_length", config.head_dim)
    u32("llama.attention.value_length", config.head_dim)
    u32("llama.rope.dimension_count", config.head_dim)  # RoPE turns every dimension of a head
    f32("llama.rope.freq_base", config.rope_theta)
    f32("llama.attention.layer_norm_rms_epsilon", config.rms_norm_eps)


# ----------------------------------------------------------------------------- 5. weight types

TYPES = ("f32", "f16", "bf16", "q8_0")
# general.file_type: llama.cpp's LlamaFileType, what the bulk of the weights is stored in.
FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}


def encode(weight, weight_type, gguf, name="a tensor"):
    """(numpy array, GGML type) of a float32 tensor stored as weight_type. Vectors (the norms,
    rope_freqs) stay f32: llama.cpp computes them in f32 only, and they are a tiny part of the
    file. q8_0 stores each run of 32 numbers of a row as 32 int8 and one f16 scale (8.5 bits a
    number): ValueError naming the tensor when a row is not a multiple of 32 long."""
    T = gguf.GGMLQuantizationType
    if weight.ndim == 1 or weight_type == "f32":
        return weight.numpy(), T.F32
    if weight_type == "f16":
        return weight.to(torch.float16).numpy(), T.F16
    if weight_type == "bf16":  # numpy has no bf16: torch rounds, the bits travel as int16
        return weight.to(torch.bfloat16).view(torch.int16).numpy(), T.BF16
    if weight.shape[-1] % 32:
        raise ValueError(f"q8_0 stores rows in blocks of 32 numbers, and {name} has rows of "
                         f"{weight.shape[-1]}: choose --type f16, bf16 or f32")
    return gguf.quants.quantize(weight.numpy(), T.Q8_0), T.Q8_0


def decode(array, ggml_type, gguf):
    """encode backwards: a float32 torch tensor in the logical shape."""
    if ggml_type == gguf.GGMLQuantizationType.BF16:
        bits = torch.from_numpy(np.array(array).view(np.int16))  # a copy: the file is read-only
        return bits.view(torch.bfloat16).float()
    return torch.from_numpy(np.array(gguf.quants.dequantize(array, ggml_type),
                                     dtype=np.float32))


# ----------------------------------------------------------------------------- the file

def export_gguf(model, out_dir, weight_type="f32"):
    """Write out_dir/model.gguf (the model with its LoRA merged, or the base without one) and
    out_dir/Modelfile for Ollama. Returns update_lost (export/merged.py) of each adapted weight:
    how much of alpha * B @ A the type keeps. ValueError for another type or model."""
    gguf = require_gguf()
    if weight_type not in TYPES:
        raise ValueError(f"weight type must be one of {', '.join(TYPES)}, got {weight_type!r}")
    config, modules = model.config, lora.lora_modules(model)
    eos_texts = [QuoteTokenizer.from_model_dir(model.model_dir).tokenizer.id_to_token(i)
                 for i in config.eos_token_ids]
    lost = []

    def write(tmp):
        # use_temp_file: each tensor goes to disk as it is made, not all of them into memory.
        writer = gguf.GGUFWriter(tmp / GGUF_FILE, "llama", use_temp_file=True)
        writer.add_string("general.name", Path(str(model.name_or_path)).name)
        writer.add_uint32("general.file_type", FILE_TYPES[weight_type])
        writer.add_uint32("general.quantization_version", gguf.GGML_QUANT_VERSION)
        write_hyperparameters(writer, config)
        write_tokenizer(writer, model.model_dir, config.vocab_size, gguf)
        factors = rope_factors(config)
        if factors is not None:
            writer.add_tensor("rope_freqs.weight", factors.numpy())
        for hf, weight in merged_tensors(model):
            heads = heads_of(hf, config)
            if heads:
                weight = rope_pairs_adjacent(weight, heads)
            array, ggml_type = encode(weight, weight_type, gguf, hf)
            module = modules.get(hf.removesuffix(".weight"))
            if module is not None:  # what the file holds, back in our row order
                stored = decode(array, ggml_type, gguf)
                lost.append(update_lost(module, rope_pairs_split(stored, heads) if heads
                                        else stored))
            writer.add_tensor(gguf_name(hf), array, raw_dtype=ggml_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        (tmp / MODELFILE).write_text(modelfile(GGUF_FILE, eos_texts))
    write_atomic(out_dir, write, folder=True)
    return lost


def modelfile(gguf_file, eos_texts, adapter=None):
    """Ollama's recipe for the file: `ollama create tagger -f Modelfile`. Plain completion, as
    training saw the text: the prompt is "<quote> | tags:" and no chat template wraps it. Greedy,
    and repeat_penalty 1: Ollama's default 1.1 would push the tags off the greedy ones."""
    lines = ["# ollama create tagger -f Modelfile && ollama run tagger '<quote> | tags:'"]
    if adapter:
        lines.append(f"# {gguf_file}: the base the adapter was trained on, as GGUF "
                     "(python -m export --no-adapter --model M --format gguf --out DIR)")
    lines.append(f"FROM ./{gguf_file}")
    if adapter:
        lines.append(f"ADAPTER ./{adapter}")
    lines += ['TEMPLATE """{{ .Prompt }}"""',
              "PARAMETER temperature 0",
              "PARAMETER repeat_penalty 1",
              "PARAMETER num_predict 32",
              *[f'PARAMETER stop "{text}"' for text in eos_texts]]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- and back

def read_gguf(path):
    """(tensors, metadata) of a llama GGUF: tensors {HF name: float32 tensor} in our layout
    (names back to HF's, q and k rows back in HF's order, every type back to float32),
    rope_freqs left out (llama.py computes it from config.json); metadata {key: value}."""
    gguf = require_gguf()
    reader = gguf.GGUFReader(path)
    metadata = {key: field.contents() for key, field in reader.fields.items()
                if not key.startswith("GGUF.")}  # the reader's own header fields
    heads = {"q_proj": metadata["llama.attention.head_count"],
             "k_proj": metadata["llama.attention.head_count_kv"]}
    tensors = {}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            continue
        name = hf_name(t.name)
        weight = decode(t.data, t.tensor_type, gguf)
        module = name.split(".")[-2]
        if module in heads:
            weight = rope_pairs_split(weight, heads[module])
        tensors[name] = weight
    return tensors, metadata


def model_from_gguf(path, model_dir):
    """Our Llama with the weights of a GGUF file, float32, on the CPU; config.json and the
    tokenizer from model_dir, the base's folder. Tied when the file has no output.weight."""
    tensors, _ = read_gguf(path)
    config = LlamaConfig.from_dir(model_dir)
    config.tie_word_embeddings = "lm_head.weight" not in tensors
    with torch.device("meta"):  # no memory for weights that are replaced at once
        model = Llama(config)
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    if set(missing) - {"lm_head.weight"} or unexpected:
        raise ValueError(f"{path}: tensors do not fit the model of {model_dir} "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(config)
    model.name_or_path, model.model_dir = str(path), Path(model_dir)
    return model.eval()
