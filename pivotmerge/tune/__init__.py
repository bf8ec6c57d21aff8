"""Tuning: a study searches methods and their parameters on dev data (Optuna), each trial a merge
in memory scored on the dev sets; the best trial's merge is written as a normal merge output.
`space` reads the search space from the methods' own description (narrowed by the spec), `trials`
runs fast trials, `study` drives Optuna, `tuning` ties them to a spec and an output folder.

May import: spec, plan, repos, methods, run, data, report, errors, progress."""
