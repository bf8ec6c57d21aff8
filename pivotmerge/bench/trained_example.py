"""The trained example: a small world of the quality suite in a user's folder, with a spec that merges it.

The tiny example of `pivotmerge/data/example.py` shows that merging runs, but its
experts are random perturbations that learned nothing, so it cannot show what
merging buys. This one's experts learned: a world of `world.py`'s recipe, small
enough to build in about a minute on 2 cores (and read back from the suite's
cache after that), in which each expert's projector was trained on its own
domain. `pivotmerge quickstart` and `pivotmerge make-example --data` copy it to a
folder and write a spec that merges the experts' projectors with PivotMerge,
gives each expert its domain's calibration set, and scores the merge beside the
base and every expert on each domain's test split.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from safetensors.torch import load_file

from pivotmerge.bench.domains import DOMAINS
from pivotmerge.bench.world import Config, Progress, build_world, world_at
from pivotmerge.data.example import ExampleSet, perturbed_names, write_spec

# Small enough to build in about a minute (54 s of CPU on one thread), large enough that each expert beats
# the others on its own domain (seed 0: by 0.23-0.46 test token accuracy; with 100 vision steps instead of
# 200, the dots expert reached 0.60 dev token accuracy instead of 0.82).
# benchmarks/trained_example_method.py scores its candidate merges on dev.
SMALL = Config(n_train=64, n_dev=32, n_test=48, n_calib=16, vision_steps=200, lm_steps=200, expert_steps=80, lr=5e-3)


def make_trained_example(out_dir: str | Path, cache: Path, seed: int = 0,
                         progress: Progress = lambda _: None) -> ExampleSet:
    """Build (or read from `cache`) the small world of `seed` and copy it to `out_dir` with `pivotmerge.yaml`.

    `out_dir` gets base/, expert_<domain>/ per domain, joint/ (one projector trained on
    all domains, the upper reference), data/<split>/<domain>/data.jsonl for the splits
    train, dev, test and calib, and the spec; `datasets` maps each domain to its test split.
    """
    root = Path(out_dir).resolve()
    world = build_world(SMALL, seed, cache, progress)
    shutil.copytree(world.root, root, dirs_exist_ok=True)
    copy = world_at(root, SMALL)
    experts = [copy.experts[d] for d in DOMAINS]
    tests = {d: copy.dataset("test", d) for d in DOMAINS}
    spec = write_spec(root, copy.base, experts, calibration=[copy.dataset("calib", d) for d in DOMAINS],
                      evaluate=tests)
    projector = perturbed_names(load_file(copy.base / "model.safetensors"), lm_experts=False)
    return ExampleSet(root=root, base=copy.base, experts=experts, spec=spec, perturbed=projector, datasets=tests)
