"""Data: image-text datasets, evaluation of model folders, calibration statistics, and the
tiny example repos.

May import: plan (calibration needs the plan), repos, methods (what each method needs), spec, errors, progress."""
