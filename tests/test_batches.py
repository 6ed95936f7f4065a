"""data.py: the train/validation split and the batches.

Oracles: hand-made samples with hand-counted positions; every sample counted once per epoch.
"""
import random

import numpy as np
import torch

from data import batches, collate, count_supervised, split_samples


# -----------------------------------------------------------------------------
# Train/validation split


def numbered(n):
    return [{"input_tokens": [0, i], "output_tokens": [i, 1], "sep_token_index": 0} for i in range(n)]


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
    return [b["input_tokens"][:, 1].tolist() for b in batches(samples, batch_size=4, pad_id=0, **kwargs)]


def test_batches_are_deterministic_for_seed_and_epoch_and_differ_across_epochs():
    samples = numbered(50)
    assert order_of(samples, seed=0, epoch=1) == order_of(samples, seed=0, epoch=1)
    assert order_of(samples, seed=0, epoch=1) != order_of(samples, seed=0, epoch=2)
    assert order_of(samples, seed=0, epoch=1) != order_of(samples, seed=1, epoch=1)


def test_without_shuffle_batches_keep_the_given_order():
    assert order_of(numbered(10), shuffle=False) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
