"""The webhook delivery task: send one signed delivery, retry with exponential backoff, record each try.

Runs on the `webhooks` queue (`celery -A workers.worker worker -Q webhooks`),
apart from the GPU queue, so deliveries never wait behind a merge.
"""

from __future__ import annotations

import json
import time
import uuid

import httpx
from celery import Task, shared_task
from sqlalchemy import update

from service_core.models import DeliveryState, Webhook, WebhookDelivery, utcnow
from service_core.webhooks import SIGNATURE_HEADER, refused_destination, signature
from workers.celery_app import DELIVER_WEBHOOK
from workers.tasks import context

RESPONSE_EXCERPT_CHARS = 1000


def backoff_seconds(base: float, attempt: int) -> float:
    """Wait after the `attempt`-th failed try: base, 2 base, 4 base, ..."""
    return base * 2 ** (attempt - 1)


@shared_task(name=DELIVER_WEBHOOK, bind=True, max_retries=None)
def deliver_webhook(self: Task, delivery_id: str) -> None:
    ctx = context()
    settings = ctx.settings
    with ctx.sessions() as session:
        delivery = session.get(WebhookDelivery, uuid.UUID(delivery_id))
        hook = session.get(Webhook, delivery.webhook_id) if delivery else None
        if delivery is None or hook is None or delivery.state is not DeliveryState.pending:
            return  # the endpoint was removed, or a duplicate of a finished delivery
        url, secret, payload, attempt = hook.url, hook.secret, delivery.payload, delivery.attempts + 1

    body = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
    status_code: int | None = None
    response_text: str | None = None
    # Checked again at every try: the name may resolve elsewhere since the endpoint was registered.
    error = refused_destination(url, settings.webhook_allow_private_addresses)
    if error is None:
        headers = {"Content-Type": "application/json", SIGNATURE_HEADER: signature(secret, int(time.time()), body),
                   "PivotMerge-Event": payload["event"], "PivotMerge-Delivery": delivery_id}
        try:
            response = httpx.post(url, content=body, headers=headers, timeout=settings.webhook_timeout_seconds,
                                  follow_redirects=False)
            status_code, response_text = response.status_code, response.text[:RESPONSE_EXCERPT_CHARS]
            error = None if 200 <= status_code < 300 else f"the receiver answered HTTP {status_code}"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"

    done = error is None
    state = DeliveryState.succeeded if done else (
        DeliveryState.failed if attempt >= settings.webhook_max_attempts else DeliveryState.pending)
    with ctx.sessions() as session:
        session.execute(update(WebhookDelivery).where(WebhookDelivery.id == uuid.UUID(delivery_id)).values(
            attempts=attempt, state=state, last_status_code=status_code, last_error=error,
            last_response=response_text, last_attempt_at=utcnow()))
        session.commit()
    if state is DeliveryState.pending:
        raise self.retry(countdown=backoff_seconds(settings.webhook_backoff_seconds, attempt))
