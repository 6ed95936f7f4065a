"""data.py: the sample format and its loss boundary (reading the quotes: test_jsonl.py; splits and
batches: test_batches.py).

Oracles: hand-written token lists and hand-counted positions; the raw `tokenizers` library for
what the real Llama-3.2 and SmolLM2 tokenizers do by themselves.
"""
import json
import shutil

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from data import QuoteTokenizer, batches, build_samples, make_sample, prompt_text, sample_text
from machinery.data_files import load_dataset
from machinery.rows import read_quotes
from tests.tiny import train_tokenizer
from tiny_run import good_row, write_jsonl

# the Instruct model's
LLAMA_CONFIG = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}


@pytest.fixture(scope="session")
def llama(llama_tokenizer_path, tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama-3.2")
    shutil.copy(llama_tokenizer_path, folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps(LLAMA_CONFIG))
    return QuoteTokenizer.from_model_dir(folder)


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    return QuoteTokenizer.from_model_dir(smollm2_dir)


@pytest.fixture(params=["llama", "smollm2"])
def tokenizer(request):
    return request.getfixturevalue(request.param)


# -----------------------------------------------------------------------------
# The text format


def test_sample_text_is_quote_separator_and_comma_separated_tags():
    assert (sample_text("“Be yourself.”", ["honesty", "life"])
            == "“Be yourself.” | tags: honesty, life")


def test_prompt_text_is_the_sample_text_up_to_the_separator():
    assert prompt_text("“Be yourself.”") == "“Be yourself.” | tags:"
    assert sample_text("q", ["a"]).startswith(prompt_text("q"))


# -----------------------------------------------------------------------------
# The tokenizer


def test_llama_bos_and_eos_come_from_tokenizer_config(llama):
    assert (llama.bos_id, llama.eos_id) == (128000, 128009)  # <|begin_of_text|>, <|eot_id|>


def test_smollm2_bos_and_eos_come_from_tokenizer_config(smollm2):
    assert (smollm2.bos_id, smollm2.eos_id) == (1, 2)  # <|im_start|>, <|im_end|>


def test_ids_fall_back_to_config_json_and_take_the_first_eos(tmp_path):
    train_tokenizer(384).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 2, "eos_token_id": [1, 0]}))
    tokenizer = QuoteTokenizer.from_model_dir(tmp_path)
    assert (tokenizer.bos_id, tokenizer.eos_id) == (2, 1)


def test_special_tokens_may_be_written_as_content_dicts(tmp_path):
    train_tokenizer(384).save(str(tmp_path / "tokenizer.json"))
    config = {"bos_token": {"content": "<|eot_id|>"},
              "eos_token": {"content": "<|begin_of_text|>"}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = QuoteTokenizer.from_model_dir(tmp_path)
    assert (tokenizer.bos_id, tokenizer.eos_id) == (1, 0)  # tiny.py puts bos at 0, eos at 1


def test_missing_tokenizer_json_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}: no tokenizer.json"):
        QuoteTokenizer.from_model_dir(tmp_path)


def test_encode_adds_no_bos_although_the_llama_post_processor_does(llama, llama_tokenizer_path):
    raw = Tokenizer.from_file(str(llama_tokenizer_path)).encode("Be yourself.").ids
    assert raw[0] == 128000  # the oracle: tokenizer.json alone prepends <|begin_of_text|>
    assert llama.encode("Be yourself.") == raw[1:]


def test_special_token_text_inside_a_quote_stays_plain_text(llama):
    ids = llama.encode("the end <|eot_id|> <|begin_of_text|> <|image|>")
    assert all(i < 128000 for i in ids)  # no special id, not even <|image|> = 128256
    assert llama.decode(ids) == "the end <|eot_id|> <|begin_of_text|> <|image|>"


# -----------------------------------------------------------------------------
# Samples and the separator boundary (both real tokenizers)


def test_llama_sample_by_hand(llama):
    sample = make_sample(llama, "“Be yourself.”", ["honesty", "life"])
    # bos “ Be Ġyourself .” Ġ| Ġtags : Ġhonesty , Ġlife eos: the ":" is input position 7
    assert sample["sep_token_index"] == 7
    assert len(sample["input_tokens"]) == 11
    assert sample["input_tokens"][1:] == sample["output_tokens"][:-1]
    assert llama.decode(sample["output_tokens"][7:8]) == " honesty"


def test_exactly_one_bos_at_the_start_and_eos_last(tokenizer):
    sample = make_sample(tokenizer, "“Be yourself.”", ["honesty", "life"])
    assert sample["input_tokens"][0] == tokenizer.bos_id
    assert tokenizer.bos_id not in sample["input_tokens"][1:] + sample["output_tokens"]
    assert sample["output_tokens"][-1] == tokenizer.eos_id
    assert tokenizer.eos_id not in sample["input_tokens"]


def test_outputs_from_the_separator_on_are_exactly_the_tags_and_eos(tokenizer):
    sample = make_sample(tokenizer, "“Be yourself.”", ["be-yourself", "love"])
    sep = sample["sep_token_index"]
    assert tokenizer.decode(sample["output_tokens"][sep:]) == " be-yourself, love"
    assert sample["output_tokens"][sep:][-1] == tokenizer.eos_id


def test_inputs_up_to_the_separator_are_bos_and_the_prompt(tokenizer):
    sample = make_sample(tokenizer, "“Be yourself.”", ["love"])
    sep = sample["sep_token_index"]
    fed_by_sample_py = [tokenizer.bos_id] + tokenizer.encode("“Be yourself.” | tags:")
    assert sample["input_tokens"][:sep + 1] == fed_by_sample_py
    assert tokenizer.decode(sample["input_tokens"][:sep + 1]).endswith(" | tags:")


def test_quote_containing_the_separator_keeps_the_boundary_at_the_last_one(tokenizer):
    quote = "a | b | tags: not tags | tags:x"
    sample = make_sample(tokenizer, quote, ["real", "tags"])
    sep = sample["sep_token_index"]
    assert tokenizer.decode(sample["input_tokens"][:sep + 1]) == quote + " | tags:"
    assert tokenizer.decode(sample["output_tokens"][sep:]) == " real, tags"


def test_bpe_merge_across_the_boundary_falls_back_to_tokenizing_prompt_and_tags_apart(tmp_path):
    # A BPE without pre-tokenizer splits learns tokens that run across ": love" (oracle: raw
    # encode).
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(["q | tags: love"] * 10, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    raw.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    tokenizer = QuoteTokenizer.from_model_dir(tmp_path)
    prompt = tokenizer.encode("q | tags:")
    assert tokenizer.encode("q | tags: love")[:len(prompt)] != prompt  # the merge happens
    sample = make_sample(tokenizer, "q", ["love"])
    sep = sample["sep_token_index"]
    assert sample["input_tokens"][:sep + 1] == [0] + prompt
    assert sample["output_tokens"][sep:] == tokenizer.encode(" love") + [1]


# -----------------------------------------------------------------------------
# Truncation to max_len


def test_sample_of_exactly_max_len_is_kept_whole(llama):
    whole = make_sample(llama, "“Be yourself.”", ["honesty", "life"])
    assert make_sample(llama, "“Be yourself.”", ["honesty", "life"], max_len=11) == whole


def test_truncation_cuts_the_quote_and_keeps_separator_tags_and_eos(llama):
    quote = "one two three four five six seven eight nine ten"  # 10 tokens
    sample = make_sample(llama, quote, ["counting", "numbers"], max_len=12)
    # bos + 10 quote + 3 separator (" |", " tags", ":") + 3 tags (" counting", ",", " numbers")
    # + eos = 18 tokens, 17 inputs: 5 quote tokens must go, 5 stay
    assert len(sample["input_tokens"]) == 12
    assert sample["input_tokens"][1:6] == llama.encode(quote)[:5]
    assert sample["sep_token_index"] == 8
    assert llama.decode(sample["input_tokens"][:9]) == "one two three four five | tags:"
    assert llama.decode(sample["output_tokens"][8:]) == " counting, numbers"


def test_sample_that_cannot_keep_one_quote_token_is_dropped(llama):
    # bos + 1 quote token + 3 separator + 3 tags = 8 inputs is the least that fits
    assert len(make_sample(llama, "one two three", ["counting", "numbers"],
                           max_len=8)["input_tokens"]) == 8
    assert make_sample(llama, "one two three", ["counting", "numbers"], max_len=7) is None


def test_build_samples_counts_truncated_and_dropped(llama):
    # inputs: bos + quote + 3 separator + tags: 8 (fits exactly), 11 (cut to 8), 44 (39 tag
    # tokens: dropped)
    pairs = [("one two three", ["a"]), ("one two three four five six", ["a"]), ("x", ["a"] * 20)]
    samples, counts = build_samples(llama, pairs, max_len=8)
    assert counts == {"truncated": 1, "dropped": 1}
    assert [len(s["input_tokens"]) for s in samples] == [8, 8]


# -----------------------------------------------------------------------------
# Batches (the rest: test_batches.py)


def test_length_grouping_pads_far_less_than_random_batches_on_the_real_quotes(llama, quotes_path):
    pairs, _ = read_quotes(str(quotes_path))
    samples, _ = build_samples(llama, pairs, max_len=256)
    lengths = np.array([len(s["input_tokens"]) for s in samples])

    def padding(groups):
        return sum(len(g) * lengths[g].max() - lengths[g].sum() for g in groups)

    random_order = np.random.default_rng(0).permutation(len(samples))
    random_padding = padding([random_order[i:i + 16] for i in range(0, len(samples), 16)])
    grouped_padding = sum(int(b["input_tokens"].numel() - b["lengths"].sum())
                          for b in batches(samples, batch_size=16, pad_id=llama.eos_id))
    assert grouped_padding < random_padding / 10  # measured: 6,765 vs 265,261 pads


# -----------------------------------------------------------------------------
# load_dataset


def test_load_dataset_reads_tokenizes_and_splits_with_counts(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    train_tokenizer(384).save(str(folder / "tokenizer.json"))
    # tiny.py uses Llama's names
    (folder / "tokenizer_config.json").write_text(json.dumps(LLAMA_CONFIG))
    rows = ([good_row(f"quote number {i}", ["books"]) for i in range(20)]
            + [good_row("no tags", [])])
    rows.append(good_row("So many books, so little time. " * 20, ["books"]))  # far over max_len 40
    train, val, tokenizer, info = load_dataset(
        folder, str(write_jsonl(tmp_path / "q.jsonl", rows)), max_len=40)
    assert info == {"rows": 21, "skipped": {"empty tags": 1}, "truncated": 1, "dropped": 0,
                    "train": 19, "val": 2, "format": "quotes"}
    assert (len(train), len(val)) == (19, 2)
    # tiny.py's <|begin_of_text|>, <|eot_id|>
    assert (tokenizer.bos_id, tokenizer.eos_id) == (0, 1)
    assert max(len(s["input_tokens"]) for s in train + val) == 40
