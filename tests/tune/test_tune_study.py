"""Studies driven directly: a failing trial is recorded and the study goes on, cancel stops it
between trials and writes nothing, the time budget stops it, calibration data is measured once
per kind, and a trial's tensors are the engine's own."""

from __future__ import annotations


import pytest
import torch
from safetensors.torch import load_file

from pivotmerge import methods
from pivotmerge.data.datasets import load_dataset
from pivotmerge.errors import MergeCancelled
from pivotmerge.methods import MethodParams, Need, method
from pivotmerge.methods.fields import Scale, scale_field
from pivotmerge.run.merge import merge
from pivotmerge.spec.schema import DatasetRef, spec_from_dict
from pivotmerge.tune import trials as trials_module
from pivotmerge.tune.space import read_space
from pivotmerge.tune.study import local_batches, run_study, run_trial
from pivotmerge.tune.trials import TrialRunner
from pivotmerge.tune.tuning import tune


class FragileParams(MethodParams):
    scale: Scale = scale_field()


def fragile(tensors, base, weights, params, generator=None):
    """Task arithmetic that breaks above scale 1, to make a trial fail."""
    if params.scale > 1.0:
        raise RuntimeError("scale above 1 breaks this method")
    return base + params.scale * sum(w * (t - base) for w, t in zip(weights, tensors))


@pytest.fixture
def fragile_method(monkeypatch):
    monkeypatch.setattr(methods, "_REGISTRY", dict(methods.all_methods()))
    method("fragile", summary="breaks above scale 1", params=FragileParams)(fragile)


@pytest.fixture(scope="module")
def spec(example):
    data = {"method": "task_arithmetic", "base_model": str(example.base),
            "models": [{"model": str(e)} for e in example.experts],
            "components": ["projector"], "calibration": {"dataset": str(example.datasets["shapes"]), "limit": 4}}
    return spec_from_dict(data)


@pytest.fixture(scope="module")
def runner(spec, example):
    with TrialRunner(spec, [load_dataset(example.datasets["dots"], limit=4)], "loss") as r:
        yield r


def test_a_failing_trial_is_recorded_and_the_study_goes_on(fragile_method, spec, runner):
    space = read_space(spec, {"space": {"fragile": {"scale": [0.5, 1.5, 0.25]}}})
    study = run_study(space, "loss", local_batches(runner), trials=10)
    assert [t.state for t in study.trials] == ["complete", "failed", "complete"]
    failed = study.trials[1]
    assert failed.error == "RuntimeError: scale above 1 breaks this method" and failed.objective is None
    assert failed.params == {"scale": 1.5} and failed.dev == []
    assert study.best in (0, 2)


def test_cancel_stops_the_study_between_trials(spec, runner):
    space = read_space(spec, {"space": {"task_arithmetic": {}}})
    seen = []
    with pytest.raises(MergeCancelled):
        run_study(space, "loss", local_batches(runner), trials=10, on_trial=seen.append,
                  should_cancel=lambda: len(seen) >= 2)
    assert len(seen) == 2


def test_cancel_mid_study_writes_no_output(spec, example, tmp_path):
    seen = []
    with pytest.raises(MergeCancelled):
        tune(spec, {}, [DatasetRef(dataset=str(example.datasets["dots"]), limit=4)], tmp_path / "out", trials=5,
             on_trial=seen.append, should_cancel=lambda: len(seen) >= 1)
    assert len(seen) == 1 and list(tmp_path.iterdir()) == []


def test_the_time_budget_stops_the_study_after_the_trial_running_when_it_ends(spec, runner):
    space = read_space(spec, {"space": {"task_arithmetic": {}}})
    study = run_study(space, "loss", local_batches(runner), trials=50, timeout_s=1e-6)
    assert study.stopped == "time" and len(study.trials) == 1 and study.budget_seconds == 1e-6


def test_calibration_is_measured_once_per_kind_of_data(spec, example, monkeypatch):
    calls = []
    real = trials_module.calibrate
    monkeypatch.setattr(trials_module, "calibrate",
                        lambda plan, *a, **k: calls.append(frozenset(plan.needs)) or real(plan, *a, **k))
    space = read_space(spec, {"space": {"regmean": {"off_diagonal_scale": [0.5, 0.9, 1.0]},
                                        "pm_data": {"method": "pivotmerge", "layer_weighting": "data",
                                                    "scale_max": [0.5, 1.0]}}})
    with TrialRunner(spec, [load_dataset(example.datasets["dots"], limit=4)], "loss") as r:
        study = run_study(space, "loss", local_batches(r), trials=6)
    assert {t.label for t in study.trials} == {"regmean", "pm_data"}
    assert {t.state for t in study.trials} <= {"complete", "repeat"} and len(study.trials) == 6
    # pm_data takes PivotMerge's data defaults (the spec gives calibration): gram combine refitted on
    # the merged model's inputs, so it needs Grams besides its alignment scores; each kind of data is
    # still measured once, whichever expert_target a trial draws (the refit's merged-input Grams, and
    # the cross Grams of `own_inputs`, change with every trial and are measured per trial).
    refit = {"merged_input_grams", "cross_grams"}
    assert len(calls) == 2
    measured = sorted(sorted(n.value for n in c if n.value not in refit) for c in calls)
    assert measured == [["alignment", "grams"], ["grams"]]
    assert all(refit & {n.value for n in c} for c in calls if Need.ALIGNMENT in c)


def test_a_trials_tensors_are_the_engines_merge(spec, runner, tmp_path):
    params = {"scale": 0.37, "density": 0.6}
    ties = methods.get_method("ties")
    in_memory = runner.merged(runner.plan(ties, params))
    merge({**spec.model_dump(mode="json"), "method": "ties", "parameters": params}, tmp_path / "out")
    written = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert in_memory and all(torch.equal(t, written[n]) for n, t in in_memory.items())


def test_a_refit_trials_tensors_are_the_engines_block_refit(spec, runner, tmp_path):
    """RegMean++ (`gram_inputs: merged`): the trial, its blocks refitted in order as `merge` refits
    them (`refit_blocks`), gives the tensors `merge` writes."""
    params = {"gram_inputs": "merged", "off_diagonal_scale": 0.9}
    regmean = methods.get_method("regmean")
    in_memory = runner.merged(runner.plan(regmean, params))
    one_pass = runner.merged(runner.plan(regmean, {**params, "gram_inputs": "expert"}))
    merge({**spec.model_dump(mode="json"), "method": "regmean", "parameters": params}, tmp_path / "out")
    written = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert in_memory and all(torch.equal(t, written[n]) for n, t in in_memory.items())
    assert any(not torch.equal(t, one_pass[n]) for n, t in in_memory.items())  # the refit changed the merge


def test_batches_fanned_out_to_two_runners_choose_what_one_process_chooses(spec, example, runner):
    """Two runners (each with its own loaded model, as two workers would be) share each batch; the study
    proposes, scores and chooses exactly what one process running the same batches does."""
    from concurrent.futures import ThreadPoolExecutor

    space = read_space(spec, {"space": {"task_arithmetic": {}, "tsv": {}}})
    alone = run_study(space, "loss", local_batches(runner), trials=6, seed=3, batch_size=2)
    threads = torch.get_num_threads()
    dev = [load_dataset(example.datasets["dots"], limit=4)]
    with TrialRunner(spec, dev, "loss") as first, TrialRunner(spec, dev, "loss") as second, \
            ThreadPoolExecutor(max_workers=2) as pool:
        def fan_out(proposals):
            workers = [first, second]
            return list(pool.map(lambda ip: run_trial(workers[ip[0] % 2], ip[1]), enumerate(proposals)))

        together = run_study(space, "loss", fan_out, trials=6, seed=3, batch_size=2)
    torch.set_num_threads(threads)
    assert ([(t.label, t.params, t.objective) for t in together.trials]
            == [(t.label, t.params, t.objective) for t in alone.trials])
    assert together.best == alone.best
    assert len({json_key(t.params) for t in alone.trials}) > 2  # the sampler explored beyond the defaults


def json_key(params):
    import json

    return json.dumps(params, sort_keys=True)


def test_the_qa_objective_scores_generated_answers(spec, example):
    space = read_space(spec, {"space": {"task_arithmetic": {"scale": [0.5]}}})
    with TrialRunner(spec, [load_dataset(example.datasets["shapes"], limit=4)], "qa") as r:
        [trial] = run_study(space, "qa", local_batches(r), trials=3).trials
    [dev] = trial.dev
    assert dev.questions == 4 and dev.exact_match is not None
    assert trial.objective == dev.exact_match and trial.objective in (0.0, 0.25, 0.5, 0.75, 1.0)
