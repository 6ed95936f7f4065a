"""Chapter: speed and memory against transformers + PEFT on the same LoRA job.

    bench.py         the command (python -m bench): times the sides step by step, checks they agree
    sides.py         the sides (plain, kernels, peft) and one training step of any of them
    measure.py       FLOPs of a LoRA step, the matmul peak, peak memory, step statistics
    matmul_speed.py  the matmul speed per dtype behind --dtype auto (python -m bench.matmul_speed)
"""
