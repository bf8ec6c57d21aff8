"""The FastAPI application: `uvicorn --factory app.main:create_app`."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import FastAPI

from pivotmerge import __version__
from workers.celery_app import make_celery
from workers.kinds import load_kinds

from service_core.db import make_engine, make_sessionmaker
from service_core.logs import configure_logging
from app.errors import install_error_handlers
from app.limits import BodySizeLimit
from app.housekeeping import DISPATCHER, housekeeping
from app.job_routes import job_router
from app.metrics import install_metrics
from app.request_log import RequestLog
from app.routers import health, inputs, methods, tuning_trials, webhooks
from app.ui import pages as ui_pages
from service_core.settings import Settings, get_settings
from service_core.storage import make_store

DESCRIPTION = """Merge multimodal (LLaVA-style) models as jobs.

Every `/v1` request needs `Authorization: Bearer <team API key>`. A team sees only
its own jobs: another team's job id answers 404, exactly like a missing one.
Errors are JSON `{"detail": "...", "field": "..."}`.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    engine = make_engine(settings.database_url)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        beats = [beat.start() for beat in housekeeping(settings, app.state.sessionmaker, app.state.celery,
                                                       app.state.store)]
        for beat in beats:
            if beat.name == DISPATCHER:
                app.state.wake_dispatcher = beat.wake
        yield
        for beat in beats:
            beat.stop()
        engine.dispose()

    configure_logging(settings.log_format, settings.log_level)
    app = FastAPI(title="PivotMerge", version=__version__, description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessionmaker = make_sessionmaker(engine)
    app.state.store = make_store(settings)
    app.state.celery = make_celery(settings)
    # A submission wakes this process's dispatcher; without housekeeping the workers' passes dispatch it.
    app.state.wake_dispatcher = lambda: None
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    app.add_middleware(RequestLog)  # outermost: its line and id cover every answer, 413s included
    kinds = load_kinds(settings.job_kind_modules)
    app.state.kinds = kinds
    for kind in kinds:
        app.include_router(job_router(kind))
    for module in (tuning_trials, webhooks, methods, inputs, health, ui_pages):
        app.include_router(module.router)
    if settings.metrics_enabled:
        install_metrics(app, app.state.sessionmaker, [kind.name for kind in kinds])
    return app
