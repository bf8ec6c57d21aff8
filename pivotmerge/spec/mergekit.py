"""Read a mergekit YAML config as a PivotMerge spec.

Covers the methods both tools share; anything that cannot be mapped exactly is
a SpecError naming the key, never silently dropped.
"""

from __future__ import annotations

import re
from typing import Any

from pivotmerge.errors import SpecError

SHARED_METHODS = {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp"}
# Top-level keys we map; tokenizer/chat-template keys are accepted only where they mean "the base's".
MAPPED_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source",
               "chat_template"}
# mergekit computes in `dtype`; we always compute in float32, so `dtype` only names the output dtype.
DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "bfloat16": "bfloat16",
          "bf16": "bfloat16"}


def _model_ref(value: Any, where: str) -> str:
    if isinstance(value, dict) and set(value) == {"model"}:
        value = value["model"]
    if not isinstance(value, str):
        raise SpecError(f"{where}: expected a model path or hub id")
    if "+" in value:
        raise SpecError(f"{where}: LoRA references ('model+lora') are not supported; merge the adapter first")
    return value


def _value(value: Any, where: str) -> Any:
    """mergekit filters are substrings of tensor names; ours are regular expressions."""
    if isinstance(value, list) and value and isinstance(value[0], dict):
        out = []
        for i, entry in enumerate(value):
            if not isinstance(entry, dict) or "value" not in entry:
                raise SpecError(f"{where}.{i}: expected {{filter, value}}")
            out.append({"value": entry["value"],
                        **({"filter": re.escape(entry["filter"])} if entry.get("filter") else {})})
        return out
    return value


def _parameters(params: Any, method: str, where: str) -> tuple[dict[str, Any], Any]:
    """Translate mergekit parameter names; returns (parameters, weight or None)."""
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise SpecError(f"{where}: expected a mapping of parameter names to values")
    out: dict[str, Any] = {}
    weight = None
    for name, value in params.items():
        if name == "weight":
            weight = _value(value, f"{where}.weight")
        elif name == "int8_mask":
            continue  # mergekit's storage type for sign masks; results are identical
        elif name == "rescale" and method.startswith("dare"):
            if not isinstance(value, bool):
                raise SpecError(f"{where}.rescale: expected true or false")
            out["rescale"] = "l1" if value else "none"
        else:
            out[name] = _value(value, f"{where}.{name}")
    return out, weight


def from_mergekit(config: dict[str, Any]) -> dict[str, Any]:
    """Our spec dict for a mergekit config dict."""
    unknown = sorted(set(config) - MAPPED_KEYS)
    if unknown:
        hint = " (layer slicing has no PivotMerge equivalent)" if unknown[0] in ("slices", "modules") else ""
        raise SpecError(f"{unknown[0]}: mergekit key not supported by pivotmerge{hint}")
    method = config["merge_method"]
    if method not in SHARED_METHODS:
        raise SpecError(f"merge_method: mergekit method {method!r} has no pivotmerge equivalent; "
                        f"shared: {', '.join(sorted(SHARED_METHODS))}")
    for key in ("tokenizer_source", "chat_template"):
        if config.get(key) not in (None, "base"):
            raise SpecError(f"{key}: only 'base' is supported (pivotmerge carries the base's tokenizer and template)")
    base = _model_ref(config["base_model"], "base_model") if config.get("base_model") else None
    models_in = config.get("models") or []
    if not isinstance(models_in, list) or not models_in:
        raise SpecError("models: a list of {model, parameters} is required")
    global_params, global_weight = _parameters(config.get("parameters"), method, "parameters")
    models = []
    for i, entry in enumerate(models_in):
        if not isinstance(entry, dict) or "model" not in entry or set(entry) - {"model", "parameters"}:
            raise SpecError(f"models.{i}: expected {{model, parameters}}")
        own, weight = _parameters(entry.get("parameters"), method, f"models.{i}.parameters")
        model = {"model": _model_ref(entry["model"], f"models.{i}.model"), "parameters": own}
        if weight is not None or global_weight is not None:
            model["weight"] = weight if weight is not None else global_weight
        models.append(model)
    spec: dict[str, Any] = {"method": method, "models": models, "parameters": global_params}
    if method == "slerp":
        # mergekit's slerp goes from base_model (t=0) to the other model (t=1).
        others = [m for m in models if m["model"] != base]
        if base is None or len(others) != 1:
            raise SpecError("models: mergekit slerp needs base_model and exactly one other model")
        spec["models"] = [{"model": base}, {"model": others[0]["model"]}]
        spec["base_model"] = base
    elif method == "linear":
        spec["base_model"] = base
    else:
        spec["base_model"] = base
        # mergekit's task-vector methods skip the base when it is listed among the models.
        spec["models"] = [m for m in models if m["model"] != base] or models
    dtype = config.get("out_dtype") or config.get("dtype")
    if dtype is not None:
        if dtype not in DTYPES:
            raise SpecError(f"dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
        spec["dtype"] = DTYPES[dtype]
    return spec
