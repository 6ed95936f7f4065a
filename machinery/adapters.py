"""Adapter files checked, written whole, and loaded into a model only once they fit it.

lora.py writes and reads A and B; this file is what a tool needs around that: the file's format
tag and the base's shape in its metadata (to refuse an adapter trained on another model size), a
write that a crash cannot leave half done, one-line errors that name the file for anything that
is not one of our adapters, and the model with its adapter for sample.py and eval.py.

Metadata of adapter.safetensors (str -> str): format, r, alpha, init, targets (lora.py's), and
base_model (the --model it was trained on), base_config (a few numbers of the base's shape, JSON).
An adapter whose init says "seed" is read as "random": the same init under another name.
"""
import json
import numbers
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

import lora
from lora import LoraModule
from machinery import json_out

ADAPTER_FILE = "adapter.safetensors"  # what train.py writes into its --out folder
FORMAT = "lora-from-scratch"  # safetensors metadata tag that tells our adapters from other files


# ----------------------------------------------------------------------------- what a file says

def fingerprint(model):
    """The base's shape in a few numbers, {name: int}, from its config."""
    config = getattr(model, "config", None)
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads")
    return {k: getattr(config, k) for k in keys if isinstance(getattr(config, k, None), int)}


def adapter_of_model(model):
    """(tensors keyed like model.layers.0.self_attn.q_proj.lora_module.0.weight, metadata): what
    an adapter file of this model holds. ValueError without LoRA, or with modules that differ in
    r or alpha (one file holds one of each)."""
    tensors, modules = lora.lora_state_dict(model), lora.lora_modules(model)
    first = next(iter(modules.values()))
    if any((m.r, m.alpha) != (first.r, first.alpha) for m in modules.values()):
        raise ValueError("LoRA modules differ in r or alpha; "
                         "one adapter file holds one r and one alpha")
    meta = dict(r=first.r, alpha=first.alpha, init=first.init, base_config=fingerprint(model),
                targets=sorted({n.rsplit(".", 1)[-1] for n in modules}),
                base_model=str(getattr(model, "name_or_path", None) or ""))
    return tensors, meta


# ----------------------------------------------------------------------------- writing

def save(model, path, base_model: str, **metadata):
    """lora.save_adapter, whole or not at all: a temp file beside `path` takes its place in one
    os.replace, so a crash mid-write leaves the previous file as it was. A folder gets
    adapter.safetensors inside. More str -> str metadata may be given. Returns the Path."""
    if not isinstance(base_model, str):
        raise TypeError(f"base_model must be the base's name or path as a str, got {base_model!r}")
    adapter_of_model(model)  # one r and one alpha
    path = Path(path) / ADAPTER_FILE if Path(path).is_dir() else Path(path)
    tmp = path.with_name(f".{path.name}.tmp")  # beside it: os.replace is atomic there
    # the base it learned against: in the compute dtype, or in NF4 (qlora/load.py sets it)
    metadata.setdefault("base_quantize", getattr(model, "quantize", None) or "none")
    try:
        lora.save_adapter(model, tmp, format=FORMAT, base_model=base_model,
                          base_config=json_out.dumps(fingerprint(model)), **metadata)
        os.chmod(tmp, 0o644)  # safetensors makes its files private
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# ----------------------------------------------------------------------------- reading

def read_metadata(path):
    """The safetensors metadata of an adapter file (or of a folder's adapter.safetensors), {}
    when there is none to read: read() below says what is wrong with such a path."""
    path = Path(path)
    path = path / ADAPTER_FILE if path.is_dir() else path
    try:
        with safe_open(path, "pt") as f:
            return f.metadata() or {}
    except (OSError, SafetensorError):
        return {}


def read(path):
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
            raw = f.metadata() or {}
    except SafetensorError as e:
        raise ValueError(f"{path}: not a safetensors file ({e})") from None
    if raw.get("format") != FORMAT:
        peft = path.name == "adapter_model.safetensors"
        hint = " (a PEFT adapter? pass its folder)" if peft else ""
        raise ValueError(f"{path}: not a LoRA adapter written by lora.py{hint}")
    try:
        tensors, meta = lora.read_adapter(path)
        meta.update(init=lora.check_init("random" if meta["init"] == "seed" else meta["init"]),
                    base_model=meta["base_model"], base_config=json.loads(meta["base_config"]))
    except (KeyError, ValueError) as e:
        raise ValueError(f"{path}: damaged adapter metadata ({type(e).__name__}: {e})") from None
    except SafetensorError as e:
        raise ValueError(f"{path}: not a safetensors file ({e})") from None
    meta.pop("format")
    for key, t in tensors.items():  # every key a pair half, A (r, in) or B (out, r)
        half = key.endswith((".lora_module.0.weight", ".lora_module.1.weight"))
        if not half or t.ndim != 2 or t.shape[int(key[-8])] != meta["r"]:
            raise ValueError(f"{path}: tensor {key} {tuple(t.shape)} "
                             f"is not a LoRA A or B of rank r={meta['r']}")
    return tensors, meta


def load(model, adapter, alpha=None):
    """lora.load_adapter, once the adapter is checked to fit the model. adapter: a path (read()
    above) or (tensors, metadata) already read (export/peft.py reads PEFT's). alpha overrides the
    saved one. Returns the metadata. ValueError, before the model is touched, for an adapter that
    does not fit (naming the first misfit): the shapes decide, not the base's name in the
    metadata, since the same weights go by many names (hub id, a local copy)."""
    if alpha is not None:
        check_alpha(alpha)
    tensors, meta = read(adapter) if isinstance(adapter, (str, os.PathLike)) else adapter
    check_fits(model, tensors, meta)
    lora.load_adapter(model, (tensors, meta), alpha)
    return {k: v for k, v in meta.items() if k != "base_weights"}  # a checked copy of lm_head


def check_alpha(alpha):
    """lora.check_alpha, with numpy's and other numbers.Real types named in the error too."""
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError("alpha must be a real number (int or float), "
                        f"got {type(alpha).__name__} {alpha!r}")
    return lora.check_alpha(alpha)


def check_fits(model, tensors, meta):
    """The Linear names the adapter adapts, once each fits: the base's shape, the model's LoRA
    modules if it has some, every A and B's shape, and any copy of a base weight the adapter
    carries equal to the model's own (meta["base_weights"]: export/peft.py reads PEFT files
    that hold a copy of lm_head or the embeddings)."""
    base = fingerprint(model)
    for k, v in meta.get("base_config", {}).items():
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
    existing = lora.lora_modules(model)
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
        if not lora.is_linear(linear):
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
