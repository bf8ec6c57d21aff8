"""FastAPI dependencies: settings, a database session, the calling team."""

from __future__ import annotations

from typing import Annotated, Iterator

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app.auth import team_for_key
from app.errors import ApiError
from core.models import Team
from core.settings import Settings
from core.storage import ArtifactStore

bearer = HTTPBearer(auto_error=False, description="A team API key: `Authorization: Bearer pm_...`.")


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    with request.app.state.sessionmaker() as session:
        yield session


def get_store(request: Request) -> ArtifactStore:
    return request.app.state.store


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
StoreDep = Annotated[ArtifactStore, Depends(get_store)]


def current_team(request: Request, session: SessionDep,
                 credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Team:
    team = team_for_key(session, credentials.credentials) if credentials else None
    if team is None:
        raise ApiError(401, "a valid team API key is required: Authorization: Bearer <key>",
                       headers={"WWW-Authenticate": "Bearer"})
    request.state.team = str(team.id)  # for the request's log line (app.request_log)
    return team


TeamDep = Annotated[Team, Depends(current_team)]
