"""Search spaces come from the methods' own description; a spec narrows or fixes them; bad names and
values are refused naming the field."""

from __future__ import annotations

import pytest

from pivotmerge.errors import SpecError
from pivotmerge.methods import Search, get_method
from pivotmerge.spec.schema import spec_from_dict
from pivotmerge.tune.space import MAX_GRID, read_space

SPEC = {"method": "ties", "base_model": "base", "models": [{"model": "a"}, {"model": "b"}],
        "components": ["projector"], "parameters": {"lambda": 0.7}}


def space(section=None, labels=(), spec=SPEC):
    return read_space(spec_from_dict(spec), section, labels)


def test_a_methods_space_is_its_search_markers():
    [c] = space(labels=["iso_cts"]).candidates
    assert c.searched == get_method("iso_cts").search_space
    assert c.searched == {"scale": Search(0.05, 2.0, log=True), "common_space_fraction": Search(0.5, 0.95)}
    assert c.fixed == {}


def test_the_specs_parameters_are_fixed_for_its_own_method_only():
    ties, tsv = space(labels=["ties", "tsv"]).candidates
    assert ties.fixed == {"scale": 0.7} and set(ties.searched) == {"density"}
    assert tsv.fixed == {} and set(tsv.searched) == {"scale"}


def test_the_tune_section_narrows_fixes_and_adds_parameters_and_labels_settings_of_a_method():
    section = {"space": {"tsv": {"alpha": {"low": 0.2, "high": 1.5}},
                         "pivotmerge": {"spectrum": ["keep", "flatten"], "energy": 0.8,
                                        "layer_weighting": ["uniform", "weight"]},
                         "pm_data": {"method": "pivotmerge", "layer_weighting": "data", "combine": "gram",
                                     "energy": 0.9}}}
    tsv, pm, pm_data = space(section).candidates
    assert tsv.searched == {"scale": Search(0.2, 1.5, log=True)}  # the declared range was log: so is the narrowed one
    assert pm.fixed == {"energy": 0.8}
    assert pm.searched["spectrum"] == Search(choices=("keep", "flatten"))
    assert pm.searched["layer_weighting"] == Search(choices=("uniform", "weight"))  # not declared, searched on request
    assert pm_data.method.name == "pivotmerge" and pm_data.fixed == {"layer_weighting": "data", "combine": "gram",
                                                                     "energy": 0.9}
    assert "energy" not in pm_data.searched and "scale_max" in pm_data.searched


def test_the_first_trial_of_a_candidate_is_what_a_plain_merge_of_the_spec_would_use():
    [plain] = space(labels=["pivotmerge"]).candidates
    assert plain.defaults()["spectrum"] == "keep" and plain.defaults()["residual_weight"] == 0.0
    # the separation's scales, scale_min 0 included (searched on a linear range that holds it)
    assert (plain.defaults()["scale_min"], plain.defaults()["scale_max"]) == (0.0, 0.6)
    with_data = {**SPEC, "calibration": {"dataset": "calib.jsonl"}}
    [data] = space(labels=["pivotmerge"], spec=with_data).candidates
    # Given data, PivotMerge's data defaults: spectrum kept, residuals whole, scale 1 (and, not searched,
    # the gram combine refitted on the merged model's inputs, as a plain merge does).
    assert data.fixed == {}
    assert {k: data.defaults()[k] for k in ("spectrum", "residual_weight", "scale_min", "off_diagonal_scale")} == {
        "spectrum": "keep", "residual_weight": 1.0, "scale_min": 1.0, "off_diagonal_scale": 1.0}
    assert data.defaults()["energy"] == 0.95  # not a data default: the method's own


def test_a_discrete_space_is_a_grid_and_a_range_is_not():
    section = {"space": {"ties": {"density": [0.2, 0.5]}, "tsv": {"scale": [0.5, 1.0, 1.5]}}}
    grid = space(section).grid()
    assert grid == [("ties", {"density": 0.2}), ("ties", {"density": 0.5}),
                    ("tsv", {"scale": 0.5}), ("tsv", {"scale": 1.0}), ("tsv", {"scale": 1.5})]
    assert space({"space": {"tsv": {}}}).grid() is None
    big = {"space": {"tsv": {"scale": [i / 1000 + 0.1 for i in range(MAX_GRID + 1)]}}}
    assert space(big).grid() is None


@pytest.mark.parametrize(("section", "labels", "message"), [
    (None, ["nope"], "--methods: unknown merge method 'nope'"),
    ({"space": {"x": {"method": "nope"}}}, [], "tune.space.x.method: unknown merge method 'nope'"),
    ({"space": {"ties": {"foo": [1, 2]}}}, [],
     "tune.space.ties.foo: not a parameter of 'ties'; it takes: density, normalize, scale"),
    ({"space": {"ties": {"grams": 1}}}, [], "tune.space.ties.grams: not a parameter of 'ties'"),
    ({"space": {"regmean": {"grams": [1]}}}, [], "tune.space.regmean.grams: not a parameter of 'regmean'"),
    ({"space": {"ties": {"density": []}}}, [], "tune.space.ties.density: an empty list leaves nothing to search"),
    ({"space": {"ties": {"density": {"low": 0.9, "high": 0.1}}}}, [],
     "tune.space.ties.density: low and high must be numbers"),
    ({"space": {"tsv": {"scale": {"low": 0, "high": 1}}}}, [], "tune.space.tsv.scale: a log range needs low > 0"),
    ({"space": {"pivotmerge": {"spectrum": ["keep", "sideways"]}}}, [],
     "tune.space.pivotmerge.spectrum: Input should be"),
    ({"space": {"slerp": {}}}, [], "tune.space.slerp: method 'slerp' cannot merge 2 models"),
    ({"space": ["ties"]}, [], "tune.space: expected a mapping"),
    ({"space": {"ties": [0.5]}}, [], "tune.space.ties: expected a mapping"),
])
def test_bad_spaces_are_refused_naming_the_field(section, labels, message):
    spec = SPEC if "slerp" not in str(section) else {**SPEC, "models": SPEC["models"] + [{"model": "c"}]}
    with pytest.raises(SpecError) as err:
        space(section, labels, spec)
    assert str(err.value).startswith(message.replace("2 models", f"{len(spec['models'])} models"))
