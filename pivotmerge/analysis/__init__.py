"""Analysis without merging (weight-distance metrics) and expert folding within one model.

May import: plan, run (the write loop), repos, methods, data, report, spec, errors, progress, version."""
