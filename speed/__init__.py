"""Chapter: speed. Nothing here changes what is computed, only how fast and in how much memory.

    kernels.py    hand-written backward passes (RMSNorm, SwiGLU, causal attention on the CPU,
                  lm_head and cross-entropy in chunks, outputs rebuilt instead of kept);
                  kernels.use(model) switches them on for one model
    generate.py   generation with the prompts read packed instead of padded

train.py, sample.py and eval.py import this folder only with --kernels; llama.py and lora.py never
do. Every piece is checked against the plain formula it replaces (tests/test_kernels.py,
tests/test_half.py, tests/test_sample.py).
"""
