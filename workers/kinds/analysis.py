"""Analyses (/v1/analyses): weight distances between models, without merging (`pivotmerge analyze`).
The report is the job's metrics and its one artifact."""

from __future__ import annotations

import json

import pivotmerge
from pivotmerge.analysis.analyze import check_analysis

from workers.kinds import JobKind, JobRun, Outcome, SpecRequest, declare

ANALYSIS_REPORT = "analysis_report.json"


def run_analysis(run: JobRun) -> Outcome:
    report = pivotmerge.analyze(run.request, **run.hooks)
    run.out_dir.mkdir(parents=True)
    (run.out_dir / ANALYSIS_REPORT).write_text(json.dumps(report, indent=2))
    return Outcome(report, report)


# An analysis also needs two models to compare; check_analysis refuses fewer.
ANALYSIS = declare(JobKind(name="analysis", collection="analyses", noun="analysis", label="Analysis",
                           request=SpecRequest, run=run_analysis, check_spec=check_analysis))
