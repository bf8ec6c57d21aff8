"""What a study searches: candidates (a method with fixed parameters and searched ones), read from
each method's own description (`Method.search_space`) and narrowed or fixed by the spec.

A tuning spec is a merge spec with an optional ``tune`` section:

    tune:
      space:
        task_arithmetic: {}                       # the method's declared space as it is
        ties: {density: 0.5}                      # a number or string: fixed
        tsv: {scale: {low: 0.2, high: 1.5}}       # a range: searched there (log if the method's is)
        pivotmerge: {spectrum: [flatten, keep]}   # a list: searched over these values
        pivotmerge_data:                          # a label of its own: another setting of a method
          method: pivotmerge
          layer_weighting: data
          combine: gram

A candidate's label is its key; ``method`` defaults to the label. Any parameter of the method may be
fixed or searched this way, not only the declared ones. The spec's own ``parameters`` are fixed for
the candidates of the spec's ``method``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from pydantic import ValidationError

from pivotmerge.errors import SpecError
from pivotmerge.methods import Method, Search, get_method
from pivotmerge.spec.schema import MergeSpec, format_validation_error

# A study over a discrete space at most this large runs it whole, as a grid, instead of sampling it.
MAX_GRID = 256


@dataclass(frozen=True)
class Candidate:
    """One thing a study may pick: a method with some parameters fixed and others searched."""

    label: str
    method: Method
    fixed: dict[str, Any] = field(default_factory=dict)
    searched: dict[str, Search] = field(default_factory=dict)
    # Defaults that replace the method's own in this spec: its `with_calibration` where the spec gives data.
    spec_defaults: dict[str, Any] = field(default_factory=dict)

    def key(self, name: str) -> str:
        """The parameter's name in the study (unique across candidates)."""
        return f"{self.label}.{name}"

    def grid(self) -> list[dict[str, Any]] | None:
        """Every setting of the searched parameters when all are discrete; None when one is a range."""
        if any(s.choices is None for s in self.searched.values()):
            return None
        names = list(self.searched)
        settings = itertools.product(*(self.searched[n].choices or () for n in names))
        return [dict(zip(names, values)) for values in settings]

    def defaults(self) -> dict[str, Any]:
        """What a plain merge of the spec would use for the searched parameters, where it lies in their
        (possibly narrowed) space: the method's defaults, or its data defaults where the spec gives data."""
        out = {}
        for name, search in self.searched.items():
            default = self.spec_defaults.get(name, self.method.params.model_fields[name].default)
            if _within(default, search):
                out[name] = default
        return out


def _within(value: Any, search: Search) -> bool:
    if search.choices is not None:
        return value in search.choices
    if search.low is None or search.high is None:
        return False
    return isinstance(value, (int, float)) and not isinstance(value, bool) and search.low <= value <= search.high


@dataclass(frozen=True)
class FieldNames:
    """What errors call the space and the candidate list: the CLI's words by default, the API's fields there."""

    space: str = "tune.space"
    methods: str = "--methods"


@dataclass(frozen=True)
class Space:
    candidates: list[Candidate]

    def by_label(self, label: str) -> Candidate:
        return next(c for c in self.candidates if c.label == label)

    def grid(self) -> list[tuple[str, dict[str, Any]]] | None:
        """The whole space as (label, searched values) when it is discrete and at most MAX_GRID settings."""
        out: list[tuple[str, dict[str, Any]]] = []
        for c in self.candidates:
            settings = c.grid()
            if settings is None:
                return None
            out += [(c.label, s) for s in settings]
            if len(out) > MAX_GRID:
                return None
        return out


def read_space(spec: MergeSpec, section: Mapping[str, Any] | None, labels: Sequence[str] = (),
               names: FieldNames = FieldNames()) -> Space:
    """The candidates `labels` names (default: those of the ``tune.space`` section, else the spec's method).

    Errors are SpecErrors naming the field: ``tune.space.ties.foo: not a parameter of 'ties' ...``.
    """
    space = (section or {}).get("space") or {}
    if not isinstance(space, dict):
        raise SpecError(f"{names.space}: expected a mapping of candidate label -> parameters")
    chosen = list(labels) or list(space) or [spec.method]
    if len(set(chosen)) != len(chosen):
        raise SpecError(f"{names.methods}: {', '.join(chosen)} names a candidate twice")
    return Space([_candidate(spec, label, space.get(label), names.space if label in space else names.methods)
                  for label in chosen])


def _candidate(spec: MergeSpec, label: str, entry: Any, where: str) -> Candidate:
    if not isinstance(entry or {}, dict):
        raise SpecError(f"{where}.{label}: expected a mapping of parameter -> value, list or range")
    entry = dict(entry or {})
    name = entry.pop("method", label)
    try:
        method = get_method(str(name))
    except KeyError as exc:
        field_name = f"{where}.{label}.method" if name != label else f"{where}"
        raise SpecError(f"{field_name}: {exc.args[0]}") from None
    _check_models(spec, method, f"{where}.{label}")
    canonical = method.aliases()
    fixed: dict[str, Any] = {}
    if method.name == spec.method:
        fixed.update({canonical[k]: v for k, v in spec.parameters.items()})
    searched = {n: s for n, s in method.search_space.items()}
    for given, value in entry.items():
        param = canonical.get(given)
        if param is None or given in method.engine_params:
            known = ", ".join(sorted(method.params.model_fields))
            raise SpecError(f"{where}.{label}.{given}: not a parameter of {method.name!r}; it takes: {known}")
        searched.pop(param, None)
        fixed.pop(param, None)
        declared = method.search_space.get(param)
        if isinstance(value, list):
            if not value:
                raise SpecError(f"{where}.{label}.{given}: an empty list leaves nothing to search")
            searched[param] = Search(choices=tuple(value))
        elif isinstance(value, dict):
            searched[param] = _range(value, declared, f"{where}.{label}.{given}")
        else:
            fixed[param] = value
    for param in fixed:
        searched.pop(param, None)
    candidate = Candidate(label, method, fixed, searched,
                          spec_defaults=dict(method.with_calibration) if spec.gives_calibration else {})
    _check_values(candidate, f"{where}.{label}")
    return candidate


def _check_models(spec: MergeSpec, method: Method, where: str) -> None:
    k = len(spec.models)
    if k < method.min_models or (method.max_models is not None and k > method.max_models):
        raise SpecError(f"{where}: method {method.name!r} cannot merge {k} models")
    if method.base == "required" and spec.base_model is None:
        raise SpecError(f"{where}: method {method.name!r} needs the spec's base_model")


def _range(value: Mapping[str, Any], declared: Search | None, where: str) -> Search:
    unknown = set(value) - {"low", "high", "log"}
    if unknown or "low" not in value or "high" not in value:
        raise SpecError(f"{where}: a range is {{low, high[, log]}}"
                        + (f"; unknown: {', '.join(sorted(unknown))}" if unknown else ""))
    low, high = value["low"], value["high"]
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (low, high))
    if not numbers or low > high:
        raise SpecError(f"{where}: low and high must be numbers with low <= high")
    log = bool(value.get("log", declared.log if declared is not None else False))
    if log and low <= 0:
        raise SpecError(f"{where}: a log range needs low > 0")
    return Search(low, high, log=log)


def _check_values(candidate: Candidate, where: str) -> None:
    """The fixed values with each end of every range and every choice are valid parameters, so a bad
    value is refused before the study starts, not as failed trials."""
    probes: list[dict[str, Any]] = [{}]
    for name, search in candidate.searched.items():
        values = search.choices if search.choices is not None else (search.low, search.high)
        probes += [{name: v} for v in values]
    # Depth lists and filtered values (from the spec's `parameters`) are checked per tensor by the plan.
    fixed = {k: v for k, v in candidate.fixed.items() if not isinstance(v, list)}
    for probe in probes:
        try:
            candidate.method.params.model_validate({**fixed, **probe})
        except ValidationError as exc:
            raise SpecError(f"{where}.{format_validation_error(exc)}") from None


def params_of(candidate: Candidate, values: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's full parameter set: the candidate's fixed values with the searched ones."""
    return {**candidate.fixed, **values}
