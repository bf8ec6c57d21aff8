"""Job kinds, each declared once, the way a method is (pivotmerge.methods): one module per kind calls
`declare` with everything the service needs to know about it.

A declaration gives the kind's name, its /v1 collection and noun, the request body, the checks run
before a request is accepted, what the worker runs and what that returns (the report, metrics and the
files left in the output folder), and whether the kind can push to the hub or run split. The API's
routes (one generic create route, app.job_routes), the worker's dispatch (workers.tasks.run_job), the
dashboard (app.ui.pages) and the docs read it; nothing else names a kind. The built-in kinds are the
modules in BUILT_IN; a deployment adds its own with `PIVOTMERGE_JOB_KIND_MODULES` (docs/service.md,
"Adding a job kind").

The API process imports this package for the declarations; a kind module imports nothing of `app`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Iterable, Protocol, Sequence

from pydantic import BeforeValidator, TypeAdapter

from core.settings import Settings
from pivotmerge.errors import SpecError
from pivotmerge.spec.schema import MergeSpec, spec_from_dict

from workers.context import JobHooks

BUILT_IN = ("workers.kinds.merge", "workers.kinds.analysis", "workers.kinds.tuning")


def _accept_mergekit_config(value: Any) -> Any:
    # spec_from_dict translates a mergekit config (it has `merge_method`) into our spec.
    if isinstance(value, dict) and "merge_method" in value:
        try:
            return spec_from_dict(value)
        except SpecError as exc:
            raise ValueError(str(exc)) from None
    return value


# The request of a kind whose request is a merge spec: the engine's own schema, or a mergekit config.
SpecRequest = Annotated[MergeSpec, BeforeValidator(_accept_mergekit_config)]


class Preflight(Protocol):
    """Refuses (PivotMergeError naming the field) what the worker could not run, before it is accepted."""

    def __call__(self, value: Any, /, *, allowed_roots: Sequence[Path], allow_downloads: bool) -> None: ...


@dataclass(frozen=True)
class Outcome:
    """What a job's run returns for its row; the files it left in its output folder are its artifacts."""

    report: dict[str, Any]
    metrics: dict[str, Any] | None = None
    # The shards are in the artifact store already (a split merge's parts put them there): only recorded.
    shards_stored: bool = False


@dataclass(frozen=True)
class JobRun:
    """One attempt's run of a job, as its kind's `run` gets it: the request parsed once, where to write."""

    request: Any  # an instance of the kind's `request`
    out_dir: Path  # does not exist yet; what the run leaves in it is published
    scratch: Path  # the attempt's scratch folder (out_dir's parent)
    settings: Settings
    job: JobHooks

    @property
    def hooks(self) -> dict[str, Any]:
        """The engine's keyword arguments for progress, cancel and the allowed inputs."""
        return dict(progress=self.job.progress, should_cancel=self.job.should_cancel,
                    allowed_roots=self.settings.allowed_roots, allow_downloads=self.settings.hub_allow_downloads)


def no_more_checks(value: Any, *, allowed_roots: Sequence[Path], allow_downloads: bool) -> None:
    """A kind whose request is its spec: the spec's checks are all there is."""


@dataclass(frozen=True)
class JobKind:
    """One kind of job: `/v1/<collection>/{id}`, run by the workers of the gpu queue."""

    name: str  # the job's `kind`
    collection: str  # its URL collection: /v1/<collection>, /ui/<collection>/{id}
    noun: str  # in messages and operation ids: "merge 123 not found", create_merge
    label: str  # on the dashboard
    request: Any  # the POST body's type: a pydantic model, or an Annotated one
    run: Callable[[JobRun], Outcome]
    check_spec: Preflight  # the request's merge spec; its errors name fields under `spec_field`
    check_request: Preflight = no_more_checks  # the rest of the request; its errors name their own fields
    # The request's field holding the merge spec; None: the request is the spec.
    spec_field: str | None = None
    # The request as the job keeps it (defaults filled in); may refuse it with a PivotMergeError naming a field.
    accept: Callable[[Any, Settings], Any] = lambda request, settings: request
    can_push: bool = False  # push_to_hub: the run's output folder is a model
    can_split: bool = False  # split: N runs as parts (workers.split_parts) instead of `run`

    @property
    def a_noun(self) -> str:
        return f"{'an' if self.noun[0] in 'aeiou' else 'a'} {self.noun}"

    def spec_of(self, request: Any) -> MergeSpec:
        return request if self.spec_field is None else getattr(request, self.spec_field)

    def parse(self, stored: dict[str, Any]) -> Any:
        """A job's stored request (its `spec` column) as the kind's request."""
        return TypeAdapter(self.request).validate_python(stored)


_REGISTRY: dict[str, JobKind] = {}


def declare(kind: JobKind) -> JobKind:
    """Register a kind; a kind module calls it once, at import."""
    clash = next((k for k in _REGISTRY.values() if k.name != kind.name and kind.collection == k.collection), None)
    if clash is not None:
        raise ValueError(f"job kind {kind.name!r}: collection {kind.collection!r} is {clash.name!r}'s")
    _REGISTRY[kind.name] = kind
    return kind


def load_kinds(modules: Iterable[str] = ()) -> list[JobKind]:
    """Every declared kind, the built-in ones first, after importing `modules` (a deployment's own)."""
    order = {module: i for i, module in enumerate((*BUILT_IN, *modules))}
    for module in order:
        importlib.import_module(module)
    # In the order of the modules, whichever was imported first: the dashboard lists them so.
    return sorted(_REGISTRY.values(), key=lambda kind: order.get(kind.run.__module__, len(order)))
