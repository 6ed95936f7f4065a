"""LoRA from scratch: a frozen Linear layer plus a small trainable detour, readable top to bottom.

A Linear layer computes y = W x with W (out, in). LoRA leaves W alone and learns a low-rank change:

    y = W x + alpha * B (A x)        A (r, in), B (out, r), r << in, out

so a 2048x2048 projection trains 2 * 8 * 2048 numbers instead of 4 million. The method here wraps
every nn.Linear of Llama (lm_head included) in a `LoraModule`, starts with a small alpha and doubles
it each epoch. Below: the module, putting it into a model, merging it back into W, and saving and
loading adapters (ours, and PEFT's). Exporting to PEFT or to a merged model: export.py, also run as
`python lora.py export ...`.
"""
import json
import math
import numbers
import os
import re
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

INITS = ("seed", "zero")
ADAPTER_FILE = "adapter.safetensors"  # what a folder written by train.py --out holds
FORMAT = "lora-from-scratch"  # safetensors metadata tag that tells our adapters from other files


def check_r(r):
    if isinstance(r, bool) or not isinstance(r, int):  # bool is an int subclass, but True is no rank
        raise TypeError(f"r (the rank) must be a positive int, got {type(r).__name__} {r!r}")
    if r < 1:
        raise ValueError(f"r (the rank) must be a positive int, got {r!r}")
    return r


def check_alpha(alpha):
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"alpha must be a real number (int or float), got {type(alpha).__name__} {alpha!r}")
    try:
        value = float(alpha)
    except OverflowError:  # an int past float range
        value = math.inf
    if not math.isfinite(value) or value < 0:  # alpha = 0 is meaningful: the adapter is switched off
        raise ValueError(f"alpha must be finite and >= 0, got {alpha!r}")
    return value


def check_init(init):
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    return init


# ----------------------------------------------------------------------------- the module

class LoraModule(nn.Module):
    """original_module(x) + alpha * B A x, with the original frozen and A, B trainable."""

    def __init__(self, orig_module: nn.Linear, r: int = 8, alpha: float = 1.0, init: str = "seed"):
        super().__init__()
        if not isinstance(orig_module, nn.Linear):
            raise TypeError(f"LoraModule wraps an nn.Linear, got {type(orig_module).__name__}")
        self.r, self.alpha, self.init = check_r(r), check_alpha(alpha), check_init(init)
        self.original_module = orig_module
        # The method wrote `orig_module.requires_grad = False`: that only sets a plain Python attribute
        # on the Module object. Autograd reads the flag of each Parameter, which stayed True, so W
        # kept receiving gradients (and optimizer updates). requires_grad_ sets it on every Parameter.
        orig_module.requires_grad_(False)
        # The frozen base may be bf16; A and B train in at least float32 (and so do their AdamW
        # moments): bf16 keeps about 3 significant digits, so small updates would round away.
        W = orig_module.weight
        kw = dict(bias=False, device=W.device, dtype=torch.promote_types(W.dtype, torch.float32))
        self.lora_module = nn.Sequential(nn.Linear(orig_module.in_features, r, **kw),   # A (r, in)
                                         nn.Linear(r, orig_module.out_features, **kw))  # B (out, r)
        if init == "zero":
            # Standard LoRA: B = 0, so the model starts exactly as the base. With "seed" (the method)
            # both keep nn.Linear's random init: the model is perturbed from step 0, which is why the
            # method starts with a small alpha and doubles it as B A learns something useful.
            nn.init.zeros_(self.lora_module[1].weight)

    def forward(self, x):  # x (..., in) -> (..., out)
        y = self.original_module(x)
        A, B = self.lora_module[0].weight, self.lora_module[1].weight  # (r, in), (out, r)
        # x may be bf16 while A, B are float32: cast x to theirs, then cast the detour back to the
        # base output's dtype. Under autocast the products run in the autocast dtype anyway, so
        # casting x up would only copy the activations twice.
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(A.dtype)
        z = F.linear(F.linear(x, A), B)  # B (A x), the Linear layers' own function: no module calls
        return torch.add(y, z.to(y.dtype), alpha=self.alpha)  # y + alpha * z in one pass over y

    def set_alpha(self, new_alpha):
        self.alpha = check_alpha(new_alpha)

    @torch.no_grad()
    def merged_weight(self):
        """W + alpha * B @ A, (out, in) in the base's dtype, computed in float32."""
        W = self.original_module.weight
        A, B = self.lora_module[0].weight, self.lora_module[1].weight
        delta = B.float() @ A.float()  # (out, r) @ (r, in) -> (out, in)
        return (W.float() + self.alpha * delta).to(W.dtype)

    def extra_repr(self):
        return f"r={self.r}, alpha={self.alpha}, init={self.init!r}"


# ----------------------------------------------------------------------------- a model with LoRA

def lora_modules(model):
    """{module name: LoraModule}, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraModule)}


def lora_parameters(model):
    return [p for m in lora_modules(model).values() for p in m.lora_module.parameters()]


def count_parameters(model):
    """(trainable, total). parameters() yields a tied weight (embed_tokens = lm_head) once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def set_alpha(model, alpha):
    modules = lora_modules(model)
    if not modules:
        raise ValueError("the model has no LoRA modules (call add_lora first)")
    for m in modules.values():
        m.set_alpha(alpha)


def _set_submodule(model, name, module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _wrap(model, names, r, alpha, init):
    """Replace the named Linear layers by LoraModules and freeze everything else."""
    for p in model.parameters():  # embeddings and norms too: only A and B train
        p.requires_grad_(False)
    for name in names:  # in model order, so the same RNG state gives the same A and B
        _set_submodule(model, name, LoraModule(model.get_submodule(name), r, alpha, init))


def add_lora(model, r=8, alpha=1.0, init="seed", targets=None):
    """Wrap every nn.Linear (or those whose last name component is in targets) in a LoraModule,
    freeze all other parameters, return the wrapped names."""
    check_r(r), check_alpha(alpha), check_init(init)  # before touching the model
    if lora_modules(model):
        raise ValueError("the model already has LoRA modules; add_lora once per model")
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if targets is not None:
        if isinstance(targets, str) or not all(isinstance(t, str) for t in targets):
            raise TypeError(f"targets must be a list of names like ['q_proj', 'v_proj'], got {targets!r}")
        valid = sorted({n.rsplit(".", 1)[-1] for n in linears})
        unknown = [t for t in targets if t not in valid]
        if unknown or not targets:
            raise ValueError(f"unknown targets {unknown}; this model's Linear layers are named: {', '.join(valid)}")
        linears = [n for n in linears if n.rsplit(".", 1)[-1] in targets]
    _wrap(model, linears, r, alpha, init)
    return linears


def merge_lora(model):
    """Fold alpha * B @ A into each W and put the plain nn.Linear back: inference at base speed."""
    modules = lora_modules(model)
    for name, m in modules.items():
        linear = m.original_module
        # A new Parameter, not an in-place edit: when lm_head shares its weight with embed_tokens,
        # editing it in place would also change the embeddings. This unties them instead.
        linear.weight = nn.Parameter(m.merged_weight(), requires_grad=False)
        _set_submodule(model, name, linear)
    config = getattr(model, "config", None)
    if "lm_head" in modules and getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False
    return list(modules)


# ----------------------------------------------------------------------------- our adapter files

def _adapter_of_model(model):
    """(tensors keyed like model.layers.0.self_attn.q_proj.lora_module.0.weight, metadata)."""
    modules = lora_modules(model)
    if not modules:
        raise ValueError("the model has no LoRA modules: nothing to save")
    first = next(iter(modules.values()))
    if any((m.r, m.alpha) != (first.r, first.alpha) for m in modules.values()):
        raise ValueError("LoRA modules differ in r or alpha; one adapter file holds one r and one alpha")
    tensors = {f"{name}.lora_module.{i}.weight": m.lora_module[i].weight.detach()
               for name, m in modules.items() for i in (0, 1)}
    meta = dict(r=first.r, alpha=first.alpha, init=first.init, base_config=_fingerprint(model),
                targets=sorted({n.rsplit(".", 1)[-1] for n in modules}),
                base_model=str(getattr(model, "name_or_path", None) or ""))
    return tensors, meta


def lora_state_dict(model):
    """Only the LoRA tensors. They share memory with the parameters (no copy): copy_ into them
    restores a checkpoint."""
    return _adapter_of_model(model)[0]


def _fingerprint(model):
    """The base's shape in a few numbers, to refuse an adapter trained on another model size."""
    config = getattr(model, "config", None)
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads")
    return {k: getattr(config, k) for k in keys if isinstance(getattr(config, k, None), int)}


@contextmanager
def _replacing(path):
    """Yield a temp path next to `path`; move it over `path` only once fully written, so a crash
    mid-write never destroys an earlier adapter (os.replace is atomic within one filesystem)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private to us
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_adapter(model, path, base_model: str):
    """Write only the LoRA tensors (a few MB, not the 2.5 GB base) plus what it takes to reload
    them; a folder path gets adapter.safetensors inside. Returns the file's Path."""
    if not isinstance(base_model, str):
        raise TypeError(f"base_model must be the base's name or path as a str, got {base_model!r}")
    tensors, meta = _adapter_of_model(model)
    path = Path(path) / ADAPTER_FILE if Path(path).is_dir() else Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = dict(format=FORMAT, r=str(meta["r"]), alpha=repr(meta["alpha"]), init=meta["init"],
                    targets=",".join(meta["targets"]), base_model=base_model,
                    base_config=json.dumps(meta["base_config"]))  # safetensors metadata is str -> str
    with _replacing(path) as tmp:
        save_file({k: t.to("cpu").contiguous() for k, t in tensors.items()}, tmp, metadata=metadata)
    return path


def _read_ours(path):
    try:
        with safe_open(path, "pt") as f:
            raw, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise ValueError(f"{path}: not a safetensors file ({e})") from None
    if raw.get("format") != FORMAT:
        hint = " (a PEFT adapter? pass its folder)" if path.name == "adapter_model.safetensors" else ""
        raise ValueError(f"{path}: not a LoRA adapter written by lora.py{hint}")
    try:
        meta = dict(r=int(raw["r"]), alpha=float(raw["alpha"]), init=raw["init"], base_model=raw["base_model"],
                    targets=raw["targets"].split(","), base_config=json.loads(raw["base_config"]))
    except (KeyError, ValueError) as e:
        raise ValueError(f"{path}: damaged adapter metadata ({type(e).__name__}: {e})") from None
    return tensors, meta


def read_adapter(path):
    """(tensors, metadata) from our .safetensors file, a folder holding one, or a PEFT folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such adapter file or folder")
    if path.is_dir() and (path / "adapter_config.json").is_file():
        tensors, meta = _read_peft(path)
    elif path.is_dir() and (path / ADAPTER_FILE).is_file():
        path = path / ADAPTER_FILE
        tensors, meta = _read_ours(path)
    elif path.is_dir():
        raise FileNotFoundError(f"{path}: folder holds neither {ADAPTER_FILE} nor a PEFT adapter_config.json")
    else:
        tensors, meta = _read_ours(path)
    r = meta["r"]
    for key, t in tensors.items():  # every key a pair half, A (r, in) or B (out, r)
        half = re.fullmatch(r".+\.lora_module\.([01])\.weight", key)
        if not half or t.ndim != 2 or t.shape[int(half[1])] != r:
            raise ValueError(f"{path}: tensor {key} {tuple(t.shape)} is not a LoRA A or B of rank r={r}")
    return tensors, meta


def _check_fits(model, tensors, meta):
    """Refuse, before touching the model, an adapter that does not fit it; names the first misfit."""
    base = _fingerprint(model)
    for k, v in meta["base_config"].items():
        if k in base and base[k] != v:
            raise ValueError(f"adapter was trained on a base with {k}={v}, this model has {k}={base[k]}")
    names = list(dict.fromkeys(k.rsplit(".lora_module.", 1)[0] for k in tensors))
    existing = lora_modules(model)
    if existing:
        ranks = {m.r for m in existing.values()}
        if ranks != {meta["r"]}:
            raise ValueError(f"adapter has rank r={meta['r']}, the model's LoRA modules have r={sorted(ranks)}")
        differ = [n for n in [*existing, *names] if (n in existing) != (n in names)]
        if differ:  # a partial load would leave some modules with stale weights
            raise ValueError(f"the model's LoRA modules and the adapter's differ, first at {differ[0]}")
    for name in names:
        try:
            m = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"adapter has LoRA weights for {name}, which this model does not have") from None
        linear = m.original_module if isinstance(m, LoraModule) else m
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"adapter has LoRA weights for {name}, which is a {type(m).__name__}, not a Linear")
        want = {0: (meta["r"], linear.in_features), 1: (linear.out_features, meta["r"])}
        for i in (0, 1):
            key = f"{name}.lora_module.{i}.weight"
            if key not in tensors:
                raise ValueError(f"adapter lacks {key}")
            if tuple(tensors[key].shape) != want[i]:
                raise ValueError(f"{key}: adapter has shape {tuple(tensors[key].shape)}, model expects {want[i]}")
    return names


def load_adapter(model, path, alpha=None, expected_base=None):
    """Put an adapter (ours or PEFT's) into the model, adding LoRA modules if it has none yet.
    alpha overrides the saved one. Returns the adapter's metadata."""
    if alpha is not None:
        check_alpha(alpha)
    tensors, meta = read_adapter(path)
    if expected_base is not None and meta["base_model"] != expected_base:
        # Warn, not refuse: the same weights go by many names (hub id, a local copy's path); the
        # shapes, checked next, are what must match.
        warnings.warn(f"{path}: adapter was trained on {meta['base_model']!r}, loading into {expected_base!r}")
    names = _check_fits(model, tensors, meta)
    if not lora_modules(model):
        _wrap(model, names, meta["r"], meta["alpha"], meta["init"])
    with torch.no_grad():
        for name, m in lora_modules(model).items():
            for i in (0, 1):
                m.lora_module[i].weight.copy_(tensors[f"{name}.lora_module.{i}.weight"])
    set_alpha(model, meta["alpha"] if alpha is None else alpha)
    return meta


# ----------------------------------------------------------------------------- the PEFT format
# PEFT (Hugging Face's adapter library) stores A and B as `base_model.model.<module>.lora_A.weight`
# (r, in) and `.lora_B.weight` (out, r) and scales by lora_alpha / r, so our alpha is lora_alpha / r.

PEFT_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")
# PEFT options that change the arithmetic, with the value under which it is plain LoRA.
PEFT_PLAIN = dict(use_dora=False, use_rslora=False, bias="none", lora_bias=False, fan_in_fan_out=False,
                  layers_to_transform=None, layers_pattern=None, rank_pattern={}, alpha_pattern={},
                  modules_to_save=None, layer_replication=None, trainable_token_indices=None,
                  target_parameters=None, use_qalora=False, alora_invocation_tokens=None,
                  ensure_weight_tying=False)  # True would move an lm_head adapter onto embed_tokens too


def _read_peft(folder):
    config = json.loads((folder / "adapter_config.json").read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{folder}: peft_type {config.get('peft_type')!r} is not supported, only 'LORA'")
    for option, plain in PEFT_PLAIN.items():
        value = config.get(option, plain)
        if not (value == plain or value is None or value is False or value in ([], {})):
            raise ValueError(f"{folder}: PEFT option {option}={value!r} is not supported (plain LoRA only)")
    file = folder / "adapter_model.safetensors"
    if not file.is_file():
        raise FileNotFoundError(f"{file}: not found (only safetensors PEFT adapters are supported)")
    tensors = {}
    for key, t in load_file(file).items():
        match = PEFT_KEY.fullmatch(key)
        if not match:
            raise ValueError(f"{file}: tensor {key} is not a LoRA A or B of a Linear layer")
        tensors[f"{match[1]}.lora_module.{'AB'.index(match[2])}.weight"] = t
    r, lora_alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(r, int) or not isinstance(lora_alpha, (int, float)):
        raise ValueError(f"{folder}: adapter_config.json lacks an int r or a number lora_alpha")
    # init only records how A and B started; "zero" is PEFT's default and the loaded weights replace it.
    meta = dict(r=r, alpha=lora_alpha / r, init="zero", base_config={},
                base_model=config.get("base_model_name_or_path") or "",
                targets=sorted({k.split(".lora_module.")[0].rsplit(".", 1)[-1] for k in tensors}))
    return tensors, meta


def import_peft(model, peft_dir, alpha=None, expected_base=None):
    if not (Path(peft_dir) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{peft_dir}: no adapter_config.json, not a PEFT adapter folder")
    return load_adapter(model, peft_dir, alpha, expected_base)


if __name__ == "__main__":  # `python lora.py export ...`: the exports live in export.py
    from export import main
    main()
