"""Strict JSON, for every file and line the project writes (eval.py's and sample.py's output,
metrics.jsonl, run.json, the benchmarks', the exports'): json.dumps writes NaN and Infinity,
which are no JSON and which other readers refuse. A number that is not finite is written as null,
with "<key>_reason" beside it saying what it was: "val_loss": null, "val_loss_reason":
"not finite (nan)".
"""
import json
import math


def finite(value):
    """value with every float that is not finite as None, in dicts, lists and tuples at any depth;
    in a dict, "<key>_reason": "not finite (nan)" (or inf, -inf) is added beside it."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out[key] = finite(item)
            if isinstance(item, float) and not math.isfinite(item):
                out[f"{key}_reason"] = f"not finite ({item})"
        return out
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    return value


def dumps(value, **kwargs):
    """json.dumps(value, **kwargs) as strict JSON (allow_nan=False): non-finite numbers null, with
    their reason (finite above)."""
    return json.dumps(finite(value), allow_nan=False, **kwargs)
