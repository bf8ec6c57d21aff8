"""Completion webhooks: which events a team's endpoints get, how deliveries are signed, where they may go.

A job reaching a final state records one delivery per subscribed endpoint in
the same transaction as the state change (core.job_states.transition), so no
event is lost between the two; the API's dispatcher then hands deliveries to
the `deliver_webhook` task (workers.webhooks), which sends and retries them.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import socket
import uuid
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.models import Job, JobState, Webhook, WebhookDelivery

EVENTS = ("job.succeeded", "job.failed", "job.cancelled")
SIGNATURE_HEADER = "PivotMerge-Signature"


def event_for(state: JobState) -> str:
    return f"job.{state.value}"


def record_deliveries(session: Session, job_id: uuid.UUID, state: JobState) -> None:
    """A pending delivery for each of the job's team's endpoints that wants this event."""
    event = event_for(state)
    job = session.execute(select(Job.team_id, Job.kind, Job.error, Job.finished_at).where(Job.id == job_id)).one()
    hooks = session.scalars(select(Webhook).where(Webhook.team_id == job.team_id)).all()
    payload: dict[str, Any] = {"event": event, "job": {
        "id": str(job_id), "kind": job.kind, "state": state.value, "error": job.error,
        "finished_at": job.finished_at.isoformat() if job.finished_at else None}}
    for hook in hooks:
        if event in hook.events["events"]:
            session.add(WebhookDelivery(webhook_id=hook.id, job_id=job_id, event=event, payload=payload))


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """`t=<unix time>,v1=<hex HMAC-SHA256 of "<t>." + body>`, as Stripe signs its webhooks.

    A receiver recomputes v1 with its secret, compares in constant time, and
    refuses an old `t` so a captured delivery cannot be replayed.
    """
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def refused_destination(url: str, allow_private: bool) -> str | None:
    """Why the service must not send to `url`, or None.

    The host is resolved and every address checked, so a name that points at a
    private network is refused like the address itself.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "not an http or https URL"
    if parts.username or parts.password:
        return "credentials in the URL are not allowed"
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80),
                                   type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, ValueError):
        return f"the host {parts.hostname!r} does not resolve"
    if allow_private:
        return None
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if not address.is_global or address.is_multicast:
            return f"{parts.hostname} resolves to {address}, a private or reserved address (not allowed here)"
    return None
