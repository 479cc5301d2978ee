"""JSON lines as the dataset readers take them: one value per non-blank line, each bad line named by its number."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator


def json_lines(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """``(line number, value, None)`` for each non-blank line that parses, ``(line number, None, why)`` for one
    that does not. Each line is decoded on its own (split at ``\\n``/``\\r`` only, as JSON lines are), so a
    byte that is not UTF-8 is named by its line and the lines after it still count."""
    for n, raw in enumerate(path.read_bytes().splitlines(), 1):
        try:
            line = raw.decode("utf-8-sig" if n == 1 else "utf-8")  # a byte-order mark (Windows tools write one) is not data
        except UnicodeDecodeError as e:
            yield n, None, f"not UTF-8 text ({e.reason} at byte {e.start} of the line)"
            continue
        if not line.strip():
            continue
        try:
            yield n, json.loads(line), None
        except json.JSONDecodeError as e:
            yield n, None, f"invalid JSON ({e.msg}, column {e.colno})"
