"""A log file's text as sectune's log readers take it (infer's inputs, the auth-log builder's real logs)."""

from __future__ import annotations

import gzip
from pathlib import Path

from sectune.errors import DataError, shown

_GZIP, _UTF16 = b"\x1f\x8b", (b"\xff\xfe", b"\xfe\xff")


def read_log(path: Path, who: str = "infer") -> str:
    """A log file's text: UTF-8, or gzip-compressed (a rotated ``auth.log.2.gz``), or UTF-16 with its byte-order mark
    (a Windows export). Bytes that are not UTF-8 (a user name an attacker typed in Latin-1, say) become U+FFFD with a
    warning naming their lines: one such byte must not keep a whole log from being analysed."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    if data.startswith(_GZIP):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: a gzip file that does not decompress ({e})") from None
    if data.startswith(_UTF16):
        text = data.decode("utf-16", errors="replace")
    elif b"\x00" in data:
        raise DataError(f"{path}: binary file (NUL bytes); {who} reads text log files (plain, .gz or UTF-16)")
    else:
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            lines = [n for n, raw in enumerate(data.split(b"\n"), 1) if not _utf8(raw)]
            print(f"sectune: warning: {who}: {shown(path.name)}: {len(lines)} line(s) not UTF-8 (line {', '.join(map(str, lines[:5]))}"
                  f"{' …' if len(lines) > 5 else ''}); their bad bytes read as U+FFFD")
            text = data.decode("utf-8-sig", errors="replace")
    if not text.strip():
        raise DataError(f"{path}: empty log file")
    return text


def _utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False
