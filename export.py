"""Adapter files: every format this project reads or writes, and the `python lora.py export` CLI.

The formats:

    ours    adapter.safetensors (what train.py --out holds): the LoRA tensors keyed as in the
            model, `model.layers.0.self_attn.q_proj.lora_module.0.weight` for A (r, in) and
            `...lora_module.1.weight` for B (out, r), plus safetensors metadata (str -> str):
            format, r, alpha, init, targets, base_model, base_config (the base's shape).
    PEFT    Hugging Face's adapter library: a folder with adapter_config.json and
            adapter_model.safetensors, keys `base_model.model.<module>.lora_A.weight` (r, in) and
            `.lora_B.weight` (out, r). PEFT scales by lora_alpha / r: our alpha is lora_alpha / r.
            On lm_head it also saves the base's own head (`...lm_head.base_layer.weight`), checked
            against the model's. Read by load_adapter (given the folder), written by export_peft.
    merged  a plain Hugging Face model folder with alpha * B @ A folded into W: any Llama loader
            (transformers, vLLM, llama.cpp's converter) runs it without knowing about LoRA.

The sections: writing whole or not at all (write_atomic, used for every file and folder the
project writes); our adapter file; loading an adapter into a model; the PEFT format; the merged
export; the command line:

    python lora.py export --adapter out --format peft --out out-peft
    python lora.py export --adapter out --format merged --out out-merged
"""
import argparse
import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from lora import (LoraModule, check_alpha, lora_modules, lora_state_dict, set_alpha,
                  wrap_linears)

ADAPTER_FILE = "adapter.safetensors"  # what a folder written by train.py --out holds
FORMAT = "lora-from-scratch"  # safetensors metadata tag that tells our adapters from other files


# ----------------------------------------------------------------------------- whole or not at all

def write_atomic(path, write, folder=False):
    """write(tmp) fills a temp file (a temp folder with folder=True) beside `path`, which then
    takes `path`'s place in one os.replace (atomic within one filesystem). A crash mid-write
    leaves the previous file whole (at worst a hidden .NAME.*.tmp, which train.py --resume
    deletes); an error mid-write deletes the temp. A non-empty folder is never replaced."""
    path = Path(path)
    if folder:
        check_out_dir(path)  # before writing anything
    path.parent.mkdir(parents=True, exist_ok=True)
    names = dict(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    if folder:
        tmp = Path(tempfile.mkdtemp(**names))
    else:
        fd, tmp = tempfile.mkstemp(**names)
        os.close(fd)
        tmp = Path(tmp)
    try:
        write(tmp)
        # mkstemp, mkdtemp and safetensors make what they create private to us (0600, 0700).
        for p in [tmp, *tmp.rglob("*")] if folder else [tmp]:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        os.replace(tmp, path)  # a folder may replace an empty one (checked above)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
    return path


def check_out_dir(out_dir):
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir}: exists and is not empty; refusing to overwrite it")


# ----------------------------------------------------------------------------- our adapter file

def fingerprint(model):
    """The base's shape in a few numbers, to refuse an adapter trained on another model size."""
    config = getattr(model, "config", None)
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads")
    return {k: getattr(config, k) for k in keys if isinstance(getattr(config, k, None), int)}


def adapter_of_model(model):
    """(tensors keyed like model.layers.0.self_attn.q_proj.lora_module.0.weight, metadata)."""
    modules = lora_modules(model)
    if not modules:
        raise ValueError("the model has no LoRA modules: nothing to save")
    first = next(iter(modules.values()))
    if any((m.r, m.alpha) != (first.r, first.alpha) for m in modules.values()):
        raise ValueError("LoRA modules differ in r or alpha; "
                         "one adapter file holds one r and one alpha")
    meta = dict(r=first.r, alpha=first.alpha, init=first.init, base_config=fingerprint(model),
                targets=sorted({n.rsplit(".", 1)[-1] for n in modules}),
                base_model=str(getattr(model, "name_or_path", None) or ""))
    return lora_state_dict(model), meta


def save_adapter(model, path, base_model: str):
    """Write only the LoRA tensors (a few MB, not the 2.5 GB base) plus what it takes to reload
    them; a folder path gets adapter.safetensors inside. Returns the file's Path."""
    if not isinstance(base_model, str):
        raise TypeError(f"base_model must be the base's name or path as a str, got {base_model!r}")
    tensors, meta = adapter_of_model(model)
    path = Path(path) / ADAPTER_FILE if Path(path).is_dir() else Path(path)
    tensors = {k: t.to("cpu").contiguous() for k, t in tensors.items()}
    metadata = dict(format=FORMAT, r=str(meta["r"]), alpha=repr(meta["alpha"]), init=meta["init"],
                    targets=",".join(meta["targets"]), base_model=base_model,
                    base_config=json.dumps(meta["base_config"]))  # metadata is str -> str
    return write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def _read_ours(path):
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
        meta = dict(r=int(raw["r"]), alpha=float(raw["alpha"]), init=raw["init"],
                    base_model=raw["base_model"], targets=raw["targets"].split(","),
                    base_config=json.loads(raw["base_config"]), base_weights={})
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
        raise FileNotFoundError(f"{path}: folder holds neither {ADAPTER_FILE} "
                                "nor a PEFT adapter_config.json")
    else:
        tensors, meta = _read_ours(path)
    r = meta["r"]
    for key, t in tensors.items():  # every key a pair half, A (r, in) or B (out, r)
        half = re.fullmatch(r".+\.lora_module\.([01])\.weight", key)
        if not half or t.ndim != 2 or t.shape[int(half[1])] != r:
            raise ValueError(f"{path}: tensor {key} {tuple(t.shape)} "
                             f"is not a LoRA A or B of rank r={r}")
    return tensors, meta


# ----------------------------------------------------------------------------- into a model

def _check_fits(model, tensors, meta):
    """Refuse, before touching the model, an adapter that does not fit; name the first misfit."""
    base = fingerprint(model)
    for k, v in meta["base_config"].items():
        if k in base and base[k] != v:
            raise ValueError(f"adapter was trained on a base with {k}={v}, "
                             f"this model has {k}={base[k]}")
    if meta["base_weights"]:  # state_dict() holds a tied head twice, under both names
        own = {k.replace(".original_module.", "."): t for k, t in model.state_dict().items()}
    for key, saved in meta["base_weights"].items():
        name = key.removeprefix("base_model.model.").replace(".base_layer.", ".")
        if name not in own:
            raise ValueError(f"adapter holds {key}, a weight this model does not have")
        if not _same_numbers(own[name], saved):
            raise ValueError(f"adapter holds {key}, which differs from this model's {name}: "
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


def load_adapter(model, path, alpha=None, expected_base=None):
    """Put an adapter (ours or PEFT's) into the model, adding LoRA modules if it has none yet.
    alpha overrides the saved one. Returns the adapter's metadata."""
    if alpha is not None:
        check_alpha(alpha)
    tensors, meta = read_adapter(path)
    if expected_base is not None and meta["base_model"] != expected_base:
        # Warn, not refuse: the same weights go by many names (hub id, a local copy's path);
        # the shapes, checked next, are what must match.
        warnings.warn(f"{path}: adapter was trained on {meta['base_model']!r}, "
                      f"loading into {expected_base!r}")
    names = _check_fits(model, tensors, meta)
    del meta["base_weights"]  # only checked: a copy of the vocabulary matrix, not to keep
    if not lora_modules(model):
        wrap_linears(model, names, meta["r"], meta["alpha"], meta["init"])
    with torch.no_grad():
        for name, m in lora_modules(model).items():
            m.A.copy_(tensors[f"{name}.lora_module.0.weight"])
            m.B.copy_(tensors[f"{name}.lora_module.1.weight"])
    set_alpha(model, meta["alpha"] if alpha is None else alpha)
    return meta


# ----------------------------------------------------------------------------- the PEFT format

PEFT_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")
# Every option of adapter_config.json (the fields of peft 0.21's LoraConfig and PeftConfig) is in
# one of three tables; tests/test_peft_export.py fails when peft has a field none of them names.
# 1. Read: what the adapter means (init_lora_weights is checked against PEFT_PLAIN_INITS).
PEFT_READ = {"peft_type", "r", "lora_alpha", "init_lora_weights", "base_model_name_or_path"}
# 2. Harmless here: bookkeeping; which modules to wrap (the saved tensors name them); settings
#    only read for training or together with an option that is itself checked.
PEFT_HARMLESS = {"task_type", "auto_mapping", "peft_version", "revision", "inference_mode",
                 "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
                 "lora_dropout",  # off at inference
                 "runtime_config",  # never saved
                 "megatron_core",  # used only with megatron_config
                 "qalora_group_size",  # used only with use_qalora
                 # used only with init_lora_weights of the same name:
                 "eva_config", "corda_config", "loftq_config", "lora_ga_config"}
# 3. Options that change the arithmetic, with the value under which it is plain LoRA.
PEFT_PLAIN = dict(use_dora=False, use_rslora=False, bias="none", lora_bias=False,
                  fan_in_fan_out=False, rank_pattern={}, alpha_pattern={}, modules_to_save=None,
                  layer_replication=None, trainable_token_indices=None, target_parameters=None,
                  use_qalora=False, alora_invocation_tokens=None, megatron_config=None,
                  velora_config=None, monteclora_config=None, use_bdlora=None,
                  arrow_config=None, kasa_config=None,
                  # True would move an lm_head adapter onto embed_tokens too:
                  ensure_weight_tying=False)
# init_lora_weights values that only chose how A and B started (EVA from activations, MiCA from
# W's SVD): the saved A and B replace them. pissa, pissa_niter_N, olora, corda, lora_ga and loftq
# also rewrote W into a residual: their A and B mean something only on that rewritten base.
PEFT_PLAIN_INITS = [True, False, "gaussian", "orthogonal", "eva", "mica"]
PEFT_REWRITES_BASE = re.compile(r"pissa(_niter_\d+)?|olora|corda|lora_ga|loftq")


def _check_peft_config(folder, config):
    """Refuse, naming the option, an adapter_config.json that is not plain LoRA."""
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{folder}: peft_type {config.get('peft_type')!r} is not supported, "
                         "only 'LORA'")
    init = config.get("init_lora_weights", True)
    if init not in PEFT_PLAIN_INITS:
        rewrote = isinstance(init, str) and PEFT_REWRITES_BASE.fullmatch(init)
        why = "PEFT rewrote the base's weights for it; " if rewrote else ""
        raise ValueError(f"{folder}: PEFT option init_lora_weights={init!r} is not supported "
                         f"({why}plain LoRA only)")
    for option, plain in PEFT_PLAIN.items():
        value = config.get(option, plain)
        if not (value == plain or value is None or value is False or value in ([], {})):
            raise ValueError(f"{folder}: PEFT option {option}={value!r} is not supported "
                             "(plain LoRA only)")
    known = PEFT_READ | PEFT_HARMLESS | set(PEFT_PLAIN)
    for option, value in config.items():  # a newer peft's option may change the arithmetic
        if option not in known and value not in (None, False, [], {}):
            raise ValueError(f"{folder}: PEFT option {option}={value!r} is unknown to lora.py "
                             "(plain LoRA only)")


def _read_peft(folder):
    config = json.loads((folder / "adapter_config.json").read_text())
    _check_peft_config(folder, config)
    file = folder / "adapter_model.safetensors"
    if not file.is_file():
        raise FileNotFoundError(f"{file}: not found "
                                "(only safetensors PEFT adapters are supported)")
    tensors, base_weights = {}, {}
    for key, t in load_file(file).items():
        match = PEFT_KEY.fullmatch(key)
        if match:
            tensors[f"{match[1]}.lora_module.{'AB'.index(match[2])}.weight"] = t
        elif key.startswith("base_model.model.") and ".lora_" not in key:
            # PEFT saves the base's own lm_head (or a resized embedding) beside its LoRA:
            # _check_fits makes sure it is the model's.
            base_weights[key] = t
        else:
            raise ValueError(f"{file}: tensor {key} is not a LoRA A or B of a Linear layer")
    r, lora_alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(r, int) or not isinstance(lora_alpha, (int, float)):
        raise ValueError(f"{folder}: adapter_config.json lacks an int r or a number lora_alpha")
    # init only records how A and B started; "zero" is PEFT's default and the loaded weights
    # replace it.
    meta = dict(r=r, alpha=lora_alpha / r, init="zero", base_config={},
                base_model=config.get("base_model_name_or_path") or "",
                targets=sorted({k.split(".lora_module.")[0].rsplit(".", 1)[-1] for k in tensors}),
                base_weights=base_weights)
    return tensors, meta


def import_peft(model, peft_dir, alpha=None, expected_base=None):
    if not (Path(peft_dir) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{peft_dir}: no adapter_config.json, not a PEFT adapter folder")
    return load_adapter(model, peft_dir, alpha, expected_base)


def export_peft(source, out_dir, base_model=None):
    """Write a PEFT adapter folder from a model with LoRA or from an adapter path (no base
    needed)."""
    if isinstance(source, (str, Path)):
        tensors, meta = read_adapter(source)
    else:
        tensors, meta = adapter_of_model(source)
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", r=meta["r"],
                  lora_alpha=meta["alpha"] * meta["r"], target_modules=meta["targets"],
                  base_model_name_or_path=base_model or meta["base_model"] or None,
                  bias="none", use_dora=False, use_rslora=False, fan_in_fan_out=False,
                  lora_dropout=0.0, init_lora_weights=True, inference_mode=True)
    peft = {}
    for key, t in tensors.items():
        name, i = re.fullmatch(r"(.+)\.lora_module\.([01])\.weight", key).groups()
        peft[f"base_model.model.{name}.lora_{'AB'[int(i)]}.weight"] = t.to("cpu").contiguous()

    def write(tmp):
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(peft, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
    return write_atomic(out_dir, write, folder=True)


# ----------------------------------------------------------------------------- merged HF export

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
               for name, m in lora_modules(model).items()}
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


# ----------------------------------------------------------------------------- command line

def main(argv=None):
    parser = argparse.ArgumentParser(prog="lora.py",
                                     description="Tools for LoRA adapters made by train.py.")
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser(
        "export", help="convert an adapter to PEFT or to a merged HF model folder",
        description="Convert an adapter to a PEFT adapter folder or a merged HF model.")
    export.add_argument("--adapter", required=True, help="train.py's --out folder, "
                        "an adapter .safetensors file, or a PEFT adapter folder")
    export.add_argument("--format", required=True, choices=["peft", "merged"],
                        help="peft: adapter_config.json + adapter_model.safetensors for "
                             "peft.PeftModel; merged: a full HF model folder with LoRA folded "
                             "into the weights")
    export.add_argument("--out", required=True,
                        help="folder to create (must not exist or be empty)")
    export.add_argument("--model", help="base model, hub id or local folder (default: the one "
                        "the adapter records); for peft it only sets base_model_name_or_path")
    args = parser.parse_args(argv)
    try:
        check_out_dir(args.out)  # before loading a 1B model, not after
        if args.format == "peft":
            export_peft(args.adapter, args.out, base_model=args.model)
        else:
            base = args.model or read_adapter(args.adapter)[1]["base_model"]
            if not base:
                raise ValueError(f"{args.adapter} does not record its base model; pass --model")
            from llama import Llama  # only the merged export needs the model
            # Merge in float32; export_merged saves in the base's dtype.
            model = Llama.from_pretrained(base, dtype=torch.float32)
            load_adapter(model, args.adapter)
            export_merged(model, args.out)
    except (ValueError, TypeError, OSError, RuntimeError) as e:
        parser.exit(2, f"lora.py: error: {' '.join(str(e).split())}\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
