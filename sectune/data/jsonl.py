"""JSON lines as the dataset readers take them: one value per non-blank line, each bad line named by its number."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from sectune.errors import DataError


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
            value = json.loads(line)
            why = lone_surrogate(value) if "\\u" in line else None  # only an escape can write one: UTF-8 bytes cannot
            yield (n, None, why) if why else (n, value, None)
        except json.JSONDecodeError as e:
            yield n, None, f"invalid JSON ({e.msg}, column {e.colno})"
        except (ValueError, RecursionError) as e:  # an integer past Python's 4,300-digit limit; nesting past the recursion limit
            yield n, None, f"unreadable JSON ({type(e).__name__}: {str(e).splitlines()[0][:120]})"


def lone_surrogate(value: Any) -> str | None:
    """Why ``value`` (parsed JSON) is not text, or None: an escaped half of a surrogate pair (``"\\ud83d"``, an emoji
    cut in two by a scraper) parses to a string that no file, tokenizer or hash takes (UnicodeEncodeError later)."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        return f"an unpaired surrogate escape (\\u{ord(e.object[e.start]):04x}): half of a character, not text"
    return None


def given_splits(path: Path, objs: list[dict], group) -> dict[str, str]:
    """``{window: split}`` of the windows whose lines name a split; two lines of one window (one ``id``, or one
    input) naming different splits are an error naming both lines (the last one had decided for all of them, so
    lines marked train went to test, or a window sat in two splits)."""
    out: dict[str, tuple[str, int]] = {}
    for o in objs:
        if not o.get("split"):
            continue
        g, here = group(o), (o["split"], o["_line"])
        if g in out and out[g][0] != here[0]:
            raise DataError(f"{path}: line {out[g][1]} puts window {g!r} in {out[g][0]} and line {here[1]} in {here[0]}: the "
                            "lines of one window (one id, or one input) must share a split")
        out.setdefault(g, here)
    return {g: s for g, (s, _) in out.items()}
