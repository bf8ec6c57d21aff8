"""The worker's Celery app, configured from PIVOTMERGE_* variables:

    celery -A workers.worker worker -Q gpu
"""

from typing import Any

from celery.signals import setup_logging, worker_init

from core.logs import configure_logging
from core.settings import Settings

from workers import heartbeat  # noqa: F401  (its signal handlers beat while the worker runs)
from workers.celery_app import make_celery

celery = make_celery(Settings())


@setup_logging.connect
def structured_logs(**_: Any) -> None:
    """Our log lines (core.logs) instead of Celery's: each carries the job, team and attempt it is about."""
    settings = Settings()
    configure_logging(settings.log_format, settings.log_level)


@worker_init.connect
def preload_engine(**_: Any) -> None:
    """Import what a merge would import lazily, once, in the parent process.

    Jobs run in forked children (a new one whenever a job killed the last);
    forking a parent that already holds the methods and transformers saves
    seconds of imports. No CUDA is touched here, so forking stays safe.
    """
    import transformers  # noqa: F401  (the engine loads configs and processors with it)

    from pivotmerge.methods import all_methods
    from workers.kinds import load_kinds

    all_methods()
    load_kinds(Settings().job_kind_modules)


@worker_init.connect
def sweep_scratch_at_start(**_: Any) -> None:
    """Scratch folders of attempts whose worker died and that will not run again (docs/service.md, Workers)."""
    from core.db import make_engine, make_sessionmaker
    from workers.tasks import sweep_scratch

    settings = Settings()
    assert settings.work_dir is not None
    # An engine of its own, disposed before the pool forks: children must not inherit its connections.
    engine = make_engine(settings.database_url)
    try:
        sweep_scratch(settings.work_dir, make_sessionmaker(engine))
    finally:
        engine.dispose()
