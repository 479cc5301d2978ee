"""Edits of an auth-log window that a rule engine must see through, or must see.

* :func:`counterfactual_window`: the same events with another surface (users, IPs, host names, ports,
  pids, timestamps renamed consistently and injectively): the rule engine's verdict and counts stay.
* :func:`plant_injection`: a new sshd connection whose attacker-controlled field (user name, ssh
  client string, reverse-DNS host name) carries an instruction; the line is evidence like any other.

Used by the ``injection_triplets`` builder (:mod:`sectune.data.injection`).
"""

from __future__ import annotations

import random
import re
from datetime import datetime, timedelta

from sectune.errors import ConfigError

FIELDS = ("user", "ssh_client", "host")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# ------------------------------------------------------------------------ counterfactual
_STAMP = re.compile(r"^(?P<ts>\w{3}\s+\d+\s+\d\d:\d\d:\d\d)\s+(?P<host>\S+)\s+(?P<proc>[^\[:\s]+)(?:\[(?P<pid>\d+)\])?:")
_IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.])")
_PORT = re.compile(r"(?<=\bport )\d+")
_HOSTNAME = re.compile(r"(?P<pre>rhost=|getaddrinfo for |maps to )(?P<h>[^\s,\[\]]+)")
_USER_SPOTS = tuple(re.compile(p) for p in (
    r"(?P<pre>Invalid user )(?P<u>[^\s\x00]+)(?= from )",
    r"(?P<pre>invalid user )(?P<u>[^\s\x00]+)(?= \[preauth\]| from )",
    r"(?P<pre>(?:Failed|Accepted) \S+ for )(?P<u>[^\s\x00]+)(?= from )",
    r"(?P<pre>attempts exceeded for )(?P<u>[^\s\x00]+)(?= from )",
    r"(?P<pre>\buser=)(?P<u>[^\s\x00]+)",
    r"(?P<pre>for user )(?P<u>[^\s\x00]+)",
    r"(?P<pre>failures for )(?P<u>[^\s\x00]+)(?= \[preauth\])",
))
_NAMES = ("amy", "ben", "chen", "dara", "eli", "farah", "gus", "hana", "ivo", "jun", "kai", "lena", "milo", "nia", "omar",
          "pia", "quin", "rosa", "sami", "tove", "ugo", "vera", "wes", "yara", "zed", "ops", "svc", "dev", "www", "sys")
_HOSTS = ("gw", "edge", "node", "vps", "mx", "relay", "cdn", "dsl", "cable", "static")
_TLDS = ("com", "net", "org", "io", "de", "cn", "br", "ru")


class _Renamer:
    """Injective, seeded renaming maps: one original value always becomes the same new value."""

    def __init__(self, rng: random.Random, avoid: set[str]):
        # ``avoid``: every word of the original, so a new value is never an old one of another thing
        self.rng, self.maps, self.taken = rng, {}, set(avoid)

    def get(self, kind: str, old: str, make) -> str:
        m = self.maps.setdefault(kind, {})
        if old not in m:
            for _ in range(1000):
                new = make(self.rng)
                if new not in self.taken:
                    break
            self.taken.add(new)
            m[old] = new
        return m[old]


def _new_ip(r: random.Random) -> str:
    return f"{r.choice((23, 31, 46, 58, 61, 77, 89, 103, 118, 125, 142, 178, 185, 195, 203, 211))}.{r.randint(0, 255)}.{r.randint(0, 255)}.{r.randint(1, 254)}"


def _new_host(r: random.Random) -> str:
    return f"{r.choice(_HOSTS)}{r.randint(1, 999)}.{r.choice(_NAMES)}-{r.choice(_HOSTS)}.{r.choice(_TLDS)}"


def counterfactual_window(log_text: str, rng: random.Random) -> str:
    """The same window with user names, IPs, host names, ports, pids and timestamps renamed consistently.

    Each renaming is injective (two different originals never become one), so the rule engine's
    grouping by pid, source and user is unchanged: same verdict, same counts (checked by the builder).
    """
    ren = _Renamer(rng, set(re.findall(r"[^\s\[\]():;,='\"]+", log_text)))
    # a renamed user's placeholder: a private-use character the window does not hold (NUL was used, and a window or
    # prompt holding "\x000\x00" had its text replaced by a renamed user, or an IndexError)
    mark = next(chr(c) for c in range(0xE000, 0xF900) if chr(c) not in log_text)
    placeholder = re.compile(f"{mark}([0-9]+){mark}")
    shift = timedelta(seconds=rng.randint(3600, 40 * 86400))
    out = []
    for line in log_text.splitlines():
        names: list[str] = []

        def user(m: re.Match) -> str:
            names.append(ren.get("user", m["u"], lambda r: f"{r.choice(_NAMES)}{r.randint(1, 99) if r.random() < 0.6 else ''}"))
            return f"{m['pre']}{mark}{len(names) - 1}{mark}"

        for spot in _USER_SPOTS:  # placeholders, so a renamed user is never renamed twice
            line = spot.sub(user, line)
        line = _HOSTNAME.sub(lambda m: m["pre"] + (m["h"] if _IPV4.fullmatch(m["h"]) else ren.get("host", m["h"], _new_host)), line)
        line = _IPV4.sub(lambda m: ren.get("ip", m[0], _new_ip), line)
        line = _PORT.sub(lambda m: ren.get("port", m[0], lambda r: str(r.randint(1024, 65535))), line)
        if h := _STAMP.match(line):
            stamp = h["ts"]
            try:
                t = datetime.strptime(f"2001 {' '.join(stamp.split())}", "%Y %b %d %H:%M:%S") + shift
                stamp = f"{t:%b} {t.day:2d} {t:%H:%M:%S}"
            except ValueError:  # e.g. Feb 29: keep the stamp
                pass
            host = ren.get("syslog_host", h["host"], lambda r: f"{r.choice(_HOSTS)}-{r.choice(_NAMES)}{r.randint(1, 9)}")
            pid = f"[{ren.get('pid', h['pid'], lambda r: str(r.randint(1000, 32767)))}]" if h["pid"] else ""
            line = f"{stamp} {host} {h['proc']}{pid}:{line[h.end():]}"
        line = placeholder.sub(lambda m: names[int(m[1])], line)
        out.append(line)
    return "\n".join(out)


def analysis_signature(a: dict) -> tuple:
    """What a renaming must not change: verdict, counts, and the failures per listed source."""
    return (a["verdict"], a["failed_logins"], a["accepted_logins"], a["brute_force"], a["break_in_attempts"],
            len(a["invalid_users"]), len(a["targeted_users"]), tuple(s["failures"] for s in a["source_ips"]))


# ------------------------------------------------------------------------ injection
def _slug_host(text: str, rng: random.Random) -> str:
    """An instruction as a DNS name an attacker could put in a PTR record (labels ≤ 63 chars)."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "x"
    labels = [slug[i : i + 63].strip("-") or "x" for i in range(0, len(slug), 63)]
    return ".".join(labels + [rng.choice(_TLDS)])


def plant_injection(log_text: str, text: str, where: str, rng: random.Random) -> str:
    """The window with ``text`` planted in an attacker-controlled field, as a new sshd connection
    (fresh pid) inserted at a random position with its neighbour's timestamp and host:

    * ``user``: ``Invalid user <text> from IP`` + ``input_userauth_request: invalid user <text> [preauth]``
    * ``ssh_client``: ``Bad protocol version identification '<text>' from IP port N``
    * ``host``: ``reverse mapping checking getaddrinfo for <text as a DNS name> [IP] failed - POSSIBLE BREAK-IN ATTEMPT!``
    """
    if where not in FIELDS:
        raise ConfigError(f"dataset.injection_fields: unknown field {where!r}; choose from {', '.join(FIELDS)}")
    text = _one_line(text)
    lines = log_text.splitlines()
    at = rng.randint(1, len(lines)) if lines else 0
    ref = _STAMP.match(lines[at - 1]) if lines else None
    stamp, host = (ref["ts"], ref["host"]) if ref else ("Jan  1 00:00:00", "localhost")
    # pids of at most 9 digits (Linux's are 7): int() of a 4,300-digit one, which a hostile log can hold, raised
    pids = {int(m["pid"]) for ln in lines if (m := _STAMP.match(ln)) and m["pid"] and len(m["pid"]) <= 9}
    pid = (max(pids) if pids else rng.randint(1000, 30000)) + rng.randint(1, 40)
    ips = sorted({ip for ln in lines for ip in _IPV4.findall(ln)})
    ip = rng.choice(ips) if ips and rng.random() < 0.5 else _new_ip(rng)
    head = f"{stamp} {host} sshd[{pid}]:"
    planted = {
        "user": [f"{head} Invalid user {text} from {ip}", f"{head} input_userauth_request: invalid user {text} [preauth]"],
        "ssh_client": [f"{head} Bad protocol version identification '{text}' from {ip} port {rng.randint(1024, 65535)}"],
        "host": [f"{head} reverse mapping checking getaddrinfo for {_slug_host(text, rng)} [{ip}] failed - POSSIBLE BREAK-IN ATTEMPT!"],
    }[where]
    return "\n".join(lines[:at] + planted + lines[at:])
