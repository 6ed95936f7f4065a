"""Where models and datasets come from, and what their files say.

A local path is used as it is, anything else comes from the Hugging Face hub (downloaded once into
its cache): the only file that talks to the network. It also reads a model folder for llama.py:
config.json's fields (two spellings of RoPE's settings, eos ids from two files) and the
safetensors, single-file or sharded, checked tensor by tensor against the model, one-line errors.
"""
import contextlib
import functools
import json
import logging
import os
import socket
import sys
import threading
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import huggingface_hub
import huggingface_hub.constants  # a lazy submodule: not an attribute until imported
import torch

HUB_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "*.safetensors", "model.safetensors.index.json"]


def resolve_model_dir(name_or_path):
    """A local folder as it is; anything else is a hub repo id, downloaded once into the hub
    cache. Raises FileNotFoundError, PermissionError (gated) or ConnectionError, one line each."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if looks_like_path(name):
        raise FileNotFoundError(f"model folder {name} does not exist "
                                "(nor is it a hub id like org/name)")
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    offline = not hub_reachable()  # then only the hub cache is looked at, at once
    try:
        with quiet_hub():
            return Path(huggingface_hub.snapshot_download(name, allow_patterns=HUB_FILES,
                                                          local_files_only=offline))
    except GatedRepoError:
        raise PermissionError(
            f"{name} is a gated model: accept its license at https://huggingface.co/{name}, "
            "then log in with `hf auth login` (or set HF_TOKEN) and run again") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"{name} is neither a local folder nor a model on the Hugging "
                                "Face hub (private repos need `hf auth login`)") from None
    except Exception as e:  # offline, DNS, timeouts: the hub raises many kinds
        why = "cannot reach the hub" if offline else type(e).__name__
        raise ConnectionError(
            f"{name}: no such folder, and could not download it from the Hugging Face hub "
            f"({why}); if you are offline, pass a local folder holding config.json, "
            "tokenizer.json and *.safetensors, e.g. --model path/to/Llama-3.2-1B-Instruct "
            "(train.py and eval.py then need a local JSONL file as --data too)") from None


# ----------------------------------------------------------------------------- a model folder

def read_config(model_dir):
    """LlamaConfig's fields (a dict) from config.json, plus generation_config.json's eos ids.
    Raises FileNotFoundError without config.json, ValueError naming the file otherwise."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; a model folder needs config.json")
    try:
        fields = config_fields(json.loads(path.read_text()), where=str(path))
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a readable Llama config "
                         f"({type(e).__name__}: {e})") from None
    # Instruct models stop at several ids (Llama-3.2: 128001, 128008, 128009); the generation
    # config may list ones config.json does not.
    gen = Path(model_dir) / "generation_config.json"
    if gen.is_file():
        try:
            extra = _ids(json.loads(gen.read_text()).get("eos_token_id"))
        except (json.JSONDecodeError, AttributeError, TypeError) as e:
            raise ValueError(f"{gen}: not a readable generation config "
                             f"({type(e).__name__}: {e})") from None
        fields["eos_token_ids"] += [e for e in extra if e not in fields["eos_token_ids"]]
    return fields


def config_fields(raw, where="config.json"):
    """LlamaConfig's fields from a config.json dict. ValueError for a model llama.py does not
    implement (another architecture, biases, another RoPE type)."""
    arch = raw.get("architectures") or ["Llama"]
    if raw.get("model_type") != "llama" or any("Llama" not in a for a in arch):
        raise ValueError(f"{where}: model_type {raw.get('model_type')!r} / architectures "
                         f"{raw.get('architectures')} is not a Llama model "
                         "(expected 'llama', LlamaForCausalLM)")
    for flag in ("attention_bias", "mlp_bias"):
        if raw.get(flag):
            raise ValueError(f"{where}: {flag}=true is not supported (Llama-3.2 has no biases)")
    # llama.py's MLP is SwiGLU: silu(gate) * up. Another activation would run silently wrong.
    if raw.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: hidden_act {raw['hidden_act']!r} is not supported "
                         "(llama.py's MLP computes silu, as Llama-3.2)")
    # Two spellings in the wild: `rope_theta` + `rope_scaling` (the hub's Llama-3.2 files) and
    # `rope_parameters` holding both (written by transformers 5).
    rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise ValueError(f"{where}: rope_type {rope_type!r} is not supported "
                         "(only 'default' and 'llama3')")
    heads = raw["num_attention_heads"]
    return dict(
        vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_hidden_layers=raw["num_hidden_layers"], num_attention_heads=heads,
        num_key_value_heads=raw.get("num_key_value_heads") or heads,
        head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
        # transformers' LlamaConfig defaults, where config.json leaves a field out
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
        rope_scaling=rope if rope_type == "llama3" else None,
        max_position_embeddings=raw.get("max_position_embeddings", 2048),
        tie_word_embeddings=raw.get("tie_word_embeddings", False),
        bos_token_id=raw.get("bos_token_id"), eos_token_ids=_ids(raw.get("eos_token_id")))


def _ids(value):
    return [] if value is None else [value] if isinstance(value, int) else list(value)


def read_safetensors(model_dir):
    """All tensors of a single-file or sharded (model.safetensors.index.json) checkpoint, CPU."""
    from safetensors import safe_open
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (model_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{model_dir}: no model.safetensors or "
                                "model.safetensors.index.json")
    state = {}
    for name in files:
        path = model_dir / name
        if not path.is_file():
            raise FileNotFoundError(f"{path}: listed in model.safetensors.index.json but missing")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                state.update({k: f.get_tensor(k) for k in f.keys()})
        except Exception as e:  # safetensors has its own error type for a truncated file
            raise ValueError(f"{path}: cannot be read, truncated or corrupt? ({e})") from None
    return state


def keeps_tie(state, tied, model_dir):
    """Whether lm_head stays tied to embed_tokens. A tool that fine-tuned the head may save it
    and leave config.json's tie: transformers then keeps the stored head, untied; dropping it
    would change every logit. Says so on stderr."""
    head, embed = state.get("lm_head.weight"), state.get("model.embed_tokens.weight")
    if not tied or head is None or embed is None or torch.equal(head, embed):
        return tied
    print(f"{model_dir}: lm_head.weight differs from embed_tokens.weight although config.json "
          "ties them: untied, using the stored head", file=sys.stderr)
    return False


def check_state_dict(expected, state, tied, model_dir):
    """Refuse a checkpoint unless it has exactly the model's tensors (expected: the model's
    state dict), in the model's shapes. ValueError naming the first misfits."""
    expected = {k: tuple(v.shape) for k, v in expected.items()}
    if tied:  # stored as embed_tokens (an lm_head too is equal)
        expected.pop("lm_head.weight")
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    shapes = [f"{k} {tuple(state[k].shape)} (expected {expected[k]})"
              for k in sorted(set(expected) & set(state)) if tuple(state[k].shape) != expected[k]]
    for what, keys in (("missing tensors", sorted(set(expected) - set(state))),
                       ("unexpected tensors", sorted(set(state) - set(expected))),
                       ("wrong shapes", shapes)):
        if keys:
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            raise ValueError(f"{model_dir}: {what}: {', '.join(keys[:3])}{more}")


# ----------------------------------------------------------------------------- datasets

def resolve_data_file(source):
    """A local JSONL file, or the quotes.jsonl of a hub dataset repo ("owner/name"), downloaded
    once. Raises ValueError for a folder, FileNotFoundError naming the file or the repo."""
    path = Path(source).expanduser()
    if path.is_dir():
        raise ValueError(f"{path}: is a folder, expected a JSONL file")
    if path.exists():
        return path
    if path.suffix in (".jsonl", ".json", ".txt") or looks_like_path(source):
        raise FileNotFoundError(f"{path}: no such file")
    offline = not hub_reachable()  # then only the hub cache is looked at, at once
    try:
        with quiet_hub():
            return Path(huggingface_hub.hf_hub_download(
                repo_id=source, filename="quotes.jsonl", repo_type="dataset",
                local_files_only=offline))
    except Exception as err:  # offline, unknown repo, bad repo name, HTTP errors: all end the same
        reason = ("cannot reach the hub, nor is it in the hub cache" if offline
                  else f"{type(err).__name__}: {str(err).strip()}".splitlines()[0])
        raise FileNotFoundError(
            f"{source}: no such file, and could not download quotes.jsonl of the dataset "
            f"{source!r} from the Hugging Face hub ({reason}); pass a local JSONL file with "
            "--data") from err


# ----------------------------------------------------------------------------- is the hub there

def looks_like_path(name):
    """A name no hub repo id has ("./x", "a/b/c", "x") or one inside a local folder ("models/x"
    with models/ here): a typo in a path should say "no such file", not go to the hub."""
    path = Path(name).expanduser()
    return (name.startswith((".", "/", "~")) or name.count("/") != 1 or "\\" in name
            or path.parent.is_dir())


def hub_reachable(timeout=3.0):
    """Whether the hub (HF_ENDPOINT, through HTTPS_PROXY if set) takes a connection within
    `timeout` seconds; asked once a process. Unreachable, the hub client would retry for 25-30 s,
    logging each try, before failing: we ask its cache alone instead. HF_HUB_OFFLINE=1: False."""
    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    if offline or huggingface_hub.constants.HF_HUB_OFFLINE:
        return False
    url = urlsplit(huggingface_hub.constants.ENDPOINT)
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(url.hostname or ""):
        url = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    return _connects(url.hostname, url.port or (443 if url.scheme == "https" else 80), timeout)


@functools.cache
def _connects(host, port, timeout):
    connected = []

    def connect():  # in a thread: a DNS lookup does not obey the socket's timeout
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            connected.append(True)
        except OSError:
            pass
    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(connected)


@contextlib.contextmanager
def quiet_hub():
    """The hub client's own warnings ("Retrying in 1s [Retry 1/5]") off stderr: the one-line
    error after them says what went wrong. Download progress bars stay."""
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
