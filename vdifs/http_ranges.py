"""HTTP's conditional and range requests, pure: RFC 9110 sections 13 and 14.

``vdifs serve`` answers a single byte range (206), the whole body when the
header asks for several ranges or cannot be parsed (a server may ignore
``Range``, RFC 9110 14.2), and 416 when no range can be satisfied.
"""

from __future__ import annotations

import email.utils
import re
from dataclasses import dataclass

_SPEC = re.compile(r"^\s*(\d{0,20})\s*-\s*(\d{0,20})\s*$")
MAX_RANGES = 16  # more than this in one header is not worth parsing: the whole body


@dataclass(frozen=True)
class Unsatisfiable:
    """No range of the header lies inside the body: 416 with ``Content-Range: bytes */size``."""


def parse_range(header: str | None, size: int) -> tuple[int, int] | Unsatisfiable | None:
    """``(first, last)`` inclusive for one satisfiable range; None for the whole body."""
    if header is None:
        return None
    unit, _, specs = header.partition("=")
    if unit.strip().lower() != "bytes" or not specs:
        return None
    parts = specs.split(",")
    if len(parts) > MAX_RANGES:
        return None
    ranges: list[tuple[int, int]] = []
    for part in parts:
        match = _SPEC.match(part)
        if match is None or match[1] == match[2] == "":
            return None  # malformed: the header is ignored
        first, last = match[1], match[2]
        if first == "":  # the last N bytes
            length = int(last)
            if length == 0 or size == 0:
                continue
            ranges.append((max(0, size - length), size - 1))
            continue
        start = int(first)
        end = int(last) if last else size - 1
        if last and end < start:
            return None  # invalid: ignored, as RFC 9110 14.1.1 says
        if start >= size:
            continue
        ranges.append((start, min(end, size - 1)))
    if not ranges:
        return Unsatisfiable()
    if len(ranges) > 1:
        return None  # several ranges: the whole body rather than multipart/byteranges
    return ranges[0]


def http_date(seconds: float) -> str:
    return email.utils.formatdate(seconds, usegmt=True)


def if_range_holds(header: str | None, etag: str, last_modified: str) -> bool:
    """Whether a Range may be honoured under ``If-Range`` (RFC 9110 13.1.5): only a
    strong validator that still matches."""
    if header is None:
        return True
    header = header.strip()
    if header.startswith('"'):
        return not etag.startswith("W/") and header == etag
    return not etag.startswith("W/") and header == last_modified
