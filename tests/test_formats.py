"""Your own data: the four shapes of row (quotes, completion, alpaca, chat), each row checked, the
loss where the answer is, the samples shown (python data.py --show), and sampling and scoring
that follow the data.

Oracles: the tokenizer itself on the whole text (a sample's ids), Stanford Alpaca's prompt
written out by hand, transformers' apply_chat_template on SmolLM2 and Llama-3.2 (the chat ids),
machinery/chat.py's generation prompt (what sample.py --chat feeds), hand-counted rows.
"""
import json
import shutil

import pytest

import data
import eval as eval_py
import sample
import train
from data import QuoteTokenizer, collate
from machinery import chat, data_files, prompts
from machinery.data_files import alpaca_prompt, load_dataset
from machinery.rows import read_rows
from tiny_run import main_of, run_script, tiny_model, train_args, write_jsonl

CHATML = ("{% for m in messages %}<|begin_of_text|>{{ m['role'] }}\n{{ m['content'] }}"
          "<|eot_id|>\n{% endfor %}{% if add_generation_prompt %}<|begin_of_text|>assistant\n"
          "{% endif %}")  # a ChatML-like template in the tiny tokenizer's special tokens


def chat_rows(n=12):
    return [{"messages": [{"role": "user", "content": f"Tags for quote {i}?"},
                          {"role": "assistant", "content": "books, humor"}]} for i in range(n)]


def completion_rows(n=12):
    return [{"prompt": f"So many books {i} | author:", "completion": " Frank Zappa"}
            for i in range(n)]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """The tiny model with a chat template of its own."""
    folder = tmp_path_factory.mktemp("chat") / "model"
    shutil.copytree(tiny_model(tmp_path_factory), folder)
    (folder / "chat_template.jinja").write_text(CHATML)
    return folder


# ----------------------------------------------------------------------------- the four shapes

@pytest.mark.parametrize("row, shape", [
    ({"quote": "Be yourself.", "tags": ["life"]}, "quotes"),
    ({"prompt": "2 + 2 =", "completion": " 4"}, "completion"),
    ({"instruction": "Add.", "input": "2 + 2", "output": "4"}, "alpaca"),
    ({"instruction": "Say hi.", "output": "Hi."}, "alpaca"),
    ({"messages": [{"role": "user", "content": "Hi"},
                   {"role": "assistant", "content": "Hello"}]}, "chat"),
], ids=["quotes", "completion", "alpaca", "alpaca_no_input", "chat"])
def test_the_first_rows_keys_tell_the_shape(tmp_path, row, shape):
    path = write_jsonl(tmp_path / "d.jsonl", [row, row])
    assert read_rows(str(path))[1:3] == (shape, [(1, row), (2, row)])


def test_the_alpaca_prompt_is_stanford_alpacas_with_a_newline_after_response():
    """Oracle: the template of Stanford Alpaca's train.py (PROMPT_DICT), typed out here, with
    the newline after "### Response:" that torchtune and litgpt put there."""
    assert alpaca_prompt("Add.", "2 + 2") == (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd.\n\n### Input:\n2 + 2\n\n### Response:\n")
    assert alpaca_prompt("Say hi.") == alpaca_prompt("Say hi.", "  ") == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nSay hi.\n\n### Response:\n")


def test_a_completion_sample_is_the_whole_text_tokenized_with_the_loss_on_the_answer(
        tmp_path_factory):
    tokenizer = QuoteTokenizer.from_model_dir(tiny_model(tmp_path_factory))
    prompt, completion = "So many books, so little time. | tags:", " books, humor"
    sample, cut = data_files.completion_sample(tokenizer, prompt, completion)
    whole = [tokenizer.bos_id] + tokenizer.encode(prompt + completion) + [tokenizer.eos_id]
    assert not cut and sample["input_tokens"] + sample["output_tokens"][-1:] == whole
    n_prompt = len(tokenizer.encode(prompt))
    assert sample["sep_token_index"] == n_prompt
    batch = collate([sample], tokenizer.eos_id)
    targets = batch["targets"][0].tolist()
    assert targets[:n_prompt] == [data.IGNORE_INDEX] * n_prompt
    assert targets[n_prompt:] == whole[n_prompt + 1:]  # the answer and the eos


def test_a_long_prompt_loses_its_start_and_the_answer_stays_whole(tmp_path_factory):
    tokenizer = QuoteTokenizer.from_model_dir(tiny_model(tmp_path_factory))
    prompt, completion = "So many books, so little time. " * 8 + "| tags:", " books, humor"
    sample, cut = data_files.completion_sample(tokenizer, prompt, completion, max_len=20)
    assert cut and len(sample["input_tokens"]) == 20
    answer = tokenizer.encode(prompt + completion)[len(tokenizer.encode(prompt)):]
    assert sample["output_tokens"][-len(answer) - 1:] == answer + [tokenizer.eos_id]
    kept = sample["input_tokens"][1:sample["sep_token_index"] + 1]
    assert kept == tokenizer.encode(prompt)[-len(kept):]  # the prompt's end, the cue, stays
    assert data_files.completion_sample(tokenizer, prompt, completion * 30, max_len=20) == (None, True)


def test_train_on_input_puts_the_loss_on_every_training_token_and_validation_keeps_its_own(
        tmp_path_factory, tmp_path):
    model_dir = tiny_model(tmp_path_factory)
    path = write_jsonl(tmp_path / "c.jsonl", completion_rows(10))
    plain, val, _, _ = load_dataset(model_dir, str(path), 64, 0.2, 0)
    everything, val_again, _, _ = load_dataset(model_dir, str(path), 64, 0.2, 0,
                                               train_on_input=True)
    assert val_again == val and all("supervised" not in s for s in val)
    for sample in everything:
        targets = collate([sample], 1)["targets"][0]
        assert (targets != data.IGNORE_INDEX).all()  # every position a target
    assert len(everything) == len(plain)


# ----------------------------------------------------------------------------- every row checked

@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "a", "completion": "b"}, {"quote": "q", "tags": ["t"]}],
     "{p}:2: a quotes row in a completion file (the first row's keys decide the shape; "
     "--format names it)"),
    ([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
      {"messages": [{"role": "robot", "content": "a"}]}],
     "{p}:2: message 0: role 'robot' is not one of system, user, assistant"),
], ids=["another_shape", "unknown_role"])
def test_a_row_that_breaks_the_file_stops_it_naming_file_and_line(tmp_path, rows, message):
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(ValueError) as error:
        read_rows(str(path))
    assert str(error.value) == message.format(p=path)


def test_rows_that_cannot_be_samples_are_skipped_and_counted(tmp_path):
    good = {"prompt": "2 + 2 =", "completion": " 4"}
    rows = [good, {"prompt": "x", "completion": "  "}, {"prompt": "x"},
            {"prompt": 3, "completion": "y"}, good]
    _, shape, usable, skipped = read_rows(str(write_jsonl(tmp_path / "c.jsonl", rows)))
    assert (shape, [n for n, _ in usable]) == ("completion", [1, 5])
    assert skipped == {"empty answer": 1, 'missing "completion"': 1, '"prompt" not a string': 1}
    chats = [chat_rows(1)[0], {"messages": [{"role": "user", "content": "only a question"}]},
             {"messages": [{"role": "user", "content": "q"}, {"role": "assistant",
                                                             "content": ""}]}]
    _, _, usable, skipped = read_rows(str(write_jsonl(tmp_path / "chat.jsonl", chats)))
    assert len(usable) == 1 and skipped == {"no assistant turn": 1, "empty answer": 1}


def test_chat_data_for_a_model_without_a_template_is_told_to_use_completion(tmp_path_factory,
                                                                            tmp_path):
    model_dir = tiny_model(tmp_path_factory)
    path = write_jsonl(tmp_path / "chat.jsonl", chat_rows(4))
    with pytest.raises(ValueError, match=r"has no chat template .*\(--format completion\)"):
        load_dataset(model_dir, str(path), 64, 0.25, 0)


# ----------------------------------------------------------------------------- chats, real models

CHATS = [
    [{"role": "user", "content": "Tags for: Be yourself."},
     {"role": "assistant", "content": "honesty, life"}],
    [{"role": "system", "content": "You write tags."},
     {"role": "user", "content": "So many books."}, {"role": "assistant", "content": "books"},
     {"role": "user", "content": "And this?"}, {"role": "assistant", "content": "humor, life"}],
]


@pytest.mark.parametrize("which", ["smollm2_dir", "llama1b_dir"])
def test_chat_samples_are_transformers_template_ids_with_the_loss_on_the_replies(
        request, tmp_path, which):
    """Oracle: transformers' apply_chat_template (its ids), and the replies themselves (the
    supervised tokens decode to each reply and its end-of-turn token)."""
    from transformers import AutoTokenizer
    model_dir = request.getfixturevalue(which)
    hf = AutoTokenizer.from_pretrained(model_dir)
    path = write_jsonl(tmp_path / "chats.jsonl", [{"messages": m} for m in CHATS])
    samples, _ = data_files.samples_of_rows(QuoteTokenizer.from_model_dir(model_dir), model_dir,
                                            "chat", read_rows(str(path))[2], None)
    tokenizer = QuoteTokenizer.from_model_dir(model_dir)
    eot = tokenizer.tokenizer.id_to_token(tokenizer.eos_id)
    for messages, sample in zip(CHATS, samples):
        ids = hf.apply_chat_template(messages, tokenize=True, return_dict=False,
                                     date_string=chat.DATE_STRING)
        tokens, supervised = data_files.supervised_tokens(sample)
        assert tokens == list(ids)
        targets = [t for t, s in zip(tokens, supervised) if s]
        replies = "".join(m["content"] + eot for m in messages if m["role"] == "assistant")
        assert tokenizer.tokenizer.decode(targets, skip_special_tokens=False) == replies
        # input_tokens up to sep_token_index prompt for the last reply: the generation prompt
        prompt = hf.apply_chat_template(messages[:-1], tokenize=True, return_dict=False,
                                        add_generation_prompt=True, date_string=chat.DATE_STRING)
        assert sample["input_tokens"][:sample["sep_token_index"] + 1] == list(prompt)
        assert sample["reference"] == messages[-1]["content"]


# ----------------------------------------------------------------------------- python data.py

def test_data_py_shows_the_samples_with_the_supervised_tokens(chat_model, tmp_path):
    """--json: one object a sample, input_tokens (bos to the last target) and supervised (1 where
    that token is a target). Oracle: the samples train.py makes (load_dataset), and the text."""
    path = write_jsonl(tmp_path / "chat.jsonl", chat_rows(3))
    done = run_script(["data.py", "--model", chat_model, "--data", path, "--show", 2, "--json"])
    assert done.returncode == 0, done.stderr
    shown = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(shown) == 2
    tokenizer = QuoteTokenizer.from_model_dir(chat_model)
    samples, _ = data_files.samples_of_rows(tokenizer, chat_model, "chat",
                                            read_rows(str(path))[2], 256)
    for row, sample in zip(shown, samples):
        assert (row["input_tokens"], row["supervised"]) == data_files.supervised_tokens(sample)
        targets = [t for t, s in zip(row["input_tokens"], row["supervised"]) if s]
        assert tokenizer.tokenizer.decode(targets, skip_special_tokens=False) == (
            "books, humor<|eot_id|>")
    text = run_script(["data.py", "--model", chat_model, "--data", path, "--show", 1]).stdout
    assert "[[books, humor<|eot_id|>]]" in text and "Tags for quote 0?" in text


def test_data_py_refuses_a_bad_file_in_one_line(chat_model, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "bot", "content": "x"}]}])
    done = run_script(["data.py", "--model", chat_model, "--data", path])
    assert done.returncode == 2 and done.stderr == (
        f"data.py: error: {path}:1: message 0: role 'bot' is not one of system, user, "
        "assistant\n")


# ----------------------------------------------------------------------------- sampling, scoring

@pytest.fixture(scope="module")
def chat_run(chat_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat_run")
    path = write_jsonl(folder / "chat.jsonl", chat_rows(12))
    out = folder / "out"
    assert train.main(train_args(chat_model, path, out, "--max-steps", 2)) == 0
    return out, path


def test_a_run_on_chats_records_its_format_and_samples_in_the_template(chat_run, chat_model,
                                                                        capsys, monkeypatch):
    """run.json says chat; sample.py then wraps each prompt as a user turn with the assistant's
    header after it, as --chat does. Oracle: chat.generation_prompt, and what generate gets."""
    out, _ = chat_run
    assert json.loads((out / "run.json").read_text())["format"] == "chat"
    seen = []

    def fake_generate(model, prompts, *args, **kwargs):
        seen.extend(prompts)
        return [[] for _ in prompts]

    monkeypatch.setattr(prompts, "generate", fake_generate)
    tokenizer = QuoteTokenizer.from_model_dir(chat_model)
    expected = chat.generation_prompt(tokenizer.tokenizer, CHATML,
                                      [{"role": "user", "content": "Tags for this?"}],
                                      "<|begin_of_text|>", "<|eot_id|>")
    for argv in (["--adapter", out], ["--adapter", out, "--chat"],
                 ["--no-adapter", "--model", chat_model, "--chat"]):
        seen.clear()
        code, err = main_of(sample, capsys, [*argv, "--device", "cpu", "--dtype", "float32",
                                             "Tags for this?"])
        assert code == 0, err
        assert seen == [expected]
        assert "added" not in err  # no " | tags:" note: that is the quotes' prompt


def test_eval_on_completion_data_reports_the_exact_match_share(chat_model, tmp_path, capsys,
                                                               monkeypatch):
    """Oracle: a fake generate that writes the reference for every other prompt: half of them
    match, whitespace aside."""
    path = write_jsonl(tmp_path / "c.jsonl", completion_rows(20))
    tokenizer = QuoteTokenizer.from_model_dir(chat_model)
    answer = tokenizer.encode("  Frank   Zappa ")
    calls = []

    def fake_generate(model, prompts, *args, **kwargs):
        calls.append(len(prompts))
        return [answer if i % 2 == 0 else [] for i in range(len(prompts))]

    monkeypatch.setattr(prompts, "generate", fake_generate)
    code = eval_py.main(["--no-adapter", "--model", str(chat_model), "--data", str(path),
                         "--val-fraction", "0.5", "--device", "cpu", "--dtype", "float32",
                         "--batch-size", "10"])
    out = capsys.readouterr()
    assert code == 0, out.err
    result = json.loads(out.out)
    assert result["exact_match"] == 0.5 and result["n"] == 10
    assert result["val_loss"] > 0 and "f1" not in result


# ----------------------------------------------------------------------------- a hub dataset

def test_a_hub_dataset_gives_its_named_file_or_its_one_data_file(tmp_path, monkeypatch):
    """owner/name:FILE downloads FILE; owner/name alone takes quotes.jsonl, or else the repo's
    one JSON/JSONL file. Oracle: the calls the hub client received (it is replaced here)."""
    from huggingface_hub.errors import EntryNotFoundError

    from machinery import hub
    local = write_jsonl(tmp_path / "c.jsonl", completion_rows(2))
    calls = []

    def download(**kw):
        calls.append(kw["filename"])
        if kw["filename"] == "quotes.jsonl":
            raise EntryNotFoundError("no quotes.jsonl here")
        return str(local)

    monkeypatch.setattr(hub, "hub_reachable", lambda: True)
    monkeypatch.setattr(hub.huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(hub.huggingface_hub, "list_repo_files",
                        lambda repo, repo_type: ["README.md", "data/train.jsonl"])
    assert read_rows("someone/tasks:data/train.jsonl")[1] == "completion"
    assert calls == ["data/train.jsonl"]
    calls.clear()
    assert read_rows("someone/tasks")[1] == "completion"
    assert calls == ["quotes.jsonl", "data/train.jsonl"]
    monkeypatch.setattr(hub.huggingface_hub, "list_repo_files",
                        lambda repo, repo_type: ["a.jsonl", "b.json"])
    with pytest.raises(FileNotFoundError, match="the repo has 2 JSON/JSONL files, name one as "
                                                "someone/tasks:FILE"):
        read_rows("someone/tasks")


def test_eval_scores_tag_lists_in_any_shape_with_score_tags(chat_model, tmp_path, capsys,
                                                            monkeypatch):
    """A chat whose answers are tags ("books, humor"), scored as tags. Oracle by hand: every
    completion writes " books" only: precision 1, recall 1/2, F1 2/3."""
    path = write_jsonl(tmp_path / "chat.jsonl", chat_rows(20))
    tokenizer = QuoteTokenizer.from_model_dir(chat_model)
    monkeypatch.setattr(prompts, "generate", lambda model, prompts, *a, **k:
                        [tokenizer.encode(" books") for _ in prompts])
    code = eval_py.main(["--no-adapter", "--model", str(chat_model), "--data", str(path),
                         "--val-fraction", "0.5", "--device", "cpu", "--dtype", "float32",
                         "--score", "tags"])
    out = capsys.readouterr()
    assert code == 0, out.err
    result = json.loads(out.out)
    assert (result["precision"], result["recall"]) == (1.0, 0.5)
    assert result["f1"] == pytest.approx(2 / 3) and "exact_match" not in result
