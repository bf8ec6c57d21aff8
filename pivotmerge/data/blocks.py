"""Block features for distillation methods (``Need.BLOCK_FEATURES``), measured and fitted block after block.

A block is the module a group of merged tensors belongs to: the whole projector (linear_1 -> GELU ->
linear_2), a decoder or encoder layer (``....layers.<i>``), or, for a tensor in neither, its own module.
`fit_blocks` keeps a student model (the reference model holding the method's per-tensor merge, its
start), and for each block in the model's order:

1. runs the student on each expert's own calibration set and keeps the block's inputs there (the
   merged model's features, earlier blocks already fitted);
2. hands the method (`Method.fit_block`) those, each expert's own inputs and outputs of the block on the
   same samples (measured once, one expert in memory at a time), and the block as a differentiable
   function of its tensors; with ``Need.CAPTION_OUTPUTS`` also the whole student model as a function
   of the block's tensors and each expert's caption logits;
3. puts the fitted tensors into the student, so the next block sees them.

Devices and I/O stay here; the method only sees tensors and functions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any, Callable, Collection, Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call

from pivotmerge.data.calibration import (InputCapture, MergedInputGrams, add_to, cross_gram, gram, in_model,
                                         linear_modules)
from pivotmerge.data.datasets import Dataset
from pivotmerge.data.evaluate import CaptionBatch, Loaded, caption_batches, load_model
from pivotmerge.errors import CompatibilityError, MergeCancelled
from pivotmerge.methods import NO_CALIBRATION, Block, Calibration, Merged, Need
from pivotmerge.plan.plan import MergePlan
from pivotmerge.progress import CancelFn, Progress, ProgressFn
from pivotmerge.repos.architectures import architecture_for

# The projector as one block; tower layers by their index.
BLOCK_PATH = re.compile(
    r"^(.*?(?:multi_modal_projector|mm_projector|merger|connector)|.*?\.(?:layers|layer|blocks|h)\.\d+)\."
)
# Decoder-layer arguments holding a key-value cache: a replayed call must not read or extend it.
CACHE_ARGUMENTS = ("past_key_values", "past_key_value", "cache_position")
# Calibration images per forward pass while fitting: a small calibration set is then one full batch.
BATCH_SIZE = 32


def block_of(parameter: str) -> str:
    """The block module a model parameter belongs to (its own module outside projector and layers)."""
    m = BLOCK_PATH.match(parameter)
    return m.group(1) if m else parameter.rpartition(".")[0]


def parameter_names(model: nn.Module, tensor_names: Sequence[str]) -> dict[str, str]:
    """Merged tensor name -> the loaded model's parameter name holding it."""
    held = {n: n for n, _ in model.named_parameters()}
    canonical = architecture_for(getattr(model.config, "model_type", None)).canonical
    out = {}
    for name in tensor_names:
        hit = in_model(name, held, canonical)
        if hit is None:
            raise CompatibilityError(f"the loaded model has no parameter for tensor {name}")
        out[name] = hit
    return out


def blocks_in_order(model: nn.Module, parameters: Mapping[str, str]) -> list[tuple[str, list[str]]]:
    """(block path, its merged tensors) in the order the model registers its modules (its forward order)."""
    order = {n: i for i, (n, _) in enumerate(model.named_parameters())}
    groups: dict[str, list[str]] = {}
    for name in sorted(parameters, key=lambda n: order[parameters[n]]):
        groups.setdefault(block_of(parameters[name]), []).append(name)
    return list(groups.items())


@dataclass
class Call:
    """One run of a block: its first input, the rest of the call (replayed as is), and its output."""

    input: torch.Tensor
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: torch.Tensor | None = None


def _output(call: Call) -> torch.Tensor:
    """A teacher call's output: its hook always records one."""
    assert call.output is not None
    return call.output


def _detached(value: Any) -> Any:
    return value.detach() if isinstance(value, torch.Tensor) else value


class BlockCalls:
    """Hooks keeping every call of the given block modules (`calls[path]`, in order)."""

    def __init__(self, modules: Mapping[str, nn.Module]):
        self.calls: dict[str, list[Call]] = {p: [] for p in modules}
        self._handles = []
        for path, module in modules.items():
            self._handles.append(module.register_forward_pre_hook(self._before(path), with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._after(path)))

    def _before(self, path: str):
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            kept = {k: _detached(v) for k, v in kwargs.items() if k not in CACHE_ARGUMENTS}
            self.calls[path].append(Call(args[0].detach(), tuple(_detached(a) for a in args[1:]), kept))

        return hook

    def _after(self, path: str):
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            self.calls[path][-1].output = _first(output).detach()

        return hook

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _run(loaded: Loaded, batch: CaptionBatch, params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Logits of `loaded` on one caption batch, with `params` (model parameter name -> tensor) swapped in."""
    inputs: dict[str, Any] = {k: v.to(loaded.device) for k, v in batch.inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(loaded.model.dtype)
    inputs["use_cache"] = False  # a key-value cache would carry one replayed call's state into the next
    if params is None:
        return loaded.model(**inputs).logits
    return functional_call(loaded.model, dict(params), args=(), kwargs=inputs).logits


def _caption_logits(logits: torch.Tensor, batch: CaptionBatch) -> torch.Tensor:
    """The logits that predict caption tokens (position i predicts token i + 1), tokens x vocabulary."""
    return logits[:, :-1][batch.targets[:, 1:].to(logits.device)]


@dataclass
class Teacher:
    """One expert on its own calibration set: its batches, each block's calls, and its caption logits."""

    batches: list[CaptionBatch]
    calls: dict[str, list[Call]]
    logits: torch.Tensor | None


@torch.no_grad()
def _teacher(expert: Loaded, data: Dataset, modules: Mapping[str, str], caption_outputs: bool) -> Teacher:
    batches = caption_batches(expert.processor, data.records, BATCH_SIZE, data.prompt)
    named = dict(expert.model.named_modules())
    hooks = BlockCalls({p: named[p] for p in modules})
    try:
        logits = [_caption_logits(_run(expert, b), b) for b in batches]
    finally:
        hooks.close()
    return Teacher(batches, hooks.calls, torch.cat(logits) if caption_outputs else None)


@torch.no_grad()
def _student_calls(student: Loaded, module: nn.Module, batches: Sequence[CaptionBatch]) -> list[Call]:
    hooks = BlockCalls({"block": module})
    try:
        for b in batches:
            _run(student, b)
    finally:
        hooks.close()
    return hooks.calls["block"]


def _set(model_params: Mapping[str, nn.Parameter], values: Mapping[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, value in values.items():
            model_params[name].copy_(value.to(model_params[name].dtype))


def fit_blocks(
    plan: MergePlan,
    datasets: Sequence[Dataset],
    device: torch.device,
    inputs: Callable[[str], Sequence[torch.Tensor]],
    start: Callable[[str], Merged],
    *,
    progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
) -> tuple[dict[str, Merged], list[dict[str, Any]]]:
    """Every merged tensor whose parameters need block features, fitted block by block by the plan's method.

    `inputs(name)` gives a tensor's inputs ([base?, *models], float32 on `device`), `start(name)` the
    method's per-tensor merge of it (with its calibration). Returns the fitted tensors and, per block,
    what the report records.
    """
    method = plan.method
    assert method.fit_block is not None
    names = sorted(plan.tensors_needing(Need.BLOCK_FEATURES))
    caption_outputs = not plan.tensors_needing(Need.CAPTION_OUTPUTS).isdisjoint(names)
    student = load_model(plan.reference.path, device.type)
    student.model.requires_grad_(False)
    parameters = parameter_names(student.model, names)
    held = dict(student.model.named_parameters())
    starts = {n: start(n) for n in names}
    _set(held, {parameters[n]: m.tensor for n, m in starts.items()})
    blocks = blocks_in_order(student.model, parameters)
    paths = {p: p for p, _ in blocks}
    teachers = []
    for i, (repo, data) in enumerate(zip(plan.models, datasets, strict=True)):
        if should_cancel is not None and should_cancel():
            raise MergeCancelled("merge cancelled")
        teachers.append(_teacher(load_model(repo.path, device.type), data, paths, caption_outputs))
        if progress is not None:
            progress(
                Progress("calibrate", i + 1, len(plan.models), message="each expert's block features on its own data")
            )
    modules = dict(student.model.named_modules())
    fitted: dict[str, Merged] = {}
    report = []
    for j, (path, block_names) in enumerate(blocks):
        if should_cancel is not None and should_cancel():
            raise MergeCancelled("merge cancelled")
        block = _block(student, modules[path], path, block_names, parameters, teachers, caption_outputs)
        tensors = {n: [t.to(device=device, dtype=torch.float32) for t in inputs(n)] for n in block_names}
        base = {n: t[0] for n, t in tensors.items()} if plan.base is not None else None
        experts = [{n: t[k + (plan.base is not None)] for n, t in tensors.items()} for k in range(len(plan.models))]
        first = plan.tensor_params[block_names[0]]
        out = method.fit_block(
            experts, base, {n: starts[n].tensor for n in block_names}, first.weights, first.params, block
        )
        _set(held, {parameters[n]: m.tensor for n, m in out.items()})
        for n, m in out.items():
            fitted[n] = Merged(m.tensor.detach(), {**starts[n].info, **m.info})
        report.append(
            {
                "block": path,
                "tensors": block_names,
                **{k: v for k, v in next(iter(out.values())).info.items() if k.startswith("loss")},
            }
        )
        if progress is not None:
            progress(Progress("fit", j + 1, len(blocks), message=f"block {path} fitted"))
    return fitted, report


def _block(
    student: Loaded,
    module: nn.Module,
    path: str,
    names: Sequence[str],
    parameters: Mapping[str, str],
    teachers: Sequence[Teacher],
    caption_outputs: bool,
) -> Block:
    """The block as the method sees it: features on each expert's data, and the block and model as functions."""
    local = {n: parameters[n][len(path) + 1 :] for n in names}
    student_calls = [_student_calls(student, module, t.batches) for t in teachers]

    def forward(tensors: Mapping[str, torch.Tensor], k: int, b: int, x: torch.Tensor) -> torch.Tensor:
        call = student_calls[k][b]
        return _first(
            functional_call(module, {local[n]: t for n, t in tensors.items()}, args=(x, *call.args), kwargs=call.kwargs)
        )

    def caption_logits(tensors: Mapping[str, torch.Tensor], k: int) -> torch.Tensor:
        swapped = {parameters[n]: t for n, t in tensors.items()}
        return torch.cat([_caption_logits(_run(student, b, swapped), b) for b in teachers[k].batches])

    return Block(
        path=path,
        names=tuple(names),
        forward=forward,
        student_inputs=[[c.input for c in calls] for calls in student_calls],
        teacher_inputs=[[c.input for c in t.calls[path]] for t in teachers],
        teacher_outputs=[[_output(c) for c in t.calls[path]] for t in teachers],
        caption_logits=caption_logits if caption_outputs else None,
        teacher_logits=[t.logits for t in teachers if t.logits is not None] if caption_outputs else None,
    )


# ----------------------------------------------------- RegMean++'s order: each block on the merged blocks below it


@torch.no_grad()
def _block_grams(
    student: Loaded,
    module: nn.Module,
    teacher: Teacher,
    calls: Sequence[Call],
    expert: Mapping[str, torch.Tensor],
    linears: Mapping[str, nn.Module],
    cross_names: Collection[str],
) -> MergedInputGrams:
    """One expert's merged-input Grams ``X~^T X~`` of a block's linear layers, and for those in `cross_names`
    the cross Grams ``X^T X~``.

    ``X`` is what the expert's own block (its tensors `expert`, by the module's local names) feeds each linear
    on the expert's own block inputs (`calls`), ``X~`` what the student, the merged model as far as it is
    fitted, feeds it on the same samples; rows pair up as both run on the same batches, one batch at a time.
    The expert's block runs only when some linear needs its cross Gram.
    """
    grams: dict[str, torch.Tensor] = {}
    cross: dict[str, torch.Tensor] = {}
    runs_expert = any(n in cross_names for n in linears)
    with InputCapture(linears) as capture:
        for batch, call in zip(teacher.batches, calls, strict=True):
            capture.token_mask = batch.inputs["attention_mask"].bool().to(call.input.device)
            own: dict[str, torch.Tensor] = {}
            if runs_expert:
                functional_call(module, dict(expert), args=(call.input, *call.args), kwargs=call.kwargs)
                own = capture.pop()
            _run(student, batch)
            for name, rows in capture.pop().items():
                add_to(grams, name, gram(rows))
                if name in cross_names:
                    add_to(cross, name, cross_gram(own[name], rows))
    return MergedInputGrams({n: g.cpu() for n, g in grams.items()}, {n: c.cpu() for n, c in cross.items()})


@torch.no_grad()
def refit_blocks(
    plan: MergePlan,
    datasets: Sequence[Dataset],
    device: torch.device,
    inputs: Callable[[str], Sequence[torch.Tensor]],
    merge: Callable[[str, Calibration], torch.Tensor],
    calibration: Mapping[str, Calibration],
    *,
    progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
) -> tuple[dict[str, Calibration], list[str]]:
    """`calibration` for ``gram_inputs: merged``, measured block after block in the model's order (RegMean++'s).

    A student (the reference model) receives each block's merge in turn: first the block's per-tensor merge
    with `calibration` (the experts' own Grams), which feeds the linears inside the block; then, for the
    linear weights whose parameters fit on merged inputs, the Grams of the inputs the student feeds them
    (every block below already refitted) and the cross Grams against each expert's own inputs on the same
    samples; the block is merged again with those and put into the student before the next block is
    measured. So block ``l`` is fitted on what the *final* merged blocks below it produce, not on a first
    pass's. `inputs(name)` gives a tensor's stored inputs ([base?, *models]), `merge(name, calibration)` its
    merge (as the output will hold it). Returns the calibration (refitted tensors replaced) and the blocks
    refitted, in order.
    Cost: each expert's block inputs on its calibration set held in memory (as `fit_blocks`), and one
    forward pass of the student per block and calibration batch.
    """
    names = sorted(plan.merged)
    refit = sorted(plan.tensors_needing(Need.MERGED_INPUTS))
    cross = plan.tensors_needing(Need.CROSS_GRAMS)
    student = load_model(plan.reference.path, device.type)
    student.model.requires_grad_(False)
    parameters = parameter_names(student.model, names)
    held = dict(student.model.named_parameters())
    linears = linear_modules(student.model, refit)
    blocks = blocks_in_order(student.model, parameters)
    measured = {p: p for p, block_names in blocks if any(n in linears for n in block_names)}
    teachers = []
    for i, (repo, data) in enumerate(zip(plan.models, datasets, strict=True)):
        if should_cancel is not None and should_cancel():
            raise MergeCancelled("merge cancelled")
        teachers.append(_teacher(load_model(repo.path, device.type), data, measured, caption_outputs=False))
        if progress is not None:
            progress(Progress("calibrate", i + 1, len(plan.models),
                              message="each expert's block inputs on its own data"))
    modules = dict(student.model.named_modules())
    offset = plan.base is not None
    out = dict(calibration)
    refitted = []
    if progress is not None:
        progress(Progress("refit", 0, len(blocks), message="each block fitted on the merged blocks below it"))
    for j, (path, block_names) in enumerate(blocks):
        if should_cancel is not None and should_cancel():
            raise MergeCancelled("merge cancelled")
        _set(held, {parameters[n]: merge(n, out.get(n, NO_CALIBRATION)) for n in block_names})
        block_linears = {n: linears[n] for n in block_names if n in linears}
        # A block that does not run once per batch (never reached, or shared) has no paired rows: it keeps
        # the fit on the experts' own inputs.
        if block_linears and all(len(t.calls[path]) == len(t.batches) for t in teachers):
            local = {n: parameters[n][len(path) + 1 :] for n in block_names}
            stored = {n: inputs(n) for n in block_names}
            per_expert = []
            for k, teacher in enumerate(teachers):
                expert = {local[n]: t[k + offset].to(device=device, dtype=held[parameters[n]].dtype)
                          for n, t in stored.items()}
                per_expert.append(_block_grams(student, modules[path], teacher, teacher.calls[path], expert,
                                               block_linears, cross))
            for n in block_linears:
                out[n] = replace(out.get(n, NO_CALIBRATION), grams=[p.grams[n] for p in per_expert],
                                 cross_grams=[p.cross_grams[n] for p in per_expert] if n in cross else None)
            _set(held, {parameters[n]: merge(n, out[n]) for n in block_names})
            refitted.append(path)
        if progress is not None:
            progress(Progress("refit", j + 1, len(blocks)))
    return out, refitted
