"""Celery workers: run jobs with the pivotmerge engine and record their progress."""
