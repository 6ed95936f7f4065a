"""What a Hugging Face model folder's files say, read for llama.py and data.py and checked.

config.json's fields (two spellings of RoPE's settings; eos ids from config.json and
generation_config.json), the tokenizer's bos and eos (tokenizer_config.json names them), and the
safetensors, single-file or sharded, checked tensor by tensor against the model: every refusal a
line that names the file.
"""
import json
import sys
from pathlib import Path

import torch


def read_config(model_dir):
    """LlamaConfig's fields (a dict) from config.json, plus generation_config.json's eos ids.
    Raises FileNotFoundError without config.json, ValueError naming the file otherwise."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; a model folder needs config.json")
    try:
        fields = config_fields(json.loads(path.read_text()), where=str(path))
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a readable Llama config "
                         f"({type(e).__name__}: {e})") from None
    # Instruct models stop at several ids (Llama-3.2: 128001, 128008, 128009); the generation
    # config may list ones config.json does not.
    gen = Path(model_dir) / "generation_config.json"
    if gen.is_file():
        try:
            extra = _ids(json.loads(gen.read_text()).get("eos_token_id"))
        except (json.JSONDecodeError, AttributeError, TypeError) as e:
            raise ValueError(f"{gen}: not a readable generation config "
                             f"({type(e).__name__}: {e})") from None
        fields["eos_token_ids"] += [e for e in extra if e not in fields["eos_token_ids"]]
    return fields


def config_fields(raw, where="config.json"):
    """LlamaConfig's fields from a config.json dict. ValueError for a model llama.py does not
    implement (another architecture, biases, another RoPE type)."""
    arch = raw.get("architectures") or ["Llama"]
    if raw.get("model_type") != "llama" or any("Llama" not in a for a in arch):
        raise ValueError(f"{where}: model_type {raw.get('model_type')!r} / architectures "
                         f"{raw.get('architectures')} is not a Llama model "
                         "(expected 'llama', LlamaForCausalLM)")
    for flag in ("attention_bias", "mlp_bias"):
        if raw.get(flag):
            raise ValueError(f"{where}: {flag}=true is not supported (Llama-3.2 has no biases)")
    # llama.py's MLP is SwiGLU: silu(gate) * up. Another activation would run silently wrong.
    if raw.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: hidden_act {raw['hidden_act']!r} is not supported "
                         "(llama.py's MLP computes silu, as Llama-3.2)")
    # Two spellings in the wild: `rope_theta` + `rope_scaling` (the hub's Llama-3.2 files) and
    # `rope_parameters` holding both (written by transformers 5).
    rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise ValueError(f"{where}: rope_type {rope_type!r} is not supported "
                         "(only 'default' and 'llama3')")
    heads = raw["num_attention_heads"]
    return dict(
        vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_hidden_layers=raw["num_hidden_layers"], num_attention_heads=heads,
        num_key_value_heads=raw.get("num_key_value_heads") or heads,
        head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
        # transformers' LlamaConfig defaults, where config.json leaves a field out
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
        rope_scaling=rope if rope_type == "llama3" else None,
        max_position_embeddings=raw.get("max_position_embeddings", 2048),
        tie_word_embeddings=raw.get("tie_word_embeddings", False),
        bos_token_id=raw.get("bos_token_id"), eos_token_ids=_ids(raw.get("eos_token_id")))


def _ids(value):
    return [] if value is None else [value] if isinstance(value, int) else list(value)


def safetensors_files(model_dir):
    """The checkpoint's files: model.safetensors, or the shards model.safetensors.index.json
    lists. FileNotFoundError when there is none, or a listed shard is missing."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (model_dir / "model.safetensors").is_file():
        names = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{model_dir}: no model.safetensors or "
                                "model.safetensors.index.json")
    for name in names:
        if not (model_dir / name).is_file():
            raise FileNotFoundError(f"{model_dir / name}: listed in model.safetensors.index.json "
                                    "but missing")
    return [model_dir / name for name in names]


def each_tensor(model_dir, keys=None):
    """(name, tensor) of a single-file or sharded checkpoint, one tensor at a time, CPU, in the
    stored dtype; only `keys` if given. ValueError naming a truncated or corrupt file."""
    from safetensors import safe_open
    for path in safetensors_files(model_dir):
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                names = [k for k in f.keys() if keys is None or k in keys]
            for k in names:
                # The file is mapped into memory while open, and each page read stays counted
                # in the process's memory until it is closed: open it for one tensor at a time.
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    tensor = f.get_tensor(k)  # a copy, in the stored dtype
                yield k, tensor
                del tensor
        except Exception as e:  # safetensors has its own error type for a truncated file
            raise ValueError(f"{path}: cannot be read, truncated or corrupt? ({e})") from None


def read_safetensors(model_dir):
    """All tensors of a single-file or sharded (model.safetensors.index.json) checkpoint, CPU."""
    return dict(each_tensor(model_dir))


def read_tensors(model_dir, keys):
    """The tensors named in keys (a list), in that order: KeyError for one not stored."""
    found = dict(each_tensor(model_dir, set(keys)))
    return [found[k] for k in keys]


def safetensors_shapes(model_dir):
    """{name: (shape, path)} of every stored tensor, read from the files' headers only."""
    from safetensors import safe_open
    shapes = {}
    for path in safetensors_files(model_dir):
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                shapes.update({k: (tuple(f.get_slice(k).get_shape()), path) for k in f.keys()})
        except Exception as e:
            raise ValueError(f"{path}: cannot be read, truncated or corrupt? ({e})") from None
    return shapes


def keeps_tie(state, tied, model_dir):
    """Whether lm_head stays tied to embed_tokens. A tool that fine-tuned the head may save it
    and leave config.json's tie: transformers then keeps the stored head, untied; dropping it
    would change every logit. Says so on stderr."""
    head, embed = state.get("lm_head.weight"), state.get("model.embed_tokens.weight")
    if not tied or head is None or embed is None or torch.equal(head, embed):
        return tied
    print(f"{model_dir}: lm_head.weight differs from embed_tokens.weight although config.json "
          "ties them: untied, using the stored head", file=sys.stderr)
    return False


def check_state_dict(expected, state, tied, model_dir):
    """Refuse a checkpoint unless it has exactly the model's tensors (expected: the model's
    state dict), in the model's shapes. ValueError naming the first misfits."""
    expected = {k: tuple(v.shape) for k, v in expected.items()}
    if tied:  # stored as embed_tokens (an lm_head too is equal)
        expected.pop("lm_head.weight")
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    shapes = [f"{k} {tuple(state[k].shape)} (expected {expected[k]})"
              for k in sorted(set(expected) & set(state)) if tuple(state[k].shape) != expected[k]]
    for what, keys in (("missing tensors", sorted(set(expected) - set(state))),
                       ("unexpected tensors", sorted(set(state) - set(expected))),
                       ("wrong shapes", shapes)):
        if keys:
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            raise ValueError(f"{model_dir}: {what}: {', '.join(keys[:3])}{more}")




# ----------------------------------------------------------------------------- the tokenizer

def read_tokenizer(model_dir):
    """(tokenizers.Tokenizer, bos_id, eos_id) of a model folder. tokenizer_config.json names the
    tokens ("<|eot_id|>", or {"content": "<|eot_id|>"}): the eos an Instruct model ends its turns
    with; config.json's ids (the first of a list) where it names none. Raises FileNotFoundError
    without tokenizer.json, ValueError when neither file names a bos and an eos."""
    from tokenizers import Tokenizer
    model_dir = Path(model_dir)
    if not (model_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"{model_dir}: no tokenizer.json (expected a Hugging Face model folder)")
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    names = _read_json(model_dir / "tokenizer_config.json")
    ids = _read_json(model_dir / "config.json")
    bos_id = _special_id(tokenizer, names.get("bos_token"), ids.get("bos_token_id"))
    eos_id = _special_id(tokenizer, names.get("eos_token"), ids.get("eos_token_id"))
    if bos_id is None or eos_id is None:
        raise ValueError(
            f"{model_dir}: no bos or eos token in tokenizer_config.json or config.json")
    return tokenizer, bos_id, eos_id


def _read_json(path):
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _special_id(tokenizer, token, config_id):
    if isinstance(token, dict):
        token = token.get("content")
    if isinstance(token, str) and tokenizer.token_to_id(token) is not None:
        return tokenizer.token_to_id(token)
    if isinstance(config_id, list):
        config_id = config_id[0] if config_id else None
    return config_id
