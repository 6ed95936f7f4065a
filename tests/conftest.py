"""Shared fixtures: where the test data and model folders are, and a tiny random Llama.

The real quotes file, the Llama-3.2 tokenizer and the model folders are large and live outside
the repository. Tests find them through environment variables (set by .ci/run):

  LORA_TEST_QUOTES            english_quotes JSONL file
  LORA_TEST_LLAMA_TOKENIZER   Llama-3.2 tokenizer.json
  LORA_TEST_SMOLLM2           HF folder of SmolLM2-135M-Instruct
  LORA_TEST_LLAMA1B           HF folder with the Llama-3.2-1B-Instruct config (random weights)

Without one of them, the tests that need it are skipped, unless LORA_TEST_REQUIRE=1 (CI sets it),
in which case they fail: CI must never pass by skipping.
"""
import copy
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _path_from_env(name):
    value = os.environ.get(name)
    if value and Path(value).exists():
        return Path(value)
    message = f"{name} is not set or does not exist (got {value!r})"
    if os.environ.get("LORA_TEST_REQUIRE") == "1":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def quotes_path():
    return _path_from_env("LORA_TEST_QUOTES")


@pytest.fixture(scope="session")
def llama_tokenizer_path():
    return _path_from_env("LORA_TEST_LLAMA_TOKENIZER")


@pytest.fixture(scope="session")
def smollm2_dir():
    return _path_from_env("LORA_TEST_SMOLLM2")


@pytest.fixture(scope="session")
def llama1b_dir():
    return _path_from_env("LORA_TEST_LLAMA1B")


# ----------------------------------------------------- tiny models (test_lora, test_adapter_files)

@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    from tiny import LLAMA3_GQA_TIED, PLAIN_MHA_UNTIED, write_tiny_model
    root = tmp_path_factory.mktemp("tiny")
    return {"tied": write_tiny_model(root / "tied", LLAMA3_GQA_TIED),
            "untied": write_tiny_model(root / "untied", PLAIN_MHA_UNTIED)}


@pytest.fixture(scope="module")
def base_models(tiny_dirs):
    from llama import Llama
    return {k: Llama.from_pretrained(d) for k, d in tiny_dirs.items()}


@pytest.fixture
def tied(base_models):
    # deepcopy keeps lm_head.weight IS embed_tokens.weight
    return copy.deepcopy(base_models["tied"])


@pytest.fixture
def untied(base_models):
    return copy.deepcopy(base_models["untied"])


# ------------------------------------------------------- small training runs (tiny_run.py)

@pytest.fixture(scope="module")
def one_thread():
    from tiny_run import one_torch_thread
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(tiny model folder, quotes file)."""
    from tiny_run import tiny_model, write_quotes
    quotes = write_quotes(tmp_path_factory.mktemp("data") / "quotes.jsonl")
    return tiny_model(tmp_path_factory), quotes


@pytest.fixture(scope="module")
def stopped_run(setup, tmp_path_factory):
    """An --out folder stopped by --max-steps at step 2 of 5: checkpoint.pt, adapter, metrics,
    run.json."""
    import train
    from tiny_run import train_args
    out = tmp_path_factory.mktemp("stopped") / "out"
    assert train.main(train_args(*setup, out, "--max-steps", 2)) == 0
    return out


@pytest.fixture
def run_copy(stopped_run, tmp_path):
    """A copy of stopped_run to be attacked, and its file hashes before."""
    import shutil

    from tiny_run import hashes
    out = tmp_path / "out"
    shutil.copytree(stopped_run, out)
    return out, hashes(out)


@pytest.fixture(scope="module")
def three_epochs(setup, tmp_path_factory):
    """A 3-epoch run through train.main, watched from inside: the model it trains, the LoRA weights
    it starts from, what it hands to AdamW, and what each checkpoint save wrote. Module-scoped: it
    runs once in each module that asks for it (test_train.py, test_resume.py, test_plot.py)."""
    import torch

    import lora
    import train
    from machinery import adapters, checkpoint
    from tiny_run import three_epoch_args
    out = tmp_path_factory.mktemp("three_epochs") / "out"
    seen = {"saves": []}
    real_add_lora, real_adamw, real_save = lora.add_lora, torch.optim.AdamW, checkpoint.save

    def add_lora(model, **kwargs):
        names = real_add_lora(model, **kwargs)
        seen["model"] = model
        seen["initial"] = {k: v.clone() for k, v in lora.lora_state_dict(model).items()}
        return names

    def adamw(params, **kwargs):
        seen["optimized"] = list(params)
        return real_adamw(seen["optimized"], **kwargs)

    def save(out, model, optimizer, scaler, position, base_model, best_too=False):
        real_save(out, model, optimizer, scaler, position, base_model, best_too)
        ckpt = torch.load(Path(out) / checkpoint.CHECKPOINT, weights_only=False)
        saved_alpha = adapters.read(Path(out) / checkpoint.LAST_ADAPTER)[1]["alpha"]
        seen["saves"].append((ckpt["step"], ckpt["epoch"], saved_alpha))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lora, "add_lora", add_lora)
        mp.setattr(torch.optim, "AdamW", adamw)
        mp.setattr(checkpoint, "save", save)
        assert train.main(three_epoch_args(setup, out, "--plot")) == 0
    return out, seen


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: loads a large model folder (CI still runs these)")
    config.addinivalue_line("markers", "device: runs on every device of tests/devices.py "
                            "(gpu_check/run.sh selects these with -m device)")
    config.addinivalue_line("markers", "nested: runs a whole gpu_check/run.sh of its own "
                            "(run.sh's own 'other tests' step leaves these out)")


@pytest.fixture
def unreachable_hub(tmp_path, monkeypatch):
    """A hub endpoint that refuses connections (a port bound but not listening) and an empty hub
    cache: the hub is out of reach the same way on any machine, with a network or without."""
    import socket

    import huggingface_hub.constants
    for proxy in ("http_proxy", "https_proxy", "all_proxy"):  # the endpoint itself, not a proxy
        monkeypatch.delenv(proxy, raising=False)
        monkeypatch.delenv(proxy.upper(), raising=False)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT",
                        f"http://127.0.0.1:{closed.getsockname()[1]}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    yield
    closed.close()
