"""Generated auth-log lines in the real logs' formats, for a fresh clone without the data.

The real OpenSSH_2k / Linux_2k logs live outside the repository (``shared_data_dir()``); when
they are absent, ``build_auth_folder`` cuts windows from these lines instead, so every test and
the default run still work. The mix mirrors what the real logs contain: benign sessions
(OpenSSH ``Accepted`` + PAM session lines, Linux ``su``/``sshd(pam_unix)`` sessions), scattered
single failures, brute-force bursts (with ``message repeated N times``), invalid-user scans,
reverse-mapping ``POSSIBLE BREAK-IN ATTEMPT!`` warnings and pre-auth noise. Everything is
drawn from ``random.Random(seed)``: the same ``(n, seed)`` always gives the same lines.
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta

_USERS = ["alice", "bob", "fztu", "deploy", "backup", "jenkins", "carol", "news", "cyrus"]
_ATTACK_USERS = ["root", "admin", "oracle", "test", "guest", "ubuntu", "postgres"]
_SCAN_USERS = ["webmaster", "support", "ftpuser", "pi", "user1", "git", "nagios", "tomcat", "mysql", "0101"]
_HOSTS = ["ns.example-bad.com", "mail.scanner-net.ru", "static.vps-host.cn", "unknown.dsl-pool.br"]
#: made-up providers for generated reverse-DNS names (Linux_2k's PAM rhost is often a host name, not an IP)
_ISPS = ["dsl.example-tel.net", "adsl.pool-isp.com", "cable.netz-beispiel.de", "dyn.provider-xy.nl", "static.isp-ejemplo.es",
         "ip.kabel-net.at", "broadband.sample-tel.co.uk", "res.fibre-isp.fr"]
_WORDS = ["zeta", "mercury", "lynx", "orion", "delta", "nimbus", "atlas", "quartz", "ember", "cobalt", "vortex", "summit"]
_TLDS = ["com", "net", "org", "info", "edu", "biz"]
#: ``fresh_names``: syllables of made-up account names, and neutral words for the free text an attacker can put
#: in a field it controls (a user name, a reverse-DNS name, an ssh client string). No instruction-like text.
_SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "ba", "do", "fi", "gu", "ha", "jo", "pe", "qu", "wy",
              "xe", "an", "el", "or", "us", "in"]
_TEXT = ["the", "a", "blue", "window", "seven", "river", "paper", "quick", "green", "house", "music", "table", "over",
         "under", "light", "stone", "north", "garden", "yellow", "and", "of", "to", "is", "was", "with", "night",
         "bright", "clock", "number", "letter", "train", "field", "cloud", "small", "open", "close", "bird", "road"]
#: bumped whenever the generated lines change, so cached generated builds are rebuilt
GENERATOR_VERSION = "auth-gen-2"


class _Log:
    """Accumulates lines with increasing timestamps and fresh pids, in OpenSSH/Linux syntax."""

    def __init__(self, rng: random.Random, fresh_names: bool = False) -> None:
        self.rng = rng
        self.fresh_names = fresh_names
        self.now = datetime(2024, 12, 10, 6, 55, 46)
        self.pid = 24000 + rng.randint(0, 500)
        self.lines: list[str] = []

    def new_pid(self) -> int:
        self.pid += self.rng.randint(1, 40)
        return self.pid

    def emit(self, proc: str, pid: int | None, msg: str, host: str = "LabSZ", gap: int = 2) -> None:
        self.now += timedelta(seconds=self.rng.randint(0, gap))
        stamp = f"{self.now:%b} {self.now.day:2d} {self.now:%H:%M:%S}"
        self.lines.append(f"{stamp} {host} {proc}{'' if pid is None else f'[{pid}]'}: {msg}")

    def ip(self) -> str:
        r = self.rng
        return f"{r.randint(1, 223)}.{r.randint(0, 255)}.{r.randint(0, 255)}.{r.randint(1, 254)}"

    def port(self) -> int:
        return self.rng.randint(1024, 65535)

    def hostname(self) -> str:
        """A fresh reverse-DNS name in one of the shapes Linux_2k's rhost values take."""
        r = self.rng
        a, b, c, d = r.randint(1, 223), r.randint(0, 255), r.randint(0, 255), r.randint(1, 254)
        shape = r.randrange(5)
        if shape == 0:
            return f"{a}-{b}-{c}-{d}.{r.choice(_ISPS)}"
        if shape == 1:
            return f"adsl-{a}-{b}-{c}-{d}.{r.choice(_ISPS)}"
        if shape == 2:
            return f"h{a}-{b}-{c}-{d}.{r.choice(_ISPS)}"
        if shape == 3:
            return f"{r.choice(_WORDS)}{r.randint(1, 99)}.{r.choice(_WORDS)}.{r.choice(_TLDS)}"
        return f"{r.choice('abcdhnp')}{r.randint(10**6, 10**9)}.{r.choice(_ISPS)}"

    def rhost(self) -> str:
        return self.hostname() if self.rng.random() < 0.6 else self.ip()

    def user(self, pool: list[str], junk: float = 0.0) -> str:
        """An account name from ``pool``; with ``fresh_names``, often a made-up one (a model then learns to copy
        the name it reads rather than recall a short list), and with probability ``junk`` a phrase with spaces,
        as a scanner or an attacker may send for an invalid user."""
        r = self.rng
        if not self.fresh_names or r.random() < 0.35:
            return r.choice(pool)
        if r.random() < junk:
            return self.text(2, 9)
        name = "".join(r.choice(_SYLLABLES) for _ in range(r.randint(1, 4)))
        return name + (str(r.randint(0, 999)) if r.random() < 0.25 else "")

    def text(self, lo: int, hi: int, sep: str = " ") -> str:
        return sep.join(self.rng.choice(_TEXT) for _ in range(self.rng.randint(lo, hi)))

    def break_in_host(self) -> str:
        """The reverse-DNS name of a break-in warning; with ``fresh_names`` a new one (sometimes a long chain of
        words, a name an attacker who controls its DNS can choose) instead of four fixed ones."""
        if not self.fresh_names:
            return self.rng.choice(_HOSTS)
        return self.hostname() if self.rng.random() < 0.7 else f"{self.text(3, 14, '-')}.{self.rng.choice(_TLDS)}"


def _benign_ssh(g: _Log) -> None:
    pid, ip, user = g.new_pid(), g.ip(), g.user(_USERS[:7])
    method = g.rng.choice(["password", "publickey"])
    g.emit("sshd", pid, f"Accepted {method} for {user} from {ip} port {g.port()} ssh2")
    g.emit("sshd", pid, f"pam_unix(sshd:session): session opened for user {user} by (uid=0)", gap=0)
    g.emit("sshd", pid, f"Received disconnect from {ip}: 11: disconnected by user", gap=600)
    g.emit("sshd", pid, f"pam_unix(sshd:session): session closed for user {user}", gap=0)


def _benign_su(g: _Log) -> None:
    pid, user = g.new_pid(), g.rng.choice(["news", "cyrus"])
    g.emit("su(pam_unix)", pid, f"session opened for user {user} by (uid=0)", host="combo", gap=60)
    g.emit("su(pam_unix)", pid, f"session closed for user {user}", host="combo", gap=5)


def _benign_linux_ssh(g: _Log) -> None:
    pid, user = g.new_pid(), g.rng.choice(["test", "alice"])
    g.emit("sshd(pam_unix)", pid, f"session opened for user {user} by (uid=509)", host="combo", gap=60)
    g.emit("sshd(pam_unix)", pid, f"session closed for user {user}", host="combo", gap=120)


def _noise(g: _Log) -> None:
    pid, ip = g.new_pid(), g.ip()
    msg = g.rng.choice([f"Connection closed by {ip} [preauth]", f"Did not receive identification string from {ip}"])
    if g.fresh_names and g.rng.random() < 0.25:  # a client string the sender chose: no evidence, whatever it says
        msg = f"Bad protocol version identification '{g.text(1, 12)}' from {ip} port {g.port()}"
    g.emit("sshd", pid, msg, gap=30)


def _pam_fail(g: _Log, pid: int, ip: str, user: str | None) -> None:
    tail = f"  user={user}" if user else " "
    g.emit("sshd", pid, f"pam_unix(sshd:auth): authentication failure; logname= uid=0 euid=0 tty=ssh ruser= rhost={ip}{tail}")


def _typo_then_login(g: _Log) -> None:
    """One mistyped password, then success: a single failure (suspicious at most)."""
    pid, ip, user = g.new_pid(), g.ip(), g.user(_USERS[:7])
    _pam_fail(g, pid, ip, user)
    g.emit("sshd", pid, f"Failed password for {user} from {ip} port {g.port()} ssh2")
    g.emit("sshd", pid, f"Accepted password for {user} from {ip} port {g.port()} ssh2", gap=8)
    g.emit("sshd", pid, f"pam_unix(sshd:session): session opened for user {user} by (uid=0)", gap=0)


def _brute_force(g: _Log) -> None:
    ip, user = g.ip(), g.user(_ATTACK_USERS)
    for _ in range(g.rng.randint(1, 3)):
        pid, port = g.new_pid(), g.port()
        _pam_fail(g, pid, ip, user)
        g.emit("sshd", pid, f"Failed password for {user} from {ip} port {port} ssh2")
        n = g.rng.randint(2, 5)
        g.emit("sshd", pid, f"message repeated {n} times: [ Failed password for {user} from {ip} port {port} ssh2]", gap=12)
        g.emit("sshd", pid, f"Disconnecting: Too many authentication failures for {user} [preauth]", gap=0)
        g.emit("sshd", pid, f"PAM {n} more authentication failures; logname= uid=0 euid=0 tty=ssh ruser= rhost={ip}  user={user}", gap=0)


def _invalid_scan(g: _Log, break_in: bool = False) -> None:
    ip = g.ip()
    for _ in range(g.rng.randint(1, 3)):
        pid, user = g.new_pid(), g.user(_SCAN_USERS, junk=0.15)
        if break_in:
            g.emit("sshd", pid, f"reverse mapping checking getaddrinfo for {g.break_in_host()} [{ip}] failed - POSSIBLE BREAK-IN ATTEMPT!")
        g.emit("sshd", pid, f"Invalid user {user} from {ip}", gap=0)
        g.emit("sshd", pid, f"input_userauth_request: invalid user {user} [preauth]", gap=0)
        g.emit("sshd", pid, "pam_unix(sshd:auth): check pass; user unknown", gap=0)
        _pam_fail(g, pid, ip, None)
        g.emit("sshd", pid, f"Failed password for invalid user {user} from {ip} port {g.port()} ssh2")
        g.emit("sshd", pid, f"Received disconnect from {ip}: 11: Bye Bye [preauth]", gap=1)


def _linux_root_guess(g: _Log) -> None:
    """Linux_2k style: one PAM failure line per attempt, from a host name (or IP), user=root."""
    host = g.rhost()
    for _ in range(g.rng.randint(1, 9)):
        g.emit(
            "sshd(pam_unix)",
            g.new_pid(),
            f"authentication failure; logname= uid=0 euid=0 tty=NODEVssh ruser= rhost={host}  user=root",
            host="combo",
            gap=1,
        )


def _linux_unknown_user(g: _Log) -> None:
    """Linux_2k style: a burst of guesses at unknown accounts, each pid logging ``check pass; user unknown``
    then a PAM failure without ``user=``; the pids' lines interleave, as they do in the real log."""
    host, pids = g.rhost(), [g.new_pid() for _ in range(g.rng.randint(1, 12))]
    pending: list[tuple[int, str]] = []
    for pid in pids:
        pending.append((pid, "check pass; user unknown"))
        pending.append((pid, f"authentication failure; logname= uid=0 euid=0 tty=NODEVssh ruser= rhost={host} "))
    while pending:  # keep each pid's two lines in order, shuffle across pids
        i = g.rng.randrange(min(3, len(pending)))
        pid = pending[i][0]
        first = next(j for j, (p, _) in enumerate(pending) if p == pid)
        g.emit("sshd(pam_unix)", pid, pending.pop(first)[1], host="combo", gap=1)


def _klogind_fail(g: _Log) -> None:
    """Linux_2k style: Kerberos rlogin failures, two lines per attempt."""
    ip = g.ip()
    for _ in range(g.rng.randint(1, 6)):
        pid = g.new_pid()
        g.emit("klogind", pid, f"Authentication failed from {ip} ({ip}): Permission denied in replay cache code ", host="combo", gap=1)
        g.emit("klogind", pid, "Kerberos authentication failed ", host="combo", gap=0)


def _linux_noise(g: _Log) -> None:
    """Linux_2k lines that carry no authentication evidence: ftpd connections, logrotate alerts."""
    if g.rng.random() < 0.3:
        g.emit("logrotate", None, "ALERT exited abnormally with [1]", host="combo", gap=30)
        return
    ip, name = g.ip(), g.rng.choice([g.hostname(), ""])
    for _ in range(g.rng.randint(1, 4)):
        g.emit("ftpd", g.new_pid(), f"connection from {ip} ({name}) at {g.now:%a %b} {g.now.day} {g.now:%H:%M:%S %Y} ", host="combo", gap=0)


_EPISODES = [
    (_benign_ssh, 14),
    (_benign_su, 14),
    (_benign_linux_ssh, 6),
    (_noise, 8),
    (_typo_then_login, 6),
    (_brute_force, 8),
    (_invalid_scan, 8),
    (lambda g: _invalid_scan(g, break_in=True), 4),
    (_linux_root_guess, 4),
    (_linux_unknown_user, 4),
    (_klogind_fail, 2),
    (_linux_noise, 6),
]


def generate_auth_lines(n: int, seed: int = 0, fresh_names: bool = False) -> list[str]:
    """``n`` log lines: a reproducible mix of benign and attack episodes (see module doc).
    ``fresh_names``: account names mostly made up per episode (some multi-word for invalid users), new
    reverse-DNS names for break-in warnings, and client strings in ``Bad protocol version`` lines, instead of
    a few fixed lists (an SFT warm-up's lines, ``sft.warmup_fresh_names``; the default lines are unchanged).

    Benign episodes come in runs (several in a row) so that windows made only of benign
    lines occur, as they do in the real logs.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    g = _Log(rng, fresh_names)
    funcs, weights = zip(*_EPISODES)
    benign = {_benign_ssh, _benign_su, _benign_linux_ssh, _noise, _linux_noise}
    while len(g.lines) < n:
        episode = rng.choices(funcs, weights)[0]
        for _ in range(rng.randint(3, 8) if episode in benign else 1):
            episode(g)
    return g.lines[:n]
