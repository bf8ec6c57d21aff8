"""The merge plan: a spec checked against its repos before any tensor data is read.

`plan_merge` opens every repo (headers only), checks architectures, shapes and
dtypes, chooses the merged tensors and resolves the method's parameters for each, once:
the plan holds them. Once checked the plan does not change: what calibration data measures later is
the calibration stage's own result (`pivotmerge.data.calibration.Calibrated`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from pivotmerge.errors import CompatibilityError, RepoError, SpecError
from pivotmerge.methods import Method, Need, get_method
from pivotmerge.plan.device import DTYPES, resolve_device
from pivotmerge.plan.params import TensorParams, resolve_all
from pivotmerge.repos.architectures import Architecture, TensorPlace, architecture_for, place_tensors
from pivotmerge.repos.inputs import open_input
from pivotmerge.repos.model_repo import ModelRepo, resolve_roots
from pivotmerge.repos.vocab import Vocabulary, align_vocabularies
from pivotmerge.repos.writer import OutputTensor
from pivotmerge.spec.schema import MergeSpec, spec_from_dict


def as_spec(spec: MergeSpec | Mapping[str, Any]) -> MergeSpec:
    return spec if isinstance(spec, MergeSpec) else spec_from_dict(dict(spec))


@dataclass
class MergePlan:
    """Everything a merge needs, checked, before any tensor data is read."""

    spec: MergeSpec
    method: Method
    base: ModelRepo | None
    models: list[ModelRepo]
    architecture: Architecture
    places: dict[str, TensorPlace]
    names: list[str]  # output tensors, in the reference repo's order
    merged: set[str]
    tensor_params: dict[str, TensorParams]  # merged tensor -> its weights and parameters
    outputs: list[OutputTensor] = field(default_factory=list)
    vocabulary: Vocabulary | None = None  # set when an expert's vocabulary extends the base's

    @property
    def needs(self) -> set[Need]:
        """The calibration data some merged tensor's parameters need."""
        return set().union(*(self.method.needs_for(p.params) for p in self.tensor_params.values()))

    def tensors_needing(self, need: Need) -> set[str]:
        """The merged tensors whose parameters need `need`."""
        return {n for n, p in self.tensor_params.items() if need in self.method.needs_for(p.params)}

    def calibrated_tensors(self) -> set[str]:
        """The merged tensors whose parameters need calibration data."""
        return {n for n, p in self.tensor_params.items() if self.method.needs_for(p.params)}

    @property
    def reference(self) -> ModelRepo:
        """The repo whose unmerged tensors and side files the output carries: the base, else the first model."""
        return self.base or self.models[0]

    def repos(self) -> list[ModelRepo]:
        return ([self.base] if self.base else []) + self.models

    def close(self) -> None:
        for repo in self.repos():
            repo.close()

    def __enter__(self) -> "MergePlan":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def plan_merge(spec: MergeSpec | Mapping[str, Any], *, allowed_roots: Sequence[str | Path] | None = None,
               relative_to: Path | None = None, allow_downloads: bool = False) -> MergePlan:
    """Open the repos (headers only) and check that the spec can run on them; hub ids come from
    the local Hugging Face cache unless `allow_downloads`."""
    spec = as_spec(spec)
    method = get_method(spec.method)
    roots = resolve_roots(allowed_roots)
    resolve_device(spec.device)
    base = _open_repo(spec.base_model, "base_model", None, roots, relative_to, allow_downloads) if spec.base_model else None
    models = [_open_repo(m.model, f"models.{i}.model", base, roots, relative_to, allow_downloads)
              for i, m in enumerate(spec.models)]
    reference = base or models[0]
    _check_architectures(reference, [r for r in [base, *models] if r is not None])
    architecture = architecture_for(reference.model_type)
    names = list(reference.tensors)
    # Inputs saved in the other naming style (legacy `language_model.model.*` vs `model.language_model.*`) line up by name.
    models = [m if m is reference else m.renamed_as(names, architecture.canonical) for m in models]
    inputs, vocabulary = align_vocabularies(reference, [r for r in [base, *models] if r is not None], architecture,
                                            spec.tokenizer)
    base, models = (inputs[0], inputs[1:]) if base is not None else (None, inputs)
    reference = base or models[0]
    places = place_tensors(architecture, names)
    _check_components(spec, places, architecture, reference)
    merged = _select(spec, names, places, reference)
    if not merged:
        raise SpecError("components: no tensor of the base matches the components/include/exclude given")
    _check_tensors(reference, [m for m in models if m is not reference], merged)
    tensor_params = resolve_all(spec, method, {n: places[n].depth for n in sorted(merged)})
    out_dtype = DTYPES[spec.dtype] if spec.dtype else None
    outputs = [
        OutputTensor(n, reference.tensors[n].shape,
                     out_dtype if out_dtype is not None and reference.tensors[n].dtype.is_floating_point else reference.tensors[n].dtype)
        for n in names
    ]
    plan = MergePlan(spec, method, base, models, architecture, places, names, merged, tensor_params, outputs, vocabulary)
    _check_loadable_inputs(plan)
    return plan


def _check_loadable_inputs(plan: MergePlan) -> None:
    """Calibration and `evaluate_inputs` run each input as a model: adapters and text-only LMs cannot."""
    if not (plan.needs or plan.spec.evaluate_inputs):
        return
    fields = ([("base_model", plan.base)] if plan.base else []) + [(f"models.{i}.model", m) for i, m in enumerate(plan.models)]
    for field_name, repo in fields:
        if repo.kind != "model folder":
            why = "calibration data" if plan.needs else "evaluate_inputs"
            plan.close()
            raise SpecError(f"{field_name}: {repo.ref} is a {repo.kind}; {why} runs each input as a model, "
                            f"which needs a model folder (merge the {repo.kind} into one first)")


def _open_repo(ref: str, field: str, base: ModelRepo | None, roots: Sequence[Path] | None,
               relative_to: Path | None, allow_downloads: bool) -> ModelRepo:
    """Open a repo (a model input may be an adapter over `base`); errors name the spec field that points at it."""
    try:
        return open_input(ref, base, allowed_roots=roots, relative_to=relative_to, allow_downloads=allow_downloads)
    except RepoError as exc:
        raise RepoError(f"{field}: {exc}") from None
    except OSError as exc:  # e.g. a path too long for the filesystem
        raise RepoError(f"{field}: cannot read {ref!r}: {exc.strerror}") from None


def check(spec: MergeSpec | Mapping[str, Any], *, allowed_roots: Sequence[str | Path] | None = None,
          relative_to: Path | None = None, allow_downloads: bool = False) -> None:
    """Full pre-flight validation; raises a PivotMergeError naming the problem."""
    plan_merge(spec, allowed_roots=allowed_roots, relative_to=relative_to, allow_downloads=allow_downloads).close()


def _check_architectures(reference: ModelRepo, repos: Sequence[ModelRepo]) -> None:
    for repo in repos:
        if repo.model_type != reference.model_type:
            raise CompatibilityError(f"{repo.ref}: architecture {repo.model_type!r} differs from {reference.ref}'s {reference.model_type!r}")


def _check_components(spec: MergeSpec, places: Mapping[str, TensorPlace], architecture: Architecture,
                      reference: ModelRepo) -> None:
    """A component the spec names must exist in the model: merging nothing there is a mistake, not a no-op."""
    present = {p.component for p in places.values()}
    for component in spec.components or ():
        if component not in present:
            have = ", ".join(sorted(c.value for c in present if c is not None)) or "none"
            raise SpecError(f"components: {reference.ref} ({architecture.name} family, model_type "
                            f"{reference.model_type!r}) has no {component.value} tensors; it has: {have}")


def _select(spec: MergeSpec, names: Sequence[str], places: Mapping[str, TensorPlace], reference: ModelRepo) -> set[str]:
    components = set(spec.components) if spec.components else None
    chosen = set()
    for name in names:
        if not reference.tensors[name].dtype.is_floating_point:
            continue  # integer buffers (position ids and the like) are carried, never averaged
        by_component = components is None and not spec.include or (components is not None and places[name].component in components)
        by_pattern = any(re.search(p, name) for p in spec.include)
        if (by_component or by_pattern) and not any(re.search(p, name) for p in spec.exclude):
            chosen.add(name)
    return chosen


def _check_tensors(reference: ModelRepo, others: Sequence[ModelRepo], merged: set[str]) -> None:
    for repo in others:
        for name in sorted(merged):
            want = reference.tensors[name]
            got = repo.tensors.get(name)
            if got is None:
                raise CompatibilityError(f"{repo.ref}: tensor {name} is missing (present in {reference.ref})")
            if got.shape != want.shape:
                raise CompatibilityError(f"{repo.ref}: tensor {name} has shape {list(got.shape)}, {reference.ref} has {list(want.shape)}")
            if got.dtype != want.dtype:
                raise CompatibilityError(f"{repo.ref}: tensor {name} has dtype {got.dtype}, {reference.ref} has {want.dtype}")


@dataclass
class Timings:
    read_s: float = 0.0
    merge_s: float = 0.0
    write_s: float = 0.0

