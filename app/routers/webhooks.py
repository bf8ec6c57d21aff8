"""/v1/webhooks: a team's endpoints for job events, and the record of every delivery."""

from __future__ import annotations

import secrets
import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Response
from sqlalchemy import select

from app.deps import SessionDep, SettingsDep, TeamDep
from app.errors import ERROR_RESPONSES, ApiError
from app.schemas import DeliveryOut, DeliveryPage, ErrorOut, WebhookCreated, WebhookIn, WebhookList, WebhookOut
from service_core.models import Webhook, WebhookDelivery
from service_core.webhooks import refused_destination

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"], responses=ERROR_RESPONSES)
HOOK_NOT_FOUND = {404: {"model": ErrorOut, "description": "No such webhook for this team."}}


def team_webhook(webhook_id: uuid.UUID, session: SessionDep, team: TeamDep) -> Webhook:
    hook = session.scalar(select(Webhook).where(Webhook.id == webhook_id, Webhook.team_id == team.id))
    if hook is None:
        raise ApiError(404, f"webhook {webhook_id} not found")
    return hook


WebhookDep = Annotated[Webhook, Depends(team_webhook)]


def webhook_out(hook: Webhook) -> WebhookOut:
    return WebhookOut(id=hook.id, url=hook.url, events=hook.events["events"], created_at=hook.created_at)


@router.post("", status_code=201, operation_id="create_webhook", summary="Register an endpoint for job events",
             description="Deliveries are POSTed as JSON, signed in the `PivotMerge-Signature` header: "
                         "`t=<unix time>,v1=<hex HMAC-SHA256 of \"<t>.\" + body, keyed by the secret>`. "
                         "The secret is shown only in this answer.")
def create_webhook(body: WebhookIn, session: SessionDep, team: TeamDep, settings: SettingsDep) -> WebhookCreated:
    if reason := refused_destination(str(body.url), settings.webhook_allow_private_addresses):
        raise ApiError(422, f"url: {reason}", "url")
    hook = Webhook(team_id=team.id, url=str(body.url), events={"events": sorted(set(body.events))},
                   secret="whsec_" + secrets.token_urlsafe(32))
    session.add(hook)
    session.commit()
    return WebhookCreated(**webhook_out(hook).model_dump(), secret=hook.secret)


@router.get("", operation_id="list_webhooks", summary="The team's webhook endpoints")
def list_webhooks(session: SessionDep, team: TeamDep) -> WebhookList:
    hooks = session.scalars(select(Webhook).where(Webhook.team_id == team.id).order_by(Webhook.created_at)).all()
    return WebhookList(webhooks=[webhook_out(h) for h in hooks])


@router.delete("/{webhook_id}", status_code=204, operation_id="delete_webhook", summary="Remove an endpoint",
               response_class=Response, responses=HOOK_NOT_FOUND)
def delete_webhook(hook: WebhookDep, session: SessionDep) -> Response:
    session.delete(hook)
    session.commit()
    return Response(status_code=204)


@router.get("/{webhook_id}/deliveries", operation_id="list_webhook_deliveries", responses=HOOK_NOT_FOUND,
            summary="Deliveries to an endpoint, newest first: state, attempts, the last response")
def list_deliveries(hook: WebhookDep, session: SessionDep,
                    limit: Annotated[int, Query(ge=1, le=100)] = 50) -> DeliveryPage:
    rows = session.scalars(select(WebhookDelivery).where(WebhookDelivery.webhook_id == hook.id)
                           .order_by(WebhookDelivery.created_at.desc()).limit(limit)).all()
    return DeliveryPage(deliveries=[DeliveryOut.model_validate(r, from_attributes=True) for r in rows])
