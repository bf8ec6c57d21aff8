"""Stage 2, the plan: a spec checked against the repos, with every merged tensor's method and
resolved parameters fixed before any tensor data is read; device choice.

May import: spec, repos, methods, errors."""
