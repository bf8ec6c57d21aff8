"""Merge jobs (/v1/merges): `pivotmerge merge` as a job. The output folder is the merged model; a spec
with `split: N` runs as parts on the split workers (workers.split_parts), and `push_to_hub` uploads it."""

from __future__ import annotations

import pivotmerge

from workers.kinds import JobKind, JobRun, Outcome, SpecRequest, declare


def run_merge(run: JobRun) -> Outcome:
    report = pivotmerge.merge(run.request, run.out_dir, **run.hooks).as_json()
    return Outcome(report, report.get("evaluation"))  # the row holds what merge_report.json holds


MERGE = declare(JobKind(name="merge", collection="merges", noun="merge", label="Merge", request=SpecRequest,
                        run=run_merge, check_spec=pivotmerge.check, can_push=True, can_split=True))
