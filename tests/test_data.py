"""data.py: reading the quotes, the sample format and its loss boundary (splits and batches: test_batches.py).

Oracles: hand-written token lists and hand-counted positions; the raw `tokenizers` library for
what the real Llama-3.2 and SmolLM2 tokenizers do by themselves.
"""
import json
import shutil

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import data
import hub
from data import (QuoteTokenizer, batches, build_samples, describe_skips, load_dataset, make_sample,
                  prompt_text, read_quotes, sample_text)
from tests.tiny import train_tokenizer

LLAMA_CONFIG = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}  # the Instruct model's


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def good_row(quote="“Be yourself.”", tags=("honesty", "life")):
    return {"quote": quote, "author": "Oscar Wilde", "tags": list(tags)}


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
    assert sample_text("“Be yourself.”", ["honesty", "life"]) == "“Be yourself.” | tags: honesty, life"


def test_prompt_text_is_the_sample_text_up_to_the_separator():
    assert prompt_text("“Be yourself.”") == "“Be yourself.” | tags:"
    assert sample_text("q", ["a"]).startswith(prompt_text("q"))


# -----------------------------------------------------------------------------
# Reading JSONL


def test_real_file_keeps_2499_rows_and_skips_its_9_empty_tag_rows(quotes_path):
    pairs, skips = read_quotes(str(quotes_path))
    assert len(pairs) == 2499  # 2,508 published rows - 9 with "tags": []
    assert skips == {"empty tags": 9}
    assert describe_skips(skips) == "skipped 9 rows: 9 empty tags"
    assert pairs[0] == ("“Be yourself; everyone else is already taken.”",
                        ["be-yourself", "gilbert-perreira", "honesty", "inspirational",
                         "misattributed-oscar-wilde", "quote-investigator"])


def test_missing_file_raises_file_not_found_naming_the_path(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_quotes(str(missing))


def test_missing_path_like_source_is_not_sent_to_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hub.huggingface_hub, "hf_hub_download", lambda **kw: pytest.fail("went to the hub"))
    with pytest.raises(FileNotFoundError, match="quotes.jsonl"):
        read_quotes("data/quotes.jsonl")


def test_empty_or_blank_file_raises_value_error_naming_the_file(tmp_path):
    for text in ["", "\n  \n\r\n"]:
        path = tmp_path / "empty.jsonl"
        path.write_text(text)
        with pytest.raises(ValueError, match=r"empty\.jsonl: empty file"):
            read_quotes(str(path))


def test_line_that_is_not_json_reports_file_and_line_number(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps(good_row()) + "\n\n{'quote': 'single quotes'}\n")
    with pytest.raises(ValueError, match=r"q\.jsonl:3: not valid JSON \(") as error:
        read_quotes(str(path))
    assert "\n" not in str(error.value)


def test_line_nested_too_deep_to_parse_is_reported_as_not_json(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps(good_row()) + "\n" + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(ValueError, match=r"q\.jsonl:2: not valid JSON \(maximum recursion depth"):
        read_quotes(str(path))


def test_json_array_file_says_jsonl_is_expected(tmp_path):
    path = tmp_path / "q.json"
    path.write_text(json.dumps([good_row(), good_row()], indent=2))
    with pytest.raises(ValueError, match=r"JSON array; expected JSONL \(one JSON object per line\)"):
        read_quotes(str(path))


def test_unusable_rows_are_skipped_and_counted_in_one_line(tmp_path):
    rows = [
        good_row(),
        "just a string", [1, 2],                                # 2 not a JSON object
        {"tags": ["a"]},                                       # 1 missing "quote"
        {"quote": "q"},                                        # 1 missing "tags"
        {"quote": 5, "tags": ["a"]}, {"quote": "  ", "tags": ["a"]},  # 2 bad quote
        {"quote": "q", "tags": "love"}, {"quote": "q", "tags": [1]}, {"quote": "q", "tags": ["a", ""]},  # 3
        {"quote": "q", "tags": []}, {"quote": "r", "tags": []},  # 2 empty tags
    ]
    pairs, skips = read_quotes(str(write_jsonl(tmp_path / "q.jsonl", rows)))
    assert pairs == [("“Be yourself.”", ["honesty", "life"])]
    assert skips == {"not a JSON object": 2, 'missing "quote"': 1, 'missing "tags"': 1,
                     '"quote" not a non-empty string': 2, '"tags" not a list of non-empty strings': 3,
                     "empty tags": 2}
    assert describe_skips(skips) == ('skipped 11 rows: 3 "tags" not a list of non-empty strings, '
                                     '2 "quote" not a non-empty string, 2 empty tags, 2 not a JSON object, '
                                     '1 missing "quote", 1 missing "tags"')


def test_escaped_lone_surrogate_is_skipped_not_passed_to_the_tokenizer(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"quote": "ok", "tags": ["a"]}\n{"quote": "half \\ud800 a pair", "tags": ["a"]}\n')
    pairs, skips = read_quotes(str(path))
    assert pairs == [("ok", ["a"])]
    assert skips == {"invalid Unicode (lone surrogate)": 1}


def test_describe_skips_with_nothing_skipped():
    assert describe_skips({}) == "skipped 0 rows"


def test_file_with_no_usable_row_raises_naming_the_file_and_reasons(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"quote": "q", "tags": []}])
    with pytest.raises(ValueError, match=r"q\.jsonl: no usable rows \(skipped 1 row: 1 empty tags\)"):
        read_quotes(str(path))


def test_non_utf8_bytes_report_file_and_line_number(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_bytes(json.dumps(good_row()).encode() + b'\n{"quote": "caf\xe9", "tags": ["a"]}\n')  # latin-1 é
    with pytest.raises(ValueError, match=r"q\.jsonl:2: not valid UTF-8"):
        read_quotes(str(path))


def test_crlf_line_endings_blank_lines_and_a_bom_are_read(tmp_path):
    path = tmp_path / "q.jsonl"
    lines = [json.dumps(good_row("a")), "", json.dumps(good_row("b", ["x"])), ""]
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode())
    pairs, skips = read_quotes(str(path))
    assert pairs == [("a", ["honesty", "life"]), ("b", ["x"])]
    assert skips == {}


def test_hub_source_downloads_quotes_jsonl_of_the_dataset_repo(tmp_path, monkeypatch):
    local = write_jsonl(tmp_path / "quotes.jsonl", [good_row()])
    calls = []
    monkeypatch.setattr(hub, "hub_reachable", lambda: True)
    monkeypatch.setattr(hub.huggingface_hub, "hf_hub_download", lambda **kw: calls.append(kw) or str(local))
    pairs, _ = read_quotes("Abirate/english_quotes")
    assert calls == [{"repo_id": "Abirate/english_quotes", "filename": "quotes.jsonl", "repo_type": "dataset",
                      "local_files_only": False}]
    assert pairs == [("“Be yourself.”", ["honesty", "life"])]


def test_hub_failure_is_one_line_telling_to_pass_data(monkeypatch):
    def offline(**kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'.\nCheck your connection.")
    monkeypatch.setattr(hub, "hub_reachable", lambda: True)  # reached, then failed
    monkeypatch.setattr(hub.huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(FileNotFoundError, match="could not download.*pass a local JSONL file with --data") as error:
        read_quotes("Abirate/english_quotes")
    assert "\n" not in str(error.value)


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
    config = {"bos_token": {"content": "<|eot_id|>"}, "eos_token": {"content": "<|begin_of_text|>"}}
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
    # A BPE without pre-tokenizer splits learns tokens that run across ": love" (oracle: raw encode).
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(["q | tags: love"] * 10, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    raw.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
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
    # bos + 10 quote + 3 separator (" |", " tags", ":") + 3 tags (" counting", ",", " numbers") + eos
    # = 18 tokens, 17 inputs: 5 quote tokens must go, 5 stay
    assert len(sample["input_tokens"]) == 12
    assert sample["input_tokens"][1:6] == llama.encode(quote)[:5]
    assert sample["sep_token_index"] == 8
    assert llama.decode(sample["input_tokens"][:9]) == "one two three four five | tags:"
    assert llama.decode(sample["output_tokens"][8:]) == " counting, numbers"


def test_sample_that_cannot_keep_one_quote_token_is_dropped(llama):
    # bos + 1 quote token + 3 separator + 3 tags = 8 inputs is the least that fits
    assert len(make_sample(llama, "one two three", ["counting", "numbers"], max_len=8)["input_tokens"]) == 8
    assert make_sample(llama, "one two three", ["counting", "numbers"], max_len=7) is None


def test_build_samples_counts_truncated_and_dropped(llama):
    # inputs: bos + quote + 3 separator + tags: 8 (fits exactly), 11 (cut to 8), 44 (39 tag tokens: dropped)
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
    (folder / "tokenizer_config.json").write_text(json.dumps(LLAMA_CONFIG))  # tiny.py uses Llama's names
    rows = [good_row(f"quote number {i}", ["books"]) for i in range(20)] + [good_row("no tags", [])]
    rows.append(good_row("So many books, so little time. " * 20, ["books"]))  # far over max_len 40
    train, val, tokenizer, info = load_dataset(folder, str(write_jsonl(tmp_path / "q.jsonl", rows)), max_len=40)
    assert info == {"rows": 21, "skipped": {"empty tags": 1}, "truncated": 1, "dropped": 0, "train": 19, "val": 2}
    assert (len(train), len(val)) == (19, 2)
    assert (tokenizer.bos_id, tokenizer.eos_id) == (0, 1)  # tiny.py's <|begin_of_text|>, <|eot_id|>
    assert max(len(s["input_tokens"]) for s in train + val) == 40


# -----------------------------------------------------------------------------
# The hub out of reach (issue 11.8): one line within seconds, and paths taken for paths


def test_train_on_a_local_model_with_the_default_data_offline_fails_in_one_line_at_once(
        tmp_path, monkeypatch, capsys, unreachable_hub):
    """Before: the hub client retried for 25-30 s, printing 13 lines, before the error."""
    import time

    import train
    from tests.tiny import write_tiny_model
    model = write_tiny_model(tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()  # what writing the model printed
    start = time.monotonic()
    code = train.main(["--model", str(model), "--out", str(tmp_path / "out")])  # default --data
    seconds = time.monotonic() - start
    source = data.DEFAULT_DATASET
    assert (code, capsys.readouterr().err.splitlines()) == (2, [
        f"train.py: error: {source}: no such file, and could not download quotes.jsonl of the dataset "
        f"{source!r} from the Hugging Face hub (cannot reach the hub, nor is it in the hub cache); "
        "pass a local JSONL file with --data"])
    assert seconds < 5


def test_offline_a_dataset_in_the_hub_cache_is_still_used(tmp_path, unreachable_hub):
    """The hub cache's own layout (refs/main names the snapshot), as hf_hub_download leaves it."""
    repo = tmp_path / "hub-cache" / "datasets--Abirate--english_quotes"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    write_jsonl(repo / "snapshots" / ("0" * 40) / "quotes.jsonl", [good_row()])
    assert read_quotes("Abirate/english_quotes")[0] == [("“Be yourself.”", ["honesty", "life"])]


def test_missing_path_under_a_local_folder_is_not_sent_to_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()  # "data/quotes": a file of data/, not the hub repo "data" / "quotes"
    monkeypatch.setattr(hub, "hub_reachable", lambda: True, raising=False)
    monkeypatch.setattr(hub.huggingface_hub, "hf_hub_download", lambda **kw: pytest.fail("went to the hub"))
    with pytest.raises(FileNotFoundError, match=r"^data/quotes: no such file$"):
        read_quotes("data/quotes")


def test_missing_relative_path_offline_says_no_such_file(tmp_path, monkeypatch, unreachable_hub):
    monkeypatch.chdir(tmp_path)  # no data/ here: "data/quotes" could be a hub id, but no hub answers
    with pytest.raises(FileNotFoundError, match=r"^data/quotes: no such file, and could not download") as error:
        read_quotes("data/quotes")
    assert "\n" not in str(error.value)


def test_hub_reachable_asks_hf_endpoint_and_respects_hf_hub_offline(monkeypatch):
    import socket

    import huggingface_hub.constants
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    listening = socket.create_server(("127.0.0.1", 0))
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{listening.getsockname()[1]}")
    with listening:
        assert hub.hub_reachable()
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        assert not hub.hub_reachable()


def test_hub_reachable_gives_up_after_its_timeout(monkeypatch):
    """A DNS lookup or a connection that hangs does not hold the run: the answer comes in time."""
    import socket
    import time
    def hang(*args, **kwargs):
        time.sleep(3)
        raise TimeoutError("timed out")
    monkeypatch.setattr(socket, "create_connection", hang)
    start = time.monotonic()
    assert not hub._connects("hangs.example", 443, 0.2)
    assert time.monotonic() - start < 1
