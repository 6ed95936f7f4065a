"""The exports run by llama.cpp itself, and its greedy tags compared with sample.py's.

    python -m export.llamacpp_check --adapter out --data quotes.jsonl [--n 20]
        [--types f32,f16,bf16,q8_0] [--llamacpp-python PATH] [--json results.json]

llama.cpp runs through llama-cpp-python, in a process of its own (export/llamacpp_run.py, which
needs no torch): --llamacpp-python names the Python that has it (default: this one). For the first
--n held-out quotes of the adapter's split (export/check.py) it compares greedy completions:

    sample.py   the adapter merged in float32, greedy, as sample.py --adapter --dtype float32
    project     our Llama reading the exported file back (export/gguf.py's model_from_gguf)
    llama.cpp   llama-cpp-python on the same file, greedy (export/llamacpp_run.py)

for the merged model as GGUF in each --types type, and for the base as GGUF (f32) with the LoRA
GGUF on it. llama.cpp runs each file twice: with its keys and values cached in f32, so that
float32 weights are computed in float32 throughout, and with its default f16 cache, a rounding of
its own that any llama.cpp or Ollama user gets. An adapter with a LoRA on a tied lm_head is
refused by the LoRA GGUF export (export/gguf_lora.py): the check prints the refusal, counts how
many completions change without the lm_head part, and runs the LoRA GGUF of the adapter without
it. It also checks that llama.cpp cuts each prompt into our tokens (the GGUF's tokenizer). Files
go to a temporary folder, or to --work DIR, kept. docs/adapters.md shows a run.
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import lora
from machinery import adapters, json_out
from machinery.checkpoint import run_beside
from machinery.cli import positive
from data import QuoteTokenizer
from export.check import greedy_completions, held_out_prompts
from export.gguf import GGUF_FILE, TYPES, export_gguf, model_from_gguf
from export.gguf_lora import ADAPTER_GGUF, export_lora_gguf, read_lora_gguf
from export.merged import describe_lost
from export.peft import read_any
from llama import Llama

WORKER = Path(__file__).with_name("llamacpp_run.py")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m export.llamacpp_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", required=True, help="train.py's --out folder or adapter file")
    p.add_argument("--model", help="base model (default: the one the adapter records)")
    p.add_argument("--data", required=True, help="the quotes JSONL file the adapter trained on")
    p.add_argument("--n", type=positive(int), default=20, help="held-out quotes (default: 20)")
    p.add_argument("--types", default="f32,f16,bf16,q8_0",
                   help="GGUF types of the merged model (default: f32,f16,bf16,q8_0)")
    p.add_argument("--llamacpp-python", default=sys.executable,
                   help="a Python that imports llama_cpp (default: this one)")
    p.add_argument("--threads", type=positive(int), default=1, help="llama.cpp's CPU threads")
    p.add_argument("--work", help="folder for the exported files, kept (default: a temporary "
                   "folder, deleted)")
    p.add_argument("--json", help="also write every number and completion to this file")
    args = p.parse_args(argv)
    args.types = args.types.split(",")
    unknown = [t for t in args.types if t not in TYPES]
    if unknown:
        p.error(f"--types: {unknown[0]!r} is not one of {', '.join(TYPES)}")
    return args


KV_CACHES = ("f32", "f16")  # how llama.cpp keeps keys and values: exact, and its default


def llamacpp(python, gguf, prompts, lora_gguf=None, threads=1, kv_cache="f16"):
    """(rows of export/llamacpp_run.py, None), or (None, why it failed in one line). A run that
    llama.cpp crashes is run again with its --no-repack (no CPU-specific weight layouts: its AMX
    int8 kernel crashes on some machines), and the rows say so under "note"."""
    command = [python, str(WORKER), str(gguf), "--threads", str(threads), "--kv-cache", kv_cache]
    if lora_gguf:
        command += ["--lora", str(lora_gguf)]
    job = json_out.dumps({"prompts": prompts, "max_new_tokens": 32})
    crashed = None
    for again in ([], ["--no-repack"]):
        done = subprocess.run(command + again, input=job, capture_output=True, text=True,
                              timeout=3600)
        if done.returncode == 0:
            # a row a \n: str.splitlines would also cut at a U+2028 in a completion's text
            rows = [json.loads(line) for line in done.stdout.split("\n") if line.strip()]
            note = f"{crashed}; run again with --no-repack" if crashed else None
            return [{**r, "note": note} for r in rows], None
        if done.returncode > 0:  # an error, not a crash: --no-repack would not help
            tail = done.stderr.strip().splitlines()[-1:] or [""]
            return None, f"llama.cpp: exit {done.returncode}: {tail[0]}"
        crashed = f"llama.cpp crashed (signal {-done.returncode})"
    return None, crashed


def compare(name, kv_cache, rows, why, ours, reference, ids, tokenizer):
    """One result: llama.cpp's completions against sample.py's and the project's reading of the
    same file, and its tokens of each prompt against ours. llama.cpp's greedy tokens are
    decoded by our tokenizer, so that equal tokens are equal texts; its own text
    (create_completion's) is compared too, and differs where a token is part of a character."""
    if rows is None:
        return {"file": name, "kv_cache": kv_cache, "failed": why}
    theirs = [tokenizer.decode(r["completion_ids"]) for r in rows]
    same = lambda a, b: sum(x == y for x, y in zip(a, b, strict=True))  # noqa: E731
    return {"file": name, "kv_cache": kv_cache, "n": len(rows), "note": rows[0]["note"],
            "llamacpp_eq_sample": same(theirs, reference),
            "llamacpp_eq_project": same(theirs, ours),
            "project_eq_sample": same(ours, reference),
            "llamacpp_text_eq_sample": same([r["completion"] for r in rows], reference),
            "tokens_eq": sum(r["tokens"] == i for r, i in zip(rows, ids, strict=True)),
            "differ": [{"prompt": r["prompt"], "llamacpp": t, "project": o, "sample": s}
                       for r, t, o, s in zip(rows, theirs, ours, reference) if len({t, o, s}) > 1]}


def without_head(model):
    """The adapter of `model` less its lm_head part: (tensors, metadata) for adapters.load."""
    tensors, meta = adapters.adapter_of_model(model)
    kept = {k: t.clone() for k, t in tensors.items() if not k.startswith("lm_head.")}
    return kept, {**meta, "targets": [t for t in meta["targets"] if t != "lm_head"]}


def sample_py(model, tokenizer, prompts):
    """sample.py's completions: alpha * B @ A folded into the float32 weights, then greedy."""
    lora.merge_lora(model)
    return greedy_completions(model, tokenizer, prompts)


def main(argv=None):
    args = parse_args(argv)
    found = subprocess.run([args.llamacpp_python, "-c", "import llama_cpp"], capture_output=True)
    if found.returncode != 0:
        sys.exit(f"llamacpp_check: {args.llamacpp_python} cannot import llama_cpp: pip install "
                 "llama-cpp-python there, or pass --llamacpp-python")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        results = check(args, work)
    print_table(results)
    if args.json:
        Path(args.json).write_text(json_out.dumps(results, indent=1, ensure_ascii=False) + "\n",
                                   encoding="utf-8")
    return 0


def check(args, work):
    """Export every file into work, run each in the project and in llama.cpp; the results."""
    tensors, meta = read_any(args.adapter)
    model = Llama.from_pretrained(args.model or meta["base_model"], dtype=torch.float32)
    adapters.load(model, (tensors, meta))
    model_dir = model.model_dir
    tokenizer = QuoteTokenizer.from_model_dir(model_dir)
    prompts = held_out_prompts(model_dir, args.data, args.n, run_beside(args.adapter)[1])
    results = {"adapter": str(args.adapter), "base": str(model_dir), "n": args.n,
               "prompts": prompts, "update_lost": {}, "files": []}
    runs = export_merged_ggufs(model, args.types, work, tokenizer, prompts, results)
    runs += export_lora(model, work, tokenizer, prompts, results)
    ids = [[tokenizer.bos_id] + tokenizer.encode(p) for p in prompts]
    for name, path, lora_path, ours, expected in runs:
        for kv_cache in KV_CACHES:
            rows, why = llamacpp(args.llamacpp_python, path, prompts, lora_path, args.threads,
                                 kv_cache)
            results["files"].append(compare(name, kv_cache, rows, why, ours, expected, ids,
                                            tokenizer))
    return results


def export_merged_ggufs(model, types, work, tokenizer, prompts, results):
    """The merged model as GGUF in each type, and sample.py's completions (results
    ["sample_py"]). Returns the runs for llama.cpp: (name, GGUF, None, the project's
    completions from the file, sample.py's)."""
    for t in types:
        lost = export_gguf(model, work / f"merged-{t}", t)
        results["update_lost"][t] = describe_lost(lost, t)
    try:
        export_lora_gguf(model, work / "lora", "f32")  # the adapter as it is, if it can be
    except ValueError as refused:
        results["lora_refused"] = str(refused)
        results["without_head"] = without_head(model)  # what is measured instead
    results["sample_py"] = sample_py(model, tokenizer, prompts)  # merges the model's LoRA
    runs = []
    for t in types:
        path = work / f"merged-{t}" / GGUF_FILE
        ours = greedy_completions(model_from_gguf(path, model.model_dir), tokenizer, prompts)
        runs.append((f"merged {t}", path, None, ours, results["sample_py"]))
    return runs


def export_lora(model, work, tokenizer, prompts, results):
    """The base as an f32 GGUF and, beside export_merged_ggufs' LoRA GGUF, the one of the
    adapter less its lm_head when the whole was refused. Returns its run for llama.cpp: (name,
    base GGUF, LoRA GGUF, the project's completions with the LoRA GGUF read back, sample.py's
    with the adapter it holds); none for an adapter on lm_head alone."""
    base = Llama.from_pretrained(model.model_dir, dtype=torch.float32)
    export_gguf(base, work / "base-f32", "f32")
    expected = results["sample_py"]
    less_head = results.pop("without_head", None)
    if less_head and less_head[0]:  # not an adapter on lm_head alone
        adapters.load(base, less_head)
        export_lora_gguf(base, work / "lora", "f32")
        expected = sample_py(base, tokenizer, prompts)
        results["without_head_eq_sample"] = sum(a == b for a, b in zip(expected,
                                                                        results["sample_py"]))
    lora_path = work / "lora" / ADAPTER_GGUF
    if not lora_path.is_file():
        return []
    read_back = Llama.from_pretrained(model.model_dir, dtype=torch.float32)
    adapters.load(read_back, read_lora_gguf(lora_path, read_back.config))
    ours = sample_py(read_back, tokenizer, prompts)
    name = "base f32 + LoRA" + (" less lm_head" if less_head else "")
    return [(name, work / "base-f32" / GGUF_FILE, lora_path, ours, expected)]


def print_table(results):
    print(f"{results['n']} held-out quotes, greedy, adapter {results['adapter']}")
    if "lora_refused" in results:
        print(f"lora-gguf refused: {results['lora_refused']}")
        if "without_head_eq_sample" in results:
            print(f"  without its lm_head part the adapter writes the same tags on "
                  f"{results['without_head_eq_sample']} of {results['n']}; its LoRA GGUF is "
                  "checked below against that adapter")
    columns = {"llamacpp_eq_sample": "llama.cpp=sample.py", "llamacpp_eq_project":
               "llama.cpp=project", "project_eq_sample": "project=sample.py",
               "llamacpp_text_eq_sample": "its text=sample.py", "tokens_eq": "prompt tokens"}
    print(f"{'file':<29}{'KV cache':>9}" + "".join(f"{c:>21}" for c in columns.values()))
    for r in results["files"]:
        start = f"{r['file']:<29}{r['kv_cache']:>9}"
        if "failed" in r:
            print(f"{start}  {r['failed']}")
            continue
        counts = [f"{r[k]} of {r['n']}" for k in columns]
        print(start + "".join(f"{c:>21}" for c in counts))
        if r["note"]:
            print(f"  {r['note']}")
    for line in results["update_lost"].values():
        print(line)


if __name__ == "__main__":
    sys.exit(main())
