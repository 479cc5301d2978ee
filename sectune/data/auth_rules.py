"""Transparent rules that turn a window of auth-log lines into the analysis JSON.

Used as the annotation of the ``auth_logs`` dataset, as the classic baseline beside the model,
and as a reward check during RL.

Rules (``RULES_VERSION``)
-------------------------
A line is ``<timestamp> <host> <proc>[<pid>]: <message>``, the timestamp syslog's ``Mon DD HH:MM:SS`` or ISO 8601
(fractions of a second and an offset allowed). Lines are grouped by process id, because one authentication attempt is logged several times
(OpenSSH writes ``pam_unix(sshd:auth): authentication failure`` *and* ``Failed password`` for
the same attempt). For each pid two channels of evidence are counted:

* sshd/daemon messages: ``Failed <method> for [invalid user] U from IP`` (1, or N for
  ``message repeated N times: [ Failed ...]``), klogind ``Authentication failed from IP`` and
  ``Kerberos authentication failed`` (failures); ``Accepted <method> for U from IP`` and
  ftpd ``ANONYMOUS FTP LOGIN FROM IP`` (accepted logins);
* PAM messages: ``authentication failure; ... rhost=H [user=U]`` (1) and
  ``PAM N more authentication failure(s)`` (N) (failures); ``session opened for user U`` from
  sshd/login (accepted logins; ``su`` and ``cron`` sessions are local switches, not logins).

A pid's failures (and accepted logins) are the *larger* of its two channels, never their sum,
so one attempt counts once even when only half of its lines fall inside the window.
A pid's source is the first ``from IP`` (IPv4, IPv6, or IPv4-mapped ``::ffff:a.b.c.d``) of an sshd message, else the ``[IP]`` of a reverse
mapping warning, else PAM's ``rhost`` (a host name on Linux_2k). ``failed_logins`` and
``accepted_logins`` sum over pids; per-source failures sum over the pids of that source, the forms of one address being
one source (:func:`canonical_source`: ``::ffff:1.2.3.4`` is ``1.2.3.4``), named as the window first writes it.

* ``invalid_users``: names from ``Invalid user U``, ``input_userauth_request: invalid user U``
  and ``Failed ... for invalid user U`` (sorted, unique, first 5).
* ``targeted_users``: existing accounts that failed (``Failed password for U``, PAM
  ``user=U``), sorted, unique, first 5.
* ``source_ips``: sources with a failure, accepted login, invalid user or break-in warning,
  as ``{"ip", "failures"}`` sorted by failures (desc) then name, first 3.
* ``brute_force``: some source has >= 5 failures in the window.
* ``break_in_attempts``: ``POSSIBLE BREAK-IN ATTEMPT!`` lines.
* ``verdict``: **malicious** if brute_force, or break-in warnings together with failures, or an
  accepted login from a source that failed >= 3 times in the window; else **suspicious** if
  there is any failure, invalid user, ``user unknown`` or break-in warning; else **benign**.

Other lines (connection closed, disconnects, session closed, kernel noise) carry no evidence.

An attacker writes parts of these lines, so the rules read within bounds: a line's first ``MAX_LINE`` (8,192)
characters, a source of at most 64 (the schema's limit), a count of at most ``MAX_COUNT``.
"""

from __future__ import annotations

import ipaddress
import re

# 2: hostile lines (an overlong line or source) read within bounds; 3: ISO-8601 and fractional-second timestamps
# (journalctl -o short-iso / short-precise, rsyslog's file format) and IPv4-mapped IPv6 sources read (an audit, session 37)
# 5: a source's forms counted as one host (::ffff:1.2.3.4 and 1.2.3.4, fe80::1%eth0 and fe80::1, 2001:0db8::1 and
# 2001:db8::1): one attacker's failures were split over two sources and a brute force went unseen (session 44)
RULES_VERSION = "auth-rules-5"
CLASSES = ("benign", "suspicious", "malicious")
BRUTE_FORCE_FAILURES = 5
FAILED_THEN_ACCEPTED = 3
#: the answer's key order: the evidence, then the verdict decided from it, then the summary
ANSWER_KEYS = ("failed_logins", "accepted_logins", "invalid_users", "targeted_users", "source_ips", "brute_force",
               "break_in_attempts", "verdict", "summary")
REAL_SOURCES = ("loghub_openssh_2k/OpenSSH_2k.log", "loghub_linux_2k/Linux_2k.log")
_MAX_NAME = 32  # usernames in real scans can be junk; the schema caps their length
_MAX_HOST = 64  # a source (address or host name) as the schema allows it
#: characters of a line the rules read: syslog daemons cut a message at 1-8 KB, and a longer, attacker-written line made
#: the patterns that search a line (`Failed ... for U from IP port N`) take time quadratic in its length
MAX_LINE = 8192

# ---------------------------------------------------------------------------------- rules
#: syslog's ``Mon DD HH:MM:SS`` (seconds' fractions: journalctl -o short-precise) or ISO 8601 (journalctl -o short-iso,
#: rsyslog's RSYSLOG_FileFormat): every other line was read without its process and pid, so an attempt's PAM and sshd
#: lines counted twice, its sshd source was lost and a brute force went unseen (an audit, session 37)
_SYSLOG_TIME = r"\w{3}\s+\d+\s+\d\d:\d\d:\d\d"
_HOST_PROC = r"\s+\S+\s+(?P<proc>.+?)(?:\[(?P<pid>\d+)\])?:\s?(?P<msg>.*)$"
#: and journalctl's other modes: short-full (``Mon 2026-12-07 05:14:18 UTC``), an ISO date and time apart, short-unix
#: (epoch seconds), short-monotonic (``[ 1234.567890]``): read without pids, an attempt counted twice (session 40)
_HEADER = re.compile(rf"^(?:(?:{_SYSLOG_TIME}|\d{{4}}-\d\d-\d\d[T ]\d\d:\d\d:\d\d)(?:[.,]\d{{1,9}})?(?:Z|[+-]\d\d:?\d\d)?"
                     rf"|\w{{3}} \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d{{1,9}})? [A-Z]{{2,5}}|\d{{9,11}}(?:\.\d{{1,9}})?|\[\s*\d+\.\d+\])"
                     rf"{_HOST_PROC}")
#: the header the tiny analyst was trained on (stage=infer warns about other lines)
SYSLOG_HEADER = re.compile(rf"^{_SYSLOG_TIME}{_HOST_PROC}")
_FAILED = re.compile(r"Failed (?:\S+) for (?P<inv>invalid user )?(?P<user>.*?) from (?P<ip>\S+) port \d+")
_REPEATED = re.compile(r"message repeated (?P<n>\d+) times: \[ ?(?P<inner>.*)\]")
_ACCEPTED = re.compile(r"Accepted \S+ for (?P<user>\S+) from (?P<ip>\S+)")
#: (and the tail of a scan's connection, when its "Invalid user" line fell in the window before: OpenSSH >= 7.5's
#: "Connection closed by / Disconnected from invalid user U IP port N"; such a window was benign: an audit, session 40)
_INVALID = re.compile(r"(?:^Invalid user (?P<u1>.*?) from (?P<ip>\S+)|input_userauth_request: invalid user (?P<u2>.*?) \[preauth\]"
                      r"|^(?:Connection closed by|Disconnected from) invalid user (?P<u3>.*?) ?(?P<ip3>\S+) port \d+)")
_BREAK_IN = re.compile(r"reverse mapping checking getaddrinfo for \S+ \[(?P<ip>[^\]]+)\].*POSSIBLE BREAK-IN ATTEMPT")
_PAM_FAIL = re.compile(r"authentication failure; .*?rhost=(?P<rhost>\S*)(?:\s+user=(?P<user>\S+))?")
_PAM_MORE = re.compile(r"PAM (?P<n>\d+) more authentication failures?;.*?rhost=(?P<rhost>\S*)(?:\s+user=(?P<user>\S+))?")
_SESSION_OPEN = re.compile(r"session opened for user (?P<user>\S+) by")
_KLOG_FAIL = re.compile(r"Authentication failed from (?P<ip>[\d.]+)|Kerberos authentication failed")
_ANON_FTP = re.compile(r"ANONYMOUS FTP LOGIN FROM (?P<ip>[^,\s]+)")
# IPv6: 3-8 groups of at most 4 hex digits. The unbounded `[0-9a-fA-F:]+:[0-9a-fA-F:]+` took time quadratic in a run of
# colons an attacker writes after " from " (1 s for an 8 KB line, hours for 1 MB)
# An IPv4-mapped address (::ffff:10.0.0.5, from a dual-stack socket) whole: it was cut at its first dot, five hosts became
# one "::ffff:10" with a brute force (an audit, session 37)
_FROM_IP = re.compile(r" from (?P<ip>\d{1,3}(?:\.\d{1,3}){3}|[0-9a-fA-F]{0,4}(?::[0-9a-fA-F]{0,4}){2,6}:\d{1,3}(?:\.\d{1,3}){3}"
                      r"|[0-9a-fA-F]{0,4}(?::[0-9a-fA-F]{0,4}){2,7})\b")
#: sshd's own process names: OpenSSH 9.8 logs a connection from ``sshd-session`` (Debian 13, Fedora 41, RHEL 10), OpenSSH 10
#: its authentication from ``sshd-auth``; read as ``sshd`` only, every such line lost its source (an audit, session 40)
_SSHD = ("sshd", "sshd-session", "sshd-auth")
_LOGIN_PROCS = (*_SSHD, "login")


#: the schema's maximum for a count: a log line may say any number ("message repeated 10^5000 times"), an analysis not
MAX_COUNT = 1_000_000


def _count(digits: str) -> int:
    """A count a log line states, at most MAX_COUNT (``int()`` of more than 4,300 digits raised ValueError: one
    attacker-written line stopped the rules, and every builder and reward that calls them)."""
    digits = digits.lstrip("0") or "0"
    return min(int(digits), MAX_COUNT) if len(digits) <= 7 else MAX_COUNT


def _name(user: str | None) -> str | None:
    user = (user or "").strip()
    return user[:_MAX_NAME] if user else None


def canonical_source(src: str) -> str:
    """One name per host for a source (``ipaddress``): an IPv4-mapped IPv6 address as its IPv4 address, an IPv6 zone
    (``%eth0``) dropped, an IPv6 address compressed and lower-case; a host name (or anything else) as written."""
    try:
        addr = ipaddress.ip_address(src.split("%", 1)[0])
    except ValueError:
        return src
    mapped = getattr(addr, "ipv4_mapped", None)
    return str(mapped or addr)


class _Pid:
    """Evidence for one process id (one connection / session) inside a window."""

    def __init__(self) -> None:
        self.fail = [0, 0]  # [daemon channel, PAM channel]
        self.ok = [0, 0]
        self.ip: str | None = None  # from an sshd message: the most reliable
        self.alt_ip: str | None = None  # reverse-mapping [IP] or PAM rhost
        self.interesting = False


def analyze_auth_log(lines: list[str]) -> dict:
    """Apply the module's documented rules to a window of log lines; return the analysis."""
    pids: dict[str, _Pid] = {}
    invalid: set[str] = set()
    targeted: set[str] = set()
    break_ins = 0
    unknown_user = False
    for lineno, raw in enumerate(lines):
        line = raw.strip()[:MAX_LINE]
        m = _HEADER.match(line)
        proc, pid, msg = (m["proc"].strip(), m["pid"], m["msg"]) if m else ("", None, line)
        base = proc.split("(")[0]
        p = pids.setdefault(pid or f"line{lineno}", _Pid())
        rep = _REPEATED.search(msg)
        times = _count(rep["n"]) if rep else 1
        body = rep["inner"] if rep else msg
        if (ip := _FROM_IP.search(body)) and base in _SSHD and p.ip is None:
            p.ip = ip["ip"]
        named = _FAILED.search(body) or _ACCEPTED.search(body) or _INVALID.search(body)
        if named and named["ip"] and base in _SSHD and p.ip is None:  # UseDNS yes: sshd names the host, not its address
            p.ip = named["ip"][:_MAX_HOST]
        if f := _FAILED.search(body):
            p.fail[0] += times
            p.interesting = True
            (invalid if f["inv"] else targeted).add(_name(f["user"]) or "")
        elif _ACCEPTED.search(body):
            p.ok[0] += 1
            p.interesting = True
        elif i := _INVALID.search(body):
            invalid.add(_name(next((u for u in (i["u1"], i["u2"], i["u3"]) if u is not None), "")) or "")
            if i["ip3"] and base in _SSHD and p.ip is None:
                p.ip = i["ip3"][:_MAX_HOST]
            p.interesting = True
        elif b := _BREAK_IN.search(body):
            break_ins += 1
            p.alt_ip = p.alt_ip or b["ip"]
            p.interesting = True
        elif pm := (_PAM_MORE.search(body) or _PAM_FAIL.search(body)):
            p.fail[1] += _count(pm["n"]) if "n" in pm.groupdict() else 1
            p.alt_ip = p.alt_ip or (pm["rhost"][:_MAX_HOST] or None)
            if pm["user"]:
                targeted.add(_name(pm["user"]) or "")
            p.interesting = True
        elif _SESSION_OPEN.search(body) and base in _LOGIN_PROCS:
            p.ok[1] += 1
        elif k := _KLOG_FAIL.search(body):
            p.fail[0] += 1
            p.alt_ip = p.alt_ip or k["ip"]
            p.interesting = True
        elif af := _ANON_FTP.search(body):
            p.ok[0] += 1
            p.alt_ip = p.alt_ip or af["ip"]
        elif "check pass; user unknown" in body:
            unknown_user = True
    invalid.discard("")
    targeted.discard("")
    targeted -= invalid

    failures: dict[str, int] = {}
    accepted_from: set[str] = set()
    seen: set[str] = set()
    shown: dict[str, str] = {}
    failed_total = accepted_total = 0
    for p in pids.values():
        n_fail, n_ok = max(p.fail), max(p.ok)
        failed_total = min(failed_total + n_fail, MAX_COUNT)
        accepted_total = min(accepted_total + n_ok, MAX_COUNT)
        src = (p.ip or p.alt_ip or "")[:_MAX_HOST] or None  # an attacker-written "address" is capped as rhost is
        if src is None or not (p.interesting or n_ok):
            continue
        key = canonical_source(src)  # one host's forms count together; the analysis names the form the log first wrote
        shown.setdefault(key, src)
        seen.add(key)
        failures[key] = min(failures.get(key, 0) + n_fail, MAX_COUNT)
        if n_ok:
            accepted_from.add(key)
    ranked = [shown[k] for k in sorted(seen, key=lambda k: (-failures[k], shown[k]))]
    failures = {shown[k]: n for k, n in failures.items()}
    accepted_from = {shown[k] for k in accepted_from}
    brute = [ip for ip in ranked if failures[ip] >= BRUTE_FORCE_FAILURES]
    after_fail = [ip for ip in ranked if ip in accepted_from and failures[ip] >= FAILED_THEN_ACCEPTED]

    if brute:
        verdict, why = "malicious", f"brute force from {brute[0]} ({failures[brute[0]]} failures)"
    elif break_ins and failed_total:
        verdict, why = "malicious", "break-in warnings with failed logins"
    elif after_fail:
        verdict, why = "malicious", f"login accepted from {after_fail[0]} after {failures[after_fail[0]]} failures"
    elif failed_total or invalid or break_ins or unknown_user:
        verdict, why = "suspicious", "failed logins" if failed_total else "invalid users or break-in warnings"
    else:
        verdict, why = "benign", "no failed logins"
    summary = f"{verdict.capitalize()}: {why}; {failed_total} failed, {accepted_total} accepted logins."
    return {
        "failed_logins": failed_total,
        "accepted_logins": accepted_total,
        "invalid_users": sorted(invalid)[:5],
        "targeted_users": sorted(targeted)[:5],
        "source_ips": [{"ip": ip, "failures": failures[ip]} for ip in ranked[:3]],
        "brute_force": bool(brute),
        "break_in_attempts": break_ins,
        "verdict": verdict,
        "summary": summary,
    }
