"""The merge engine: stream a planned merge one tensor at a time.

Peak memory stays near (number of models + 1) x the largest tensor: inputs are
memory-mapped, each merged tensor is written out as soon as it exists, tensors
merged side by side (one per core) hold no more inputs than the largest alone,
and the output folder appears only when complete. Elementwise methods (linear, task
arithmetic) hold less: their inputs' pages go as each piece is merged.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
import zlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Collection, Iterable, Iterator, Mapping, Sequence, overload

import torch

from pivotmerge.version import __version__
from pivotmerge.data.blocks import fit_blocks
from pivotmerge.data.calibration import NOT_CALIBRATED, Calibrated, calibrate, merged_input_calibration
from pivotmerge.data.evaluate import Evaluation, evaluate_merge, evaluation_data
from pivotmerge.errors import MergeCancelled
from pivotmerge.methods import NO_CALIBRATION, Calibration, Merged, Method, Need
from pivotmerge.plan.device import resolve_device
from pivotmerge.plan.params import TensorParams
from pivotmerge.plan.plan import MergePlan, Timings, check, plan_merge
from pivotmerge.progress import CancelFn, Progress, ProgressFn
from pivotmerge.report.merge_report import CalibrationReport, MergedTensor, MergeReport, build_report, write_model_card, write_report
from pivotmerge.repos.model_repo import ModelRepo, populate, release, resolve_roots
from pivotmerge.repos.output import building, carry_side_files, check_out_dir
from pivotmerge.repos.vocab import write_tokenizer
from pivotmerge.repos.writer import ShardWriter, WrittenFile
from pivotmerge.spec.schema import MergeSpec


# Tensors read ahead of the one being merged, by a reader thread: reads (page
# faults, GIL released) overlap the maths, and memory holds at most this many
# extra tensors' inputs.
PREFETCH = 2
# Elements per piece when an elementwise method runs in pieces: 1M float32 values
# (4 MiB a piece) stay in cache across the method's passes and come from glibc's
# heap instead of fresh page-faulted mappings; a GPU wants much larger launches.
CPU_PIECE = 1 << 20
CUDA_PIECE = 1 << 26


def _input_repos(plan: MergePlan, name: str) -> list[ModelRepo]:
    """Whose `name` merging it needs: [base?, *models] if merged, else [reference]."""
    return plan.repos() if name in plan.merged else [plan.reference]


def _read_inputs(plan: MergePlan, name: str) -> list[torch.Tensor]:
    """What merging `name` needs, as stored (mapped: pages are read when first touched)."""
    return [r.get(name) for r in _input_repos(plan, name)]


def _read_ahead(plan: MergePlan, name: str) -> list[torch.Tensor]:
    """`_read_inputs` with every page read now, by the reader thread, not when the maths touches it."""
    inputs = _read_inputs(plan, name)
    for t in inputs:
        populate(t)
    return inputs


class _ReadAhead:
    """The inputs of `names` in order, read by a reader thread up to PREFETCH tensors
    ahead of the one being merged.

    Read-ahead holds at most half the largest tensor's inputs, and a tensor that
    does not fit is mapped when its turn comes, its pages read as the maths
    reaches them (and, by an elementwise merge, released behind it): the largest
    tensors set the peak, and reading the next large one during a large merge
    (the 32000 x 1024 embedding while the head merges) put all its inputs on top
    of that peak (250 MiB of bf16 on four 200M models).
    """

    def __init__(self, plan: MergePlan, names: Sequence[str], pool: ThreadPoolExecutor) -> None:
        self._plan = plan
        self._names = names
        self._pool = pool
        self.sizes = [sum(r.tensors[n].nbytes for r in _input_repos(plan, n)) for n in names]
        self._budget = max(self.sizes, default=0) // 2
        self._reads: deque[Future[list[torch.Tensor]]] = deque()
        self._taken = 0  # tensors handed out; reads of names[_taken:_taken + len(_reads)] are in flight

    def take(self) -> list[torch.Tensor]:
        """The next tensor's inputs, once read; then reads ahead what fits."""
        if self._reads:
            inputs = self._reads.popleft().result()
        else:
            inputs = _read_inputs(self._plan, self._names[self._taken])
        self._taken += 1
        while len(self._reads) < PREFETCH and self._fits():
            self._submit()
        return inputs

    def _submit(self) -> None:
        name = self._names[self._taken + len(self._reads)]
        self._reads.append(self._pool.submit(_read_ahead, self._plan, name))

    def _fits(self) -> bool:
        ahead = self._taken + len(self._reads)
        return ahead < len(self._names) and sum(self.sizes[self._taken:ahead + 1]) <= self._budget


def _float32(t: torch.Tensor, device: torch.device, consumed: bool) -> torch.Tensor:
    """`t` in float32 on `device`. When `consumed` and that is a copy, `t`'s pages are released:
    the method holds the copy, and reading `t` again would read its file."""
    out = t.to(device=device, dtype=torch.float32)
    if consumed and out.data_ptr() != t.data_ptr():
        release(t.reshape(-1))
    return out


class _Float32On(Sequence[torch.Tensor]):
    """The experts' tensors as a method sees them: float32 on the device, converted
    on access. A method that forms deltas one expert at a time (TIES, TSV) then
    holds one expert in float32, not all of them: on three 200M-parameter models
    that is 400 MB less at the embedding matrix. With `consumed` inputs, each
    stored tensor's pages go once converted (TIES on those models: 250 MB less)."""

    def __init__(self, tensors: Sequence[torch.Tensor], device: torch.device, consumed: bool) -> None:
        self._tensors = tensors
        self._device = device
        self._consumed = consumed

    def __len__(self) -> int:
        return len(self._tensors)

    @overload
    def __getitem__(self, i: int) -> torch.Tensor: ...

    @overload
    def __getitem__(self, i: slice) -> list[torch.Tensor]: ...

    def __getitem__(self, i: int | slice) -> torch.Tensor | list[torch.Tensor]:
        if isinstance(i, slice):
            return [_float32(t, self._device, self._consumed) for t in self._tensors[i]]
        return _float32(self._tensors[i], self._device, self._consumed)


def _apply(method: Method, models: Sequence[torch.Tensor], base: torch.Tensor | None, weights: list[float],
           params: Any, calibration: Calibration, generator: torch.Generator, device: torch.device,
           dtype: torch.dtype, consumed: bool) -> tuple[torch.Tensor, dict[str, Any]]:
    """Run `method` in float32 on `device` and return the result in `dtype` with its info.

    An elementwise method runs over flat pieces of the tensor, so its float32
    temporaries never exceed a piece whatever the tensor's size. When the inputs
    are `consumed` (read no more after this call), their pages are released once
    used: each piece's once merged, so they never add up to whole tensors, and
    for other methods each input's once converted to float32.
    """
    def f32(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=torch.float32)

    with _single_threaded(device):
        if not method.elementwise:
            if method.stored_inputs and device.type == "cpu":  # the method converts each piece itself
                result = method(models, base, weights, params, generator, calibration)
            else:
                result = method(_Float32On(models, device, consumed), None if base is None else _float32(base, device, consumed),
                                weights, params, generator, calibration)
            return result.tensor.to(dtype), result.info
        out = torch.empty(models[0].shape, dtype=dtype, device=device)
        flat = out.view(-1)
        step = CUDA_PIECE if device.type == "cuda" else CPU_PIECE
        info: dict[str, Any] = {}
        for start in range(0, flat.numel(), step):
            piece = slice(start, start + step)
            result = method([f32(m.reshape(-1)[piece]) for m in models],
                            None if base is None else f32(base.reshape(-1)[piece]), weights, params, generator, calibration)
            flat[piece].copy_(result.tensor)
            info = result.info
            if consumed:  # this piece and the one before: a page they share goes once both are merged
                for t in (*models, *([] if base is None else [base])):
                    release(t.reshape(-1)[max(0, start - step):piece.stop])
        return out, info


_threads_lock = threading.Lock()
_threads_users = 0
_threads_before = 0


@contextmanager
def _single_threaded(device: torch.device) -> Iterator[None]:
    """One intra-op thread for CPU merge maths, process-wide while any merge runs.

    OpenMP's fork/join per op rarely pays on merge-sized ops, and its spinning
    workers collapse on a shared machine (profiled on 2 busy cores: the maths
    of task_arithmetic on three 200M models took 18-29 s with 2 threads, 5-9 s
    with 1; TIES on a 2816 x 1024 weight 1.4-1.7 s against 0.9-1.0 s). The
    cores go to merging several tensors at once instead (`_merge_tensors`).
    Counted, so nested and concurrent users share one setting: threads started
    meanwhile take it, and the last one out restores the count.
    """
    global _threads_users, _threads_before
    if device.type != "cpu":
        yield
        return
    with _threads_lock:
        if _threads_users == 0:
            _threads_before = torch.get_num_threads()
            torch.set_num_threads(1)
        _threads_users += 1
    try:
        yield
    finally:
        with _threads_lock:
            _threads_users -= 1
            if _threads_users == 0:
                torch.set_num_threads(_threads_before)


def _maths_workers(method: Method, device: torch.device) -> int:
    """Tensors merged at once: one per CPU core this process may use, each single-threaded
    (`_single_threaded`). One for an elementwise method, whose cheap maths the reads and writes
    already keep pace with (side by side it bought 0.2 s on linear over 194M models and cost 40-70 MiB
    of peak RSS, the threads' malloc arenas); one on a GPU, whose kernels queue anyway."""
    return max(1, len(os.sched_getaffinity(0))) if device.type == "cpu" and not method.elementwise else 1


@dataclass(frozen=True)
class Measured:
    """A checked plan with what its calibration stage measured: everything one tensor's merge reads."""

    plan: MergePlan
    calibrated: Calibrated


def _merge_tensors(measured: Measured, outputs: Sequence[OutputTensor], device: torch.device, timings: Timings,
                   progress: ProgressFn | None, should_cancel: CancelFn | None) -> Iterator[tuple[str, torch.Tensor, MergedTensor | None]]:
    """Yield (name, output tensor, report entry or None) for `outputs`, in order.

    Up to `_maths_workers` tensors are merged at once, as long as their inputs together are no
    larger than the largest tensor's: a merge's memory follows its inputs, so the peak stays that
    of the largest tensor merged alone, while the many small ones share the cores. (Letting small
    ones run beside the largest, up to 1.25x its inputs, sped TIES up while it held float32
    copies of its inputs; since it reads them as stored it gains nothing and costs 26 MiB.)
    """
    plan = measured.plan
    total = len(outputs)
    workers = _maths_workers(plan.method, device)
    with _single_threaded(device), ThreadPoolExecutor(max_workers=1, thread_name_prefix="pivotmerge-read") as reader, \
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pivotmerge-maths") as maths:
        reads = _ReadAhead(plan, [o.name for o in outputs], reader)
        budget = max(reads.sizes, default=0)
        running: deque[tuple[int, Future[tuple[torch.Tensor, MergedTensor | None]]]] = deque()
        submitted = 0

        def fits() -> bool:
            return (len(running) < workers
                    and sum(reads.sizes[j] for j, _ in running) + reads.sizes[submitted] <= budget)

        for i in range(total):
            while submitted < total and (submitted <= i or fits()):
                if should_cancel is not None and should_cancel():
                    raise MergeCancelled("merge cancelled")
                out = outputs[submitted]
                if progress is not None:
                    progress(Progress("merge", submitted, total, tensor=out.name, layer=plan.places[out.name].layer))
                t0 = time.perf_counter()
                inputs = reads.take()
                timings.read_s += time.perf_counter() - t0  # time spent waiting for reads, not the reads themselves
                running.append((submitted, maths.submit(_merge_one, measured, out, inputs, device)))
                del inputs  # the merge holds them until done
                submitted += 1
            t0 = time.perf_counter()
            tensor, entry = running.popleft()[1].result()
            timings.merge_s += time.perf_counter() - t0  # time spent waiting for merges
            # Hold nothing while suspended: this output would otherwise stay alive through
            # the next tensor's merge, on top of its own memory.
            yield outputs[i].name, tensor, entry
            del tensor
    if progress is not None:
        progress(Progress("merge", total, total))


def _merge_one(measured: Measured, out: OutputTensor, inputs: list[torch.Tensor],
               device: torch.device) -> tuple[torch.Tensor, MergedTensor | None]:
    """Output tensor `out` from its inputs as stored (or its block's fit), with its report entry (None when copied)."""
    plan, calibrated = measured.plan, measured.calibrated
    name = out.name
    if name not in plan.merged:
        return inputs[0].to(out.dtype), None
    resolved = plan.tensor_params[name]
    place = plan.places[name]
    calibration = calibrated.for_tensor(name)
    if name in calibrated.fitted:
        tensor, info = calibrated.fitted[name].tensor.to(out.dtype), calibrated.fitted[name].info
    else:
        tensor, info = merge_tensor(plan, name, inputs, device, out.dtype, consumed=True, calibration=calibration)
    del inputs[:]  # their pages may go now, not when the pool drops this call
    return tensor, MergedTensor(tensor=name, component=place.component_name, layer=place.layer,
                                weights=resolved.weights, params=_reported_params(resolved, calibration), info=info or None)


def merge_tensor(plan: MergePlan, name: str, inputs: Sequence[torch.Tensor], device: torch.device,
                 dtype: torch.dtype, consumed: bool = False,
                 calibration: Calibration = NO_CALIBRATION) -> tuple[torch.Tensor, dict[str, Any]]:
    """Merged tensor `name` of `plan` from its inputs as stored ([base?, *models]), in `dtype`, with the
    method's info: what a merge writes for it, so tuning's in-memory trials are the merge's own bits.
    `consumed`: the inputs are read no more (a merge's, not a trial's), so their memory may go as they are.
    `calibration`: what the calibration stage measured for this tensor."""
    base, models = (inputs[0], inputs[1:]) if plan.base else (None, inputs)
    resolved = plan.tensor_params[name]
    generator = torch.Generator(device=device).manual_seed(_tensor_seed(plan.spec.seed, name))
    return _apply(plan.method, models, base, resolved.weights, resolved.params, calibration, generator,
                  device, dtype, consumed)


def _reported_params(resolved: TensorParams, calibration: Calibration) -> dict[str, Any]:
    """The parameters as set for a tensor, with the alignment scores calibration gave it (the Gram
    matrices are too large for a report; `calibration.gram_tensors` names the tensors that had them)."""
    out = resolved.params.model_dump(exclude_defaults=True)
    if calibration.alignment is not None:
        out["alignment"] = list(calibration.alignment)
    return out


def _tensor_seed(seed: int, name: str) -> int:
    """A seed per tensor, stable across runs and independent of merge order."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def merge(spec: MergeSpec | Mapping[str, Any], out_dir: str | Path, *, progress: ProgressFn | None = None,
          should_cancel: CancelFn | None = None, allowed_roots: Sequence[str | Path] | None = None,
          relative_to: Path | None = None, overwrite: bool = False, allow_downloads: bool = False) -> MergeReport:
    """Run a merge into `out_dir` and return its report (also written as merge_report.json).

    Stages: plan (checked once, then left as is), calibration (`_calibration_stage`: what the
    method needs, measured and returned), streaming (`write_shards`), evaluation, report (written once).
    The output is built in a hidden sibling folder and moved into place only when complete; on error or
    cancellation (MergeCancelled) nothing is left behind.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    check_out_dir(out_dir, overwrite)
    with plan_merge(spec, allowed_roots=allowed_roots, relative_to=relative_to, allow_downloads=allow_downloads) as plan:
        device = resolve_device(plan.spec.device)
        roots = resolve_roots(allowed_roots)
        eval_data = evaluation_data(plan.spec.evaluate, allowed_roots=roots, relative_to=relative_to)
        calibrated = calibrate(plan, device, allowed_roots=roots, relative_to=relative_to, progress=progress)
        with building(out_dir) as partial:
            calibrated = _calibration_stage(plan, out_dir, device, calibrated, progress, should_cancel)
            merge_progress = progress
            if Need.MERGED_INPUTS in plan.needs:
                merge_progress = _with_message(progress, "second pass: each layer fitted on the first pass's inputs")
            files, entries, timings = write_shards(plan, partial, device, merge_progress, should_cancel, calibrated=calibrated)
            write_side_files(plan, partial)
            evaluation = (evaluate_merge(_evaluated_models(plan, partial), eval_data, device, progress=progress,
                                         should_cancel=should_cancel) if eval_data else None)
            report = finish_output(plan, partial, device, entries, files, timings, started,
                                   calibration=calibrated.report, evaluation=evaluation)
    if progress is not None:
        progress(Progress("done", 1, 1))
    return report


def _calibration_stage(plan: MergePlan, out_dir: Path, device: torch.device, calibrated: Calibrated,
                       progress: ProgressFn | None, should_cancel: CancelFn | None) -> Calibrated:
    """What the merge's tensors need beyond the plan, measured: `calibrated` (Grams, alignment), then for
    ``gram_inputs: merged`` the second pass's Grams (`_refit_on_first_pass`), then for methods that fit
    blocks (``Need.BLOCK_FEATURES``) every block fitted in order, from the method's per-tensor merge."""
    needs = plan.needs
    if Need.MERGED_INPUTS in needs:
        calibrated = _refit_on_first_pass(plan, out_dir, device, calibrated, progress, should_cancel)
    if Need.BLOCK_FEATURES not in needs:
        return calibrated

    def inputs(name: str) -> list[torch.Tensor]:
        return _read_inputs(plan, name)

    def start(name: str) -> Merged:
        tensor, info = merge_tensor(plan, name, _read_inputs(plan, name), device, torch.float32,
                                    calibration=calibrated.for_tensor(name))
        return Merged(tensor, info)

    fitted, blocks = fit_blocks(plan, calibrated.datasets, device, inputs, start, progress=progress,
                                should_cancel=should_cancel)
    return replace(calibrated, report={**calibrated.report, "blocks": blocks}, fitted=fitted)


def _refit_on_first_pass(plan: MergePlan, out_dir: Path, device: torch.device, calibrated: Calibrated,
                         progress: ProgressFn | None, should_cancel: CancelFn | None) -> Calibrated:
    """`calibrated` for ``gram_inputs: merged``: merge once as usual, then measure each
    layer's inputs in that model against the experts' own (for the second pass).

    The first pass has no ``cross_grams``, so the method fits on the experts' own
    inputs, as with ``gram_inputs: expert``. Its model lives in a hidden folder
    beside `out_dir` (the output's disk, not /tmp's), removed whatever happens.
    """
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.first-pass-", dir=out_dir.parent) as tmp:
        first = Path(tmp)
        write_shards(plan, first, device, _with_message(progress, "first pass: each layer fitted on the experts' own inputs"),
                     should_cancel, calibrated=calibrated)
        write_side_files(plan, first)  # config, processor and tokenizer, so it loads as the output will
        return merged_input_calibration(plan, first, calibrated, device, progress=progress, should_cancel=should_cancel)


def _with_message(progress: ProgressFn | None, message: str) -> ProgressFn | None:
    """`progress` with `message` on the reports that carry none, so a listener can tell the passes apart."""
    if progress is None:
        return None
    return lambda p: progress(p if p.message else replace(p, message=message))


def _evaluated_models(plan: MergePlan, folder: Path) -> dict[str, Path]:
    """Label -> folder of the models to evaluate: the merged one (first), then with
    `evaluate_inputs` the base and each expert (labelled by its spec `model`)."""
    models = {"merged": folder}
    if plan.spec.evaluate_inputs:
        if plan.base is not None:
            models["base"] = plan.base.path
        for i, (entry, repo) in enumerate(zip(plan.spec.models, plan.models)):
            models[entry.model if entry.model not in models else f"{entry.model} ({i})"] = repo.path
    return models


def write_shards(plan: MergePlan, folder: Path, device: torch.device, progress: ProgressFn | None,
                 should_cancel: CancelFn | None, only: Collection[int] | None = None,
                 calibrated: Calibrated = NOT_CALIBRATED) -> tuple[list[WrittenFile], list[MergedTensor], Timings]:
    """Merge and write every shard of the plan, or the shards `only` names, into `folder`, with what the
    calibration stage measured (`calibrated`); returns the files, the merged tensors' report entries, and the timings."""
    timings = Timings()
    writer = ShardWriter(folder, plan.outputs, plan.spec.out_shard_size, metadata={"merged_by": f"pivotmerge {__version__}"},
                         only=only)
    entries: list[MergedTensor] = []

    def merged() -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor, entry in _merge_tensors(Measured(plan, calibrated), writer.tensors, device, timings, progress,
                                                  should_cancel):
            if entry is not None:
                entries.append(entry)
            yield name, tensor
            del tensor  # written or being written: only the writer holds it now

    files = write_tensors(writer, merged(), timings)
    return files, entries, timings


def write_tensors(writer: ShardWriter, tensors: Iterable[tuple[str, torch.Tensor]],
                  timings: Timings | None = None) -> list[WrittenFile]:
    """Write `tensors` (name, tensor), in the writer's order, as they are produced; returns the files.

    A writer thread writes tensor i while tensor i + 1 is produced; one write at a
    time in flight keeps a single finished tensor waiting in memory. On error the
    writer's partial files are removed. `timings.write_s` gets the time spent
    waiting for writes.
    """
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pivotmerge-write") as write_pool:
            pending: Future[None] | None = None
            for name, tensor in tensors:
                t0 = time.perf_counter()
                if pending is not None:
                    pending.result()
                pending = write_pool.submit(writer.write, name, tensor)
                del tensor  # the write holds it until written, not this loop while the next is made
                if timings is not None:
                    timings.write_s += time.perf_counter() - t0
            if pending is not None:
                pending.result()
        return writer.close()
    finally:
        writer.abort()


def write_side_files(plan: MergePlan, folder: Path) -> None:
    """The base's config and processor, and the tokenizer of the merged vocabulary where the spec merges one."""
    carry_side_files(plan.reference.path, folder, plan.spec.dtype)
    if plan.vocabulary is not None:
        write_tokenizer(plan.reference.path, folder, plan.vocabulary)


def finish_output(plan: MergePlan, folder: Path, device: torch.device, entries: Sequence[MergedTensor],
                  files: Sequence[WrittenFile], timings: Timings, started: float,
                  calibration: Mapping[str, Any] | None = None, evaluation: Evaluation | None = None) -> MergeReport:
    """Beside the shards and side files written in `folder`: the merge report (with the calibration stage's
    and the evaluation's sections, when given) and the model card. `started` is the merge's start on
    time.perf_counter's clock (the report's total time); returns the report."""
    report = build_report(plan, device, entries, files, timings, time.perf_counter() - started)
    if calibration:
        report.calibration = CalibrationReport.model_validate(calibration)
    report.evaluation = evaluation
    write_report(folder, report)
    write_model_card(folder, plan, report)
    return report
