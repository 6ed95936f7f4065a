"""Llama-3.2 in plain PyTorch: the model LoRA adapts, readable top to bottom.

    tokens -> embed_tokens -> [RMSNorm -> attention (RoPE, grouped-query) -> +
                               RMSNorm -> SwiGLU MLP -> +] x num_hidden_layers -> norm -> lm_head

Module and parameter names are Hugging Face's own (`model.layers.0.self_attn.q_proj.weight`), so
a checkpoint's safetensors load without a renaming table and adapters export to PEFT without one.
"""
import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from kernels import (attention_one_query, causal_attention, linear_cross_entropy, rebuild_instead_of_keeping,
                     rms_norm, swiglu)

DEFAULT_MODEL = "meta-llama/Llama-3.2-1B-Instruct"
# Up to this length, training on the CPU uses kernels.causal_attention; beyond it SDPA's flash
# attention, which works on blocks that stay in cache while ours goes over T x T float32 scores
# several times (measured on one core: ours 1.4-1.9x faster at 64 tokens, even at 128, 2x slower at 256).
MAX_T_OWN_ATTENTION = 128
HUB_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "*.safetensors", "model.safetensors.index.json"]


# ----------------------------------------------------------------------------- config

@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # llama3: factor, low/high_freq_factor, original_max_position_embeddings
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: list = field(default_factory=list)

    @classmethod
    def from_dict(cls, raw, where="config.json"):
        if raw.get("model_type") != "llama" or any("Llama" not in a for a in raw.get("architectures") or ["Llama"]):
            raise ValueError(f"{where}: model_type {raw.get('model_type')!r} / architectures "
                             f"{raw.get('architectures')} is not a Llama model (expected 'llama', LlamaForCausalLM)")
        for flag in ("attention_bias", "mlp_bias"):
            if raw.get(flag):
                raise ValueError(f"{where}: {flag}=true is not supported (Llama-3.2 has no biases)")
        # Two spellings in the wild: `rope_theta` + `rope_scaling` (the hub's Llama-3.2 files) and
        # `rope_parameters` holding both (written by transformers 5).
        rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", raw.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"{where}: rope_type {rope_type!r} is not supported (only 'default' and 'llama3')")
        eos = raw.get("eos_token_id")
        heads = raw["num_attention_heads"]
        return cls(
            vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"], num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=heads, num_key_value_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-5), rope_theta=float(theta),
            rope_scaling=rope if rope_type == "llama3" else None,
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=[] if eos is None else [eos] if isinstance(eos, int) else list(eos))

    @classmethod
    def from_dir(cls, model_dir):
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found; a model folder needs config.json")
        try:
            raw = json.loads(path.read_text())
            config = cls.from_dict(raw, where=str(path))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a readable Llama config ({type(e).__name__}: {e})") from None
        # Instruct models stop at several ids (Llama-3.2: 128001, 128008, 128009); the generation
        # config may list ones config.json does not.
        gen = Path(model_dir) / "generation_config.json"
        if gen.is_file():
            extra = json.loads(gen.read_text()).get("eos_token_id")
            extra = [] if extra is None else [extra] if isinstance(extra, int) else extra
            config.eos_token_ids += [e for e in extra if e not in config.eos_token_ids]
        return config


# ----------------------------------------------------------------------------- rotary embeddings

def rope_inv_freq(config):
    """Rotation speed of each pair of head dimensions, (head_dim/2,) float32.

    Llama-3 stretches the slow (long-wavelength) rotations by `factor` so the model reaches past the
    context it was pre-trained on, keeps the fast ones, and blends the band in between."""
    d = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    s = config.rope_scaling
    if s is None:
        return inv_freq
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    low_wavelen, high_wavelen = old_len / s["low_freq_factor"], old_len / s["high_freq_factor"]
    smooth = (old_len / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
    blended = (1 - smooth) * inv_freq / s["factor"] + smooth * inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s["factor"], inv_freq)
    return torch.where((wavelen >= high_wavelen) & (wavelen <= low_wavelen), blended, scaled)


def rope_cos_sin(inv_freq, positions, dtype=torch.float32):
    """cos and sin for each position, (B, 1, T, head_dim) to broadcast over the heads, cast once to
    the dtype q and k will have; the angles are float32: bf16 angles would lose positions. The first
    half of sin is negated, which is the minus sign of the rotation (see apply_rope)."""
    angles = positions[..., None].float() * inv_freq  # (B, T, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)[:, None]  # HF layout: first half and second half pair up
    sin = angles.sin()
    sin[..., :sin.shape[-1] // 2] *= -1
    return angles.cos().to(dtype), sin.to(dtype)


def apply_rope(x, cos, sin):
    """Rotate pairs (x_i, x_{i+d/2}) by the position's angle: (x1, x2) -> (x1 cos - x2 sin,
    x2 cos + x1 sin). roll swaps the halves to (x2, x1); sin carries the minus sign. x: (B, heads, T, hd)."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin)


# ----------------------------------------------------------------------------- blocks

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):  # weight * x / sqrt(mean(x^2) + eps), in float32: see kernels.py
        return rms_norm(x, self.weight, self.eps)


class KVCache:
    """Keys and values of every layer for the positions seen so far, so each new token costs one
    position's work instead of the whole prefix again."""

    def __init__(self, config, max_len):
        self.layers, self.max_len = config.num_hidden_layers, max_len
        self.k = self.v = None  # (layers, B, kv_heads, max_len, head_dim), made at the first update
        self.length = 0  # positions filled; advanced by Llama.forward after the last layer

    def update(self, layer, k, v):
        """Store k, v (B, kv_heads, T, head_dim); return everything so far (B, kv_heads, S, head_dim)."""
        if self.k is None:  # k's dtype is known only now (bf16 under autocast, else the weights')
            B, H, _, D = k.shape
            self.k = k.new_zeros(self.layers, B, H, self.max_len, D)
            self.v = v.new_zeros(self.layers, B, H, self.max_len, D)
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def put_row(self, row, start, source, source_start, length, batch_size):
        """Copy positions source_start.. of another cache's first row into row `row`, from `start` on."""
        if self.k is None:
            layers, _, H, _, D = source.k.shape
            self.k = source.k.new_zeros(layers, batch_size, H, self.max_len, D)
            self.v = source.v.new_zeros(layers, batch_size, H, self.max_len, D)
        self.k[:, row, :, start:start + length] = source.k[:, 0, :, source_start:source_start + length]
        self.v[:, row, :, start:start + length] = source.v[:, 0, :, source_start:source_start + length]


class Attention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        d, hd = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=False)

    def forward(self, x, cos, sin, cache=None, attn_mask=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, heads, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, kv_heads, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, kv_heads, S, hd), S = cached + T
        # Grouped-query attention: each kv head serves n_heads / n_kv_heads query heads. SDPA
        # shares them itself (enable_gqa), without copying k and v out to every query head.
        causal = attn_mask is None and k.shape[2] == T and T > 1
        cpu = q.device.type == "cpu"
        if cpu and causal and q.requires_grad and T <= MAX_T_OWN_ATTENTION:
            y = causal_attention(q, k, v)  # training on the CPU: SDPA's backward is slow there
        elif cpu and T == 1 and cache is not None and not q.requires_grad:
            y = attention_one_query(q, k, v, attn_mask)  # generating on the CPU: SDPA's setup dominates
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal,
                                               enable_gqa=self.n_heads != self.n_kv_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, d)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))  # silu(gate) * up


class DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, cache=None, attn_mask=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, attn_mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """The transformer body; its name `model` gives the checkpoint's `model.` key prefix."""

    def __init__(self, config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


# ----------------------------------------------------------------------------- the model

class Llama(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight  # one matrix reads and writes tokens
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        self.name_or_path, self.model_dir = None, None
        # Activation checkpointing, off by default: the backward pass keeps only each layer's input
        # and runs the layer's forward again. Activations shrink to about a tenth; a LoRA step
        # (forward, then a backward with no weight gradients, about as long) takes ~1.5x the time.
        self.recompute = False
        # Keep the norms' and SwiGLU's outputs as recipes, rebuilt in the backward pass: about a
        # fifth less activation memory for a few elementwise passes (kernels.py, the last section).
        self.rebuild = True

    def hidden_states(self, tokens, positions=None, cache=None, attn_mask=None):
        """tokens (B, T) -> final-normed hidden states (B, T, d).

        positions (B, T) default to 0.. (after the cache's length); attn_mask (B, 1, T, S) bool, True
        where a query may attend, is only needed for padding (generation) or packed samples."""
        B, T = tokens.shape
        if positions is None:
            start = cache.length if cache is not None else 0
            positions = torch.arange(start, start + T, device=tokens.device).expand(B, T)
        if attn_mask is None and cache is not None and cache.length > 0 and T > 1:
            S = cache.length + T  # new queries see the whole cache and the causal part of themselves
            attn_mask = torch.ones(T, S, dtype=torch.bool, device=tokens.device).tril(cache.length)
        x = self.model.embed_tokens(tokens)  # (B, T, d)
        device = tokens.device.type  # q and k come out of autocast's dtype if it is on, else x's
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        cos, sin = rope_cos_sin(self.inv_freq, positions, dtype)  # (B, 1, T, head_dim)
        training = torch.is_grad_enabled()
        rebuild = training and self.rebuild and not self.recompute  # checkpoint() keeps nothing to rebuild
        with rebuild_instead_of_keeping() if rebuild else contextlib.nullcontext():
            for layer in self.model.layers:
                if self.recompute and training:
                    x = checkpoint(layer, x, cos, sin, cache, attn_mask, use_reentrant=False)
                else:
                    x = layer(x, cos, sin, cache, attn_mask)
        if cache is not None:
            cache.length += T
        return self.model.norm(x)

    def forward(self, tokens, positions=None, cache=None, attn_mask=None, logits_at=None, targets=None):
        """tokens (B, T) -> logits (B, T, vocab), or (N, vocab) at the N places where the bool mask
        logits_at (B, T) is True. The loss needs logits only after the separator: projecting every
        position onto a 128,256-wide vocabulary would spend most of the step's memory on nothing.
        With targets (N,), the next tokens at those places: the summed cross-entropy instead."""
        h = self.hidden_states(tokens, positions, cache, attn_mask)
        if logits_at is not None:
            h = h[logits_at]  # (N, d)
        if targets is not None:
            return linear_cross_entropy(h, self.lm_head, targets)  # lm_head and loss in chunks
        return self.lm_head(h)

    @classmethod
    def from_pretrained(cls, name_or_path=DEFAULT_MODEL, dtype=torch.float32, device="cpu"):
        """Build the model from a local HF folder or a hub repo id, strictly: every tensor present,
        none extra, every shape right."""
        model_dir = resolve_model_dir(name_or_path)
        config = LlamaConfig.from_dir(model_dir)
        with torch.device("meta"):  # no memory for random weights that are overwritten at once
            model = cls(config)
        state = read_safetensors(model_dir)
        check_state_dict(model, state, model_dir)
        names = model.state_dict().keys()
        state = {k: v.to(device=device, dtype=dtype) for k, v in state.items() if k in names}
        model.load_state_dict(state, strict=False, assign=True)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight  # assign=True broke the tie
        model.inv_freq = rope_inv_freq(config).to(device)
        model.name_or_path, model.model_dir = str(name_or_path), model_dir
        return model.eval()


# ----------------------------------------------------------------------------- loading

def resolve_model_dir(name_or_path):
    """A local folder as it is; anything else is a hub repo id, downloaded once into the hub cache."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists() or str(name_or_path).startswith((".", "/", "~")) or str(name_or_path).count("/") != 1:
        raise FileNotFoundError(f"model folder {name_or_path} does not exist (nor is it a hub id like org/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    try:
        return Path(snapshot_download(str(name_or_path), allow_patterns=HUB_FILES))
    except GatedRepoError:
        raise PermissionError(
            f"{name_or_path} is a gated model: accept its license at https://huggingface.co/{name_or_path}, "
            "then log in with `hf auth login` (or set HF_TOKEN) and run again") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"{name_or_path} is neither a local folder nor a model on the Hugging Face hub "
                                "(private repos need `hf auth login`)") from None
    except Exception as e:  # offline, DNS, timeouts: the hub raises many kinds
        raise ConnectionError(f"could not download {name_or_path} from the Hugging Face hub ({type(e).__name__}); "
                              "if you are offline, pass a local folder holding config.json, tokenizer.json and "
                              "*.safetensors, e.g. --model path/to/Llama-3.2-1B-Instruct") from None


def read_safetensors(model_dir):
    """All tensors of a single-file or sharded (model.safetensors.index.json) checkpoint, on the CPU."""
    from safetensors import safe_open
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (model_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")
    state = {}
    for name in files:
        path = model_dir / name
        if not path.is_file():
            raise FileNotFoundError(f"{path}: listed in model.safetensors.index.json but missing")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                state.update({k: f.get_tensor(k) for k in f.keys()})
        except Exception as e:  # safetensors raises its own error type for a truncated or corrupt file
            raise ValueError(f"{path}: cannot be read, truncated or corrupt? ({e})") from None
    return state


def check_state_dict(model, state, model_dir):
    """Refuse a checkpoint unless it has exactly the model's tensors, in the model's shapes."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        expected.pop("lm_head.weight")  # tied: the checkpoint stores the matrix once, as embed_tokens
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k} {tuple(state[k].shape)} (expected {expected[k]})"
              for k in sorted(set(expected) & set(state)) if tuple(state[k].shape) != expected[k]]
    for what, keys in (("missing tensors", missing), ("unexpected tensors", unexpected), ("wrong shapes", shapes)):
        if keys:
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            raise ValueError(f"{model_dir}: {what}: {', '.join(keys[:3])}{more}")
