"""The benchmark's Markdown table and its plot of per-domain accuracy by method."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on CI or servers
import matplotlib.pyplot as plt  # noqa: E402

SHORT = {"caption_loss": "loss", "token_accuracy": "tok acc", "qa_exact_match": "QA EM"}


def _cell(stat: dict[str, float]) -> str:
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}"


def markdown(result: dict[str, Any]) -> str:
    domains, table = result["domains"], result["table"]
    cfg = result["config"]
    lines = [
        f"Test splits, mean ± std over {cfg['seeds']} seed(s); hyperparameters chosen on the dev splits.",
        "",
        "| model | " + " | ".join(f"{d} tok acc" for d in domains) + " | avg loss | avg tok acc | avg QA EM |",
        "|---|" + "---|" * (len(domains) + 3),
    ]
    for name, row in table.items():
        cells = [_cell(row[d]["token_accuracy"]) for d in domains]
        cells += [_cell(row["average"][m]) for m in SHORT]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "QA exact match per domain:", "",
              "| model | " + " | ".join(domains) + " |", "|---|" + "---|" * len(domains)]
    for name, row in table.items():
        lines.append(f"| {name} | " + " | ".join(_cell(row[d]["qa_exact_match"]) for d in domains) + " |")
    lines += ["", "Spearman correlation of each weight-distance metric with the quality lost by a merge"
              " (scenarios: domain pairs, triples and all four; short and full training):", ""]
    spearman = result["spearman"]
    names = list(next(iter(spearman.values())))
    lines += ["| merge | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for method, rho in spearman.items():
        lines.append(f"| {method} | " + " | ".join(f"{rho[n]:+.2f}" for n in names) + " |")
    return "\n".join(lines + _attribution_lines(result["layer_attribution"])) + "\n"


def _attribution_lines(per_seed: list[list[dict[str, Any]]]) -> list[str]:
    """Per seed, the bar's comparisons split by layer: the total difference in test token
    accuracy, and the rival with one layer taken from PivotMerge."""
    layers = [k for k in per_seed[0][0]["test_token_accuracy"] if k != "total"]
    lines = ["", "Layer attribution (test token accuracy; `rival + ours' <layer>`: the rival with that layer"
             " taken from the PivotMerge row, minus the rival):", "",
             "| seed | ours | rival | ours - rival | " + " | ".join(f"rival + ours' {layer}" for layer in layers) + " |",
             "|---|---|---|---|" + "---|" * len(layers)]
    for seed, comparisons in enumerate(per_seed):
        for c in comparisons:
            delta = c["test_token_accuracy"]
            lines.append(f"| {seed} | {c['ours']} | {c['theirs']} | {delta['total']:+.4f} | "
                         + " | ".join(f"{delta[layer]:+.4f}" for layer in layers) + " |")
    return lines


def plot(result: dict[str, Any], path: Path) -> None:
    domains, table = result["domains"], result["table"]
    names = list(table)
    fig, ax = plt.subplots(figsize=(max(8, 0.6 * len(names) * len(domains) / 2), 4.5))
    width = 0.8 / len(domains)
    for j, d in enumerate(domains):
        xs = [i + (j - (len(domains) - 1) / 2) * width for i in range(len(names))]
        ax.bar(xs, [table[n][d]["token_accuracy"]["mean"] for n in names], width,
               yerr=[table[n][d]["token_accuracy"]["std"] for n in names], label=d)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("test token accuracy")
    ax.set_ylim(0, 1)
    ax.legend(ncol=len(domains), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
