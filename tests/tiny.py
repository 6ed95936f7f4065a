"""Tiny random Llama folders in the Hugging Face layout, written by transformers (the oracle).

A test that needs a whole model (loading, LoRA, training, sampling) gets one here in a second:
a random `LlamaForCausalLM` saved with `save_pretrained`, plus a small byte-level BPE tokenizer
trained on a few sentences, so token ids stay below the tiny vocabulary.
"""
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

BOS, EOS = "<|begin_of_text|>", "<|eot_id|>"

# (a) llama3 RoPE scaling, grouped-query attention, tied embeddings: the Llama-3.2 shape, shrunk.
LLAMA3_GQA_TIED = dict(
    vocab_size=384, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
    rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=0, eos_token_id=[1, 2],
    rope_theta=500000.0, initializer_range=0.1,
    rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=64),
)
# (b) plain RoPE, multi-head attention (kv heads = heads), untied lm_head, head_dim implied.
PLAIN_MHA_UNTIED = dict(
    vocab_size=384, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
    rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
    rope_theta=10000.0, initializer_range=0.1,
)

SENTENCES = [
    "Be yourself; everyone else is already taken. "
    "| tags: attributed-no-source, be-yourself, honesty",
    "So many books, so little time. | tags: books, humor",
    "A room without books is like a body without a soul. | tags: books, simile, soul",
    "You only live once, but if you do it right, once is enough. | tags: humor, life, love",
    "In three words I can sum up everything I've learned about life: it goes on. | tags: life",
] * 20


def train_tokenizer(vocab_size):
    """A byte-level BPE whose ids 0 and 1 are bos and eos, like a real Llama tokenizer."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size,
                                  special_tokens=[BOS, EOS, "<|end_of_text|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(SENTENCES, trainer)
    return tokenizer


def write_tiny_model(folder, config=LLAMA3_GQA_TIED, seed=0, max_shard_size=None,
                     dtype=torch.float32):
    """Write a random HF Llama folder; returns its Path. transformers is only needed here."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**config)).to(dtype).eval()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    train_tokenizer(config["vocab_size"]).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": BOS, "eos_token": EOS}))
    return folder


# ----------------------------------------------------------------------------- adapters on them

# (2, 9) ids below both vocabularies
TOKENS = torch.randint(0, 384, (2, 9), generator=torch.Generator().manual_seed(1))


def randomize_b(model, seed=0):
    """Give every B random values, as training would: with B = 0 an adapter tests nothing."""
    from lora import lora_modules
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            B = m.B  # (out, r)
            B.copy_(torch.randn(B.shape, generator=g) * 0.1)
