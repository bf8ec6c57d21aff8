"""`pivotmerge bench quality --rows`: only the named rows are merged, and the tables cope with what is left out."""

from __future__ import annotations

import pytest

from pivotmerge.bench.domains import DOMAINS
from pivotmerge.bench.quality import FULL, OWN_DOMAINS, QUICK, own_domains, paired, with_rows
from pivotmerge.bench.tables import markdown
from pivotmerge.cli.main import main


def test_rows_choose_what_a_suite_merges():
    suite = with_rows(FULL, ("cart", "pivotmerge"))
    assert [suite.runs(r) for r in ("cart", "pivotmerge", "iso_c")] == [True, True, False]
    assert with_rows(FULL, None) is FULL and FULL.runs("iso_c")
    quick = with_rows(QUICK, ("cart", "pivotmerge"))  # quick mode's own row list still applies
    assert [quick.runs(r) for r in ("cart", "pivotmerge")] == [False, True]


def test_an_unknown_row_is_a_usage_error_naming_it(capsys):
    with pytest.raises(ValueError, match=r"^--rows: unknown row 'cartt'; rows: task_arithmetic, "):
        with_rows(FULL, ("cart", "cartt"))
    with pytest.raises(SystemExit) as exc:
        main(["bench", "quality", "--rows", "cart,cartt", "--out", "unused", "--cache", "unused"])
    assert exc.value.code == 2
    assert "Error: --rows: unknown row 'cartt'" in capsys.readouterr().err


def _row(accuracy: float, dev: float | None = None) -> dict:
    per = {d: {"token_accuracy": accuracy, "caption_loss": 1.0} for d in (*DOMAINS, "average")}
    return {"test": per, "search": [{"params": {}, "dev_token_accuracy": accuracy if dev is None else dev}]}


def test_paired_differences_of_a_partial_run():
    # cart is the dev-chosen data-free rival (dev .7 against .6), so the bar compares with its test score .65
    runs = [{"tuned": {"pivotmerge": _row(0.70), "cart": _row(0.65, dev=0.7), "ace": _row(0.68, dev=0.6)},
             "defaults": {"pivotmerge": _row(0.69)}}]
    got = {p["comparison"]: p["per_seed"][0] for p in paired(runs)}
    assert got == pytest.approx({
        "pivotmerge - best data-free baseline (dev-chosen per seed)": 0.05,
        "pivotmerge defaults - best data-free baseline (dev-chosen per seed)": 0.04,
        "pivotmerge - ace": 0.02, "pivotmerge - cart": 0.05,
        "pivotmerge defaults - pivotmerge tuned": -0.01})
    assert paired([{"tuned": {"cart": _row(0.65)}, "defaults": {}}]) == []


def _experts(own: dict[str, float]) -> dict:
    """Reference rows where expert d scores own[d] on its own domain and 0.1 elsewhere."""
    ref = {f"expert_{d}": {"test": {o: {"token_accuracy": own[d] if o == d else 0.1,
                                        "caption_loss": 2.0 if o == d else 5.0} for o in DOMAINS}}
           for d in DOMAINS}
    ref[OWN_DOMAINS] = {"test": own_domains(ref)}
    return ref


def test_the_experts_own_domain_row_takes_each_domain_from_its_expert():
    own = dict(zip(DOMAINS, (0.9, 1.0, 0.8, 0.7)))
    row = _experts(own)[OWN_DOMAINS]["test"]
    assert {d: row[d]["token_accuracy"] for d in DOMAINS} == own
    assert row["average"] == pytest.approx({"token_accuracy": 0.85, "caption_loss": 2.0})


def test_the_data_rows_are_paired_with_the_dev_best_data_rival():
    # regmean is the dev-chosen data rival (dev .9 against RegMean++'s .8), so both comparisons use its test .85;
    # the experts average .85 on their own domains
    runs = [{"tuned": {"pivotmerge_data": _row(0.88), "regmean": _row(0.85, dev=0.9),
                       "regmean_plus_plus": _row(0.87, dev=0.8)},
             "defaults": {"pivotmerge_data": _row(0.86)},
             "reference": _experts(dict(zip(DOMAINS, (0.9, 1.0, 0.8, 0.7))))}]
    got = {p["comparison"]: p["per_seed"][0] for p in paired(runs)}
    assert got == pytest.approx({
        "pivotmerge_data - best data baseline (dev-chosen per seed)": 0.03,
        "pivotmerge_data defaults - best data baseline (dev-chosen per seed)": 0.01,
        "pivotmerge_data - experts on their own domains": 0.03,
        "best data baseline (dev-chosen per seed) - experts on their own domains": 0.0,
        "pivotmerge_data - regmean_plus_plus": 0.01,
        "pivotmerge_data defaults (calibration, no parameters) - pivotmerge_data tuned": -0.02})


def test_tables_of_a_partial_run_leave_out_scenarios_and_attribution():
    stats = {d: {m: {"mean": 0.5, "std": 0.0} for m in ("token_accuracy", "caption_loss")}
             for d in (*DOMAINS, "average")}
    result = {"domains": list(DOMAINS), "suite": {"seeds": 1}, "reference": {"base": stats}, "tuned": {"cart": stats},
              "defaults": {}, "paired": [], "gates": {"expert_specialisation": 0.2}, "spearman": {},
              "layer_attribution": [[]], "merge_seconds": {}}
    text = markdown(result)
    assert "| cart | 0.500" in text and "Spearman" not in text and "Layer attribution" not in text


def test_paired_differences_carry_the_t_interval_of_their_mean():
    # per seed +.02, +.04, -.03: mean .01, sample sd sqrt(((.01)^2 + (.03)^2 + (.04)^2) / 2) = .036056;
    # t(.975, 2 dof) = 4.302653, so the half width is 4.302653 * .036056 / sqrt(3) = .089567 and 0 lies inside
    runs = [{"tuned": {"pivotmerge": _row(0.70 + d), "cart": _row(0.70)}, "defaults": {}} for d in (0.02, 0.04, -0.03)]
    got = {p["comparison"]: p for p in paired(runs)}["pivotmerge - cart"]
    assert got["mean"] == pytest.approx(0.01)
    assert got["interval95"] == pytest.approx((0.01 - 0.089567, 0.01 + 0.089567), abs=1e-6)
    # one seed has no interval; equal differences have none of width
    one = paired(runs[:1])[0]
    assert one["interval95"] is None
    same = paired([{"tuned": {"pivotmerge": _row(0.75), "cart": _row(0.70)}, "defaults": {}}] * 4)[0]
    assert same["interval95"] == pytest.approx((0.05, 0.05))
    stats = {d: {m: {"mean": 0.5, "std": 0.0} for m in ("token_accuracy", "caption_loss")}
             for d in (*DOMAINS, "average")}
    result = {"domains": list(DOMAINS), "suite": {"seeds": 3}, "reference": {"base": stats}, "tuned": {"cart": stats},
              "defaults": {}, "paired": paired(runs), "gates": {}, "spearman": {}, "layer_attribution": [[]],
              "merge_seconds": {}}
    row = "| pivotmerge - cart | +0.0200 | +0.0400 | -0.0300 | +0.0100 | [-0.0796, +0.0996] | 2/3 |"
    assert row in markdown(result)
