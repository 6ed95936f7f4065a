"""Chapter: QLoRA. LoRA over a base model stored in 4 bits, NF4 written from scratch.

QLoRA (Dettmers, Pagnoni, Holtzman and Zettlemoyer 2023, "QLoRA: Efficient Finetuning of
Quantized LLMs", arXiv 2305.14314) changes one thing in LoRA: the frozen W is kept in 4 bits. A
and B still train in 16 bits or more; every product still runs in bf16, on W dequantized for the
product and dropped after it. The gradient flows through the 4-bit W to A and B and to the layers
below, never into W. Three pieces (section 3), two of them here:

  NF4, 4-bit NormalFloat   16 values at quantiles of a normal distribution, one set for blocks of
                           64 weights each scaled by its absmax. Trained weights are about normal,
                           so each value is used about as often as any other.
  double quantization      the absmaxes themselves in 8 bits, in blocks of 256.
  paged optimizers         optimizer state that spills to CPU memory on a spike (not here).

The memory arithmetic, bits a weight:

    bf16                      16
    NF4                       4 + 32/64                 = 4.5     (a float32 absmax per 64)
    NF4 + double quant        4 + 8/64 + 32/(64 * 256)  = 4.127   (8-bit absmax, and a float32
                                                                   scale per 256 absmaxes)

Llama-3.2-1B's Linear layers (16 blocks, 973M weights; the embedding and the tied lm_head
aside): 1.95 GB in bf16, 547 MB in NF4, 502 MB with double quantization.

The paper's claims: a 65B model finetuned on one 48 GB GPU (from over 780 GB for 16-bit
finetuning), with the task performance of 16-bit finetuning (16-bit LoRA and full finetuning,
section 4); NF4 better than 4-bit floats (FP4) and integers (Int4) at the same size; double
quantization saving 0.373 bits a weight, about 3 GB on a 65B model; Guanaco, a QLoRA finetune,
at 99.3% of ChatGPT on the Vicuna benchmark after 24 hours on one GPU.

    nf4.py      the codebook derived from the normal quantiles, quantize_nf4 and
                dequantize_nf4, bit for bit bitsandbytes 0.50's CPU quantize_4bit (nf4)
    linear.py   LinearNF4: a frozen 4-bit Linear whose backward dequantizes W again
                instead of keeping it

tests/test_qlora.py checks every byte against bitsandbytes, and against golden bytes it wrote
(tests/golden/, rewritten by tests/golden/make_qlora_golden.py) where it is not installed.
"""
from qlora.linear import LinearNF4
from qlora.nf4 import NF4Weight, dequantize_nf4, quantize_nf4

__all__ = ["LinearNF4", "NF4Weight", "dequantize_nf4", "quantize_nf4"]
