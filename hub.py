"""Where models and datasets come from: a local path as it is, anything else from the Hugging
Face hub (downloaded once into its cache). The only file that talks to the network; it also
reads a checkpoint's safetensors, single-file or sharded, with one-line errors.
"""
import json
from pathlib import Path

import huggingface_hub

HUB_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "*.safetensors", "model.safetensors.index.json"]


def resolve_model_dir(name_or_path):
    """A local folder as it is; anything else is a hub repo id, downloaded once into the hub
    cache. Raises FileNotFoundError, PermissionError (gated) or ConnectionError, one line each."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise FileNotFoundError(f"model folder {name} does not exist "
                                "(nor is it a hub id like org/name)")
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    try:
        return Path(huggingface_hub.snapshot_download(name, allow_patterns=HUB_FILES))
    except GatedRepoError:
        raise PermissionError(
            f"{name} is a gated model: accept its license at https://huggingface.co/{name}, "
            "then log in with `hf auth login` (or set HF_TOKEN) and run again") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"{name} is neither a local folder nor a model on the Hugging "
                                "Face hub (private repos need `hf auth login`)") from None
    except Exception as e:  # offline, DNS, timeouts: the hub raises many kinds
        raise ConnectionError(
            f"could not download {name} from the Hugging Face hub ({type(e).__name__}); if you "
            "are offline, pass a local folder holding config.json, tokenizer.json and "
            "*.safetensors, e.g. --model path/to/Llama-3.2-1B-Instruct") from None


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


def resolve_data_file(source):
    """A local JSONL file, or the quotes.jsonl of a hub dataset repo ("owner/name"), downloaded
    once. Raises ValueError for a folder, FileNotFoundError naming the file or the repo."""
    # A path that exists, or looks like one, is a file: a typo in it should say "not found", not
    # send a strange repo name to the hub. Anything else ("owner/name") is a hub dataset repo.
    path = Path(source).expanduser()
    if path.is_dir():
        raise ValueError(f"{path}: is a folder, expected a JSONL file")
    if path.exists():
        return path
    if path.suffix in (".jsonl", ".json", ".txt") or source.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return Path(huggingface_hub.hf_hub_download(
            repo_id=source, filename="quotes.jsonl", repo_type="dataset"))
    except Exception as err:  # offline, unknown repo, bad repo name, HTTP errors: all end the same
        reason = f"{type(err).__name__}: {str(err).strip()}".splitlines()[0]
        raise FileNotFoundError(
            f"could not download quotes.jsonl of the dataset {source!r} from the Hugging Face "
            f"hub ({reason}); pass a local JSONL file with --data") from err
