"""Stage 3-5, the run: stream a planned merge tensor by tensor (read -> method -> write),
whole or split into parts by output shard.

May import: plan, repos, methods, data, report, spec, errors, progress, version."""
