"""The sides bench.py compares, and one training step of any of them.

Ours is this project's Llama with LoRA, trained as train.py trains it: "plain" as by default
(llama.py's and lora.py's formulas as written), "kernels" with the speed chapter (train.py
--kernels). Peft is transformers' LlamaForCausalLM with peft's LoRA, trained as their
documentation does it. bench.py builds them all on the same weights with the same starting A and B
(adapter_weights, copy_adapter), so that any difference in speed, memory or loss comes from the
implementations, not from the inputs.
"""
import time
import warnings

import torch

import data
import lora
from bench.measure import sync
from machinery.device import autocast
from machinery.hub import resolve_model_dir
from llama import Llama, LlamaConfig, generate, until_eos
from speed import kernels
from speed.generate import generate_packed


def grad_scaler(device, dtype):
    """train.py's loss scaling: float16 only, a no-op otherwise."""
    return torch.amp.GradScaler(device.split(":")[0], enabled=dtype == torch.float16)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ----------------------------------------------------------------------------- the two sides

class Ours:
    """Our Llama with LoRA, trained as train.py trains it (logits only where the loss is):
    "plain" as train.py's default, autograd differentiating llama.py's formulas; "kernels" as
    train.py --kernels; "nf4" and "nf4-dq" as train.py --quantize (plain, on the 4-bit base of
    the qlora chapter)."""

    def __init__(self, args, device, dtype, plain=True, quantize=None):
        self.name, self.plain = quantize or ("plain" if plain else "kernels"), plain
        self.quantize = quantize
        if quantize:
            from qlora.load import from_pretrained
            self.model = from_pretrained(args.model, quantize, dtype=dtype, device=device)
        else:
            self.model = Llama.from_pretrained(args.model, dtype=dtype, device=device)
        torch.manual_seed(args.seed)
        lora.add_lora(self.model, r=args.r, alpha=args.alpha, init="random",
                      targets=args.target_list)
        if not plain:  # compiled layers fuse the elementwise work their own way: no rebuilding
            kernels.use(self.model, rebuild=not args.compile)
        self.model.recompute = args.recompute
        if args.compile and not plain:
            # one compiled graph serves every layer: same code
            for layer in self.model.model.layers:
                layer.compile(dynamic=True, backend=args.compile)
        self.model.train()
        self.optimizer = torch.optim.AdamW(lora.lora_parameters(self.model), lr=args.lr,
                                           weight_decay=0.0)
        self.scaler = grad_scaler(device, dtype)  # float16: train.py's loss scaling
        self.merged = False

    def loss_sum(self, batch):
        if self.merged:
            raise RuntimeError("the adapter was merged for generation: train before generating")
        # train.py's loss after the separator: data.py's, or the speed chapter's fused one
        return (data.loss_sum if self.plain else kernels.loss_sum)(self.model, batch)

    def generate(self, prompts, max_new_tokens, ignore_eos=False):
        """sample.py's path: the adapter merged into the weights, in place, once training is
        over (a copy would hold a second model: past 24 GB for float32 1B models)."""
        if not self.merged:
            if not self.quantize:  # sample.py merges, except into a 4-bit base
                lora.merge_lora(self.model)
            self.model.eval()
            self.merged = True
        run = generate if self.plain else generate_packed  # sample.py's, and with --kernels
        return run(self.model, prompts, max_new_tokens, eos_ids=[] if ignore_eos else None)


class Peft:
    """transformers' LlamaForCausalLM with peft's LoRA, trained the way its documentation does it:
    labels through the model, which computes logits at every position and the loss in float32."""
    name = "peft"

    def __init__(self, args, device, dtype, start=None):
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing",
                                category=FutureWarning)
        model_dir = resolve_model_dir(args.model)
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
        config = LoraConfig(r=args.r, lora_alpha=args.alpha * args.r,
                            target_modules=args.target_list,
                            lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
        self.model = get_peft_model(base, config)  # adapters in float32 on a bf16 base, as ours
        self.eos_ids = LlamaConfig.from_dir(model_dir).eos_token_ids
        # None in the memory run's child: the values do not change the memory
        if start is not None:
            copy_adapter(start, self.model)
        self.model.train()
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad],
                                           lr=args.lr, weight_decay=0.0)
        # float16: loss scaling as their docs advise (PEFT keeps adapters float32 for it)
        self.scaler = grad_scaler(device, dtype)
        self.merged = False

    def loss_sum(self, batch):
        if self.merged:
            raise RuntimeError("the adapter was merged for generation: train before generating")
        where = batch["targets"] != data.IGNORE_INDEX
        n = where.sum()
        # shift_labels: our targets are already shifted (targets[i] is the token after input[i]).
        out = self.model(input_ids=batch["input_tokens"], attention_mask=padding_mask(batch),
                         labels=batch["targets"], shift_labels=batch["targets"],
                         num_items_in_batch=n, use_cache=False)
        return out.loss * n

    def generate(self, prompts, max_new_tokens, ignore_eos=False):
        """PEFT's advice for inference, as ours: merge_and_unload, in place, once training is
        over."""
        if not self.merged:
            self.model = self.model.merge_and_unload().eval()
            self.merged = True
        model = self.model
        # None: no stopping, also not the config's eos
        eos_ids = None if ignore_eos else self.eos_ids
        model.generation_config.eos_token_id = eos_ids
        P = max(len(p) for p in prompts)
        ids = torch.tensor([[self.eos_ids[0]] * (P - len(p)) + p for p in prompts],
                           device=model.device)
        mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts],
                            device=model.device)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, temperature=None, top_p=None, top_k=None,
                                 eos_token_id=eos_ids, pad_token_id=self.eos_ids[0])
        return [until_eos(row, eos_ids or []) for row in out[:, P:].tolist()]


def padding_mask(batch):
    T = batch["input_tokens"].shape[1]
    # (B, T)
    return (torch.arange(T, device=batch["lengths"].device) < batch["lengths"][:, None]).long()


def adapter_weights(model):
    """{module name: (A, B)} of our model, float32 copies."""
    return {name: (m.A.detach().float().clone(), m.B.detach().float().clone())
            for name, m in lora.lora_modules(model).items()}


@torch.no_grad()
def copy_adapter(weights, peft_model):
    """Our A (r, in) and B (out, r) into PEFT's lora_A / lora_B: the same keys after PEFT's prefix.
    """
    inner = peft_model.base_model.model
    for name, (A, B) in weights.items():
        m = inner.get_submodule(name)
        m.lora_A["default"].weight.copy_(A)
        m.lora_B["default"].weight.copy_(B)


# ----------------------------------------------------------------------------- one step, timed

def train_step(side, batch, device, dtype):
    """Forward, loss, backward, AdamW: train.py's step on one batch, float16's loss scaling
    included. Returns (loss, seconds)."""
    sync(device)
    t0 = time.perf_counter()
    n = data.count_supervised(batch)
    with autocast(device, dtype):
        loss_sum = side.loss_sum(batch)
    side.scaler.scale(loss_sum / n).backward()
    side.scaler.step(side.optimizer)
    side.scaler.update()
    side.optimizer.zero_grad(set_to_none=True)
    loss = loss_sum.item() / n  # .item() waits for the device, so the time is the step's
    return loss, time.perf_counter() - t0


@torch.no_grad()
def validation_loss(side, batches, device, dtype):
    side.model.eval()
    total = count = 0
    for batch in batches:
        with autocast(device, dtype):
            total += side.loss_sum(batch).item()
        count += data.count_supervised(batch)
    side.model.train()
    return total / count
