"""`tune`: a tuning spec and dev data in, the best trial's merge out (its report holding the study)."""

from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Mapping, Sequence

from pivotmerge.data.datasets import Dataset, load_ref
from pivotmerge.errors import PivotMergeError
from pivotmerge.progress import CancelFn, ProgressFn
from pivotmerge.repos.output import building, check_out_dir
from pivotmerge.report.merge_report import MergeReport, write_report
from pivotmerge.run.engine import merge
from pivotmerge.spec.schema import DatasetRef, MergeSpec, read_yaml, spec_from_dict
from pivotmerge.tune.space import FieldNames, Space, read_space
from pivotmerge.tune.study import BatchFn, StartFn, TrialFn, best_spec, local_batches, plot_study, run_study
from pivotmerge.tune.trials import Objective, TrialRunner, check_dev

PLOT_FILE = "study.png"


def load_tuning_spec(path: str | Path) -> tuple[MergeSpec, dict[str, Any]]:
    """A merge spec file with an optional ``tune`` section (see pivotmerge.tune.space): (spec, section)."""
    data = read_yaml(path)
    section = data.pop("tune", None) if isinstance(data, dict) else None
    if section is not None and not isinstance(section, dict):
        raise PivotMergeError("tune: expected a mapping (space, ...)")
    return spec_from_dict(data), section or {}


def load_datasets(refs: Sequence[DatasetRef], field: str, *, allowed_roots: Sequence[str | Path] | None = None,
                  relative_to: Path | None = None) -> list[Dataset]:
    """Each dataset loaded and checked; an error names the field (``dev.1: dataset x has no records``)."""
    out = []
    for i, ref in enumerate(refs):
        try:
            out.append(load_ref(ref, allowed_roots=[Path(r) for r in allowed_roots] if allowed_roots else None,
                                relative_to=relative_to))
        except PivotMergeError as exc:
            raise PivotMergeError(f"{field}.{i}: {exc}") from None
    return out


def check_tuning(spec: MergeSpec, section: Mapping[str, Any], dev: Sequence[DatasetRef], *, methods: Sequence[str] = (),
                 objective: Objective = "accuracy", test: Sequence[DatasetRef] = (),
                 allowed_roots: Sequence[str | Path] | None = None, relative_to: Path | None = None,
                 names: FieldNames = FieldNames()) -> tuple[Space, list[Dataset]]:
    """What `tune` checks before it reads a model: the space, the dev sets and the objective they must
    score, the test sets; returns the space and the dev sets. Errors name the field (`names`: the space's
    and the candidates' as the caller calls them)."""
    space = read_space(spec, section, methods, names)
    dev_sets = load_datasets(dev, "dev", allowed_roots=allowed_roots, relative_to=relative_to)
    check_dev(dev_sets, objective)
    load_datasets(test, "test", allowed_roots=allowed_roots, relative_to=relative_to)  # a bad test file fails now
    return space, dev_sets


def tune(spec: MergeSpec, section: Mapping[str, Any], dev: Sequence[DatasetRef], out_dir: str | Path, *,
         methods: Sequence[str] = (), trials: int = 20, objective: Objective = "accuracy",
         test: Sequence[DatasetRef] = (), seed: int | None = None, timeout_s: float | None = None,
         run_batch: BatchFn | None = None, batch_size: int = 1, on_start: StartFn | None = None,
         on_trial: TrialFn | None = None, progress: ProgressFn | None = None, should_cancel: CancelFn | None = None,
         allowed_roots: Sequence[str | Path] | None = None, relative_to: Path | None = None,
         overwrite: bool = False) -> MergeReport:
    """Search `methods` (candidate labels; default: the spec's ``tune.space``, else its method) on `dev`,
    write the best trial's merge into `out_dir` with the test sets as its evaluation, and return its
    merge report, whose ``study`` holds every trial. Nothing is written unless the study completes.

    Trials run in this process, unless `run_batch` runs them elsewhere (each proposal on a worker that
    holds its own `TrialRunner`), `batch_size` at a time. `progress` follows the final merge."""
    out_dir = Path(out_dir)
    check_out_dir(out_dir, overwrite)
    space, dev_sets = check_tuning(spec, section, dev, methods=methods, objective=objective, test=test,
                                   allowed_roots=allowed_roots, relative_to=relative_to)
    with ExitStack() as stack:
        started = time.perf_counter()
        if run_batch is None:
            runner = stack.enter_context(TrialRunner(spec, dev_sets, objective, allowed_roots=allowed_roots,
                                                     relative_to=relative_to))
            run_batch = local_batches(runner)
        setup_s = time.perf_counter() - started
        study = run_study(space, objective, run_batch, trials=trials, seed=spec.seed if seed is None else seed,
                          batch_size=batch_size, timeout_s=timeout_s, on_start=on_start, on_trial=on_trial,
                          should_cancel=should_cancel, dev_paths=[str(d.path) for d in dev_sets], setup_s=setup_s)
        chosen = best_spec(spec, study)
    chosen["evaluate"] = [ref.model_dump(mode="json") for ref in test]
    with building(out_dir) as partial:
        report = merge(chosen, partial, progress=progress, should_cancel=should_cancel, allowed_roots=allowed_roots,
                       relative_to=relative_to, overwrite=True)
        if test and report.evaluation is not None:
            study = study.model_copy(update={"best_test": report.evaluation["merged"],
                                             "test": [str(r.dataset) for r in test]})
        report = report.model_copy(update={"study": study})
        write_report(partial, report)
        plot_study(study, partial / PLOT_FILE)
    return report

