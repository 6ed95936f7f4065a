"""What a training run leaves in its --out folder, and how a run picks it up again.

    out/run.json          the settings (RUN_FLAGS); --resume refuses other settings
    out/checkpoint.pt     adapter, AdamW moments, position in the data, RNG states: resume bit for bit
    out/adapter.safetensors   the LoRA tensors alone, for sample.py and lora.py export
    out/metrics.jsonl     one JSON object per step and per evaluation
    out/loss.png          with --plot: the curves of metrics.jsonl

Every file is written whole or not at all (write_atomic), so a crash or a kill mid-write never
destroys the previous checkpoint, and no run deletes another: --overwrite moves the old one aside.
"""
import json
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch

import lora

CHECKPOINT = "checkpoint.pt"  # everything needed to resume; the adapter alone is lora.ADAPTER_FILE
# Flags that define a run: --resume refuses an --out folder whose run differs in any of them.
RUN_FLAGS = ("model", "data", "r", "alpha", "alpha_schedule", "batch_size", "grad_accum", "lr", "targets",
             "init", "loss", "dtype", "seed", "val_fraction", "max_len")


def check_out(args):
    """Refuse to mix two runs in one folder, or to resume a run with other settings. Only reads, so
    every rank can ask (and all refuse together), before minutes of model loading."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out}: is a file, expected a folder (new, empty, or holding a run)")
    if args.resume:
        if not (out / CHECKPOINT).is_file():
            raise FileNotFoundError(f"--resume: {out / CHECKPOINT} does not exist, nothing to resume")
        theirs, mine = json.loads((out / "run.json").read_text()), {k: getattr(args, k) for k in RUN_FLAGS}
        changed = [f"--{k.replace('_', '-')} {theirs.get(k)!r} -> {mine[k]!r}" for k in RUN_FLAGS if theirs.get(k) != mine[k]]
        if changed:
            raise ValueError(f"--resume: {out} holds a run with other settings: {', '.join(changed)}")
    elif out.exists() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"--out {out} already holds a run; pass --resume to continue it, "
                              "--overwrite to start over (the old one is kept aside), or another --out")


def prepare_out(args):
    """The first write into --out (rank 0), once model, data and LoRA are set up: a run that fails
    before it leaves --out as it was. --overwrite moves an old run aside, never deletes it."""
    out = Path(args.out)
    if args.resume:
        for tmp in out.glob(".*.tmp"):  # a crash mid-write left it; the file it was to replace is whole
            tmp.unlink()
        return
    if out.exists() and any(out.iterdir()):
        aside = next(out.with_name(f"{out.name}.old{i}") for i in range(1, 10**6) if not out.with_name(f"{out.name}.old{i}").exists())
        out.rename(aside)
        print(f"moved the previous run in {out} to {aside}", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    mine = {k: getattr(args, k) for k in RUN_FLAGS}
    write_atomic(out / "run.json", lambda f: f.write_bytes(json.dumps(mine, indent=1).encode()))


def write_atomic(path, write):
    """write(tmp_path) then rename over `path`: a crash mid-write leaves the previous file whole (and
    at worst a hidden .NAME.tmp, which --resume deletes); an error mid-write deletes the temp."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(out, raw_model, optimizer, state, base_model):
    """Adapter, optimizer moments, position in the data and every RNG: enough to resume bit for bit."""
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    ckpt = {"adapter": lora.lora_state_dict(raw_model), "optimizer": optimizer.state_dict(), "rng": rng, **state}
    write_atomic(out / CHECKPOINT, lambda tmp: torch.save(ckpt, tmp))
    lora.save_adapter(raw_model, out / lora.ADAPTER_FILE, base_model=base_model)


def load_checkpoint(out, raw_model, optimizer):
    ckpt = torch.load(out / CHECKPOINT, map_location="cpu", weights_only=False)
    with torch.no_grad():
        for name, tensor in lora.lora_state_dict(raw_model).items():
            tensor.copy_(ckpt["adapter"][name])
    optimizer.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    random.setstate(ckpt["rng"]["python"])
    np.random.set_state(ckpt["rng"]["numpy"])
    if "cuda" in ckpt["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    return {k: ckpt[k] for k in ("epoch", "batches_done", "step")}


class Metrics:
    """metrics.jsonl: one JSON object a line, per step and per evaluation (rank 0 only)."""

    def __init__(self, path, keep_until_step=None):
        self.path = path
        if keep_until_step is not None and path.exists():  # resuming: forget steps after the checkpoint
            lines = [l for l in path.read_text().splitlines() if json.loads(l).get("step", 0) <= keep_until_step]
            write_atomic(path, lambda tmp: tmp.write_text("".join(l + "\n" for l in lines)))

    def log(self, **row):
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def plot(out):
    """loss.png in the --out folder `out`: train and validation loss, and alpha, over the steps."""
    out = Path(out)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib (pip install matplotlib); skipped loss.png", file=sys.stderr)
        return
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["kind"] == "step"]
    evals = [r for r in rows if r["kind"] == "eval"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=0.6, alpha=0.6, label="train loss")
    ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy per tag token")
    ax2 = ax.twinx()
    ax2.step([r["step"] for r in steps], [r["alpha"] for r in steps], "k--", lw=1, where="post", label="alpha")
    ax2.set_ylabel("alpha")
    fig.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=120)


if __name__ == "__main__":  # python checkpoint.py plot OUT: loss.png for a run, finished or not
    if len(sys.argv) != 3 or sys.argv[1] != "plot" or not (Path(sys.argv[2]) / "metrics.jsonl").is_file():
        sys.exit("usage: python checkpoint.py plot OUT   (OUT: a train.py --out folder with metrics.jsonl)")
    plot(sys.argv[2])
