"""`pivotmerge bench modality`: Sung et al.'s modality-agnostic merging study on synthetic data.

At every point of a sweep over the length of the modality-agnostic "seed" pre-training:

1. the seed (a `SharedVLModel` pre-trained for S steps) is copied into every expert of a
   `MultiwayVLModel`, which pre-trains T more steps on the same objectives (masked language
   modelling on captions alone and with their image, image-text matching, masked patch
   colours on images alone);
2. that model is folded into the shared architecture by `pivotmerge.fold.fold` on its
   Hugging Face folder with each method: interpolation (``a = 0.5``: ``v, l, vl`` at 1/3
   each in the top blocks, 1/2 below), modality arithmetic around the seed, and RegMean
   with each expert's Gram matrices measured through the model's routed forward pass;
3. a `SharedVLModel` pre-trained from scratch for S + T steps on the very same batches is
   the baseline with the same compute;
4. every model is fine-tuned the same short way on each task (image-text retrieval with a
   dual encoder, VQA-like colour questions, an NLVR-like two-image statement) and scored
   on a fixed test set;
5. the weight distances between the experts (`pivotmerge.fold.distances`, what
   `pivotmerge analyze FOLD_SPEC` prints) are measured.

Then the Spearman correlation of each metric with the folded models' scores over the
sweep, tables (results.md, results.json) and a plot (modality.png).
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors.torch import save_file
from torch import nn

from pivotmerge.bench import modality_world as world
from pivotmerge.bench.threads import torch_threads
from pivotmerge.fold.distances import fold_distances
from pivotmerge.fold.fold_repo import fold
from pivotmerge.models.multiway import MultiwayVLConfig, MultiwayVLModel, SharedVLConfig, SharedVLModel, seed_state

METHODS = ("interpolation", "modality_arithmetic", "regmean")
TASKS = ("retrieval", "vqa", "nlvr")
METRICS = ("l2", "relative_l2", "cosine", "sign_dissimilarity", "soft_sign_dissimilarity", "truncated_sign_dissimilarity")
SEED_SUFFIX = " vs seed"
Show = Callable[[str], None]


@dataclass(frozen=True)
class ModalitySuite:
    name: str
    seed_steps: tuple[int, ...]  # the sweep: modality-agnostic seed pre-training steps
    specific_steps: int  # modality-specific pre-training steps after the seed
    finetune_steps: int
    # Each score is the mean over this many fine-tunes (head initialisation and batch order seeded apart): with
    # one, a single fine-tune moved the from-scratch baseline by up to 8 points between neighbouring sweep points.
    finetune_seeds: int = 1
    batch_size: int = 32
    eval_size: int = 512
    calibration_size: int = 128  # per input kind (images, captions, pairs) for RegMean's Grams
    lr: float = 1e-3
    finetune_lr: float = 1e-3
    hidden_size: int = 32
    num_layers: int = 4
    seed: int = 0
    # Fold parameters, fixed before any run (none tuned on test): the paper's default a = 0.5;
    # modality arithmetic's scale 0.5 makes it the plain mean where two experts fold.
    arithmetic_scale: float = 0.5
    regmean_off_diagonal_scale: float = 0.9
    methods: tuple[str, ...] = field(default=METHODS)


# Seed lengths around where the shared model starts to ground words in patches (image-text
# matching leaves chance between 200 and 300 steps).
FULL = ModalitySuite("full", seed_steps=(0, 50, 100, 150, 200, 300, 400, 600), specific_steps=250, finetune_steps=100,
                     finetune_seeds=3)
QUICK = ModalitySuite("quick", seed_steps=(0, 100, 250), specific_steps=50, finetune_steps=25, eval_size=128,
                      calibration_size=32)


def model_config(suite: ModalitySuite, multiway: bool) -> SharedVLConfig:
    cls = MultiwayVLConfig if multiway else SharedVLConfig
    # Initialisation scaled to the tiny width (BEiT's 0.02 and layer scale 0.1 suit width 768: here
    # they left the text blind to the image for hundreds of steps).
    return cls(hidden_size=suite.hidden_size, num_layers=suite.num_layers, vocab_size=len(world.VOCAB),
               max_text_len=world.TEXT_LEN, image_size=world.IMAGE_SIZE, patch_size=world.PATCH_SIZE,
               initializer_range=suite.hidden_size ** -0.5, layer_scale_init=1.0)


def _generator(*key: int) -> torch.Generator:
    seed = 0
    for k in key:
        seed = seed * 1_000_003 + k
    return torch.Generator().manual_seed(seed % (2**63))


# ------------------------------------------------------------------------------------------------ pre-training

class PretrainingHeads(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.mlm = nn.Linear(d, len(world.VOCAB))
        self.itm = nn.Linear(d, 2)
        self.patch_colour = nn.Linear(d, 3)


def pretraining_loss(model: nn.Module, heads: PretrainingHeads, b: dict[str, torch.Tensor]) -> torch.Tensor:
    ce = nn.functional.cross_entropy
    image = model(pixel_values=b["masked_images"]).last_hidden_state[:, 1:]
    mim = nn.functional.mse_loss(heads.patch_colour(image)[b["patch_mask"]], b["patch_colours"][b["patch_mask"]])
    text = model(input_ids=b["text_in"], attention_mask=world.attention_mask(b["text_in"])).last_hidden_state
    mlm = ce(heads.mlm(text).flatten(0, 1), b["text_target"].flatten(), ignore_index=-100)
    fused = model(pixel_values=b["images"], input_ids=b["fused_in"],
                  attention_mask=world.attention_mask(b["fused_in"])).last_hidden_state[:, :world.TEXT_LEN]
    fused_mlm = ce(heads.mlm(fused).flatten(0, 1), b["fused_target"].flatten(), ignore_index=-100)
    pair = model(pixel_values=b["images"], input_ids=b["pair_text"],
                 attention_mask=world.attention_mask(b["pair_text"])).pooler_output
    itm = ce(heads.itm(pair), b["matched"])
    return mim * 10 + mlm + fused_mlm + itm


def pretrain(model: nn.Module, heads: PretrainingHeads, suite: ModalitySuite, steps: range,
             checkpoints: set[int] | None = None) -> dict[int, dict[str, dict[str, torch.Tensor]]]:
    """Train on batches `steps` (batch i is the same for every model); returns copies at `checkpoints`."""
    params = list(model.parameters()) + list(heads.parameters())
    optimiser = torch.optim.AdamW(params, lr=suite.lr, weight_decay=0.01)
    saved = {}
    model.train()
    for step in steps:
        if checkpoints is not None and step in checkpoints:
            saved[step] = _snapshot(model, heads)
        loss = pretraining_loss(model, heads, world.pretraining_batch(suite.batch_size, _generator(suite.seed, 1, step)))
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimiser.step()
    end = steps.stop
    if checkpoints is not None and end in checkpoints:
        saved[end] = _snapshot(model, heads)
    return saved


def _snapshot(model: nn.Module, heads: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    return {"model": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "heads": {k: v.detach().clone() for k, v in heads.state_dict().items()}}


# ------------------------------------------------------------------------------------------------ fine-tuning

class TaskHead(nn.Module):
    """The fine-tuning head of one task on top of the shared backbone."""

    def __init__(self, task: str, d: int):
        super().__init__()
        self.task = task
        if task == "retrieval":
            self.image, self.text = nn.Linear(d, d), nn.Linear(d, d)
        elif task == "vqa":
            self.classify = nn.Linear(d, len(world.ANSWERS))
        else:
            self.classify = nn.Sequential(nn.Linear(2 * d, d), nn.GELU(), nn.Linear(d, 2))

    def outputs(self, model: nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
        """Retrieval: the image-to-text similarity matrix; classification: the logits."""
        if self.task == "retrieval":
            img = nn.functional.normalize(self.image(model(pixel_values=b["images"]).pooler_output), dim=-1)
            txt = model(input_ids=b["captions"], attention_mask=world.attention_mask(b["captions"])).pooler_output
            return img @ nn.functional.normalize(self.text(txt), dim=-1).T / 0.1
        if self.task == "vqa":
            return self.classify(model(pixel_values=b["images"], input_ids=b["questions"],
                                       attention_mask=world.attention_mask(b["questions"])).pooler_output)
        mask = world.attention_mask(b["statements"])
        pooled = [model(pixel_values=b[key], input_ids=b["statements"], attention_mask=mask).pooler_output
                  for key in ("images", "images_2")]
        return self.classify(torch.cat(pooled, -1))


TASK_BATCH = {"retrieval": world.retrieval_batch, "vqa": world.vqa_batch, "nlvr": world.nlvr_batch}
TASK_KEY = {"retrieval": 2, "vqa": 3, "nlvr": 4}


def task_loss(head: TaskHead, model: nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
    out = head.outputs(model, b)
    if head.task == "retrieval":
        target = torch.arange(out.shape[0])
        return (nn.functional.cross_entropy(out, target) + nn.functional.cross_entropy(out.T, target)) / 2
    return nn.functional.cross_entropy(out, b["answers"] if head.task == "vqa" else b["labels"])


@torch.no_grad()
def task_score(head: TaskHead, model: nn.Module, b: dict[str, torch.Tensor]) -> float:
    """Accuracy in points; retrieval: recall@1 averaged over both directions, a retrieved caption
    counting when it is the query's caption (scenes repeat in a large pool)."""
    out = head.outputs(model, b)
    if head.task == "retrieval":
        same = (b["captions"][:, None, :] == b["captions"][None, :, :]).all(-1)
        rows = torch.arange(out.shape[0])
        i2t = same[rows, out.argmax(1)].float().mean()
        t2i = same[out.argmax(0), rows].float().mean()
        return float((i2t + t2i) / 2 * 100)
    target = b["answers"] if head.task == "vqa" else b["labels"]
    return float((out.argmax(-1) == target).float().mean() * 100)


def finetune_scores(backbone: nn.Module, suite: ModalitySuite) -> dict[str, float]:
    """Each task's test score after the same short fine-tunes of copies of `backbone` (the mean over
    `suite.finetune_seeds` fine-tunes; the test examples are the same for all)."""
    scores = {task: sum(finetune_score(backbone, suite, task, r) for r in range(suite.finetune_seeds)) / suite.finetune_seeds
              for task in TASKS}
    scores["average"] = sum(scores[t] for t in TASKS) / len(TASKS)
    return scores


def finetune_score(backbone: nn.Module, suite: ModalitySuite, task: str, repeat: int) -> float:
    """`task`'s test score after one fine-tune of a copy of `backbone`; `repeat` 0 is the suite's own seed."""
    seed = suite.seed + 1000 * repeat
    torch.manual_seed(seed)
    model = copy.deepcopy(backbone).train()
    head = TaskHead(task, suite.hidden_size)
    params = list(model.parameters()) + list(head.parameters())
    optimiser = torch.optim.AdamW(params, lr=suite.finetune_lr, weight_decay=0.01)
    for step in range(suite.finetune_steps):
        loss = task_loss(head, model, TASK_BATCH[task](suite.batch_size, _generator(seed, TASK_KEY[task], step)))
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimiser.step()
    model.eval()
    return task_score(head, model, TASK_BATCH[task](suite.eval_size, _generator(suite.seed, TASK_KEY[task], 10**6)))


# ------------------------------------------------------------------------------------------------ folding

def calibration_files(folder: Path, suite: ModalitySuite) -> list[str]:
    """RegMean's calibration inputs: images alone, captions alone and image-caption pairs, one file each,
    so every expert (v, l, and vl in the top blocks) sees its own tokens."""
    b = world.retrieval_batch(suite.calibration_size, _generator(suite.seed, 5))
    mask = world.attention_mask(b["captions"])
    kinds = {"images": {"pixel_values": b["images"]},
             "captions": {"input_ids": b["captions"], "attention_mask": mask},
             "pairs": {"pixel_values": b["images"], "input_ids": b["captions"], "attention_mask": mask}}
    folder.mkdir(parents=True, exist_ok=True)
    for kind, tensors in kinds.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / f"{kind}.safetensors"))
    return [str(folder / f"{kind}.safetensors") for kind in kinds]


def fold_spec(method: str, specific: Path, seed: Path, calibration: list[str], suite: ModalitySuite) -> dict[str, Any]:
    """The fold spec of one method; groups come from the model's folding table."""
    spec: dict[str, Any] = {"model": str(specific), "method": method}
    if method == "interpolation":
        spec["weights"] = {"v": 1.0, "l": 1.0, "vl": 1.0}  # a = 0.5: 2a, 2(1-a), 1
    elif method == "modality_arithmetic":
        spec |= {"w0_model": str(seed), "scale": suite.arithmetic_scale}
    else:
        spec |= {"calibration_inputs": calibration, "off_diagonal_scale": suite.regmean_off_diagonal_scale}
    return spec


def load_folded(folder: Path) -> nn.Module:
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(folder)).float()


# ------------------------------------------------------------------------------------------------ the sweep

def sweep_point(suite: ModalitySuite, seed_steps: int, seed_ckpt: dict, scratch_ckpt: dict, work: Path,
                show: Show) -> dict[str, Any]:
    """Everything measured at one seed length: folded and from-scratch scores, and the experts' distances."""
    point = work / f"seed-{seed_steps}"
    seed_model = SharedVLModel(model_config(suite, multiway=False))
    seed_model.load_state_dict(seed_ckpt["model"])
    seed_model.save_pretrained(point / "seed")
    config = model_config(suite, multiway=True)
    specific = MultiwayVLModel(config)
    specific.load_state_dict(seed_state(seed_ckpt["model"], config))
    heads = PretrainingHeads(suite.hidden_size)
    heads.load_state_dict(seed_ckpt["heads"])
    show(f"seed {seed_steps}: modality-specific pre-training, {suite.specific_steps} steps")
    pretrain(specific, heads, suite, range(seed_steps, seed_steps + suite.specific_steps))
    specific.save_pretrained(point / "specific")
    calibration = calibration_files(point / "calibration", suite)
    result: dict[str, Any] = {"seed_steps": seed_steps, "folded": {}}
    for method in suite.methods:
        show(f"seed {seed_steps}: fold ({method}), fine-tune, score")
        fold(fold_spec(method, point / "specific", point / "seed", calibration, suite), point / method, overwrite=True)
        result["folded"][method] = finetune_scores(load_folded(point / method), suite)
    show(f"seed {seed_steps}: from-scratch baseline ({seed_steps + suite.specific_steps} steps), fine-tune, score")
    scratch = SharedVLModel(model_config(suite, multiway=False))
    scratch.load_state_dict(scratch_ckpt["model"])
    result["scratch"] = finetune_scores(scratch, suite)
    result |= expert_distances(point)
    return result


def expert_distances(point: Path) -> dict[str, Any]:
    """The experts' distances on their weights (``distances``) and on their moves from the seed
    (``distances_to_seed``, task vectors ``W_m - W0``), as `pivotmerge analyze FOLD_SPEC` measures them."""
    out = {}
    for key, extra in (("distances", {}), ("distances_to_seed", {"w0_model": str(point / "seed")})):
        d = fold_distances({"model": str(point / "specific"), "method": "modality_arithmetic", **extra})
        out[key] = {"total": d["total"], "layers": d["layers"]}
    return out


def spearman(x: list[float], y: list[float]) -> float | None:
    from scipy.stats import spearmanr

    if len(set(x)) < 2 or len(set(y)) < 2:
        return None
    return float(spearmanr(x, y).statistic)


def correlations(points: list[dict[str, Any]], methods: tuple[str, ...]) -> dict[str, dict[str, float | None]]:
    """Spearman of each metric's total (on the weights, and on the moves from the seed: "... vs seed")
    with each method's average folded score, and with their mean, over the sweep."""
    out: dict[str, dict[str, float | None]] = {}
    for key, suffix in (("distances", ""), ("distances_to_seed", SEED_SUFFIX)):
        for metric in METRICS:
            values = [p[key]["total"][metric] for p in points]
            row = {m: spearman(values, [p["folded"][m]["average"] for p in points]) for m in methods}
            row["mean"] = spearman(values, [sum(p["folded"][m]["average"] for m in methods) / len(methods) for p in points])
            out[metric + suffix] = row
    return out


def findings(points: list[dict[str, Any]], rho: dict[str, dict[str, float | None]], methods: tuple[str, ...]) -> dict[str, Any]:
    """The paper's three claims, checked on the sweep."""
    last, first = points[-1], points[0]
    gaps = {m: {t: last["folded"][m][t] - last["scratch"][t] for t in TASKS} for m in methods}
    best_metric = max(rho, key=lambda k: abs(rho[k]["mean"] or 0.0))
    return {
        "longest_seed_steps": last["seed_steps"],
        "gap_to_scratch_at_longest_seed": gaps,
        "within_1_point_of_scratch": {m: all(g >= -1.0 for g in gaps[m].values()) for m in methods},
        "beats_no_seed": {m: {"no_seed": first["folded"][m]["average"],
                              "best_with_seed": max(p["folded"][m]["average"] for p in points[1:]),
                              "longest_seed": last["folded"][m]["average"]} for m in methods},
        "best_metric": {"metric": best_metric, "spearman": rho[best_metric]["mean"]},
    }


# The study trains every model it scores, so it runs on one thread whatever the caller set: with the caller's
# count, the interpolation fold's NLVR score at 250 seed steps in a quick run was 77.3 on one thread and 92.2
# on two.
STUDY_THREADS = 1


def run(suite: ModalitySuite, out: Path, show: Show) -> dict[str, Any]:
    with torch_threads(STUDY_THREADS):
        return _study(suite, out, show)


def _study(suite: ModalitySuite, out: Path, show: Show) -> dict[str, Any]:
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    work = out / "models"
    needed = set(suite.seed_steps) | {s + suite.specific_steps for s in suite.seed_steps}
    show(f"modality-agnostic pre-training: one run to {max(needed)} steps, kept at {len(needed)} points")
    torch.manual_seed(suite.seed)
    shared = SharedVLModel(model_config(suite, multiway=False))
    checkpoints = pretrain(shared, PretrainingHeads(suite.hidden_size), suite, range(0, max(needed)), needed)
    points = []
    for s in suite.seed_steps:
        points.append(sweep_point(suite, s, checkpoints[s], checkpoints[s + suite.specific_steps], work, show))
        write_results(out, suite, points, started)
    return write_results(out, suite, points, started)


def write_results(out: Path, suite: ModalitySuite, points: list[dict[str, Any]], started: float) -> dict[str, Any]:
    rho = correlations(points, suite.methods) if len(points) > 2 else {}
    result = {"suite": asdict(suite), "points": points, "spearman": rho,
              "findings": findings(points, rho, suite.methods) if rho else {},
              "seconds": round(time.perf_counter() - started, 1)}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    (out / "results.md").write_text("\n".join(markdown(result)) + "\n")
    if rho:
        plot(result, out / "modality.png")
    return result


def _f(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def markdown(result: dict[str, Any]) -> Iterator[str]:
    suite, points = result["suite"], result["points"]
    methods = suite["methods"]
    yield f"# Modality-agnostic merging study ({suite['name']}): {len(points)} seed lengths, {result['seconds']:.0f} s"
    yield ""
    yield (f"Seed pre-training S steps (modality-agnostic), then {suite['specific_steps']} modality-specific steps; "
           f"baseline: modality-agnostic from scratch for S + {suite['specific_steps']} steps on the same batches. "
           f"Every model fine-tuned {suite['finetune_steps']} steps per task (each score the mean of "
           f"{suite.get('finetune_seeds', 1)} fine-tunes); test scores in points "
           f"({suite['eval_size']} examples per task).")
    yield ""
    yield "| seed steps | model | " + " | ".join(TASKS) + " | average |"
    yield "|---|---|" + "---|" * (len(TASKS) + 1)
    for p in points:
        for name, scores in [*p["folded"].items(), ("scratch (same compute)", p["scratch"])]:
            yield f"| {p['seed_steps']} | {name} | " + " | ".join(_f(scores[t]) for t in (*TASKS, "average")) + " |"
    yield ""
    for key, what in (("distances", "weights"), ("distances_to_seed", "moves from the seed, W_m - W0")):
        yield f"Distances between the experts (v-l, and with vl in the top blocks) on their {what}, totals:"
        yield ""
        yield "| seed steps | " + " | ".join(METRICS) + " |"
        yield "|---|" + "---|" * len(METRICS)
        for p in points:
            yield f"| {p['seed_steps']} | " + " | ".join(_f(p[key]["total"][m], 4) for m in METRICS) + " |"
        yield ""
    if result["spearman"]:
        yield "Spearman correlation of each metric with the folded models' average score over the sweep:"
        yield ""
        yield "| metric | " + " | ".join(methods) + " | mean of methods |"
        yield "|---|" + "---|" * (len(methods) + 1)
        for metric, row in result["spearman"].items():
            yield f"| {metric} | " + " | ".join(_f(row[m], 2) for m in (*methods, "mean")) + " |"
        f = result["findings"]
        yield ""
        yield f"At the longest seed ({f['longest_seed_steps']} steps), folded minus from-scratch, per task:"
        yield ""
        for m, gaps in f["gap_to_scratch_at_longest_seed"].items():
            verdict = "within 1 point on every task" if f["within_1_point_of_scratch"][m] else "NOT within 1 point"
            yield f"- {m}: " + ", ".join(f"{t} {g:+.1f}" for t, g in gaps.items()) + f" ({verdict})"
        yield ""
        for m, b in f["beats_no_seed"].items():
            verdict = "beats" if b["longest_seed"] > b["no_seed"] else "does NOT beat"
            yield (f"- {m}: average {b['no_seed']:.1f} without seed pre-training, best {b['best_with_seed']:.1f} with it, "
                   f"{b['longest_seed']:.1f} at the longest seed ({verdict} folding without seed pre-training there)")
        yield ""
        yield f"Best predictor: {f['best_metric']['metric']} (Spearman {_f(f['best_metric']['spearman'], 2)})."


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points, methods = result["points"], result["suite"]["methods"]
    steps = [p["seed_steps"] for p in points]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for m in methods:
        left.plot(steps, [p["folded"][m]["average"] for p in points], marker="o", label=f"folded: {m}")
    left.plot(steps, [p["scratch"]["average"] for p in points], marker="s", linestyle="--", color="black",
              label="modality-agnostic from scratch")
    left.set(xlabel="seed pre-training steps", ylabel="average task score (points)", title="Merged performance")
    left.legend(fontsize=8)
    mean_score = [sum(p["folded"][m]["average"] for m in methods) / len(methods) for p in points]
    for key, metric in (("distances", "relative_l2"), ("distances", "soft_sign_dissimilarity"),
                        ("distances_to_seed", "truncated_sign_dissimilarity"), ("distances_to_seed", "soft_sign_dissimilarity")):
        name = metric + ("" if key == "distances" else SEED_SUFFIX)
        right.scatter([p[key]["total"][metric] for p in points], mean_score,
                      label=f"{name} (rho {_f(result['spearman'][name]['mean'], 2)})")
    right.set(xlabel="distance between experts (total)", ylabel="mean folded score (points)",
              title="Distance metrics vs merged performance")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
