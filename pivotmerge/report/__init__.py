"""Stage 6, the report: the merge report written beside a merged model, and its model card.

May import: plan, repos, data (the evaluation's metrics), methods (a searched parameter's description), version."""
