"""Where models and datasets come from: a local path is used as it is, anything else comes from
the Hugging Face hub (downloaded once into its cache). The only file that talks to the network;
when the hub cannot be reached, it looks in the hub cache at once instead of retrying for half a
minute, and says so in one line.
"""
import contextlib
import functools
import logging
import os
import socket
import threading
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import huggingface_hub
import huggingface_hub.constants  # a lazy submodule: not an attribute until imported

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


# ----------------------------------------------------------------------------- datasets

def resolve_data_file(source):
    """A local JSON or JSONL file, or a file of a hub dataset repo, downloaded once:
    "owner/name:path/in/repo.jsonl" names the file; "owner/name" alone takes quotes.jsonl, or
    the repo's one .jsonl or .json file. Raises ValueError for a folder, FileNotFoundError naming
    the file or the repo."""
    path = Path(source).expanduser()
    if path.is_dir():
        raise ValueError(f"{path}: is a folder, expected a JSONL file")
    if path.exists():
        return path
    repo, _, filename = str(source).partition(":")
    if (path.suffix in (".jsonl", ".json", ".txt") and not filename) or looks_like_path(repo):
        raise FileNotFoundError(f"{path}: no such file")
    offline = not hub_reachable()  # then only the hub cache is looked at, at once
    try:
        with quiet_hub():
            return _hub_data_file(repo, filename, offline)
    except Exception as err:  # offline, unknown repo, bad repo name, HTTP errors: all end the same
        reason = ("cannot reach the hub, nor is it in the hub cache" if offline
                  else f"{type(err).__name__}: {str(err).strip()}".splitlines()[0])
        raise FileNotFoundError(
            f"{source}: no such file, and could not download {filename or 'quotes.jsonl'} of "
            f"the dataset {repo!r} from the Hugging Face hub ({reason}); pass a local JSONL "
            "file with --data") from err


def _hub_data_file(repo, filename, offline):
    download = functools.partial(huggingface_hub.hf_hub_download, repo_id=repo,
                                 repo_type="dataset", local_files_only=offline)
    if filename:
        return Path(download(filename=filename))
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    try:
        return Path(download(filename="quotes.jsonl"))
    except LocalEntryNotFoundError:  # offline and not in the cache: nothing to list either
        raise
    except EntryNotFoundError:  # another dataset: its one data file
        files = [f for f in huggingface_hub.list_repo_files(repo, repo_type="dataset")
                 if f.endswith((".jsonl", ".json"))]
        if len(files) != 1:
            raise ValueError(f"the repo has {len(files)} JSON/JSONL files, name one as "
                             f"{repo}:FILE ({', '.join(files[:5])})") from None
        return Path(download(filename=files[0]))


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
