"""HTTP download headers: the one `Range` parser and `If-None-Match` matching."""

from __future__ import annotations

import re

from app.errors import ApiError

# ASCII digits only: str.isdigit() also accepts "²" and other digits int() refuses.
BYTE_RANGE = re.compile(r"bytes=([0-9]*)-([0-9]*)", re.ASCII)
# Offsets longer than this are past any file; int() is never asked to parse thousands of digits.
MAX_OFFSET_DIGITS = 18


def _offset(digits: str) -> int:
    return int(digits) if len(digits) <= MAX_OFFSET_DIGITS else 10**MAX_OFFSET_DIGITS


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """A single `bytes=` range as (start, end exclusive); None for the whole file.

    Other range units and multi-range requests are served whole (RFC 9110 lets a
    server ignore Range); a `bytes=` range that does not parse, or lies past the
    end, answers 416 naming the header.
    """
    if not header or not header.startswith("bytes=") or "," in header:
        return None
    match = BYTE_RANGE.fullmatch(header.strip())
    if match is None or not any(match.groups()):
        raise ApiError(416, f"Range: {header[:40]!r} is not bytes=FIRST-LAST with decimal digits", "Range",
                       headers={"Content-Range": f"bytes */{size}"})
    first, last = match.groups()
    if not first:  # suffix range: the last N bytes
        start, end = max(0, size - _offset(last)), size
    else:
        start, end = _offset(first), min(size, _offset(last) + 1) if last else size
    if start >= size or end <= start:
        raise ApiError(416, f"Range: {header[:40]!r} is outside the file's {size} bytes", "Range",
                       headers={"Content-Range": f"bytes */{size}"})
    return start, end


def etag_matches(if_none_match: str, etag: str) -> bool:
    tags = [t.strip().removeprefix("W/") for t in if_none_match.split(",")]
    return "*" in tags or etag in tags
