"""LoRA from scratch: a frozen Linear layer plus a small trainable detour.

A Linear layer computes y = W x with W (out, in). LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation
of Large Language Models", section 4.1) leaves W frozen and learns a low-rank change beside it,
through a narrow passage of r numbers:

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
Merged, W + alpha B A is one matrix again (merge_lora): no cost at inference.

Two conventions, side by side. Standard LoRA (the paper, PEFT, torchtune) and the method this
project reproduces (the write-up "Lora from scratch") differ in how B starts and in the scale:

                  standard LoRA                        the method
    B starts      at zero: step 0 is the base model    random, like A: the model is perturbed
                  exactly                              from the first step
    the scale     lora_alpha / r, kept constant        alpha itself: 0.125, doubled after
                  (lora_alpha = 16, r = 8: 2.0)        every epoch as B A learns
    train.py      --init zero --alpha-schedule         --init random --alpha 0.125
                  constant --alpha <lora_alpha / r>    --alpha-schedule double (the default)

Here alpha multiplies B A directly: it is PEFT's lora_alpha / r, so `--alpha 0.125` at r = 8 is
PEFT's lora_alpha = 1. It matters when r changes: Adam moves every entry of A and B by about lr a
step whatever r is, so the learned B A, a sum of r rank-1 terms, grows with r. The paper divides
by r so that a run at another r needs no new learning rate or alpha; ours does not. To carry a
recipe from r to r' as PEFT would, multiply alpha by r / r'. (At the start, B A x does not grow
with r: nn.Linear draws B's entries within +-1/sqrt(r).)

This file: LoraModule; add_lora, set_alpha and the alpha schedule, merge_lora; the adapter file,
only A and B (a few MB, not the base's GBs). It imports nothing of the project: it can wrap any
model. `python lora.py` shows it all on a toy model in a second. machinery/adapters.py checks an
adapter file and its fit to a model before anything here reads it.
"""
import copy
import numbers
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

# How B starts: random like A (the method), or zero (standard LoRA: the model starts as the base).
INITS = ("random", "zero")


# ----------------------------------------------------------------------------- the module

class LoraModule(nn.Module):
    """original_module(x) + alpha * B A x, with the original frozen and A (r, in), B (out, r)
    trainable. x (..., in) -> (..., out). orig_module: an nn.Linear, or a layer that computes
    like one (qlora's 4-bit LinearNF4). Raises TypeError for another module, ValueError for a
    bad r, alpha or init."""

    def __init__(self, orig_module: nn.Module, r: int = 8, alpha: float = 1.0,
                 init: str = "random"):
        super().__init__()
        if not hasattr(orig_module, "in_features") or not hasattr(orig_module, "out_features"):
            raise TypeError(f"LoraModule wraps an nn.Linear, got {type(orig_module).__name__}")
        self.r, self.alpha, self.init = check_r(r), check_alpha(alpha), check_init(init)
        self.original_module = orig_module
        # The method wrote `orig_module.requires_grad = False`: a plain Python attribute on the
        # Module object. Autograd reads the flag of each Parameter, which stayed True, so W kept
        # receiving gradients (and optimizer updates). requires_grad_ sets it on every Parameter.
        orig_module.requires_grad_(False)
        # The frozen base may be bf16 (or 4-bit codes); A and B train in at least float32, and so
        # do their AdamW moments: bf16 keeps about 3 significant digits, small updates would
        # round away.
        W = next(iter(orig_module.state_dict().values()))  # the weight, or qlora's packed codes
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
        # y + alpha * z, in one pass over y (torch.add's own alpha= is a multiplier of z)
        return torch.add(y, z.to(y.dtype), alpha=self.alpha)

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
    linears = [name for name, m in model.named_modules() if is_linear(m)]
    if targets is not None:
        linears = [n for n in linears if n.rsplit(".", 1)[-1] in check_targets(targets, linears)]
    wrap_linears(model, linears, r, alpha, init)
    return linears


def is_linear(module):
    """An nn.Linear, or qlora's 4-bit layer that stands in for one."""
    return isinstance(module, nn.Linear) or getattr(module, "is_4bit_linear", False)


def wrap_linears(model, names, r, alpha, init):
    """Replace the named Linear layers by LoraModules and freeze everything else."""
    for p in model.parameters():  # embeddings and norms too: only A and B train
        p.requires_grad_(False)
    for name in names:  # in model order, so the same RNG state gives the same A and B
        model.set_submodule(name, LoraModule(model.get_submodule(name), r, alpha, init))


def set_alpha(model, alpha):
    """One alpha for every LoraModule of the model (the schedule below picks it each epoch)."""
    modules = lora_modules(model)
    if not modules:
        raise ValueError("the model has no LoRA modules (call add_lora first)")
    for m in modules.values():
        m.set_alpha(alpha)


def alpha_for_epoch(alpha, epoch, schedule="double"):
    """The method's schedule: alpha * 2**epoch (epoch counts from 0). A random B perturbs the
    model from the first step, so alpha starts small and doubles as A and B learn. 'constant'
    keeps alpha, as standard LoRA does."""
    return alpha * 2 ** epoch if schedule == "double" else alpha


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


# ----------------------------------------------------------------------------- the adapter file
#
# adapter.safetensors holds A and B keyed as in the model: `model.layers.0.self_attn.q_proj.
# lora_module.0.weight` is A (r, in), `...lora_module.1.weight` is B (out, r); and, as safetensors
# metadata (str -> str), what it takes to put them back: r, alpha, init, targets.

def lora_state_dict(model):
    """Only the LoRA tensors, keyed as in model.state_dict(). They share memory with the
    parameters (no copy): copy_ into them restores a checkpoint."""
    modules = lora_modules(model)
    if not modules:
        raise ValueError("the model has no LoRA modules: nothing to save")
    return {f"{name}.lora_module.{i}.weight": weight.detach()
            for name, m in modules.items() for i, weight in enumerate((m.A, m.B))}


def save_adapter(model, path, **metadata):
    """Write A and B of every LoraModule to a safetensors file, with r, alpha, init and targets
    as its metadata, and any more str -> str metadata given. Returns path."""
    tensors = {k: t.to("cpu").contiguous() for k, t in lora_state_dict(model).items()}
    modules = lora_modules(model)
    first = next(iter(modules.values()))  # one r and one alpha for all (set_alpha sets them all)
    targets = sorted({name.rsplit(".", 1)[-1] for name in modules})
    meta = dict(r=str(first.r), alpha=repr(first.alpha), init=first.init,
                targets=",".join(targets), **metadata)
    save_file(tensors, path, metadata=meta)
    return path


def read_adapter(path):
    """(tensors, metadata) of an adapter file: A and B keyed as in the model; the metadata with
    r an int, alpha a float, targets a list, any other entry as saved."""
    with safe_open(path, "pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
        meta = dict(f.metadata() or {})
    meta.update(r=int(meta["r"]), alpha=float(meta["alpha"]), targets=meta["targets"].split(","))
    return tensors, meta


def load_adapter(model, adapter, alpha=None):
    """Put an adapter's A and B into the model, wrapping its Linear layers first if it has no
    LoRA yet. adapter: a path, or (tensors, metadata) already read; alpha overrides the saved one.
    Returns the metadata. It trusts the adapter to fit: machinery/adapters.py checks that first."""
    tensors, meta = read_adapter(adapter) if isinstance(adapter, (str, os.PathLike)) else adapter
    if not lora_modules(model):
        names = list(dict.fromkeys(key.rsplit(".lora_module.", 1)[0] for key in tensors))
        wrap_linears(model, names, meta["r"], meta["alpha"], meta["init"])
    with torch.no_grad():
        for name, m in lora_modules(model).items():
            m.A.copy_(tensors[f"{name}.lora_module.0.weight"])
            m.B.copy_(tensors[f"{name}.lora_module.1.weight"])
    set_alpha(model, meta["alpha"] if alpha is None else alpha)
    return meta


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
    # float() of an int past float's range raises OverflowError; NaN and inf fail the comparison
    try:
        value = float(alpha)
    except OverflowError:
        value = float("inf")
    if not 0 <= value < float("inf"):  # 0 turns the adapter off
        raise ValueError(f"alpha must be finite and >= 0, got {alpha!r}")
    return value


def check_init(init):
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    return init


def check_targets(targets, linears):
    """The target names, each the last name component of some Linear of the model."""
    if isinstance(targets, str) or not all(isinstance(t, str) for t in targets):
        raise TypeError(f"targets must be a list of names like ['q_proj', 'v_proj'], "
                        f"got {targets!r}")
    valid = sorted({n.rsplit(".", 1)[-1] for n in linears})
    unknown = [t for t in targets if t not in valid]
    if unknown or not targets:
        raise ValueError(f"unknown targets {unknown}; "
                         f"this model's Linear layers are named: {', '.join(valid)}")
    return targets


# ----------------------------------------------------------------------------- python lora.py

def demo():
    """LoRA on a toy model of two Linear layers, each claim checked as it is printed. Returns
    whether all of them held."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    x = torch.randn(32, 64)  # a batch of 32 inputs
    y_base = base(x)

    model = copy.deepcopy(base)
    add_lora(model, r=4, alpha=1.0, init="zero")  # standard LoRA: B = 0
    trainable, total = count_parameters(model)
    print(f"toy model: Linear(64, 64), ReLU, Linear(64, 10): {total - trainable:,} numbers, "
          f"frozen;\n  LoRA r=4 adds {trainable:,} trainable ones (A and B), "
          f"{trainable / total:.0%} of the whole")
    same = torch.equal(model(x), y_base)
    print(f"B = 0 (standard LoRA): the output equals the base's exactly: {same}")

    model = copy.deepcopy(base)
    add_lora(model, r=4, alpha=0.125, init="random")  # the method: B random too
    y_lora = model(x)
    moved_at_start = (y_lora - y_base).abs().max().item()
    print(f"B random (the method), alpha 0.125: the output moves from step 0, by at most "
          f"{moved_at_start:.4f}")

    merged = copy.deepcopy(model)
    merge_lora(merged)  # W + alpha B A: plain Linear layers again
    diff = (merged(x) - y_lora).abs().max().item()
    print(f"merged (W + alpha B A in one nn.{type(merged[0]).__name__}): the same output up to "
          f"rounding, max difference {diff:.1e}")

    frozen = {name: p.clone() for name, p in model.named_parameters() if not p.requires_grad}
    trained = {name: p.clone() for name, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    loss = (model(x) - torch.randn(32, 10)).pow(2).mean()  # any loss will do
    loss.backward()
    optimizer.step()
    params = dict(model.named_parameters())
    moved = all(not torch.equal(params[name], p) for name, p in trained.items())
    still = all(torch.equal(params[name], p) for name, p in frozen.items())
    print(f"one AdamW step: every A and B moved ({moved}), W and the biases stayed ({still})")
    return same and moved_at_start > 0 and diff < 1e-5 and moved and still


if __name__ == "__main__":
    import sys
    if sys.argv[1:]:  # the tools built on this file are commands of their own
        print("lora.py takes no arguments: it shows LoRA on a toy model. Its tools:\n"
              "  python -m export --adapter out --format peft|merged|gguf|lora-gguf --out PATH\n"
              "  python -m anatomy out     (what an adapter learned)", file=sys.stderr)
        sys.exit(2)
    sys.exit(0 if demo() else 1)
