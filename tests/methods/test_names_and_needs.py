"""One name per concept (old spellings still accepted) and each method's own statement of its data needs."""

from __future__ import annotations

import pytest

from pivotmerge.analysis.folding import FoldSpec
from pivotmerge.errors import SpecError
from pivotmerge.methods import Need, all_methods, get_method
from pivotmerge.plan.params import resolve_params
from pivotmerge.spec.schema import spec_from_dict

MODELS = [{"model": "a"}, {"model": "b"}]


@pytest.mark.parametrize("method, old, new", [
    ("task_arithmetic", "lambda", "scale"), ("ties", "lambda", "scale"), ("dare_linear", "lambda", "scale"),
    ("tsv", "alpha", "scale"), ("iso_c", "alpha", "scale"), ("iso_cts", "alpha", "scale"),
    ("regmean", "alpha", "off_diagonal_scale"), ("pivotmerge", "gram_alpha", "off_diagonal_scale"),
    ("pivotmerge", "lambda_max", "scale_max"), ("pivotmerge", "lambda_min", "scale_min"),
])
def test_old_spellings_resolve_to_the_canonical_parameter(method, old, new):
    m = get_method(method)
    spec = spec_from_dict({"method": method, "base_model": "base", "models": MODELS, "parameters": {old: 0.75}})
    assert getattr(resolve_params(spec, m, "x.weight", 0.0).params, new) == 0.75
    assert m.params.model_validate({old: 0.75}).model_dump(exclude_defaults=True) == {new: 0.75}


def test_one_parameter_under_two_names_is_refused_naming_both():
    with pytest.raises(SpecError, match=r"^parameters\.lambda: names the same parameter as scale \(give scale once\)$"):
        spec_from_dict({"method": "ties", "base_model": "base", "models": MODELS, "parameters": {"scale": 1.0, "lambda": 0.5}})


def test_scale_means_the_merged_updates_scale_in_every_method_that_has_one():
    with_scale = {n for n, m in all_methods().items() if "scale" in m.params.model_fields}
    assert with_scale == {"task_arithmetic", "ties", "dare_linear", "dare_ties", "tsv", "iso_c", "iso_cts"}
    assert not any("alpha" in m.params.model_fields or "lambda" in m.params.model_fields for m in all_methods().values())


def test_folding_takes_the_same_names():
    spec = FoldSpec.model_validate({"method": "regmean", "groups": {"a": {"pattern": "x", "replace": "y"},
                                                                    "b": {"pattern": "z", "replace": "y"}},
                                    "lambda": 0.5, "alpha": 0.3})
    assert (spec.scale, spec.off_diagonal_scale) == (0.5, 0.3)


@pytest.mark.parametrize("method, params, needs", [
    ("ties", {}, set()),
    ("regmean", {}, {Need.GRAMS}),
    ("regmean", {"gram_inputs": "merged"}, {Need.GRAMS, Need.MERGED_INPUTS}),
    ("pivotmerge", {}, set()),
    ("pivotmerge", {"gram_inputs": "merged"}, set()),  # without combine: gram the inputs are not used
    ("pivotmerge", {"layer_weighting": "data"}, {Need.ALIGNMENT}),
    ("pivotmerge", {"combine": "gram", "gram_inputs": "merged"}, {Need.GRAMS, Need.MERGED_INPUTS}),
])
def test_a_method_states_the_calibration_data_its_parameters_need(method, params, needs):
    m = get_method(method)
    assert m.needs_for(m.params.model_validate(params)) == needs
    assert needs <= set(m.data)


def test_needs_follow_the_parameters_each_tensor_resolves_to():
    spec = spec_from_dict({"method": "pivotmerge", "base_model": "base", "models": MODELS,
                           "parameters": {"combine": [{"filter": "linear_1", "value": "gram"}, {"value": "sum"}]}})
    m = get_method("pivotmerge")
    assert m.needs_for(resolve_params(spec, m, "projector.linear_1.weight", 0.0).params) == {Need.GRAMS}
    assert m.needs_for(resolve_params(spec, m, "projector.linear_2.weight", 1.0).params) == set()
