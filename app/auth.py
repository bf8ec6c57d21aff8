"""Team API keys: random tokens, stored only as their sha256."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from service_core.models import TEAM_NAME_MAX_CHARS, ApiKey, Team, utcnow

KEY_PREFIX = "pm_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def check_team_name(name: str) -> None:
    """Raise ValueError, in one line, unless `name` fits the teams table and is printable text."""
    if not name.isprintable() or "\x00" in name:
        # Bytes that are not UTF-8 reach Python as lone surrogates, which are not printable.
        shown = name.encode("utf-8", "backslashreplace").decode()
        raise ValueError(f"team name: {shown!r} is not printable UTF-8 text")
    if not 1 <= len(name) <= TEAM_NAME_MAX_CHARS:
        raise ValueError(f"team name: must be 1 to {TEAM_NAME_MAX_CHARS} characters, got {len(name)}")


def create_team(session: Session, name: str) -> Team:
    check_team_name(name)
    team = Team(name=name)
    session.add(team)
    session.flush()
    return team


def create_api_key(session: Session, team: Team) -> tuple[ApiKey, str]:
    """Make a key for the team; the plaintext is returned once and never stored."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(team_id=team.id, key_sha256=hash_key(key), prefix=key[:10])
    session.add(row)
    session.flush()
    return row, key


def revoke_api_key(session: Session, key_id: object) -> ApiKey | None:
    row = session.get(ApiKey, key_id)
    if row is not None and row.revoked_at is None:
        row.revoked_at = utcnow()
    return row


def team_for_key(session: Session, key: str) -> Team | None:
    digest = hash_key(key)
    row = session.scalars(select(ApiKey).where(ApiKey.key_sha256 == digest, ApiKey.revoked_at.is_(None))).first()
    if row is None or not hmac.compare_digest(row.key_sha256, digest):
        return None
    return row.team
