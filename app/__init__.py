"""The PivotMerge HTTP service: FastAPI routes, auth, settings and database models."""
