"""LoRA from scratch: a frozen Linear layer plus a small trainable detour.

A Linear layer computes y = W x with W (out, in). LoRA leaves W frozen and learns a low-rank
change beside it, through a narrow passage of r numbers:

            +------------------+
    x ----->|   W (out, in)    |---------------- W x ----------+
    (.., in)|   frozen         |                               |
       |    +------------------+                               v
       |    +-----------+       +------------+               ( + ) ---> y (.., out)
       +--->| A (r, in) |-(r)-->| B (out, r) |--> * alpha -----^
            +-----------+       +------------+
              trained              trained

    y = W x + alpha * B A x        r << in, out

A 2048x2048 projection with r = 8 trains 2 * 8 * 2048 = 32,768 numbers instead of 4.2 million.
The method wraps every nn.Linear of Llama (lm_head included) in a `LoraModule`, starts both A and
B random with a small alpha, and doubles alpha each epoch. Merged, W + alpha B A is one matrix
again (merge_lora).

The scale. Here alpha multiplies B A directly. The LoRA paper (Hu et al. 2021, section 4.1), PEFT,
torchtune and most code write the same update as (lora_alpha / r) * B A: our alpha is their
lora_alpha / r, so `--alpha 0.125` at r = 8 is PEFT's lora_alpha = 1. It matters when r changes:
Adam moves every entry of A and B by about lr per step whatever r is, so the learned B A, a sum of
r rank-1 terms, grows with r. The paper divides by r so that a run at another r needs no new
learning rate or alpha; ours does not. To carry a recipe from r to r' as PEFT would, multiply
alpha by r / r'. (At the start, B A x does not grow with r: nn.Linear draws B's entries within
+-1/sqrt(r).)

The adapter file holds only A and B (a few MB, not the base's GBs) and the few numbers it takes to
put them back: save_adapter, read_adapter, load_adapter at the end of this file. PEFT's format and
the merged and GGUF exports are a chapter of their own (export/).
"""
import json
import numbers
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

# How B starts: random like A (the method), or zero (standard LoRA: the model starts as the base).
# "seed", the name of the method's init before, is still accepted and means "random".
INITS = ("random", "zero")
ADAPTER_FILE = "adapter.safetensors"  # what train.py writes into its --out folder
FORMAT = "lora-from-scratch"  # safetensors metadata tag that tells our adapters from other files


# ----------------------------------------------------------------------------- the module

class LoraModule(nn.Module):
    """original_module(x) + alpha * B A x, with the original frozen and A (r, in), B (out, r)
    trainable. x (..., in) -> (..., out). Raises TypeError for a module that is not an nn.Linear,
    ValueError for a bad r, alpha or init."""

    def __init__(self, orig_module: nn.Linear, r: int = 8, alpha: float = 1.0,
                 init: str = "random"):
        super().__init__()
        if not isinstance(orig_module, nn.Linear):
            raise TypeError(f"LoraModule wraps an nn.Linear, got {type(orig_module).__name__}")
        self.r, self.alpha, self.init = check_r(r), check_alpha(alpha), check_init(init)
        self.original_module = orig_module
        # The method wrote `orig_module.requires_grad = False`: a plain Python attribute on the
        # Module object. Autograd reads the flag of each Parameter, which stayed True, so W kept
        # receiving gradients (and optimizer updates). requires_grad_ sets it on every Parameter.
        orig_module.requires_grad_(False)
        # The frozen base may be bf16; A and B train in at least float32 (and so do their AdamW
        # moments): bf16 keeps about 3 significant digits, so small updates would round away.
        W = orig_module.weight
        kw = dict(bias=False, device=W.device, dtype=torch.promote_types(W.dtype, torch.float32))
        # An nn.Sequential of two Linears, as the method has it: the state dict keys stay
        # `...lora_module.0.weight` (A) and `...lora_module.1.weight` (B), in every adapter file.
        self.lora_module = nn.Sequential(nn.Linear(orig_module.in_features, r, **kw),
                                         nn.Linear(r, orig_module.out_features, **kw))
        if self.init == "zero":
            # Standard LoRA: B = 0, so the model starts exactly as the base. With "random" (the
            # method) both keep nn.Linear's random init: the model is perturbed from step 0,
            # which is why the method starts with a small alpha and doubles it as B A learns.
            nn.init.zeros_(self.B)

    @property
    def A(self):  # (r, in): the Parameter itself, so optimizers and copy_ reach it
        return self.lora_module[0].weight

    @property
    def B(self):  # (out, r)
        return self.lora_module[1].weight

    def forward(self, x):  # x (..., in) -> (..., out)
        y = self.original_module(x)
        A, B = self.A, self.B  # (r, in), (out, r)
        # x may be bf16 while A, B are float32: cast x to theirs, then cast the detour back to
        # the base output's dtype. Under autocast the products run in the autocast dtype anyway,
        # so casting x up would only copy the activations twice.
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(A.dtype)
        z = F.linear(F.linear(x, A), B)  # B (A x): (..., in) -> (..., r) -> (..., out)
        return torch.add(y, z.to(y.dtype), alpha=self.alpha)  # y + alpha * z in one pass over y

    def set_alpha(self, new_alpha):
        self.alpha = check_alpha(new_alpha)

    @torch.no_grad()
    def merged_weight(self, dtype=None):
        """W + alpha * B @ A, (out, in), computed in float32 (float64 stays) and returned in
        `dtype`, by default W's own."""
        W = self.original_module.weight
        f32 = torch.promote_types(W.dtype, torch.float32)
        delta = self.B.to(f32) @ self.A.to(f32)  # (out, r) @ (r, in) -> (out, in)
        return (W.to(f32) + self.alpha * delta).to(dtype or W.dtype)

    def extra_repr(self):
        return f"r={self.r}, alpha={self.alpha}, init={self.init!r}"


# ----------------------------------------------------------------------------- a model with LoRA

def add_lora(model, r=8, alpha=1.0, init="random", targets=None):
    """Wrap every nn.Linear (or those whose last name component is in targets, e.g.
    ['q_proj', 'v_proj']) in a LoraModule, freeze all other parameters, return the wrapped names.
    Raises ValueError for an unknown target or a model that has LoRA already."""
    check_r(r), check_alpha(alpha), check_init(init)  # before touching the model
    if lora_modules(model):
        raise ValueError("the model already has LoRA modules; add_lora once per model")
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if targets is not None:
        if isinstance(targets, str) or not all(isinstance(t, str) for t in targets):
            raise TypeError("targets must be a list of names like ['q_proj', 'v_proj'], "
                            f"got {targets!r}")
        valid = sorted({n.rsplit(".", 1)[-1] for n in linears})
        unknown = [t for t in targets if t not in valid]
        if unknown or not targets:
            raise ValueError(f"unknown targets {unknown}; "
                             f"this model's Linear layers are named: {', '.join(valid)}")
        linears = [n for n in linears if n.rsplit(".", 1)[-1] in targets]
    wrap_linears(model, linears, r, alpha, init)
    return linears


def wrap_linears(model, names, r, alpha, init):
    """Replace the named Linear layers by LoraModules and freeze everything else."""
    for p in model.parameters():  # embeddings and norms too: only A and B train
        p.requires_grad_(False)
    for name in names:  # in model order, so the same RNG state gives the same A and B
        model.set_submodule(name, LoraModule(model.get_submodule(name), r, alpha, init))


def set_alpha(model, alpha):
    """The method doubles alpha each epoch: one value for every LoraModule of the model."""
    modules = lora_modules(model)
    if not modules:
        raise ValueError("the model has no LoRA modules (call add_lora first)")
    for m in modules.values():
        m.set_alpha(alpha)


def merge_lora(model):
    """Fold alpha * B @ A into each W and put the plain nn.Linear back: inference at base speed.
    Returns the merged modules' names."""
    modules = lora_modules(model)
    for name, m in modules.items():
        linear = m.original_module
        # A new Parameter, not an in-place edit: when lm_head shares its weight with
        # embed_tokens, editing it in place would also change the embeddings. This unties them.
        linear.weight = nn.Parameter(m.merged_weight(), requires_grad=False)
        model.set_submodule(name, linear)
    config = getattr(model, "config", None)
    if "lm_head" in modules and getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False
    return list(modules)


def lora_modules(model):
    """{module name: LoraModule}, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraModule)}


def lora_parameters(model):
    """A and B of every LoraModule: what the optimizer trains."""
    return [p for m in lora_modules(model).values() for p in m.lora_module.parameters()]


def count_parameters(model):
    """(trainable, total). parameters() yields a tied weight (embed_tokens = lm_head) once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def lora_state_dict(model):
    """Only the LoRA tensors, keyed as in model.state_dict(). They share memory with the
    parameters (no copy): copy_ into them restores a checkpoint."""
    modules = lora_modules(model)
    if not modules:
        raise ValueError("the model has no LoRA modules: nothing to save")
    return {f"{name}.lora_module.{i}.weight": weight.detach()
            for name, m in modules.items() for i, weight in enumerate((m.A, m.B))}


# ----------------------------------------------------------------------------- the adapter file
#
# adapter.safetensors: A and B keyed as in the model (`model.layers.0.self_attn.q_proj.
# lora_module.0.weight` for A (r, in), `...lora_module.1.weight` for B (out, r)), and as
# safetensors metadata (str -> str): format, r, alpha, init, targets, base_model, and base_config,
# the base's shape in a few numbers, to refuse an adapter trained on another model size.

def fingerprint(model):
    config = getattr(model, "config", None)
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads")
    return {k: getattr(config, k) for k in keys if isinstance(getattr(config, k, None), int)}


def adapter_of_model(model):
    """(tensors keyed like model.layers.0.self_attn.q_proj.lora_module.0.weight, metadata)."""
    tensors, modules = lora_state_dict(model), lora_modules(model)  # ValueError without LoRA
    first = next(iter(modules.values()))
    if any((m.r, m.alpha) != (first.r, first.alpha) for m in modules.values()):
        raise ValueError("LoRA modules differ in r or alpha; "
                         "one adapter file holds one r and one alpha")
    meta = dict(r=first.r, alpha=first.alpha, init=first.init, base_config=fingerprint(model),
                targets=sorted({n.rsplit(".", 1)[-1] for n in modules}),
                base_model=str(getattr(model, "name_or_path", None) or ""))
    return tensors, meta


def save_adapter(model, path, base_model: str):
    """Write the LoRA tensors of `model` and their metadata to `path` (a folder gets
    adapter.safetensors inside), whole or not at all: a temp file beside it takes its place in
    one os.replace, so a crash mid-write leaves the previous file as it was. Returns the Path."""
    if not isinstance(base_model, str):
        raise TypeError(f"base_model must be the base's name or path as a str, got {base_model!r}")
    tensors, meta = adapter_of_model(model)
    path = Path(path) / ADAPTER_FILE if Path(path).is_dir() else Path(path)
    tensors = {k: t.to("cpu").contiguous() for k, t in tensors.items()}
    metadata = dict(format=FORMAT, r=str(meta["r"]), alpha=repr(meta["alpha"]), init=meta["init"],
                    targets=",".join(meta["targets"]), base_model=base_model,
                    base_config=json.dumps(meta["base_config"]))  # metadata is str -> str
    tmp = path.with_name(f".{path.name}.tmp")  # beside it: os.replace is atomic there
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)  # safetensors makes its files private
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_adapter(path):
    """(tensors, metadata) of an adapter file, or of a folder holding adapter.safetensors.
    Raises FileNotFoundError, or ValueError naming the file (another format, damaged metadata,
    a tensor that is no A or B of rank r)."""
    path = Path(path)
    if not path.exists():  # --adapter takes either: say so
        raise FileNotFoundError(f"{path}: no such adapter file or folder")
    if path.is_dir() and (path / "adapter_config.json").is_file():
        raise ValueError(f"{path}: a PEFT adapter folder; export/peft.py reads it")
    if path.is_dir():
        path = path / ADAPTER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such adapter file")
    try:
        with safe_open(path, "pt") as f:
            raw, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise ValueError(f"{path}: not a safetensors file ({e})") from None
    if raw.get("format") != FORMAT:
        peft = path.name == "adapter_model.safetensors"
        hint = " (a PEFT adapter? pass its folder)" if peft else ""
        raise ValueError(f"{path}: not a LoRA adapter written by lora.py{hint}")
    try:
        meta = dict(r=int(raw["r"]), alpha=float(raw["alpha"]), init=check_init(raw["init"]),
                    base_model=raw["base_model"], targets=raw["targets"].split(","),
                    base_config=json.loads(raw["base_config"]))
    except (KeyError, ValueError) as e:
        raise ValueError(f"{path}: damaged adapter metadata ({type(e).__name__}: {e})") from None
    for key, t in tensors.items():  # every key a pair half, A (r, in) or B (out, r)
        half = key.endswith((".lora_module.0.weight", ".lora_module.1.weight"))
        if not half or t.ndim != 2 or t.shape[int(key[-8])] != meta["r"]:
            raise ValueError(f"{path}: tensor {key} {tuple(t.shape)} "
                             f"is not a LoRA A or B of rank r={meta['r']}")
    return tensors, meta


def load_adapter(model, adapter, alpha=None):
    """Put an adapter into the model, adding LoRA modules if it has none yet. adapter: a path
    (read_adapter) or (tensors, metadata) already read (export/peft.py reads PEFT's). alpha
    overrides the saved one. Returns the metadata. ValueError, before the model is touched, for
    an adapter that does not fit it (naming the first misfit): the shapes decide, not the base's
    name in the metadata, since the same weights go by many names (hub id, a local copy)."""
    if alpha is not None:
        check_alpha(alpha)
    tensors, meta = read_adapter(adapter) if isinstance(adapter, (str, Path)) else adapter
    names = check_fits(model, tensors, meta)
    if not lora_modules(model):
        wrap_linears(model, names, meta["r"], meta["alpha"], meta["init"])
    with torch.no_grad():
        for name, m in lora_modules(model).items():
            m.A.copy_(tensors[f"{name}.lora_module.0.weight"])
            m.B.copy_(tensors[f"{name}.lora_module.1.weight"])
    set_alpha(model, meta["alpha"] if alpha is None else alpha)
    return {k: v for k, v in meta.items() if k != "base_weights"}  # a checked copy of lm_head


def check_fits(model, tensors, meta):
    """The Linear names the adapter adapts, once each fits: the base's shape, the model's LoRA
    modules if it has some, every A and B's shape, and any copy of a base weight the adapter
    carries equal to the model's own (meta["base_weights"]: export/peft.py reads PEFT files
    that hold a copy of lm_head or the embeddings)."""
    base = fingerprint(model)
    for k, v in meta["base_config"].items():
        if k in base and base[k] != v:
            raise ValueError(f"adapter was trained on a base with {k}={v}, "
                             f"this model has {k}={base[k]}")
    own = {k.replace(".original_module.", "."): t for k, t in model.state_dict().items()}
    for name, (saved_as, saved) in meta.get("base_weights", {}).items():
        if name not in own:
            raise ValueError(f"adapter holds {saved_as}, a weight this model does not have")
        if not _same_numbers(own[name], saved):
            raise ValueError(f"adapter holds {saved_as}, which differs from this model's {name}: "
                             "the adapter was made on another base")
    names = list(dict.fromkeys(k.rsplit(".lora_module.", 1)[0] for k in tensors))
    existing = lora_modules(model)
    if existing:
        ranks = {m.r for m in existing.values()}
        if ranks != {meta["r"]}:
            raise ValueError(f"adapter has rank r={meta['r']}, "
                             f"the model's LoRA modules have r={sorted(ranks)}")
        differ = [n for n in [*existing, *names] if (n in existing) != (n in names)]
        if differ:  # a partial load would leave some modules with stale weights
            raise ValueError("the model's LoRA modules and the adapter's differ, "
                             f"first at {differ[0]}")
    for name in names:
        try:
            m = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"adapter has LoRA weights for {name}, "
                             "which this model does not have") from None
        linear = m.original_module if isinstance(m, LoraModule) else m
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"adapter has LoRA weights for {name}, "
                             f"which is a {type(m).__name__}, not a Linear")
        want = {0: (meta["r"], linear.in_features), 1: (linear.out_features, meta["r"])}
        for i in (0, 1):
            key = f"{name}.lora_module.{i}.weight"
            if key not in tensors:
                raise ValueError(f"adapter lacks {key}")
            if tuple(tensors[key].shape) != want[i]:
                raise ValueError(f"{key}: adapter has shape {tuple(tensors[key].shape)}, "
                                 f"model expects {want[i]}")
    return names


def _same_numbers(own, saved):
    """Equal in the coarser of the two dtypes: a float32 copy of a bfloat16 base is that base."""
    if own.shape != saved.shape or not (own.is_floating_point() and saved.is_floating_point()):
        return False
    dtype = max(own.dtype, saved.dtype, key=lambda d: torch.finfo(d).eps)
    return torch.equal(own.to(dtype), saved.to(own.device, dtype))


# ----------------------------------------------------------------------------- argument checks

def check_r(r):
    if isinstance(r, bool) or not isinstance(r, int):  # bool is an int, but True is no rank
        raise TypeError(f"r (the rank) must be a positive int, got {type(r).__name__} {r!r}")
    if r < 1:
        raise ValueError(f"r (the rank) must be a positive int, got {r!r}")
    return r


def check_alpha(alpha):
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError("alpha must be a real number (int or float), "
                        f"got {type(alpha).__name__} {alpha!r}")
    # Compared exactly, so NaN, inf and an int past float's range all fail; 0 turns the adapter off
    if not 0 <= alpha <= torch.finfo(torch.float64).max:
        raise ValueError(f"alpha must be finite and >= 0, got {alpha!r}")
    return float(alpha)


def check_init(init):
    """'random' or 'zero'; 'seed' (the old name of 'random') is read as 'random'."""
    init = "random" if init == "seed" else init
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    return init


if __name__ == "__main__":
    import sys
    print("lora.py is the LoRA lesson, not a command; its tools have files of their own:\n"
          "  python -m export --adapter out --format peft|merged|gguf|lora-gguf --out PATH\n"
          "  python -m anatomy out     (what an adapter learned; was `lora.py inspect`)",
          file=sys.stderr)
    sys.exit(2)
