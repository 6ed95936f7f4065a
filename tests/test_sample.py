"""sample.py end to end: train.py trains a tiny random Llama, sample.py writes tags with its adapter.

Oracle: greedy decoding by hand, one prompt at a time, recomputing the whole sequence for every
new token (no KV cache, no batching, no padding): the argmax of the last position's logits. The
oracle keeps the adapter apart (W x + alpha B A x); sample.py merges it into W first.
"""
import json
import shutil

import pytest
import torch

import lora
import sample
from data import QuoteTokenizer, prompt_text
from llama import Llama
from tiny_run import PAIRS, hashes, one_torch_thread, run_script, tiny_model, train_args, write_quotes

PROMPTS = [prompt_text(PAIRS[1][0]), prompt_text(PAIRS[4][0]), prompt_text("Time flies like an arrow."),
           prompt_text(PAIRS[0][0])]  # of different lengths, one never seen in training
NEW_TOKENS = 8


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(tiny model folder, train.py --out folder): two epochs, run as a user runs it."""
    model_dir, root = tiny_model(tmp_path_factory), tmp_path_factory.mktemp("trained")
    out = root / "out"
    done = run_script(["train.py", *train_args(model_dir, write_quotes(root / "quotes.jsonl"), out, "--epochs", 2)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert {"adapter.safetensors", "checkpoint.pt", "metrics.jsonl"} <= set(hashes(out))
    return model_dir, out


@pytest.fixture(scope="module")
def by_hand(trained):
    """{"adapter" | "base": [greedy completion of each prompt, decoded]}."""
    model_dir, out = trained
    tokenizer = QuoteTokenizer.from_model_dir(model_dir)
    base, adapted = Llama.from_pretrained(model_dir), Llama.from_pretrained(model_dir)
    lora.load_adapter(adapted, out)

    def greedy(model, prompt):
        ids, new = [tokenizer.bos_id] + tokenizer.encode(prompt), []
        for _ in range(NEW_TOKENS):
            with torch.no_grad():
                token = int(model(torch.tensor([ids + new]))[0, -1].argmax())
            if token in model.config.eos_token_ids:
                break
            new.append(token)
        return tokenizer.decode(new)

    return {"adapter": [greedy(adapted, p) for p in PROMPTS], "base": [greedy(base, p) for p in PROMPTS]}


FLAGS = ["--dtype", "float32", "--device", "cpu", "--max-new-tokens", NEW_TOKENS]


def sample_jsonl(capsys, *argv):
    """Run sample.main in this process; its stdout rows {"prompt", "completion"}, and its stderr."""
    assert sample.main([*map(str, argv), *map(str, FLAGS), "--jsonl"]) == 0
    captured = capsys.readouterr()
    return [json.loads(line) for line in captured.out.splitlines()], captured.err


def test_cli_completes_a_prompt_with_the_trained_adapter(trained, by_hand):
    model_dir, out = trained
    done = run_script(["sample.py", "--adapter", out, "--model", model_dir, *FLAGS, PROMPTS[0]])
    assert done.returncode == 0, done.stderr
    assert done.stdout == PROMPTS[0] + by_hand["adapter"][0] + "\n"
    assert "Traceback" not in done.stderr


def test_prompts_file_jsonl_batched_equals_one_by_one(trained, by_hand, tmp_path, capsys):
    model_dir, out = trained
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS[:2] + ["   "] + PROMPTS[2:]) + "\n")  # blank lines are skipped
    batched, _ = sample_jsonl(capsys, "--adapter", out, "--model", model_dir, "--prompts-file", prompts_file)
    assert [row["prompt"] for row in batched] == PROMPTS  # in the file's order, whatever the batching
    one_by_one = [sample_jsonl(capsys, "--adapter", out, "--model", model_dir, "--batch-size", 1, p)[0][0]
                  for p in PROMPTS]
    assert batched == one_by_one
    assert [row["completion"] for row in batched] == by_hand["adapter"]


def test_no_adapter_samples_the_base_model(trained, by_hand, capsys):
    model_dir, _ = trained
    rows, _ = sample_jsonl(capsys, "--no-adapter", "--model", model_dir, *PROMPTS)
    assert [row["completion"] for row in rows] == by_hand["base"]
    assert by_hand["base"] != by_hand["adapter"]  # the adapter changes what is written


def test_without_adapter_flag_the_adapter_in_out_is_used(trained, by_hand, tmp_path):
    """Run from a folder holding out/adapter.safetensors (train.py's default --out), with neither
    --adapter nor --model: the adapter is found, and its metadata names the base model."""
    _, out = trained
    (tmp_path / "out").mkdir()
    shutil.copy(out / "adapter.safetensors", tmp_path / "out")
    done = run_script([sample.__file__, *FLAGS, "--jsonl", *PROMPTS[:2]], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "using the adapter in out/" in done.stderr
    assert [json.loads(line)["completion"] for line in done.stdout.splitlines()] == by_hand["adapter"][:2]


def test_without_adapter_flag_and_out_the_base_is_sampled(trained, by_hand, tmp_path, monkeypatch, capsys):
    model_dir, _ = trained
    monkeypatch.chdir(tmp_path)  # no out/ here
    rows, err = sample_jsonl(capsys, "--model", model_dir, *PROMPTS[:2])
    assert "no adapter given and none in out/: sampling the base model" in err
    assert [row["completion"] for row in rows] == by_hand["base"][:2]


def test_an_adapter_of_a_base_by_another_name_warns_in_one_line(trained, by_hand, tmp_path, capsys):
    """The same weights in another folder: the shapes fit, so it loads, with one line of warning."""
    model_dir, out = trained
    copy = shutil.copytree(model_dir, tmp_path / "copy")
    rows, err = sample_jsonl(capsys, "--adapter", out, "--model", copy, PROMPTS[0])
    assert err == f"sample.py: warning: {out}: adapter was trained on {str(model_dir)!r}, loading into {str(copy)!r}\n"
    assert rows[0]["completion"] == by_hand["adapter"][0]
