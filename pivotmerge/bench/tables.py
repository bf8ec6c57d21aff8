"""The benchmark's Markdown tables and its plot of per-domain accuracy by row."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # files only: no display on CI or servers
import matplotlib.pyplot as plt  # noqa: E402


def _cell(stat: dict[str, float]) -> str:
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}"


def _interval(bounds: Sequence[float] | None) -> str:
    return "-" if bounds is None else f"[{bounds[0]:+.4f}, {bounds[1]:+.4f}]"


def _table(rows: dict[str, Any], domains: list[str]) -> list[str]:
    lines = ["| row | " + " | ".join(domains) + " | **average** | avg caption loss |", "|---|" + "---|" * (len(domains) + 2)]
    for name, row in rows.items():
        cells = [_cell(row[d]["token_accuracy"]) for d in domains]
        cells += [f"**{_cell(row['average']['token_accuracy'])}**", _cell(row["average"]["caption_loss"])]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def markdown(result: dict[str, Any]) -> str:
    domains, seeds = result["domains"], result["suite"]["seeds"]
    lines = [f"Test token accuracy per domain, mean ± std over {seeds} seed(s).", "",
             "Reference rows (not merges): the shared initialisation, each expert, the joint model (what the experts"
             " train, trained on every domain), and the experts each on its own domain (the level a merge that"
             " distils the experts aims for).", ""]
    lines += _table(result["reference"], domains)
    lines += ["", "**Tuned**: each row's grid searched on the dev splits (the search is in raw_scores.json), "
              "the dev-chosen merge scored on test.", ""]
    lines += _table(result["tuned"], domains)
    lines += ["", "**Defaults**: each method with no parameters (data rows: each expert's calibration set and "
              "nothing else; RegMean++ sets `gram_inputs: merged`).", ""]
    lines += _table(result["defaults"], domains)
    lines += ["", "Paired differences per seed (mean test token accuracy; each seed's world is shared by all rows):", "",
              "| comparison | " + " | ".join(f"seed {i}" for i in range(seeds)) + " | mean | 95% interval | seeds won |",
              "|---|" + "---|" * (seeds + 3)]
    for p in result["paired"]:
        lines.append(f"| {p['comparison']} | " + " | ".join(f"{d:+.4f}" for d in p["per_seed"])
                     + f" | {p['mean']:+.4f} | {_interval(p['interval95'])} | {p['wins']}/{seeds} |")
    lines += ["", "The interval is Student's t over seeds (each seed a whole world): one that holds 0 is a "
              "difference this suite does not resolve."]
    if result["merge_seconds"]:
        lines += ["", "Seconds per merge (mean over every tuned candidate and the defaults merge, all seeds; wall on"
                  " the machine as it was, and CPU of the whole process, all threads):", "",
                  "| row | wall s | CPU s |", "|---|---|---|"]
        lines += [f"| {name} | {t['wall']:.1f} | {t['cpu']:.1f} |" for name, t in result["merge_seconds"].items()]
    lines += ["", "Gates (tests/bench): " + ", ".join(f"{k} {v:+.3f}" for k, v in result["gates"].items()), ""]
    if result["spearman"]:  # a run of chosen rows, or a suite without scenarios, has none
        lines += _spearman_lines(result["spearman"])
    return "\n".join(lines + _attribution_lines(result["layer_attribution"])) + "\n"


def _spearman_lines(spearman: dict[str, dict[str, float]]) -> list[str]:
    names = list(next(iter(spearman.values())))
    lines = ["Spearman correlation of each weight-distance metric (between the merged experts' task vectors)"
             " with the quality a merge at defaults loses (scenarios: every subset of two or more domains):",
             "", "| merge | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for method, rho in spearman.items():
        lines.append(f"| {method} | " + " | ".join(f"{rho[n]:+.2f}" for n in names) + " |")
    return lines


def _attribution_lines(per_seed: list[list[dict[str, Any]]]) -> list[str]:
    if not any(per_seed):  # a run of chosen rows may have no pair to attribute
        return []
    layers = [k for k in next(c for s in per_seed for c in s)["test_token_accuracy"] if k != "total"]
    lines = ["", "Layer attribution (test token accuracy; `rival + ours' <part>`: the rival with that projector layer"
             " or component taken from the PivotMerge row, minus the rival):", "",
             "| seed | ours | rival | ours - rival | " + " | ".join(f"rival + ours' {layer}" for layer in layers) + " |",
             "|---|---|---|---|" + "---|" * len(layers)]
    for seed, comparisons in enumerate(per_seed):
        for c in comparisons:
            delta = c["test_token_accuracy"]
            lines.append(f"| {seed} | {c['ours']} | {c['theirs']} | {delta['total']:+.4f} | "
                         + " | ".join(f"{delta[layer]:+.4f}" for layer in layers) + " |")
    return lines


def plot(result: dict[str, Any], path: Path) -> None:
    domains = result["domains"]
    table = {**result["reference"], **result["tuned"]}
    names = list(table)
    fig, ax = plt.subplots(figsize=(max(8, 0.35 * len(names) * len(domains) / 2), 4.5))
    width = 0.8 / len(domains)
    for j, d in enumerate(domains):
        xs = [i + (j - (len(domains) - 1) / 2) * width for i in range(len(names))]
        ax.bar(xs, [table[n][d]["token_accuracy"]["mean"] for n in names], width,
               yerr=[table[n][d]["token_accuracy"]["std"] for n in names], label=d)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("test token accuracy (tuned rows)")
    ax.set_ylim(0, 1)
    ax.legend(ncol=len(domains), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
