"""The llama.cpp side of export/llamacpp_check.py: a GGUF (and a GGUF LoRA) loaded by
llama-cpp-python, and each prompt's greedy completion as a llama.cpp user gets it.

    python export/llamacpp_run.py model.gguf [--lora adapter.gguf] [--kv-cache f32] < job.json

It imports llama_cpp and nothing of this project, not even torch: any Python that has
llama-cpp-python runs it, a venv of its own included. It runs in a process of its own, so that a
file llama.cpp crashes on ends this process, not the check. Reads {"prompts": [...],
"max_new_tokens": 32} on stdin; writes one JSON line a prompt:

    prompt            the prompt
    tokens            llama.cpp's tokens of it (bos first when the GGUF's add_bos_token says so)
    completion_ids    the greedy tokens that follow, from llama.cpp's generate loop
    completion        the text of create_completion, llama.cpp's text API, as a user gets it

Both pick the likeliest token each step (temperature 0, repeat_penalty 1: no penalty) and stop at
an end-of-generation token of the vocabulary, or after max_new_tokens. Each prompt starts from an
empty KV cache: llama-cpp-python would otherwise reuse the cache of the tokens a prompt shares
with the one before, and a prompt read in two pieces is not the same sum to the last bit.
"""
import argparse
import json
import sys

import llama_cpp
import llama_cpp.llama_cpp as low_level


def main(argv=None):
    p = argparse.ArgumentParser(prog="export/llamacpp_run.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a GGUF model file")
    p.add_argument("--lora", help="a GGUF LoRA adapter to apply (scale 1)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads llama.cpp computes with")
    p.add_argument("--kv-cache", choices=["f16", "f32"], default="f16", help="the type llama.cpp "
                   "keeps keys and values in (its --cache-type-k/-v; default f16, llama.cpp's)")
    p.add_argument("--no-repack", action="store_true", help="llama.cpp's own --no-repack: no "
                   "CPU-specific weight layouts (its AMX int8 kernel crashes on some machines)")
    args = p.parse_args(argv)
    job = json.load(sys.stdin)
    if args.no_repack:  # llama-cpp-python has no flag for it: its default model parameters, less
        default = low_level.llama_model_default_params

        def no_repack():
            params = default()
            params.use_extra_bufts = False
            return params
        low_level.llama_model_default_params = no_repack
    cache = {"f16": llama_cpp.GGML_TYPE_F16, "f32": llama_cpp.GGML_TYPE_F32}[args.kv_cache]
    llm = llama_cpp.Llama(args.model, lora_path=args.lora, n_ctx=1024, n_threads=args.threads,
                          n_threads_batch=args.threads, type_k=cache, type_v=cache, seed=0,
                          verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    for prompt in job["prompts"]:
        tokens = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=False)
        ids = []
        llm.reset()  # an empty cache, not the last prompt's
        for token in llm.generate(tokens, temp=0.0, repeat_penalty=1.0, reset=True):
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                break
            ids.append(token)
            if len(ids) == job["max_new_tokens"]:
                break
        llm.reset()
        out = llm.create_completion(prompt, max_tokens=job["max_new_tokens"], temperature=0.0,
                                    repeat_penalty=1.0)
        row = {"prompt": prompt, "tokens": tokens, "completion_ids": ids,
               "completion": out["choices"][0]["text"]}
        print(json.dumps(row, allow_nan=False), flush=True)  # strict JSON: ids and text only
    return 0


if __name__ == "__main__":
    sys.exit(main())
