"""Stage 4, the methods: pure functions of tensors, each described once, where it is defined.

A method is one module that registers itself with the `method` decorator:

    @method("task_arithmetic", summary="W0 + scale * sum_k w_k (W_k - W0).", params=Params, execution="elementwise")
    def task_arithmetic(tensors, base, weights, params, generator=None) -> Tensor | Merged: ...

* ``tensors``: the experts' versions of one tensor (same shape, float32, same device).
* ``base``: the pivot / shared starting point, or ``None`` when the spec has none.
* ``weights``: one float per expert (the spec's ``models[].weight``).
* ``params``: the method's own pydantic ``Params``, resolved for this tensor
  (per-layer gradients and name filters already applied; per-model values such as
  ``density`` arrive as a list with one entry per expert).
* ``generator``: a ``torch.Generator`` seeded for this tensor, for random methods.
* ``calibration`` (only for a method registered with ``needs``): what calibration
  data measured for this tensor (`Calibration`), passed as its own argument.

It returns the merged tensor, or ``Merged(tensor, info)`` when it has choices worth
recording in the merge report (ranks kept, directions suppressed, layer scales).

Everything else about a method is read from that one description: the fields of
``Params`` carry their own markers (`PER_MODEL`: each model may set its own value;
`Search`: worth tuning, over this range), and ``needs(params)`` says which
calibration data (`Need`) a merge with those parameters takes. Spec validation,
`pivotmerge methods`, the engine's calibration step and tuning all read it, and
`pivotmerge.methods.description.describe` turns it into the one JSON description of a
method (`pivotmerge methods --json`, ``GET /v1/methods``).
I/O, devices and scheduling never enter method code.

The built-in methods are the modules named in `BUILTIN`; other packages add theirs through
the ``pivotmerge.methods`` entry point group (each entry names a module that registers
methods). Shared tensor maths for method authors is in `pivotmerge.methods.toolkit`.

May import: nothing (methods are the leaves of the engine).
"""

from __future__ import annotations

import importlib
import itertools
from dataclasses import dataclass, field
from enum import Enum
from functools import cache, cached_property
from importlib.metadata import entry_points
from types import MappingProxyType
from typing import Any, Callable, Literal, Mapping, Sequence, TypeVar, Union, get_args, get_origin

from pydantic import ValidationError

import torch
from pydantic import BaseModel, ConfigDict

Tensor = torch.Tensor


class MethodParams(BaseModel):
    """Base class of every method's parameters; unknown names are errors, and so are non-finite numbers, including
    strings such as "1e400" or "nan" that would otherwise become inf or nan here, after the spec's own check."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


@dataclass(frozen=True)
class PerModel:
    """Field marker: each model may set its own value under ``models[].parameters``; the method
    receives one value per expert."""


PER_MODEL = PerModel()


@dataclass(frozen=True)
class Search:
    """Field marker: a parameter worth searching when tuning a method, and where.

    Numbers are searched in ``[low, high]`` (log-uniformly when ``log``; integers when
    both bounds are ints); other parameters over ``choices``.
    """

    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] | None = None

    def __post_init__(self) -> None:
        if (self.choices is None) == (self.low is None or self.high is None):
            raise ValueError("Search: give low and high, or choices")


class Need(str, Enum):
    """Calibration data a merge can need; the value names it in `pivotmerge methods` and in errors."""

    ALIGNMENT = "alignment"  # per expert and layer: how much its caption loss rises without the layer's update
    GRAMS = "grams"  # per expert and linear weight: X_k^T X_k of the layer's inputs
    MERGED_INPUTS = "merged_input_grams"  # a second pass: Grams X~_k^T X~_k of the merged model's inputs
    CROSS_GRAMS = "cross_grams"  # with MERGED_INPUTS: X_k^T X~_k against each expert's own inputs
    BLOCK_FEATURES = "block_features"  # per block, in order: the merged model's and each expert's features (`Block`)
    CAPTION_OUTPUTS = "caption_outputs"  # with BLOCK_FEATURES: each expert's next-token distributions on its captions


@dataclass(frozen=True)
class Calibration:
    """What calibration data measured for one tensor, one entry per expert; None where not measured."""

    grams: Sequence[Tensor] | None = None
    cross_grams: Sequence[Tensor] | None = None  # with CROSS_GRAMS: X_k^T X~_k; `grams` then hold X~_k^T X~_k
    alignment: Sequence[float] | None = None  # scores in [0, 1]

    def __post_init__(self) -> None:
        for name in ("grams", "cross_grams"):
            value = getattr(self, name)
            if value is not None and not all(isinstance(g, torch.Tensor) and g.ndim == 2 for g in value):
                raise ValueError(f"{name}: expected one 2-D tensor per expert")


NO_CALIBRATION = Calibration()


@dataclass(frozen=True)
class Block:
    """One block of the model (the projector; a decoder or encoder layer) as calibration data shows it.

    For expert ``k`` and batch ``b`` of its own calibration set: ``student_inputs[k][b]`` is what the merged
    model (its earlier blocks already fitted) feeds the block, ``teacher_inputs[k][b]`` and
    ``teacher_outputs[k][b]`` the block's input and output in expert ``k``'s own model (ProDistill's dual
    inputs). ``forward(tensors, k, b, x)`` runs the block on ``x`` with its tensors (by merged-tensor name),
    differentiably; ``caption_logits(tensors, k)`` (with ``Need.CAPTION_OUTPUTS``) runs the whole merged
    model with the block's tensors replaced and returns its logits for every caption token's prediction
    on expert ``k``'s set (tokens x vocabulary), ``teacher_logits[k]`` the expert's own.
    """

    path: str  # the block's module, e.g. model.multi_modal_projector
    names: tuple[str, ...]  # its merged tensors
    forward: Callable[[Mapping[str, Tensor], int, int, Tensor], Tensor]
    student_inputs: Sequence[Sequence[Tensor]]
    teacher_inputs: Sequence[Sequence[Tensor]]
    teacher_outputs: Sequence[Sequence[Tensor]]
    caption_logits: Callable[[Mapping[str, Tensor], int], Tensor] | None = None
    teacher_logits: Sequence[Tensor] | None = None


@dataclass
class Merged:
    tensor: Tensor
    info: dict[str, Any] = field(default_factory=dict)


MethodResult = Union[Tensor, Merged]
MergeFn = Callable[..., MethodResult]
F = TypeVar("F", bound=MergeFn)
# How the engine may hand a method its inputs:
# "whole": whole float32 tensors;
# "elementwise": each output element depends only on the inputs' same element (and the parameters), so the
#   engine may merge a large tensor in cache-sized pieces;
# "stored_inputs": the method reads its inputs piece by piece and converts each piece to float32 itself, so on
#   the CPU the engine hands it the tensors as stored (bf16, say) instead of whole float32 copies.
Execution = Literal["whole", "elementwise", "stored_inputs"]
# fit_block(experts, base, start, weights, params, block) -> Merged per tensor of the block: each expert's and the
# base's tensors of the block by name, `start` the method's own per-tensor merge of them.
FitBlockFn = Callable[..., Mapping[str, Merged]]


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    params: type[MethodParams]
    merge: MergeFn
    # "required": needs base_model; "optional": uses it when given; "unused": ignores it.
    base: Literal["required", "optional", "unused"] = "required"
    min_models: int = 1
    max_models: int | None = None
    execution: Execution = "whole"
    # The calibration data a merge with these parameters takes; None: the method reads none
    # (and its merge function takes no `calibration` argument).
    needs: Callable[[Any], set[Need]] | None = None
    # Defaults that replace the Params defaults when the spec gives calibration data, for the
    # parameters the user did not set: a method that can use data does so when given it.
    with_calibration: Mapping[str, Any] = field(default_factory=dict)
    # Methods that read Need.BLOCK_FEATURES: fits a whole block at once from its per-tensor start (`FitBlockFn`).
    fit_block: FitBlockFn | None = None

    @property
    def elementwise(self) -> bool:
        return self.execution == "elementwise"

    @property
    def stored_inputs(self) -> bool:
        return self.execution == "stored_inputs"

    @cached_property
    def data(self) -> tuple[Need, ...]:
        """Every Need `needs` may answer, in `Need`'s order, for listings and for refusing them in a spec
        (`needs_of_every_setting`)."""
        return () if self.needs is None else needs_of_every_setting(self.params, self.needs)

    @property
    def per_model(self) -> tuple[str, ...]:
        """Parameters each model may set for itself."""
        return tuple(n for n, f in self.params.model_fields.items() if PER_MODEL in f.metadata)

    @property
    def engine_params(self) -> tuple[str, ...]:
        """Names of the calibration data the engine may hand this method (never set in a spec)."""
        return tuple(n.value for n in Need if n in self.data)

    @property
    def search_space(self) -> dict[str, Search]:
        """Parameter -> where tuning should search it."""
        return {n: m for n, f in self.params.model_fields.items() for m in f.metadata if isinstance(m, Search)}

    def aliases(self) -> dict[str, str]:
        """Every accepted spelling of a parameter (old names included) -> its canonical name."""
        out = {}
        for name, f in self.params.model_fields.items():
            out[name] = name
            choices = getattr(f.validation_alias, "choices", None) or ()
            out.update({c: name for c in choices if isinstance(c, str)})
        return out

    def needs_for(self, params: MethodParams) -> set[Need]:
        return set() if self.needs is None else set(self.needs(params))

    def __call__(self, tensors: Sequence[Tensor], base: Tensor | None, weights: Sequence[float],
                 params: MethodParams, generator: torch.Generator | None = None,
                 calibration: Calibration = NO_CALIBRATION) -> Merged:
        if self.needs is None:
            out = self.merge(tensors, base, weights, params, generator)
        else:
            out = self.merge(tensors, base, weights, params, generator, calibration)
        return out if isinstance(out, Merged) else Merged(out)


_REGISTRY: dict[str, Method] = {}


def method(name: str, *, summary: str, params: type[MethodParams],
           base: Literal["required", "optional", "unused"] = "required",
           min_models: int = 1, max_models: int | None = None, execution: Execution = "whole",
           needs: Callable[[Any], set[Need]] | None = None,
           with_calibration: Mapping[str, Any] | None = None,
           fit_block: FitBlockFn | None = None) -> Callable[[F], F]:
    """Register the decorated merge function as method `name`; the function itself is returned unchanged.

    `with_calibration`: parameter defaults for a spec that gives calibration data (the user's own
    values still win), e.g. the settings under which the method reads that data."""
    if fit_block is not None and needs is None:
        raise ValueError(f"method {name!r}: a method that fits blocks (`fit_block`) reads calibration data (`needs`)")
    defaults = MappingProxyType(dict(with_calibration or {}))
    if defaults:
        if needs is None:
            raise ValueError(f"method {name!r}: with_calibration defaults need a method that reads calibration data")
        unknown = set(defaults) - set(params.model_fields)
        if unknown:
            raise ValueError(f"method {name!r}: with_calibration names no parameter: {', '.join(sorted(unknown))}")
        params.model_validate(defaults)  # the defaults must be valid values

    def register(merge: F) -> F:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} registered twice")
        registered = Method(name, summary, params, merge, base, min_models, max_models, execution, needs, defaults,
                            fit_block)
        if (fit_block is None) == (Need.BLOCK_FEATURES in registered.data):
            raise ValueError(f"method {name!r}: a method fits blocks (`fit_block`) exactly when it may need block "
                             "features")
        _REGISTRY[name] = registered
        return merge
    return register


def get_method(name: str) -> Method:
    _load_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown merge method {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None


def all_methods() -> dict[str, Method]:
    _load_builtin()
    return dict(sorted(_REGISTRY.items()))


# The modules of this package that register the built-in methods; a new one adds its line here.
BUILTIN = (
    "ace",
    "adamerging",
    "cart",
    "dare",
    "iso",
    "linear",
    "pivotmerge",
    "prodistill",
    "regmean",
    "slerp",
    "task_arithmetic",
    "ties",
    "tsv",
    "wudi",
)
# Other packages register methods by naming a module in this entry point group.
ENTRY_POINT_GROUP = "pivotmerge.methods"


@cache
def _load_builtin() -> None:
    """Import the built-in method modules and those of the entry point group, once; each registers itself."""
    for module in BUILTIN:
        importlib.import_module(f"{__name__}.{module}")
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        entry.load()


# More settings than this of a method's discrete parameters and `needs_of_every_setting` refuses to try them all.
MAX_NEEDS_SETTINGS = 16384  # PivotMerge has 13824


def needs_of_every_setting(params: type[MethodParams], needs: Callable[[Any], set[Need]]) -> tuple[Need, ...]:
    """Every Need `needs` answers over all valid settings of the parameters with a finite set of values
    (bool, Literal, Enum, and their optional forms) and of the integer ones at their default, 0 and 1
    (a count such as a number of steps, where 0 turns a stage off), the others at their defaults; so
    `needs` may depend only on those parameters."""
    choices = {name: values for name, f in params.model_fields.items()
               if (values := _finite_values(f.annotation) or _count_values(f.annotation, f.default))}
    settings = itertools.product(*choices.values())
    count = 1
    for values in choices.values():
        count *= len(values)
    if count > MAX_NEEDS_SETTINGS:
        raise ValueError(f"{params.__name__}: {count} settings of {', '.join(choices)} are too many "
                         "to read `needs` over")
    found: set[Need] = set()
    for setting in settings:
        try:
            found |= set(needs(params.model_validate(dict(zip(choices, setting)))))
        except ValidationError:
            continue  # a combination the parameters' own checks refuse
    return tuple(n for n in Need if n in found)


def _count_values(annotation: Any, default: Any) -> tuple[Any, ...]:
    """An integer parameter's probes: its default, 0 and 1 (those its constraints refuse are skipped)."""
    return tuple(dict.fromkeys((default, 0, 1))) if annotation is int else ()


def _finite_values(annotation: Any) -> tuple[Any, ...]:
    """The values a parameter of this type can take when they are few; () otherwise."""
    if annotation is bool:
        return (False, True)
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return tuple(annotation)
    if get_origin(annotation) is Literal:
        return get_args(annotation)
    args = get_args(annotation)
    if type(None) in args and len(args) == 2:
        inner = _finite_values(next(a for a in args if a is not type(None)))
        return (*inner, None) if inner else ()
    return ()


def per_model(value: float | Sequence[float], k: int, name: str) -> list[float]:
    """A per-model parameter as one float per expert (a scalar applies to all)."""
    if isinstance(value, (int, float)):
        return [float(value)] * k
    values = [float(v) for v in value]
    if len(values) != k:
        raise ValueError(f"{name}: expected {k} values (one per model), got {len(values)}")
    return values
