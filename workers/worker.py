"""The worker's Celery app, configured from PIVOTMERGE_* variables:

    celery -A workers.worker worker -Q gpu
"""

from typing import Any

from celery.signals import worker_init

from core.settings import Settings

from workers.celery_app import make_celery

celery = make_celery(Settings())


@worker_init.connect
def preload_engine(**_: Any) -> None:
    """Import what a merge would import lazily, once, in the parent process.

    Jobs run in forked children (a new one whenever a job killed the last);
    forking a parent that already holds the methods and transformers saves
    seconds of imports. No CUDA is touched here, so forking stays safe.
    """
    import transformers  # noqa: F401  (the engine loads configs and processors with it)

    from pivotmerge.methods import all_methods

    all_methods()
