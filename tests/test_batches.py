"""data.py: the train/validation split, the batches, and a batch cut into pieces (split_rows: DDP's
shares and gradient accumulation's micro-batches).

Oracles: hand-made samples with hand-counted positions; every sample counted once per epoch and
once over a batch's pieces; the whole batch's loss and gradients, which its pieces must add up to.
"""
import random

import numpy as np
import pytest
import torch

import data
import lora
from data import (IGNORE_INDEX, QuoteTokenizer, batches, collate, count_supervised, make_sample,
                  split_samples)
from train import split_rows


# -----------------------------------------------------------------------------
# Train/validation split


def numbered(n):
    return [{"input_tokens": [0, i], "output_tokens": [i, 1], "sep_token_index": 0}
            for i in range(n)]


def test_split_is_disjoint_covers_all_and_has_the_asked_size():
    samples = numbered(100)
    train, val = split_samples(samples, val_fraction=0.1, seed=0)
    assert (len(train), len(val)) == (90, 10)
    assert sorted(s["output_tokens"][0] for s in train + val) == list(range(100))


def test_tiny_dataset_still_gets_one_validation_sample_unless_the_fraction_is_zero():
    train, val = split_samples(numbered(4), val_fraction=0.1)  # 4 * 0.1 rounds to 0
    assert (len(train), len(val)) == (3, 1)
    train, val = split_samples(numbered(4), val_fraction=0.0)
    assert (len(train), len(val)) == (4, 0)


def test_split_depends_on_the_seed_only_not_on_global_random_state():
    samples = numbered(100)
    first = split_samples(samples, seed=3)
    random.seed(123), np.random.seed(123), torch.manual_seed(123)
    random.random()
    assert split_samples(samples, seed=3) == first
    assert split_samples(samples, seed=4) != first


# -----------------------------------------------------------------------------
# Batches


def test_collate_pads_right_and_targets_only_tags_and_eos():
    samples = [
        {"input_tokens": [0, 5, 6, 7, 8], "output_tokens": [5, 6, 7, 8, 1], "sep_token_index": 2},
        {"input_tokens": [0, 9, 10], "output_tokens": [9, 10, 1], "sep_token_index": 1},
    ]
    batch = collate(samples, pad_id=3)
    assert batch["input_tokens"].tolist() == [[0, 5, 6, 7, 8], [0, 9, 10, 3, 3]]
    assert batch["targets"].tolist() == [[-100, -100, 7, 8, 1], [-100, 10, 1, -100, -100]]
    assert batch["lengths"].tolist() == [5, 3]
    assert {t.dtype for t in batch.values()} == {torch.int64}
    assert count_supervised(batch) == 5


def test_every_sample_appears_exactly_once_per_epoch():
    samples = numbered(1003)
    seen = []
    for batch in batches(samples, batch_size=8, pad_id=0, seed=1, epoch=2):
        assert batch["input_tokens"].shape[0] <= 8
        seen += batch["input_tokens"][:, 1].tolist()
    assert sorted(seen) == list(range(1003))


def order_of(samples, **kwargs):
    return [b["input_tokens"][:, 1].tolist()
            for b in batches(samples, batch_size=4, pad_id=0, **kwargs)]


def test_batches_are_deterministic_for_seed_and_epoch_and_differ_across_epochs():
    samples = numbered(50)
    assert order_of(samples, seed=0, epoch=1) == order_of(samples, seed=0, epoch=1)
    assert order_of(samples, seed=0, epoch=1) != order_of(samples, seed=0, epoch=2)
    assert order_of(samples, seed=0, epoch=1) != order_of(samples, seed=1, epoch=1)


def test_without_shuffle_batches_keep_the_given_order():
    assert order_of(numbered(10), shuffle=False) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


# -----------------------------------------------------------------------------
# A batch cut into pieces


def varied(n):
    """n samples of lengths 2, 3, 4, 2, ..., each with its index as its second token."""
    return [{"input_tokens": [0, i] + [5] * (i % 3), "output_tokens": [i] + [5] * (i % 3) + [1],
             "sep_token_index": 1} for i in range(n)]


@pytest.mark.parametrize("rows, pieces", [(8, 2), (3, 2), (1, 2), (5, 3), (2, 4), (7, 1), (4, 4)])
def test_split_rows_puts_every_row_in_exactly_one_piece(rows, pieces):
    """DDP's shares and gradient accumulation's micro-batches: over the pieces, each row of the
    batch is supervised exactly once, unchanged; a piece without a row gets the first row with
    no target (a forward and a backward, no loss); each piece is trimmed to its own longest."""
    batch = collate(varied(rows), pad_id=3)
    before = {k: v.clone() for k, v in batch.items()}
    parts = split_rows(batch, pieces)
    assert len(parts) == pieces and all(len(part["lengths"]) >= 1 for part in parts)
    supervised = []
    for part in parts:
        T = int(part["lengths"].max())
        assert part["input_tokens"].shape[1] == part["targets"].shape[1] == T  # trimmed
        if count_supervised(part) == 0:  # a piece without a row of its own
            assert part["input_tokens"].tolist() == batch["input_tokens"][:1, :T].tolist()
            assert (part["targets"] == IGNORE_INDEX).all()
            continue
        for row in range(len(part["lengths"])):
            i = int(part["input_tokens"][row, 1])  # which sample
            supervised.append(i)
            for key in ("input_tokens", "targets"):
                assert part[key][row].tolist() == batch[key][i, :T].tolist()
    assert sorted(supervised) == list(range(rows))
    assert sum(count_supervised(part) for part in parts) == count_supervised(batch)
    assert sum(count_supervised(part) == 0 for part in parts) == max(pieces - rows, 0)
    assert all(torch.equal(batch[k], before[k]) for k in batch)  # the batch is left as it was


def test_an_empty_piece_adds_no_loss_and_no_gradient(tied, tiny_dirs):
    """What a DDP rank with an empty share runs (train.py: the summed cross-entropy, then its
    backward). Oracle: the whole batch's loss and gradients, which the pieces' sum must give; the
    empty pieces alone give exactly zero, yet every LoRA weight gets a gradient, which DDP waits
    for before it averages."""
    tokenizer = QuoteTokenizer.from_model_dir(tiny_dirs["tied"])
    samples = [make_sample(tokenizer, q, t) for q, t in [("Be yourself.", ["life"]),
                                                         ("So many books.", ["books", "humor"]),
                                                         ("A room without books.", ["soul"])]]
    torch.manual_seed(0)
    lora.add_lora(tied, r=4, alpha=0.5)  # random A and B: every gradient is non-zero
    params = lora.lora_parameters(tied)

    def loss_and_grads(pieces):
        total = sum(data.loss_sum(tied, piece) for piece in pieces)
        total.backward()
        grads = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        return total.detach(), grads

    batch = collate(samples, tokenizer.eos_id)
    whole, whole_grads = loss_and_grads([batch])
    pieces = split_rows(batch, 5)  # 3 rows, 5 pieces: 2 without a row
    empty = [piece for piece in pieces if count_supervised(piece) == 0]
    assert len(empty) == 2
    loss, grads = loss_and_grads(pieces)
    torch.testing.assert_close(loss, whole, rtol=1e-5, atol=0)
    for got, expected in zip(grads, whole_grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    nothing, zeros = loss_and_grads(empty)
    assert nothing.item() == 0 and not any(g.any() for g in zeros)
