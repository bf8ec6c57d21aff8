"""A job worker's heartbeat: its main process writes a row every few seconds (service_core.models.WorkerHeartbeat),
so `GET /metrics` and the dispatcher can tell live workers from dead ones. The row goes when the worker shuts down
cleanly; a killed worker's row stays, with its last beat.

With each beat a job worker also runs a dispatch pass (service_core.team_queues): the API's dispatcher ticks
faster, but a deployment whose API processes run without housekeeping still has its waiting jobs sent."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from celery import Celery
from celery.signals import worker_ready, worker_shutdown
from sqlalchemy import delete, update

from service_core.db import make_engine, make_sessionmaker
from service_core.models import HEARTBEAT_SECONDS, WorkerHeartbeat, utcnow
from service_core.settings import GPU_QUEUE, Settings
from service_core.team_queues import dispatch_once
from workers.celery_app import enqueue_job

log = logging.getLogger(__name__)

_stop = threading.Event()


def beat(settings: Settings, name: str, queues: str) -> None:
    # An engine per beat, disposed at once: the pool forks children from this process, and they must not
    # inherit a connection (they would close it under us).
    engine = make_engine(settings.database_url)
    try:
        with make_sessionmaker(engine)() as session:
            values = {"queues": queues, "pid": os.getpid(), "beat_at": utcnow(), "deployment": settings.broker_key_prefix}
            if not session.execute(update(WorkerHeartbeat).where(WorkerHeartbeat.name == name).values(**values)).rowcount:
                session.add(WorkerHeartbeat(name=name, started_at=values["beat_at"], **values))
            session.commit()
    finally:
        engine.dispose()


def dispatch(settings: Settings, app: Celery) -> None:
    # An engine per pass, as per beat: the pool forks children from this process.
    engine = make_engine(settings.database_url)
    try:
        dispatch_once(make_sessionmaker(engine), lambda job_id: enqueue_job(app, job_id), settings)
    finally:
        engine.dispose()


def _beat_until_stopped(settings: Settings, name: str, queues: str, app: Celery) -> None:
    while True:
        try:
            beat(settings, name, queues)
        except Exception:  # the database is away: the next beat tries again, and the gap shows on /metrics
            log.warning("worker %s: heartbeat failed", name, exc_info=True)
        if GPU_QUEUE in queues.split(","):
            try:
                dispatch(settings, app)
            except Exception:  # the database or the broker is away: the next beat, or another dispatcher, sends
                log.warning("worker %s: dispatch failed", name, exc_info=True)
        if _stop.wait(HEARTBEAT_SECONDS):
            return


@worker_ready.connect
def start_heartbeat(sender: Any, **_: Any) -> None:
    queues = ",".join(sorted(q.name for q in sender.app.amqp.queues.consume_from.values()))
    threading.Thread(target=_beat_until_stopped, args=(Settings(), sender.hostname, queues, sender.app),
                     name="heartbeat", daemon=True).start()


@worker_shutdown.connect
def remove_heartbeat(sender: Any, **_: Any) -> None:
    _stop.set()
    engine = make_engine(Settings().database_url)
    try:
        with make_sessionmaker(engine)() as session:
            session.execute(delete(WorkerHeartbeat).where(WorkerHeartbeat.name == sender.hostname))
            session.commit()
    finally:
        engine.dispose()
