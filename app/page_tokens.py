"""Opaque page tokens for job lists: the last job's creation time and id.

The decoder accepts exactly what the encoder writes (a fixed-length ASCII
form), so a forged, truncated or nested token is a 422 naming `page_token`,
never a parser's exception.
"""

from __future__ import annotations

import base64
import binascii
import re
import uuid
from datetime import datetime, timedelta, timezone

from app.errors import ApiError

# <microseconds since the epoch, 1-17 digits>.<uuid as 32 hex digits>
TOKEN_BODY = re.compile(r"([0-9]{1,17})\.([0-9a-f]{32})", re.ASCII)
MAX_TOKEN_CHARS = 80
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MICROSECOND = timedelta(microseconds=1)


def encode_page_token(created_at: datetime, job_id: uuid.UUID) -> str:
    micros = (created_at - EPOCH) // _MICROSECOND
    return base64.urlsafe_b64encode(f"{micros}.{job_id.hex}".encode()).decode().rstrip("=")


def decode_page_token(token: str) -> tuple[datetime, uuid.UUID]:
    body = None
    if len(token) <= MAX_TOKEN_CHARS and token.isascii():
        try:
            body = TOKEN_BODY.fullmatch(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode("ascii"))
        except (binascii.Error, UnicodeDecodeError, ValueError):
            body = None
    if body is None:
        raise ApiError(422, "page_token: not a token this API returned", "page_token")
    micros, hex_id = body.groups()
    created = EPOCH + int(micros) * _MICROSECOND
    return created, uuid.UUID(hex=hex_id)
