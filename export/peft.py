"""PEFT's adapter format, both ways: Hugging Face's adapter library reads what export_peft writes,
and read_peft reads what PEFT saved, for sample.py, eval.py and the other exports.

A PEFT adapter is a folder: adapter_config.json (r, lora_alpha, target_modules, and many options
that change the arithmetic) and adapter_model.safetensors, keys
`base_model.model.<module>.lora_A.weight` (r, in) and `.lora_B.weight` (out, r). PEFT scales
B A by lora_alpha / r, so our alpha is lora_alpha / r (lora.py's docstring says why this
matters when r changes). On lm_head PEFT also saves the base's own head
(`...lm_head.base_layer.weight`), which machinery/adapters.py's check_fits compares with the
model's.

    python -m export --adapter out --format peft --out out-peft
"""
import json
import re
from pathlib import Path

from safetensors.torch import load_file, save_file

import lora
from machinery import adapters, json_out
from machinery.out_folder import write_atomic

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


def read_peft(folder):
    """(tensors, metadata) of a PEFT adapter folder, in lora.py's names and alpha: what
    machinery/adapters.py's load takes. Raises FileNotFoundError, or ValueError naming the folder
    and the option for anything but plain LoRA."""
    folder = Path(folder)
    if not (folder / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{folder}: no adapter_config.json, not a PEFT adapter folder")
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
    except ValueError as e:
        raise ValueError(f"{folder / 'adapter_config.json'}: not JSON ({e})") from None
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
            # adapters.check_fits makes sure it is the model's.
            name = key.removeprefix("base_model.model.").replace(".base_layer.", ".")
            base_weights[name] = (key, t)
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


def read_any(path):
    """(tensors, metadata) of a PEFT folder (read_peft) or of one of our adapters
    (machinery/adapters.py's read)."""
    if Path(path).is_dir() and (Path(path) / "adapter_config.json").is_file():
        return read_peft(path)
    return adapters.read(path)


def import_peft(model, peft_dir, alpha=None):
    """Put a PEFT adapter into the model (adapters.load); returns its metadata."""
    return adapters.load(model, read_peft(peft_dir), alpha)


def export_peft(source, out_dir, base_model=None):
    """Write a PEFT adapter folder from a model with LoRA or from an adapter path (no base
    needed)."""
    if isinstance(source, (str, Path)):
        tensors, meta = read_any(source)
    else:
        tensors, meta = adapters.adapter_of_model(source)
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
        (tmp / "adapter_config.json").write_text(json_out.dumps(config, indent=2) + "\n")
        save_file(peft, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
    return write_atomic(out_dir, write, folder=True)
