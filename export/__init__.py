"""Chapter: the adapter in other formats, for other programs. Nothing in the core imports this
folder. docs/adapters.md ("Use the adapter elsewhere") has the commands and the measurements.

    peft.py            PEFT's adapter folder, read and written
    merged.py          a Hugging Face model folder with alpha * B @ A folded into the weights, in
                       a chosen dtype, and how much of the update that dtype keeps
    gguf.py            the merged model as one GGUF file for llama.cpp, Ollama and LM Studio:
                       names, the q and k row order, llama3 RoPE factors, the tokenizer, weight
                       types; an Ollama Modelfile; and the file read back into our layout
    gguf_lora.py       the adapter alone as a GGUF LoRA (llama.cpp --lora, Ollama ADAPTER)
    check.py           greedy tags of held-out quotes, to compare an export with the adapter
    llamacpp_check.py  the exports run by llama.cpp itself (llama-cpp-python), tags compared:
        python -m export.llamacpp_check --adapter out --data quotes.jsonl [--n 20]
    llamacpp_run.py    the llama.cpp side of that check, run by a Python that has llama_cpp
    cli.py             the command:
        python -m export --adapter out --format peft|merged|gguf|lora-gguf --out DIR
            [--model M] [--dtype float32|bfloat16|float16] [--type f32|f16|bf16|q8_0]
            [--data quotes.jsonl [--check N]]
        python -m export --no-adapter --model M --format gguf --out DIR   (the base alone)
"""
