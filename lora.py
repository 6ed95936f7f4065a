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
The method wraps every nn.Linear of Llama (lm_head included) in a `LoraModule`, starts with a
small alpha and doubles it each epoch. Merged, W + alpha B A is one matrix again (merge_lora).
Adapter files (ours and PEFT's) and the exports live in export.py.
"""
import math
import numbers

import torch
import torch.nn as nn
import torch.nn.functional as F

INITS = ("seed", "zero")  # how B starts: random (the method) or zero (standard LoRA)


# ----------------------------------------------------------------------------- the module

class LoraModule(nn.Module):
    """original_module(x) + alpha * B A x, with the original frozen and A, B trainable."""

    def __init__(self, orig_module: nn.Linear, r: int = 8, alpha: float = 1.0, init: str = "seed"):
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
        if init == "zero":
            # Standard LoRA: B = 0, so the model starts exactly as the base. With "seed" (the
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
    def merged_weight(self):
        """W + alpha * B @ A, (out, in) in the base's dtype, computed in float32."""
        W = self.original_module.weight
        delta = self.B.float() @ self.A.float()  # (out, r) @ (r, in) -> (out, in)
        return (W.float() + self.alpha * delta).to(W.dtype)

    def extra_repr(self):
        return f"r={self.r}, alpha={self.alpha}, init={self.init!r}"


# ----------------------------------------------------------------------------- a model with LoRA

def add_lora(model, r=8, alpha=1.0, init="seed", targets=None):
    """Wrap every nn.Linear (or those whose last name component is in targets) in a LoraModule,
    freeze all other parameters, return the wrapped names."""
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
        _set_submodule(model, name, LoraModule(model.get_submodule(name), r, alpha, init))


def set_alpha(model, alpha):
    """The method doubles alpha each epoch: one value for every LoraModule of the model."""
    modules = lora_modules(model)
    if not modules:
        raise ValueError("the model has no LoRA modules (call add_lora first)")
    for m in modules.values():
        m.set_alpha(alpha)


def merge_lora(model):
    """Fold alpha * B @ A into each W and put the plain nn.Linear back: inference at base speed."""
    modules = lora_modules(model)
    for name, m in modules.items():
        linear = m.original_module
        # A new Parameter, not an in-place edit: when lm_head shares its weight with
        # embed_tokens, editing it in place would also change the embeddings. This unties them.
        linear.weight = nn.Parameter(m.merged_weight(), requires_grad=False)
        _set_submodule(model, name, linear)
    config = getattr(model, "config", None)
    if "lm_head" in modules and getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False
    return list(modules)


def _set_submodule(model, name, module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


# ----------------------------------------------------------------------------- for the scripts

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
    try:
        value = float(alpha)
    except OverflowError:  # an int past float range
        value = math.inf
    if not math.isfinite(value) or value < 0:  # alpha = 0 is meaningful: the adapter is off
        raise ValueError(f"alpha must be finite and >= 0, got {alpha!r}")
    return value


def check_init(init):
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    return init


if __name__ == "__main__":
    # Two commands, each in the file about its subject: `python lora.py export ...` in export.py
    # (formats), `python lora.py inspect ...` in anatomy.py (what an adapter learned). Imported
    # here only: both import lora, so lora.py never depends on them.
    import argparse
    import sys
    command, flags = sys.argv[1:2], sys.argv[2:]
    if command == ["inspect"]:
        from anatomy import main
        sys.exit(main(flags))
    if command == ["export"]:
        from export import main
        sys.exit(main(["export", *flags]))
    # No command, --help or a typo: say which commands there are (exit 0 for --help, else 2).
    p = argparse.ArgumentParser(prog="lora.py", description="Tools for LoRA adapters made by "
                                "train.py; `python lora.py COMMAND --help` for each one's flags.")
    p.add_argument("command", choices=["export", "inspect"], help="export: an adapter to PEFT's "
                   "format or a merged HF model folder (export.py); inspect: what an adapter "
                   "learned, the size, rank and amplification of each update (anatomy.py)")
    p.parse_args()
