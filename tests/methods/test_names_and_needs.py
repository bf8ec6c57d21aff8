"""One name per concept (old spellings still accepted) and each method's own statement of its data needs."""

from __future__ import annotations

import pydantic
import pytest

from pivotmerge.fold.folding import FoldSpec
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
    assert with_scale == {"task_arithmetic", "ties", "dare_linear", "dare_ties", "tsv", "iso_c", "iso_cts", "wudi", "ace"}
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
    # the cross Grams only when each expert's outputs on its own inputs are the target
    ("regmean", {"gram_inputs": "merged", "expert_target": "own_inputs"},
     {Need.GRAMS, Need.MERGED_INPUTS, Need.CROSS_GRAMS}),
    ("regmean", {"expert_target": "own_inputs"}, {Need.GRAMS}),
    ("pivotmerge", {}, set()),
    ("pivotmerge", {"gram_inputs": "merged"}, set()),  # without combine: gram the inputs are not used
    ("pivotmerge", {"layer_weighting": "data"}, {Need.ALIGNMENT}),
    ("pivotmerge", {"combine": "gram", "gram_inputs": "merged"}, {Need.GRAMS, Need.MERGED_INPUTS}),
    ("pivotmerge", {"combine": "gram", "gram_inputs": "merged", "expert_target": "own_inputs"},
     {Need.GRAMS, Need.MERGED_INPUTS, Need.CROSS_GRAMS}),
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


def _resolved(parameters: dict, calibration: dict | None = None, per_expert: bool = False):
    models = [{**m, "calibration": calibration} if per_expert else m for m in MODELS]
    spec = spec_from_dict({"method": "pivotmerge", "base_model": "base", "models": models, "parameters": parameters,
                           **({"calibration": calibration} if calibration and not per_expert else {})})
    return resolve_params(spec, get_method("pivotmerge"), "projector.linear_1.weight", 0.0).params


DATA = {"dataset": "calib.jsonl"}


@pytest.mark.parametrize("per_expert", [False, True], ids=["spec-wide", "per expert"])
def test_calibration_data_and_no_parameters_resolve_to_the_data_mode(per_expert):
    params = _resolved({}, DATA, per_expert)
    assert params.model_dump(include=set(get_method("pivotmerge").with_calibration)) == {
        "combine": "gram", "gram_inputs": "merged", "expert_target": "own_inputs", "off_diagonal_scale": 1.0,
        "spectrum": "keep", "residual_weight": 1.0,
        "scale_min": 1.0, "scale_max": 1.0}
    assert get_method("pivotmerge").needs_for(params) == {Need.GRAMS, Need.MERGED_INPUTS, Need.CROSS_GRAMS}
    free = _resolved({})
    assert (free.combine, free.gram_inputs, free.off_diagonal_scale, free.spectrum, free.residual_weight, free.scale_min,
            free.scale_max, free.layer_weighting) == ("covariance", "expert", 0.9, "keep", 0.0, 0.0, 0.6, "separation")


def test_values_the_spec_sets_win_over_the_data_defaults_under_any_spelling():
    params = _resolved({"spectrum": "flatten", "gram_alpha": 0.5, "lambda_min": 0.5}, DATA)
    assert (params.spectrum, params.off_diagonal_scale, params.scale_min) == ("flatten", 0.5, 0.5)
    assert (params.combine, params.gram_inputs, params.residual_weight) == ("gram", "merged", 1.0)
    # A filtered value that does not match this tensor sets nothing for it: the data default applies.
    params = _resolved({"combine": [{"filter": "linear_2", "value": "sum"}]}, DATA)
    assert params.combine == "gram"


def test_with_calibration_defaults_must_name_valid_parameters_of_a_method_that_reads_data():
    from pivotmerge.methods import method
    from pivotmerge.methods.regmean import Params as RegMeanParams
    from pivotmerge.methods.regmean import needs as regmean_needs

    with pytest.raises(ValueError, match="names no parameter: gram_alpha"):
        method("x", summary="", params=RegMeanParams, needs=regmean_needs,
               with_calibration={"gram_alpha": 1.0})
    with pytest.raises(ValueError, match="off_diagonal_scale"):
        method("x", summary="", params=RegMeanParams, needs=regmean_needs,
               with_calibration={"off_diagonal_scale": 2.0})
    with pytest.raises(ValueError, match="reads calibration data"):
        method("x", summary="", params=RegMeanParams, with_calibration={"off_diagonal_scale": 1.0})


@pytest.mark.parametrize("value", ["1e400", "nan", "-inf", float("inf")])
def test_non_finite_parameters_are_refused_by_every_method_even_as_strings(value):
    # The spec checks numbers; a string like "1e400" reached the float field and became inf (scale nan, weights nan).
    with pytest.raises(pydantic.ValidationError, match="scale_min"):
        get_method("pivotmerge").params.model_validate({"scale_min": value})
    with pytest.raises(pydantic.ValidationError, match="scale"):
        get_method("task_arithmetic").params.model_validate({"scale": value})
