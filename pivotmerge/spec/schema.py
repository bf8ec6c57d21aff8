"""The merge spec: one schema for the CLI's YAML and the service's JSON.

Parameter values (``parameters`` and ``models[].parameters``) take three forms:

* a scalar: ``density: 0.5``;
* a list of numbers, interpolated over depth (first value at the first layer of
  the tensor's component, last value at the last): ``lambda: [0.6, 1.0]``;
* a list of ``{filter, value}`` entries: the first whose ``filter`` (a regular
  expression searched in the tensor name) matches wins; an entry without
  ``filter`` is the default. ``value`` may itself be a depth list.
"""

from __future__ import annotations

import math
import re
import string
from decimal import Decimal
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (AllowInfNan, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)

from pivotmerge.errors import SpecError
from pivotmerge.methods import Method, MethodParams, get_method

# NaN and infinities are no parameter value, and JSON stores cannot hold them (Postgres refuses them).
FiniteFloat = Annotated[float, AllowInfNan(False)]
Number = Union[int, FiniteFloat]
Scalar = Union[bool, int, FiniteFloat, str]


class FilteredValue(BaseModel):
    model_config = ConfigDict(extra="forbid")
    filter: str | None = Field(
        None, description="Regular expression searched in the tensor name; omit for the default.")
    value: Union[Scalar, list[Number]]

    @field_validator("filter")
    @classmethod
    def _compiles(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"invalid regular expression {v!r}: {exc}") from None
        return v


PARAM_FORMS = "a number, a string, a list of numbers (over depth) or a list of {filter, value} entries"
WEIGHT_FORMS = "a number, a list of numbers (over depth) or a list of {filter, value} entries with numbers"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{value} is not a finite number")
    if isinstance(value, list):
        for v in value:
            _finite(v)
    return value


def _param_shape(value: Any, *, numeric: bool = False) -> Any:
    """Refuse a value that fits no form with one message, not one error per form of the union."""
    forms = WEIGHT_FORMS if numeric else PARAM_FORMS
    if _is_number(value) or (not numeric and isinstance(value, (bool, str))):
        return _finite(value)
    if isinstance(value, list) and value and all(_is_number(v) for v in value):
        return _finite(value)
    if isinstance(value, list) and value and all(isinstance(v, (dict, FilteredValue)) for v in value):
        entries = []
        for i, entry in enumerate(value):
            try:
                entries.append(FilteredValue.model_validate(entry))
            except ValidationError as exc:
                raise ValueError(f"entry {i}: {format_validation_error(exc)}") from None
            if numeric and not (_is_number(entries[-1].value) or isinstance(entries[-1].value, list)):
                raise ValueError(f"entry {i}: value: expected a number or a list of numbers")
        return entries
    raise ValueError(f"expected {forms}")


ParamValue = Annotated[Union[Scalar, list[Number], list[FilteredValue]], BeforeValidator(_param_shape)]
WeightValue = Annotated[Union[Number, list[Number], list[FilteredValue]],
                        BeforeValidator(lambda v: _param_shape(v, numeric=True))]


class Component(str, Enum):
    projector = "projector"
    language_model = "language_model"
    vision_tower = "vision_tower"


class DatasetRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = None
    dataset: str = Field(
        ..., description="A JSONL file, a parquet file, or a Hugging Face `datasets` folder (save_to_disk).")
    limit: int | None = Field(None, ge=1, description="Use at most this many records.")
    prompt: str = Field(
        "plain", description="What precedes each caption: `plain` (image tokens, then the caption: how post-alignment "
                             "models were trained), `chat` (the processor's chat template with an instruction), or a "
                             "template with `{image}` and optionally `{instruction}`.")
    image_column: str = Field("image", description="Parquet / datasets column holding the image.")
    caption_column: str = Field("caption", description="Parquet / datasets column holding the caption.")

    @field_validator("prompt")
    @classmethod
    def _prompt_format(cls, v: str) -> str:
        if v in ("plain", "chat"):
            return v
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(v) if f is not None}
        except ValueError as exc:
            raise ValueError(f"not a valid template: {exc}") from None
        if "image" not in fields or fields - {"image", "instruction"}:
            raise ValueError("expected plain, chat, or a template with {image} (and optionally {instruction})")
        return v


class HubPush(BaseModel):
    """Where a finished merge is uploaded. The token is never here: the service's setting, or the CLI user's login."""

    model_config = ConfigDict(extra="forbid")
    repo_id: str = Field(..., pattern=r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$", max_length=200,
                         description="The hub repo `org/name`, created if missing.")
    private: bool = Field(False, description="Create the repo as private.")


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(
        ..., description="Local folder, or hub id 'org/name[@revision]' from the local Hugging Face cache.")
    weight: WeightValue = Field(1.0, description="This model's weight (scalar, depth list or filtered values).")
    parameters: dict[str, ParamValue] = Field(default_factory=dict,
                                              description="Per-model method parameters, e.g. density.")
    calibration: DatasetRef | None = Field(
        None, description="This expert's own calibration data (the domain it was aligned on) for its Gram matrices and "
                          "alignment scores; default: the spec-wide `calibration`.")


SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def engine_set(field: str) -> str:
    return f"{field}: set by the engine from calibration data, not by the spec"


def parse_size(value: int | str) -> int:
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", value)
    if not m or m.group(2).upper() not in SIZE_UNITS:
        raise ValueError(f"not a size: {value!r} (use bytes or e.g. '2GB', '500MiB')")
    # Decimal, not float: a 400-digit count must stay a (too large) number, not become infinity.
    return int(Decimal(m.group(1)) * SIZE_UNITS[m.group(2).upper()])


MAX_SHARD_SIZE = 2**50  # 1 PiB: any larger request is a typo, not a shard
MAX_SPLIT_PARTS = 1024  # far more parts than workers anyone runs; each part is at least one shard

# A byte count written as a number or a string such as '2GB' or '500MiB'.
ByteSize = Annotated[int, BeforeValidator(lambda v: parse_size(v) if isinstance(v, str) else v)]


def printable(text: str) -> str:
    """`text` with what UTF-8 cannot encode (a lone surrogate) escaped, so a message can echo it."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def untextual_string(value: Any, where: str = "") -> str | None:
    """The first key or string in `value` that is not text, as "<field>: <why>"; None if all are.

    JSON can carry a NUL character or a lone surrogate ("\\ud800"), but neither
    is part of a path, a pattern or a name: no file system, JSON store (Postgres
    refuses U+0000) or UTF-8 encoder takes them.
    """
    if isinstance(value, dict):
        for key, item in value.items():
            here = f"{where}.{printable(str(key))}" if where else printable(str(key))
            if found := untextual_string(key, here) or untextual_string(item, here):
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if found := untextual_string(item, f"{where}.{i}" if where else str(i)):
                return found
    elif isinstance(value, str):
        if "\x00" in value:
            return f"{where}: strings must not contain NUL characters (\\u0000)"
        if printable(value) != value:
            return f"{where}: strings must be Unicode text (a lone surrogate such as \\ud800 is not)"
    return None


class MergeSpec(BaseModel):
    """What to merge, how, and where it runs."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data: Any) -> Any:
        if problem := untextual_string(data):
            raise ValueError(problem)
        return data

    method: str = Field(..., description="Merge method; `pivotmerge methods` lists them.")
    base_model: str | None = Field(
        None, description="The pivot: the experts' shared starting point. Copied tensors come from it.")
    models: list[ModelEntry] = Field(..., min_length=1, description="The experts to merge.")
    components: list[Component] | None = Field(
        None, description="Components to merge; the rest is copied from the base. Default: all.")
    include: list[str] = Field(default_factory=list, description="Extra regular expressions of tensor names to merge.")
    exclude: list[str] = Field(default_factory=list,
                               description="Regular expressions of tensor names never merged (copied from the base).")
    parameters: dict[str, ParamValue] = Field(default_factory=dict, description="Method parameters.")
    tokenizer: Literal["base", "union"] = Field(
        "base", description="Tokens an expert added beyond the base's vocabulary: `base` drops their embedding and "
                            "head rows; `union` appends them (from the first expert that has each) and to the "
                            "tokenizer.")
    dtype: Literal["float32", "float16", "bfloat16"] | None = Field(
        None, description="Output dtype; default: the base's.")
    device: Literal["cpu", "cuda", "auto"] = Field("auto", description="Where the maths runs.")
    out_shard_size: ByteSize = Field(2 * 10**9, gt=0, le=MAX_SHARD_SIZE,
                                     description="Largest output shard, bytes or e.g. '2GB'.")
    split: int | None = Field(
        None, ge=1, le=MAX_SPLIT_PARTS,
        description="Run the merge as up to this many parts by output shard (one part is a run of whole shards), "
                    "on the service's split workers, then finalize: the output is byte-identical to a merge run "
                    "whole, which is what a local `pivotmerge merge` does. Data-free specs only (no calibration or "
                    "evaluate: their statistics span the whole model), and no push_to_hub.")
    seed: int = Field(0, description="Seed for random methods (DARE, randomized SVD).")
    calibration: DatasetRef | None = Field(None, description="Image-text pairs for data-driven methods.")
    evaluate: list[DatasetRef] = Field(default_factory=list, description="Datasets to evaluate the merged model on.")
    evaluate_inputs: bool = Field(
        False, description="Also evaluate the base and each expert on the `evaluate` datasets, so the report shows "
                           "the merged model beside every input (one model loaded at a time; costs one evaluation "
                           "per input).")
    push_to_hub: HubPush | None = Field(None, description="Upload the finished merge to the Hugging Face Hub.")

    @field_validator("include", "exclude")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        for p in v:
            try:
                re.compile(p)
            except re.error as exc:
                raise ValueError(f"invalid regular expression {p!r}: {exc}") from None
        return v

    @model_validator(mode="after")
    def _inputs_need_datasets(self) -> "MergeSpec":
        if self.evaluate_inputs and not self.evaluate:
            raise ValueError("evaluate_inputs: needs `evaluate` datasets to evaluate the inputs on")
        return self

    @model_validator(mode="after")
    def _split_merges_take_no_data(self) -> "MergeSpec":
        if self.split is None:
            return self
        if self.gives_calibration or self.evaluate:
            raise ValueError("split: a split merge takes a data-free spec (no calibration or evaluate); "
                             "run this merge whole (omit split)")
        if self.push_to_hub is not None:
            raise ValueError("split: a split merge cannot push_to_hub; run it whole (omit split) to push it")
        return self

    @model_validator(mode="after")
    def _method_fits(self) -> "MergeSpec":
        try:
            method = get_method(self.method)
        except KeyError as exc:
            raise ValueError(f"method: {exc.args[0]}") from None
        k = len(self.models)
        if k < method.min_models or (method.max_models is not None and k > method.max_models):
            want = str(method.min_models) if method.max_models == method.min_models else f"at least {method.min_models}"
            raise ValueError(f"models: method {self.method!r} takes {want} models, got {k}")
        if method.base == "required" and self.base_model is None:
            raise ValueError(f"base_model: method {self.method!r} needs a base_model "
                             "(the experts' shared starting point)")
        _check_names(self.parameters, method, "parameters")
        names = method.aliases()
        for i, entry in enumerate(self.models):
            for name in entry.parameters:
                if name in method.engine_params:
                    raise ValueError(engine_set(f"models.{i}.parameters.{name}"))
                if names.get(name) not in method.per_model:
                    allowed = ", ".join(method.per_model) or "none"
                    raise ValueError(f"models.{i}.parameters.{name}: not a per-model parameter of {self.method!r} "
                                     f"(per-model: {allowed})")
        return self

    def method_params(self) -> type[MethodParams]:
        return get_method(self.method).params

    @property
    def gives_calibration(self) -> bool:
        """The spec names calibration data, spec-wide or for any expert."""
        return self.calibration is not None or any(m.calibration is not None for m in self.models)


def _check_names(parameters: dict[str, ParamValue], method: Method, where: str) -> None:
    """Every name is a parameter of `method` under one of its spellings (old ones such as ``lambda``
    accepted, and kept as written), given once; calibration data is refused, naming the field."""
    names = method.aliases()
    seen: dict[str, str] = {}
    for given in parameters:
        if given in method.engine_params:
            raise ValueError(engine_set(f"{where}.{given}"))
        if given not in names:
            known = ", ".join(sorted(method.params.model_fields)) or "none"
            raise ValueError(f"{where}.{given}: not a parameter of {method.name!r}; it takes: {known}")
        if names[given] in seen:
            raise ValueError(f"{where}.{given}: names the same parameter as {seen[names[given]]} "
                             f"(give {names[given]} once)")
        seen[names[given]] = given


def format_validation_error(exc: ValidationError) -> str:
    """One line naming the first offending field."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-after"))
    msg = err["msg"].removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc and not msg.startswith(loc) else msg


def spec_from_dict(data: Any) -> MergeSpec:
    """Validate a spec (ours, or a mergekit config) and raise SpecError naming the field."""
    if not isinstance(data, dict):
        raise SpecError("spec: expected a mapping at the top level")
    if problem := untextual_string(data):  # before any message can echo a name that is not text
        raise SpecError(problem)
    if "merge_method" in data:
        from pivotmerge.spec.mergekit import from_mergekit

        data = from_mergekit(data)
    try:
        return MergeSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(format_validation_error(exc)) from None


def read_yaml(path: str | Path) -> Any:
    """A spec file's content; unreadable files and bad YAML are SpecErrors of one line."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError(f"cannot read spec {path}: {exc.strerror}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f": line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError(f"{path}{where}: not valid YAML: {problem}") from None


def load_spec(path: str | Path) -> MergeSpec:
    return spec_from_dict(read_yaml(path))
