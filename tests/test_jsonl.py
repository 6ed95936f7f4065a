"""machinery/data_files.py's read_quotes: a quotes JSONL file read line by line, from a path or
from the hub.

What a file holds decides what comes back: rows kept and rows skipped, counted by reason in one
line; a file that cannot be read is one ValueError or FileNotFoundError naming the file (and the
line). The oracles are hand-written files (bad JSON, a BOM, CRLF, non-UTF-8 bytes, lone surrogates)
with their hand-counted rows and the real english_quotes file's known counts; for the hub, a hub
client replaced by stubs or made unreachable (conftest.py's unreachable_hub), which must fail in
one line at once and never take a local path for a dataset id.
"""
import json

import pytest

from machinery import data_files, hub
from machinery.rows import EXPECTED_FORMAT, describe_skips, read_quotes, read_rows
from tiny_run import good_row, write_jsonl


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
    monkeypatch.setattr(hub.huggingface_hub, "hf_hub_download",
                        lambda **kw: pytest.fail("went to the hub"))
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


ONE_ROW = '{"quote": "Be yourself.", "tags": ["honesty", "life"]}'


def test_a_json_array_of_rows_reads_as_its_jsonl_does_each_row_named_by_its_first_line(tmp_path):
    """alpaca_data.json's shape: one JSON array. Oracle: the same rows written as JSONL, and the
    line each element starts on, counted in the text json.dumps wrote."""
    rows = [good_row(), {"quote": "No tags.", "tags": []}, good_row()]
    jsonl = write_jsonl(tmp_path / "q.jsonl", rows)
    path = tmp_path / "q.json"
    for text in [json.dumps(rows, indent=2), json.dumps(rows)]:
        path.write_text(text)
        assert read_quotes(str(path)) == read_quotes(str(jsonl))
        starts = [i + 1 for i, line in enumerate(text.splitlines())
                  if line.strip().startswith('{"quote"') or line == "  {"]
        lines = [n for n, _ in read_rows(str(path))[2]]
        assert lines == ([starts[0], starts[2]] if "\n" in text else [1, 1])


@pytest.mark.parametrize("text, reason", [
    ('quote,author,tags\n"Be yourself.",Oscar Wilde,"honesty,life"\n',
     "Expecting value at column 1"),
    ("quote\tauthor\ttags\nBe yourself.\tOscar Wilde\thonesty\n", "Expecting value at column 1"),
    ('"quote","author","tags"\n"Be yourself.","Oscar Wilde","honesty, life"\n',
     "Extra data at column 8"),
    ('{\n  "quote": "Be yourself.",\n  "tags": ["life"]\n}\n',
     "Expecting property name enclosed in double quotes at column 2"),
], ids=["csv", "tsv", "csv_quoted_header", "one_pretty_object"])
def test_a_file_in_another_shape_says_what_shape_is_expected_in_one_line(tmp_path, text, reason):
    """Issue 18, item 5: a CSV or a pretty-printed JSON passed as --data. Its first line is not
    JSON: the message names the line, the expected format and one row of it, which must itself be
    a row read_quotes keeps (the oracle: read back)."""
    path = tmp_path / "q.csv"
    path.write_text(text)
    with pytest.raises(ValueError) as error:
        read_quotes(str(path))
    assert str(error.value) == f"{path}:1: not valid JSON ({reason}); {EXPECTED_FORMAT}"
    assert ONE_ROW in EXPECTED_FORMAT
    path.write_text(ONE_ROW + "\n")
    assert read_quotes(str(path)) == ([("Be yourself.", ["honesty", "life"])], {})


def test_a_bad_line_after_good_ones_names_its_line_without_the_format(tmp_path):
    """The file is JSONL, one line is broken: the line and the reason, not a lesson on JSONL."""
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps(good_row()) + "\nquote,author,tags\n")
    with pytest.raises(ValueError) as error:
        read_quotes(str(path))
    assert str(error.value) == f"{path}:2: not valid JSON (Expecting value at column 1)"


def test_unusable_rows_are_skipped_and_counted_in_one_line(tmp_path):
    rows = [
        good_row(),
        "just a string", [1, 2],                                # 2 not a JSON object
        {"tags": ["a"]},                                       # 1 missing "quote"
        {"quote": "q"},                                        # 1 missing "tags"
        {"quote": 5, "tags": ["a"]}, {"quote": "  ", "tags": ["a"]},  # 2 bad quote
        {"quote": "q", "tags": "love"}, {"quote": "q", "tags": [1]},
        {"quote": "q", "tags": ["a", ""]},                     # 3 (these two lines)
        {"quote": "q", "tags": []}, {"quote": "r", "tags": []},  # 2 empty tags
    ]
    pairs, skips = read_quotes(str(write_jsonl(tmp_path / "q.jsonl", rows)))
    assert pairs == [("“Be yourself.”", ["honesty", "life"])]
    assert skips == {"not a JSON object": 2, 'missing "quote"': 1, 'missing "tags"': 1,
                     '"quote" not a non-empty string': 2,
                     '"tags" not a list of non-empty strings': 3,
                     "empty tags": 2}
    assert describe_skips(skips) == ('skipped 11 rows: 3 "tags" not a list of non-empty strings, '
                                     '2 "quote" not a non-empty string, 2 empty tags, '
                                     '2 not a JSON object, 1 missing "quote", 1 missing "tags"')


def test_escaped_lone_surrogate_is_skipped_not_passed_to_the_tokenizer(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"quote": "ok", "tags": ["a"]}\n'
                    '{"quote": "half \\ud800 a pair", "tags": ["a"]}\n')
    pairs, skips = read_quotes(str(path))
    assert pairs == [("ok", ["a"])]
    assert skips == {"invalid Unicode (lone surrogate)": 1}


def test_describe_skips_with_nothing_skipped():
    assert describe_skips({}) == "skipped 0 rows"


def test_file_with_no_usable_row_raises_naming_the_file_and_reasons(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"quote": "q", "tags": []}])
    with pytest.raises(ValueError,
                       match=r"q\.jsonl: no usable rows \(skipped 1 row: 1 empty tags\)"):
        read_quotes(str(path))


def test_non_utf8_bytes_report_file_and_line_number(tmp_path):
    path = tmp_path / "q.jsonl"
    # latin-1 é
    path.write_bytes(json.dumps(good_row()).encode() + b'\n{"quote": "caf\xe9", "tags": ["a"]}\n')
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
    monkeypatch.setattr(hub.huggingface_hub, "hf_hub_download",
                        lambda **kw: calls.append(kw) or str(local))
    pairs, _ = read_quotes("Abirate/english_quotes")
    assert calls == [{"repo_id": "Abirate/english_quotes", "filename": "quotes.jsonl",
                      "repo_type": "dataset", "local_files_only": False}]
    assert pairs == [("“Be yourself.”", ["honesty", "life"])]


def test_hub_failure_is_one_line_telling_to_pass_data(monkeypatch):
    def offline(**kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'.\nCheck your connection.")
    monkeypatch.setattr(hub, "hub_reachable", lambda: True)  # reached, then failed
    monkeypatch.setattr(hub.huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(FileNotFoundError,
                       match="could not download.*pass a local JSONL file with --data") as error:
        read_quotes("Abirate/english_quotes")
    assert "\n" not in str(error.value)


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
    source = data_files.DEFAULT_DATASET
    assert (code, capsys.readouterr().err.splitlines()) == (2, [
        f"train.py: error: {source}: no such file, and could not download quotes.jsonl of the "
        f"dataset {source!r} from the Hugging Face hub (cannot reach the hub, nor is it in the "
        "hub cache); "
        "pass a local JSONL file with --data"])
    assert seconds < 5


def test_offline_a_dataset_in_the_hub_cache_is_still_used(tmp_path, unreachable_hub):
    """The hub cache's own layout (refs/main names the snapshot), as hf_hub_download leaves it."""
    repo = tmp_path / "hub-cache" / "datasets--Abirate--english_quotes"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    write_jsonl(repo / "snapshots" / ("0" * 40) / "quotes.jsonl", [good_row()])
    assert read_quotes("Abirate/english_quotes")[0] == [
        ("“Be yourself.”", ["honesty", "life"])]


def test_missing_path_under_a_local_folder_is_not_sent_to_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # "data/quotes": a file of data/, not the hub repo "data" / "quotes"
    (tmp_path / "data").mkdir()
    monkeypatch.setattr(hub, "hub_reachable", lambda: True, raising=False)
    monkeypatch.setattr(hub.huggingface_hub, "hf_hub_download",
                        lambda **kw: pytest.fail("went to the hub"))
    with pytest.raises(FileNotFoundError, match=r"^data/quotes: no such file$"):
        read_quotes("data/quotes")


def test_missing_relative_path_offline_says_no_such_file(tmp_path, monkeypatch, unreachable_hub):
    # no data/ here: "data/quotes" could be a hub id, but no hub answers
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError,
                       match=r"^data/quotes: no such file, and could not download") as error:
        read_quotes("data/quotes")
    assert "\n" not in str(error.value)


def test_hub_reachable_asks_hf_endpoint_and_respects_hf_hub_offline(monkeypatch):
    import socket

    import huggingface_hub.constants
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    listening = socket.create_server(("127.0.0.1", 0))
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT",
                        f"http://127.0.0.1:{listening.getsockname()[1]}")
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
