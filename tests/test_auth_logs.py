"""auth_logs: the annotation rules, the folder builder (real and synthetic) and the loader's errors."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from sectune.data import auth_logs as A
from sectune.data.synthetic_auth import GENERATOR_VERSION, generate_auth_lines
from sectune.errors import DataError
from sectune.paths import shared_data_dir

# ----------------------------------------------------------------------------- the rules

BRUTE = [
    "Dec 10 07:13:31 LabSZ sshd[24227]: pam_unix(sshd:auth): authentication failure; logname= uid=0 euid=0 tty=ssh ruser= rhost=5.36.59.76.dynamic-dsl-ip.omantel.net.om  user=root",
    "Dec 10 07:13:43 LabSZ sshd[24227]: Failed password for root from 5.36.59.76 port 42393 ssh2",
    "Dec 10 07:13:56 LabSZ sshd[24227]: message repeated 5 times: [ Failed password for root from 5.36.59.76 port 42393 ssh2]",
    "Dec 10 07:13:56 LabSZ sshd[24227]: Disconnecting: Too many authentication failures for root [preauth]",
    "Dec 10 07:13:56 LabSZ sshd[24227]: PAM 5 more authentication failures; logname= uid=0 euid=0 tty=ssh ruser= rhost=5.36.59.76.dynamic-dsl-ip.omantel.net.om  user=root",
    "Dec 10 07:13:56 LabSZ sshd[24227]: PAM service(sshd) ignoring max retries; 6 > 3",
    "Dec 10 07:14:02 LabSZ sshd[24229]: Invalid user  0101 from 5.188.10.180",
    "Dec 10 07:14:02 LabSZ sshd[24229]: input_userauth_request: invalid user  0101 [preauth]",
]

CLEAN = [
    "Dec 10 09:32:20 LabSZ sshd[24680]: Accepted password for fztu from 119.137.62.142 port 49116 ssh2",
    "Dec 10 09:32:20 LabSZ sshd[24680]: pam_unix(sshd:session): session opened for user fztu by (uid=0)",
    "Dec 10 09:45:06 LabSZ sshd[24680]: pam_unix(sshd:session): session closed for user fztu",
    "Jun 18 04:07:05 combo su(pam_unix)[31791]: session opened for user cyrus by (uid=0)",
    "Jun 18 04:07:06 combo su(pam_unix)[31791]: session closed for user cyrus",
    "Dec 10 09:45:06 LabSZ sshd[24681]: Connection closed by 212.47.254.145 [preauth]",
]

BREAK_IN = [
    "Dec 10 06:55:46 LabSZ sshd[24200]: reverse mapping checking getaddrinfo for ns.marryaldkfaczcz.com [173.234.31.186] failed - POSSIBLE BREAK-IN ATTEMPT!",
    "Dec 10 06:55:46 LabSZ sshd[24200]: Invalid user webmaster from 173.234.31.186",
    "Dec 10 06:55:46 LabSZ sshd[24200]: input_userauth_request: invalid user webmaster [preauth]",
    "Dec 10 06:55:46 LabSZ sshd[24200]: pam_unix(sshd:auth): check pass; user unknown",
    "Dec 10 06:55:46 LabSZ sshd[24200]: pam_unix(sshd:auth): authentication failure; logname= uid=0 euid=0 tty=ssh ruser= rhost=173.234.31.186 ",
    "Dec 10 06:55:48 LabSZ sshd[24200]: Failed password for invalid user webmaster from 173.234.31.186 port 38926 ssh2",
    "Dec 10 06:55:48 LabSZ sshd[24200]: Connection closed by 173.234.31.186 [preauth]",
]


def test_brute_force_burst_counts_each_attempt_once():
    a = A.analyze_auth_log(BRUTE)
    # 1 Failed + 5 repeated = 6 attempts; the PAM lines (1 + 5 more) describe the same 6.
    assert a["failed_logins"] == 6
    assert a["accepted_logins"] == 0
    assert a["brute_force"] is True
    assert a["verdict"] == "malicious"
    assert a["targeted_users"] == ["root"]
    assert a["invalid_users"] == ["0101"]  # the real log's double space is not part of the name
    # The sshd message's IP wins over PAM's reverse-DNS rhost; the scanner appears with 0 failures.
    assert a["source_ips"] == [{"ip": "5.36.59.76", "failures": 6}, {"ip": "5.188.10.180", "failures": 0}]
    assert list(a) == ["failed_logins", "accepted_logins", "invalid_users", "targeted_users",
                       "source_ips", "brute_force", "break_in_attempts", "verdict", "summary"]  # evidence first
    assert A.validate_analysis(a) == []


def test_clean_session_is_benign():
    a = A.analyze_auth_log(CLEAN)
    assert a["verdict"] == "benign"
    assert (a["failed_logins"], a["accepted_logins"]) == (0, 1)  # Accepted + session opened = 1 login; su is not one
    assert a["source_ips"] == [{"ip": "119.137.62.142", "failures": 0}]
    assert a["invalid_users"] == a["targeted_users"] == []
    assert a["brute_force"] is False and a["break_in_attempts"] == 0


def test_break_in_warning_with_failure_is_malicious():
    a = A.analyze_auth_log(BREAK_IN)
    assert a["break_in_attempts"] == 1
    assert a["failed_logins"] == 1
    assert a["invalid_users"] == ["webmaster"]
    assert a["source_ips"] == [{"ip": "173.234.31.186", "failures": 1}]
    assert a["verdict"] == "malicious" and a["brute_force"] is False
    # Without the failure lines, the warning alone is only suspicious.
    assert A.analyze_auth_log(BREAK_IN[:3])["verdict"] == "suspicious"


def test_linux_pam_failures_and_login_after_failures():
    lines = [
        f"Jun 15 02:04:{i:02d} combo sshd(pam_unix)[{20000 + i}]: authentication failure; logname= uid=0 euid=0 "
        f"tty=NODEVssh ruser= rhost=220-135-151-1.hinet-ip.hinet.net  user=root"
        for i in range(4)
    ]
    a = A.analyze_auth_log(lines)
    assert (a["failed_logins"], a["verdict"], a["brute_force"]) == (4, "suspicious", False)
    assert a["source_ips"] == [{"ip": "220-135-151-1.hinet-ip.hinet.net", "failures": 4}]
    ssh = [
        "Dec 10 10:00:00 LabSZ sshd[1]: Failed password for bob from 1.2.3.4 port 1 ssh2",
        "Dec 10 10:00:01 LabSZ sshd[2]: Failed password for bob from 1.2.3.4 port 2 ssh2",
        "Dec 10 10:00:02 LabSZ sshd[3]: Failed password for bob from 1.2.3.4 port 3 ssh2",
        "Dec 10 10:00:03 LabSZ sshd[4]: Accepted password for bob from 1.2.3.4 port 4 ssh2",
    ]
    b = A.analyze_auth_log(ssh)
    assert (b["failed_logins"], b["accepted_logins"], b["verdict"]) == (3, 1, "malicious")
    # the threshold is 3 failures (FAILED_THEN_ACCEPTED): two failures then a login is only suspicious
    c = A.analyze_auth_log(ssh[1:])
    assert (c["failed_logins"], c["accepted_logins"], c["verdict"]) == (2, 1, "suspicious")
    assert c["summary"] == "Suspicious: failed logins; 2 failed, 1 accepted logins."


def test_render_prompt_and_completion():
    a = A.analyze_auth_log(CLEAN)
    p = A.render_prompt("\n".join(CLEAN) + "\n\n")
    assert p.startswith("Analyze these authentication log lines and answer with JSON matching the schema.\n### Logs:\n")
    assert p.endswith(CLEAN[-1] + "\n### Analysis:\n")
    c = A.render_completion(a)
    assert not c.endswith("\n") and " " not in c.split('"summary"')[0]
    assert json.loads(c) == a and list(json.loads(c)) == list(a) == list(A.ANSWER_KEYS)
    # evidence first, the verdict after it, whatever order the annotation file had; extra keys last
    shuffled = dict(reversed(list({**a, "note": 1}.items())))
    keys = list(json.loads(A.render_completion(shuffled)))
    assert keys == [*A.ANSWER_KEYS, "note"] and keys.index("verdict") > keys.index("brute_force")
    schema_order = list(json.loads((Path(A.__file__).parent / "auth_schema.json").read_text())["properties"])
    assert schema_order == list(A.ANSWER_KEYS)  # constrained decoding writes the same order


def test_validate_analysis_reports_key_paths():
    a = A.analyze_auth_log(BRUTE)
    bad = dict(a, failed_logins=-1, source_ips=[{"ip": "x"}])
    errors = A.validate_analysis(bad)
    assert any(e.startswith("failed_logins:") for e in errors)
    assert any(e.startswith("source_ips/0:") and "failures" in e for e in errors)
    assert A.validate_analysis({"verdict": "benign"})  # missing keys


def test_synthetic_generator_is_reproducible():
    assert generate_auth_lines(300, seed=3) == generate_auth_lines(300, seed=3)
    assert generate_auth_lines(300, seed=3) != generate_auth_lines(300, seed=4)
    assert len(generate_auth_lines(123, seed=0)) == 123


def test_synthetic_generator_writes_linux_2k_evidence_with_fresh_sources():
    """Linux_2k's forms (unknown-user guesses from a host name, klogind failures, ftpd/logrotate noise) with sources
    that differ from episode to episode, so a model warmed up on them must copy each window's source, not recall one."""
    lines = generate_auth_lines(6000, seed=1)
    pam = [ln for ln in lines if "tty=NODEVssh" in ln]
    rhosts = {re.search(r"rhost=(\S+)", ln)[1] for ln in pam}
    assert len(rhosts) > 20 and any(not re.fullmatch(r"[\d.]+", h) for h in rhosts) and any(re.fullmatch(r"[\d.]+", h) for h in rhosts)
    unknown = [ln for ln in lines if "check pass; user unknown" in ln]
    klog = [ln for ln in lines if " klogind[" in ln]
    assert unknown and klog and any(" ftpd[" in ln for ln in lines) and any(" logrotate: ALERT" in ln for ln in lines)
    # the rules read them as evidence: a klogind attempt is a failure from its IP; a guess at an unknown account from a host name
    k = next(i for i, ln in enumerate(lines) if "Authentication failed from" in ln)
    a = A.analyze_auth_log(lines[k:k + 2])
    ip = re.search(r"from (\S+) ", lines[k])[1]
    assert a["failed_logins"] >= 1 and a["source_ips"][0]["ip"] == ip and a["verdict"] != "benign"
    u = lines.index(unknown[0])
    pid = re.search(r"\[(\d+)\]", unknown[0])[1]
    mine = [ln for ln in lines[u:u + 40] if f"[{pid}]" in ln][:2]
    assert A.analyze_auth_log(mine)["failed_logins"] == 1 and A.analyze_auth_log(mine)["verdict"] == "suspicious"



def test_fresh_names_make_up_accounts_and_attacker_text_that_the_rules_read_as_before():
    """``fresh_names`` (an SFT warm-up's ``sft.warmup_fresh_names``): account names mostly outside the fixed lists,
    some invalid users with spaces, new break-in host names, ``Bad protocol version`` client strings; the rules still
    count a multi-word invalid user as one invalid user and a client string as no evidence. The default lines are
    unchanged by the option's existence (the tiny tokenizer and the no-data fallback are trained on them)."""
    from sectune.data import synthetic_auth as S

    plain, fresh = generate_auth_lines(6000, seed=2), generate_auth_lines(6000, seed=2, fresh_names=True)
    assert plain == generate_auth_lines(6000, seed=2, fresh_names=False) and fresh != plain
    fixed = set(S._USERS + S._ATTACK_USERS + S._SCAN_USERS)

    def invalid_users(lines):
        return [m[1] for ln in lines if (m := re.search(r": Invalid user (.*) from \S+$", ln))]

    assert set(invalid_users(plain)) <= fixed
    names = invalid_users(fresh)
    made_up = {n for n in names if n not in fixed}
    assert len(made_up) > 20 and any(" " in n for n in made_up) and any(n in fixed for n in names)
    accepted = {re.search(r"Accepted \S+ for (\S+)", ln)[1] for ln in fresh if "Accepted " in ln}
    assert accepted - fixed and accepted & fixed
    hosts = {re.search(r"getaddrinfo for (\S+) ", ln)[1] for ln in fresh if "BREAK-IN" in ln}
    assert not hosts <= set(S._HOSTS) and len(hosts) > 10
    junk = next(ln for ln in fresh if re.search(r": Invalid user \S+ \S+.* from ", ln))
    a = A.analyze_auth_log([junk])
    assert a["invalid_users"] == [re.search(r"Invalid user (.*) from", junk)[1][:32]] and a["verdict"] == "suspicious"
    bad = [ln for ln in fresh if "Bad protocol version identification '" in ln]
    assert bad and A.analyze_auth_log(bad[:3])["verdict"] == "benign"


def test_warmup_fresh_names_builds_its_own_cached_folder(tmp_path):
    """``sft.warmup_fresh_names=true``: the warm-up's windows come from the fresh-names lines, in a cache folder of
    their own (a run without the option keeps reading the fixed-names folder)."""
    from conftest import compose

    from sectune.data import generated_auth_folder

    base = [f"paths.cache_dir={tmp_path}", "sft.warmup_lines=1500"]
    fixed, fresh = generated_auth_folder(compose(base)), generated_auth_folder(compose([*base, "sft.warmup_fresh_names=true"]))
    assert fresh != fixed and fresh.name == f"{fixed.name}-fresh"
    text = "\n".join(s.log_text for s in A.load_auth_folder(fresh))
    assert set(text.splitlines()) <= set(generate_auth_lines(1500, 7, fresh_names=True))
    assert "fresh names" in json.loads((fresh / "BUILD_INFO.json").read_text())["note"]

# ------------------------------------------------------------------------------ builder

_REAL = [shared_data_dir() / rel for rel in A.REAL_SOURCES]


def _check_layout(root: Path, info: dict) -> list[A.AuthSample]:
    samples = A.load_auth_folder(root)
    assert len(samples) == info["total"] == sum(info["counts"].values())
    assert {s.label for s in samples} == set(A.CLASSES)
    for s in samples:
        assert s.txt_path.parent == root / "auth_data" / s.label
        assert re.fullmatch(r"auth_data_\d+_\d+\.txt", s.txt_path.name)
        assert s.json_path == root / "Auth_bin" / s.txt_path.name.replace("auth_data_", "auth_text_").replace(".txt", ".json")
        assert A.validate_analysis(s.analysis) == []
        assert s.analysis["verdict"] == s.label
        assert len(A.render_completion(s.analysis)) < 500
    assert not [p for p in root.parent.iterdir() if p.name.startswith(f".{root.name}.")]  # no temp leftovers
    return samples


def test_build_on_real_logs(tmp_path):
    if not all(p.is_file() for p in _REAL):
        pytest.skip(f"real loghub logs not found under {shared_data_dir()} (set SECTUNE_SHARED_DATA)")
    out = tmp_path / "auth"
    info = A.build_auth_folder(out, shared_data_dir(), seed=0)
    assert info["source"] == "real"
    assert all(info["counts"][c] > 0 for c in A.CLASSES)
    assert [Path(f["path"]).name for f in info["source_files"]] == ["OpenSSH_2k.log", "Linux_2k.log"]
    assert all(len(f["sha256"]) == 64 for f in info["source_files"])
    assert json.loads((out / "BUILD_INFO.json").read_text()) == info
    samples = _check_layout(out, info)
    # Y is the window's first line number in its source file.
    first = next(s for s in samples if s.id.startswith("1_"))
    y = int(first.id.split("_")[1])
    assert _REAL[0].read_text().splitlines()[y - 1].rstrip() == first.log_text.splitlines()[0]
    lengths = {len(s.log_text.splitlines()) for s in samples}
    assert min(lengths) >= 6 and max(lengths) <= 20 and len(lengths) > 3
    # Same seed, same folder.
    again = A.build_auth_folder(tmp_path / "again", shared_data_dir(), seed=0)
    assert again["counts"] == info["counts"]


def test_iso_and_precise_timestamps_and_ipv4_mapped_sources_are_read_as_syslog_lines_are():
    """An audit (session 37): with journalctl -o short-iso / short-precise timestamps every line was read without its
    process and pid (an attempt's PAM and sshd lines counted twice, the sshd source lost, a brute force missed), and
    ::ffff:10.0.0.5 was cut to ::ffff:10, so five hosts with one failure each became one brute-forcing source."""
    from sectune.data.auth_rules import analyze_auth_log

    burst = []
    for i in range(6):
        burst.append(f"Dec 10 06:55:4{i} LabSZ sshd[2430{i}]: pam_unix(sshd:auth): authentication failure; logname= uid=0 "
                     "euid=0 tty=ssh ruser= rhost=203.0.113.7  user=root")
        burst.append(f"Dec 10 06:55:4{i} LabSZ sshd[2430{i}]: Failed password for root from 203.0.113.7 port 4{i}22 ssh2")
    want = analyze_auth_log(burst)
    assert want["failed_logins"] == 6 and want["brute_force"] and want["source_ips"] == [{"ip": "203.0.113.7", "failures": 6}]
    # and journalctl -o short-full, an ISO date and time apart, -o short-unix, -o short-monotonic (session 40: counted twice)
    for stamp in (r"2024-12-10T\1+0000", r"2024-12-10T\1.123456+00:00", r"Dec 10 \1.123456", r"2024-12-10T\1Z",
                  r"Tue 2024-12-10 \1 UTC", r"2024-12-10 \1", "1733813740.123456", "[ 1234.567890]"):
        assert analyze_auth_log([re.sub(r"^Dec 10 (\S+)", stamp, ln) for ln in burst]) == want, stamp
    scan = [f"Dec 10 06:55:4{i} LabSZ sshd[2430{i}]: Failed password for root from ::ffff:10.0.{i}.5 port 4{i}22 ssh2" for i in range(5)]
    a = analyze_auth_log(scan)
    assert not a["brute_force"] and a["verdict"] == "suspicious"
    assert [s["ip"] for s in a["source_ips"]] == ["::ffff:10.0.0.5", "::ffff:10.0.1.5", "::ffff:10.0.2.5"]
    assert analyze_auth_log(["Dec 10 06:55:40 h sshd[1]: Failed password for root from 2001:db8::7 port 22 ssh2"])["source_ips"] == [
        {"ip": "2001:db8::7", "failures": 1}]


def test_openssh_98_process_names_and_usedns_host_names_are_read_as_sshd_and_its_addresses_are():
    """An audit (session 40): OpenSSH 9.8 logs from sshd-session[pid] (10: sshd-auth), and the rules read a source only
    from "sshd": a password guessed after 3 failures was suspicious, 11 failures from one IPv6 address had no source.
    With UseDNS sshd names the host, which was never a source unless PAM's rhost= gave it."""
    from sectune.data.auth_rules import analyze_auth_log

    src = "2001:db8:5:1::23"
    lines = []
    for pid in (40120, 40124, 40130):
        lines += [f"2026-12-07T05:14:18.101555+00:00 bastion sshd[{pid}]: pam_unix(sshd:auth): authentication failure; "
                  f"logname= uid=0 euid=0 tty=ssh ruser= rhost={src}  user=deploy",
                  f"2026-12-07T05:14:20.309812+00:00 bastion sshd[{pid}]: Failed password for deploy from {src} port 51040 ssh2"]
    lines += [f"2026-12-07T05:14:36.500100+00:00 bastion sshd[40138]: Accepted password for deploy from {src} port 51090 ssh2",
              "2026-12-07T05:14:36.510200+00:00 bastion sshd[40138]: pam_unix(sshd:session): session opened for user deploy(uid=1001) by (uid=0)"]
    burst = [f"Dec  7 05:14:1{i} bastion sshd[4020{i}]: Failed password for root from {src} port 5104{i} ssh2" for i in range(6)]
    for window in (lines, burst):
        want = analyze_auth_log(window)
        assert want["verdict"] == "malicious" and want["source_ips"][0]["ip"] == src
        for name in ("sshd-session", "sshd-auth"):
            assert analyze_auth_log([ln.replace(" sshd[", f" {name}[") for ln in window]) == want, name
    host = "45-33-1-2.ip.linodeusercontent.com"
    dns = analyze_auth_log([ln.replace(src, host) for ln in burst])
    assert dns["verdict"] == "malicious" and dns["brute_force"] and dns["source_ips"] == [{"ip": host, "failures": 6}]
    from sectune.data.auth_logs import _auth_relevant

    assert _auth_relevant("Dec  7 05:14:18 combo sshd-session[5]: Failed password for root from 10.0.0.1 port 2 ssh2")


def test_the_tail_of_an_invalid_user_scan_is_a_scan_without_its_invalid_user_lines():
    """OpenSSH >= 7.5 ends each connection of a scan with "Connection closed by / Disconnected from invalid user U IP port
    N"; a window holding only those tails (the "Invalid user" lines in the window before) was benign (an audit, session 40)."""
    from sectune.data.auth_rules import analyze_auth_log

    users = ["admin", "ubuntu", "test", "oracle"]
    tail = [f"Dec  7 05:14:1{i} web1 sshd[600{i}]: {'Connection closed by' if i % 2 else 'Disconnected from'} invalid user {u} "
            f"203.0.113.9 port 4010{i} [preauth]" for i, u in enumerate(users)]
    a = analyze_auth_log(tail)
    assert a["verdict"] == "suspicious" and sorted(a["invalid_users"]) == sorted(users)
    assert [s["ip"] for s in a["source_ips"]] == ["203.0.113.9"]
    head = [f"Dec  7 05:14:0{i} web1 sshd[600{i}]: Invalid user {u} from 203.0.113.9 port 4010{i}" for i, u in enumerate(users)]
    assert analyze_auth_log(head)["invalid_users"] == a["invalid_users"]


def test_a_log_whose_lines_have_no_syslog_header_is_said_when_building(tmp_path, capsys):
    src = tmp_path / "src" / "loghub_openssh_2k"
    src.mkdir(parents=True)
    (src / "OpenSSH_2k.log").write_text("".join(f"<38>1 2024-12-10T06:55:4{i}Z host sshd 2430{i} - - Failed password for root "
                                                f"from 10.0.0.{i} port 22 ssh2\n" for i in range(9)))
    with pytest.raises(DataError):
        A.build_auth_folder(tmp_path / "out", tmp_path / "src", seed=0)
    assert "OpenSSH_2k.log: 0 of 9 lines have a syslog header" in capsys.readouterr().out


def test_build_without_real_logs_uses_synthetic(tmp_path):
    out = tmp_path / "auth"
    info = A.build_auth_folder(out, tmp_path / "nowhere", seed=1)
    assert info["source"] == "synthetic" and info["source_files"] == [] and "synthetic" in info["note"]
    _check_layout(out, info)
    # ensure_* reuses a finished build instead of rebuilding it.
    marker = out / "auth_data" / "benign" / "marker.keep"
    marker.write_text("x")
    assert A.ensure_auth_folder(out, tmp_path / "nowhere", seed=1) == info
    assert marker.exists()
    # Rebuilding replaces the folder whole.
    A.build_auth_folder(out, tmp_path / "nowhere", seed=1, max_windows=9)
    assert not marker.exists() and len(A.load_auth_folder(out)) == 9


def test_a_build_from_generated_logs_is_rebuilt_once_the_real_logs_arrive(tmp_path):
    """A fresh clone builds from generated logs; after the README's download steps the next run must read the
    real logs (it kept the generated build and said the folder had none), and the run's digest must change so
    a pipeline or a sweep does not reuse steps trained on the generated ones."""
    from sectune.runner import config_digest
    from conftest import compose

    src, out = tmp_path / "shared", tmp_path / "cache" / "auth"
    src.mkdir()
    cfg = compose([f"paths.shared_data={src}"])
    before = config_digest(cfg)
    assert A.ensure_auth_folder(out, src, seed=0)["source"] == "synthetic"
    lines = generate_auth_lines(3000, 5)
    for i, rel in enumerate(A.REAL_SOURCES):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text("\n".join(lines[i * 1500 : (i + 1) * 1500]) + "\n")
    info = A.ensure_auth_folder(out, src, seed=0)
    assert info["source"] != "synthetic" and len(info["source_files"]) == len(A.REAL_SOURCES)
    assert A.ensure_auth_folder(out, src, seed=0) == info  # and reused from then on
    assert config_digest(cfg) != before and config_digest(cfg) == config_digest(compose([f"paths.shared_data={src}"]))


def test_edited_source_logs_are_read_again_and_change_the_digest(tmp_path, capsys):
    """The built windows are cached by the source folder's name: a user's log edited (grown by a week, a newer loghub
    release) was never read again, and with a dataset.source_dir of their own a pipeline skipped every step too."""
    from sectune.runner import config_digest
    from conftest import compose

    src = tmp_path / "mine"
    lines = generate_auth_lines(3000, 5)
    for i, rel in enumerate(A.REAL_SOURCES):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text("\n".join(lines[i * 1500 : (i + 1) * 1500]) + "\n")
    cfg = compose([f"paths.cache_dir={tmp_path / 'cache'}", f"dataset.source_dir={src}"])
    from sectune.data import auth_logs_folder

    out = auth_logs_folder(cfg)
    built, before = A._built(out), config_digest(cfg)
    assert built["source"] == "real" and auth_logs_folder(cfg) == out and A._built(out) == built  # reused unchanged
    assert config_digest(compose([f"paths.cache_dir={tmp_path / 'cache'}"])) != before  # another source, another run
    log = src / A.REAL_SOURCES[0]
    log.write_text(log.read_text().replace("Failed password", "Accepted password"))
    assert auth_logs_folder(cfg) == out
    rebuilt = A._built(out)
    assert rebuilt["source_files"][0]["sha256"] != built["source_files"][0]["sha256"] and rebuilt["counts"] != built["counts"]
    assert f"{log} changed since {out} was built from it" in capsys.readouterr().err
    assert config_digest(cfg) != before
    # a file touched but unchanged: the same windows, no rebuild
    log.write_text(log.read_text())
    assert auth_logs_folder(cfg) == out and A._built(out) == rebuilt and "building" not in capsys.readouterr().err


def test_generated_lines_build_uses_no_real_line_even_where_the_real_logs_are(tmp_path):
    """sft.warmup_lines' folder: only generated lines, cut and annotated like the real ones."""
    src = tmp_path / "shared"  # a source dir that does hold "real" logs
    for rel in A.REAL_SOURCES:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text("Dec 10 06:55:46 LabSZ sshd[1]: Failed password for root from 9.9.9.9 port 22 ssh2\n" * 50)
    info = A.build_auth_folder(tmp_path / "gen", src, seed=3, generated_lines=3000)
    assert info["source"] == "synthetic" and info["source_files"] == [] and info["generated_lines"] == 3000
    samples = _check_layout(tmp_path / "gen", info)
    assert len(samples) > 150 and all(c > 0 for c in info["counts"].values())
    generated = set(generate_auth_lines(3000, 3))
    assert all(line in generated for s in samples for line in s.log_text.splitlines())
    assert not any("9.9.9.9" in s.log_text for s in samples)
    assert all(s.analysis == A.analyze_auth_log(s.log_text.splitlines()) for s in samples[:50])
    with pytest.raises(DataError, match="generated_lines must be >= 0"):
        A.build_auth_folder(tmp_path / "neg", src, generated_lines=-1)
    # too few generated lines for every class: the key to raise is named, not the real logs (an audit, session 36)
    with pytest.raises(DataError, match=r"sft.warmup_lines=100: the generated lines gave no .*raise sft.warmup_lines") as e:
        A.build_auth_folder(tmp_path / "few", src, generated_lines=100)
    assert str(src) not in str(e.value)


def test_a_generated_build_of_an_older_generator_is_rebuilt(tmp_path):
    """The cache key of a generated folder is its size and seed: a build that an older generator (or older rules)
    wrote is rebuilt, not reused; a current one is reused as it is."""
    out = tmp_path / "gen"
    info = A.ensure_auth_folder(out, seed=3, generated_lines=2000)
    assert info["generator"] == GENERATOR_VERSION
    marker = out / "auth_data" / "kept.txt"
    marker.write_text("x")
    assert A.ensure_auth_folder(out, seed=3, generated_lines=2000) == info and marker.exists()  # current: reused
    stale = dict(info)
    stale.pop("generator")
    (out / "BUILD_INFO.json").write_text(json.dumps(stale))
    assert A.ensure_auth_folder(out, seed=3, generated_lines=2000)["generator"] == GENERATOR_VERSION
    assert not marker.exists() and len(A.load_auth_folder(out)) == info["total"]


def test_a_build_that_another_run_finished_meanwhile_is_kept_as_it_is(tmp_path):
    """Two runs with a cold cache (two sweep jobs, an evaluation beside another) both build the same folder: the second
    to finish used to move the first's folder aside while the first run was reading it ("no auth_data_X_Y.txt files
    under auth_data/<class>/", exit 2). The same build found finished is now kept; a different one still replaces it."""
    out = tmp_path / "auth"
    info = A.build_auth_folder(out, tmp_path / "nowhere", seed=1)
    marker = out / "reader_was_here.txt"
    marker.write_text("x")
    assert A.build_auth_folder(out, tmp_path / "nowhere", seed=1) == info  # ensure_auth_folder saw no build when it began
    assert marker.exists() and not list(tmp_path.glob(".auth.building-*"))
    assert len(A.load_auth_folder(out)) == info["total"]
    A.build_auth_folder(out, tmp_path / "nowhere", seed=1, max_windows=9)
    assert not marker.exists() and len(A.load_auth_folder(out)) == 9


def test_failed_build_leaves_no_folder(tmp_path, monkeypatch):
    real = A._write_sample
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk full (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(A, "_write_sample", flaky)
    with pytest.raises(OSError, match="simulated"):
        A.build_auth_folder(tmp_path / "auth", tmp_path / "nowhere", seed=0)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------- loader


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("auth_small") / "auth"
    A.build_auth_folder(root, root.parent / "nowhere", seed=0, max_windows=12)
    return root


@pytest.fixture
def folder(small_folder, tmp_path) -> Path:
    copy = tmp_path / "auth"
    shutil.copytree(small_folder, copy)
    return copy


def _first_pair(root: Path) -> tuple[Path, Path]:
    s = A.load_auth_folder(root)[0]
    return s.txt_path, s.json_path


def test_max_samples_is_deterministic_and_covers_all_classes(small_folder):
    full = A.load_auth_folder(small_folder)
    assert [s.id for s in full] == sorted((s.id for s in full), key=lambda i: tuple(map(int, i.split("_"))))
    three = A.load_auth_folder(small_folder, max_samples=3)
    assert len(three) == 3 and {s.label for s in three} == set(A.CLASSES)
    assert [s.id for s in three] == [s.id for s in A.load_auth_folder(small_folder, max_samples=3)]
    assert len(A.load_auth_folder(small_folder, max_samples=1000)) == len(full)
    with pytest.raises(DataError, match="max_samples"):
        A.load_auth_folder(small_folder, max_samples=0)


def test_missing_and_not_a_dir(tmp_path):
    with pytest.raises(DataError, match="does not exist") as e:
        A.load_auth_folder(tmp_path / "absent")
    assert str(tmp_path / "absent") in str(e.value)
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(DataError, match="not a folder"):
        A.load_auth_folder(f)


@pytest.mark.parametrize("sub", ["auth_data", "Auth_bin"])
def test_missing_subfolder(folder, sub):
    shutil.rmtree(folder / sub)
    with pytest.raises(DataError, match=sub) as e:
        A.load_auth_folder(folder)
    assert str(folder / sub) in str(e.value)


def test_empty_folder(folder):
    for t in (folder / "auth_data").rglob("*.txt"):
        t.unlink()
    with pytest.raises(DataError, match="no auth_data_X_Y.txt"):
        A.load_auth_folder(folder)


def test_txt_without_json_names_both(folder):
    txt, js = _first_pair(folder)
    js.unlink()
    with pytest.raises(DataError) as e:
        A.load_auth_folder(folder)
    assert str(txt) in str(e.value) and str(js) in str(e.value)


def test_bad_json_names_file_line_and_column(folder):
    _, js = _first_pair(folder)
    js.write_text('{\n  "verdict": "benign",\n  "failed_logins": ,\n}\n')
    with pytest.raises(DataError) as e:
        A.load_auth_folder(folder)
    msg = str(e.value)
    assert str(js) in msg and "line 3, column 20" in msg and "\n" not in msg


def test_schema_violation_names_file_and_key(folder):
    _, js = _first_pair(folder)
    obj = json.loads(js.read_text())
    obj["source_ips"] = [{"ip": "1.2.3.4", "failures": "many"}]
    js.write_text(json.dumps(obj))
    with pytest.raises(DataError) as e:
        A.load_auth_folder(folder)
    msg = str(e.value)
    assert str(js) in msg and "source_ips/0/failures" in msg and "'many' is not of type 'integer'" in msg


def test_empty_txt(folder):
    txt, _ = _first_pair(folder)
    txt.write_text("\n")
    with pytest.raises(DataError, match="empty log file") as e:
        A.load_auth_folder(folder)
    assert str(txt) in str(e.value)


def test_custom_schema_path(folder, tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "required": ["not_there"]}))
    with pytest.raises(DataError, match="not_there"):
        A.load_auth_folder(folder, schema_path=schema)
    schema.write_text("{oops")
    with pytest.raises(DataError, match=r"line 1, column 2"):
        A.load_auth_folder(folder, schema_path=schema)



# ---------------------------------------------------------------- sub-windows (dataset.subwindows)
def test_subwindows_are_distinct_contiguous_spans_that_cross_the_brute_force_threshold():
    import random

    # 5 failures from one source (malicious) + one unrelated line: cutting a failure off makes it suspicious
    five = [f"Dec 10 07:28:{10 + i:02d} LabSZ sshd[{24257 + i}]: Failed password for root from 112.95.230.3 port {35113 + i} ssh2"
            for i in range(5)] + CLEAN[:1]
    assert A.analyze_auth_log(five)["verdict"] == "malicious"
    spans = A.subwindows("\n".join(five), 6, random.Random(0), min_lines=3)
    assert 1 <= len(spans) <= 6 and len(set(spans)) == len(spans)
    text = "\n".join(five)
    for s in spans:
        lines = s.splitlines()
        assert 3 <= len(lines) <= len(five) - 1 and s in text  # contiguous, never the whole window
    assert {A.analyze_auth_log(s.splitlines())["verdict"] for s in spans} >= {"suspicious"}
    assert spans == A.subwindows(text, 6, random.Random(0), min_lines=3)  # deterministic
    assert A.subwindows("one line only", 3, random.Random(0), min_lines=6) == []  # nothing shorter to cut


def test_subwindow_records_extend_train_only_and_are_annotated_by_the_rules(tmp_path):
    from conftest import compose

    from sectune import data
    from sectune.errors import ConfigError
    from sectune.evaluation import analyst_eval
    from sectune.models.reward_model import window_from_prompt

    folder = tmp_path / "auth"
    A.build_auth_folder(folder, tmp_path / "nowhere", seed=0, max_windows=30)
    plain = data.sft_splits(compose([f"dataset.path={folder}", "dataset.test_fraction=0.2"]))
    cfg = compose([f"dataset.path={folder}", "dataset.test_fraction=0.2", "dataset.subwindows=2"])
    aug = data.sft_splits(cfg)
    for split in ("validation", "test"):
        assert aug[split] == plain[split]  # the held-out windows are exactly the same
    parents = {r["id"]: window_from_prompt(r["prompt"]) for r in plain["train"]}
    extra = aug["train"][len(plain["train"]):]
    assert aug["train"][: len(plain["train"])] == plain["train"] and len(extra) > len(plain["train"])  # ~2 per window
    for r in extra:
        parent, text = r["id"].split("~")[0], window_from_prompt(r["prompt"])
        assert text in parents[parent] and text != parents[parent]  # a span of a training window
        analysis = A.analyze_auth_log(text.splitlines())
        assert json.loads(r["completion"]) == analysis and r["label"] == analysis["verdict"]
    windows = analyst_eval.load_windows(cfg)  # the table's TF-IDF trains on the same records
    assert [w.id for w in windows["train"]] == [r["id"] for r in aug["train"]]
    assert all(w.annotation == json.loads(r["completion"]) for w, r in zip(windows["train"], aug["train"]))
    with pytest.raises(ConfigError, match="dataset.subwindows"):
        data.sft_splits(compose(["dataset=hdfs", "dataset.subwindows=1"]))


def test_counterfactual_records_rename_every_training_window_and_keep_its_verdict(tmp_path):
    """dataset.counterfactuals=1: a renamed copy of each training record (sub-windows included), annotated by the
    rules, with the parent's verdict and counts and none of its users, IPs or host names; held-out windows unchanged."""
    from conftest import compose

    from sectune import data
    from sectune.data.log_edits import analysis_signature
    from sectune.errors import ConfigError
    from sectune.evaluation import analyst_eval
    from sectune.models.reward_model import window_from_prompt

    folder = tmp_path / "auth"
    A.build_auth_folder(folder, tmp_path / "nowhere", seed=0, max_windows=30)
    base = [f"dataset.path={folder}", "dataset.test_fraction=0.2", "dataset.subwindows=1"]
    plain = data.sft_splits(compose(base))
    cfg = compose([*base, "dataset.counterfactuals=1"])
    aug = data.sft_splits(cfg)
    for split in ("validation", "test"):
        assert aug[split] == plain[split]
    n = len(plain["train"])
    assert aug["train"][:n] == plain["train"] and len(aug["train"]) == 2 * n
    parents = {r["id"]: r for r in plain["train"]}
    with_ips = 0
    for r in aug["train"][n:]:
        parent = parents[r["id"].removesuffix("^0")]
        old, new = window_from_prompt(parent["prompt"]), window_from_prompt(r["prompt"])
        analysis = A.analyze_auth_log(new.splitlines())
        assert json.loads(r["completion"]) == analysis and r["label"] == analysis["verdict"] == parent["label"]
        assert analysis_signature(analysis) == analysis_signature(json.loads(parent["completion"]))
        before = {ip for ln in old.splitlines() for ip in re.findall(r"\b(?:\d{1,3}\.){3}\d{1,3}\b", ln)}
        assert not any(ip in new for ip in before), r["id"]
        with_ips += bool(before)
        assert old.split()[3] not in new.split()  # the host name is renamed too
    assert with_ips > n // 2
    windows = analyst_eval.load_windows(cfg)  # the table's TF-IDF trains on the same records, each with its parent's source
    assert [w.id for w in windows["train"]] == [r["id"] for r in aug["train"]]
    src = {w.id: w.source for w in windows["train"]}
    assert all(src[r["id"]] == src[r["id"].removesuffix("^0")] for r in aug["train"][n:])
    with pytest.raises(ConfigError, match="dataset.counterfactuals"):
        data.sft_splits(compose(["dataset=hdfs", "dataset.counterfactuals=1"]))


def test_the_table_offers_tfidf_the_warmup_windows_in_a_row_beside_the_bar(tmp_path):
    """sft.warmup_lines: TF-IDF + LR also trained with the generated windows the SFT warmed up on, as its own row;
    the bar stays the baseline trained on the real windows, and the report marks only that one as the bar."""
    from conftest import compose

    from sectune.evaluation import analyst_eval
    from sectune.evaluation.analyst_report import render_markdown

    folder = tmp_path / "auth"
    A.build_auth_folder(folder, tmp_path / "nowhere", seed=0, max_windows=60)
    base = [f"dataset.path={folder}", "dataset.test_fraction=0.2", f"paths.cache_dir={tmp_path / 'cache'}"]
    splits = analyst_eval.load_windows(compose(base))
    test = splits["test"]
    assert analyst_eval.generated_tfidf_row(compose(base), splits, test, 0) is None  # no warm-up: no row
    assert analyst_eval.generated_tfidf_row(None, splits, test, 0) is None  # no SFT step
    row = analyst_eval.generated_tfidf_row(compose([*base, "sft.warmup_lines=1500"]), splits, test, 0)
    gen = A.load_auth_folder(next((tmp_path / "cache" / "datasets").glob(f"auth_logs-generated-n1500-*-{GENERATOR_VERSION}")))  # a new generator: a new folder
    assert row.name == f"TF-IDF + LR + the {len(gen)} generated warm-up windows" and len(gen) > 50
    assert row.kind == "baseline" and len(row.verdicts) == len(test) and set(row.verdicts) <= set(A.CLASSES)

    bar = analyst_eval.tfidf_row(splits["train"], splits["validation"], test, 0)
    rows = [{"name": r.name, "kind": "baseline", "json_valid_rate": None, "schema_valid_rate": None, "verdict_accuracy": 0.5,
             "verdict_macro_f1": 0.5, "field_f1": None, "analyses_per_s": None, **extra}
            for r, extra in ((bar, {}), (row, {"vs_tfidf_lr": "loses", "vs_tfidf_lr_diff": -0.1}))]
    md = render_markdown({"rows": rows, "best_policy": None, "windows": [{"source": "OpenSSH", "verdict": "benign"}],
                          "by_source": {r["name"]: {} for r in rows}})
    assert md.count("(the bar)") == 1 and f"| {row.name} |" in md and "**loses** (-0.100)" in md


def test_the_bar_of_a_one_verdict_folder_answers_that_verdict_instead_of_failing_the_table():
    """An attack-only capture: LogisticRegression refuses one class, and the held-out table died after every pipeline
    step had trained (an audit, session 42)."""
    from sectune.evaluation import analyst_eval

    def w(i, verdict):
        return analyst_eval.Window(str(i), "OpenSSH", "", f"Dec 10 sshd[{i}]: Failed password for root from 10.0.0.{i}\n",
                                   {"verdict": verdict})

    train, val, test = [w(i, "malicious") for i in range(6)], [w(9, "malicious")], [w(10, "malicious"), w(11, "benign")]
    row = analyst_eval.tfidf_row(train, val, test, 0)
    assert row.kind == "baseline" and row.verdicts == ["malicious", "malicious"]
    assert "one verdict only (malicious)" in row.note
    two = analyst_eval.tfidf_row(train + [w(7, "benign"), w(8, "benign")], val, test, 0)  # two verdicts: fitted
    assert two.note.startswith("C=")


def test_a_byte_order_mark_in_a_window_or_its_analysis_is_not_data(folder):
    """Windows tools write a UTF-8 BOM first; the analysis JSON was refused ("Unexpected UTF-8 BOM")."""
    txt, js = _first_pair(folder)
    before = A.load_auth_folder(folder)[0]
    txt.write_bytes(b"\xef\xbb\xbf" + txt.read_bytes())
    js.write_bytes(b"\xef\xbb\xbf" + js.read_bytes())
    after = A.load_auth_folder(folder)[0]
    assert after.log_text == before.log_text and after.analysis == before.analysis


def test_the_report_states_the_shipped_datas_facts_only_where_they_hold(tmp_path):
    """On a user's folder annotated otherwise, the rule engine is not 'the ceiling', and on windows where benign
    is not all from Linux_2k the report does not say that it is (both were printed unconditionally)."""
    from conftest import compose

    from sectune.evaluation import analyst_eval
    from sectune.evaluation.analyst_report import render_markdown

    folder = tmp_path / "auth"
    A.build_auth_folder(folder, tmp_path / "nowhere", seed=0, max_windows=24)
    windows = [w for w in analyst_eval.load_windows(compose([f"dataset.path={folder}", f"paths.cache_dir={tmp_path}"]))["train"]]
    assert analyst_eval.rule_engine_row(windows).name == "rule engine (wrote the annotations: the ceiling)"
    flipped = [analyst_eval.Window(w.id, w.source, w.prompt, w.log_text, {**w.annotation, "verdict": "benign"}) for w in windows]
    row = analyst_eval.rule_engine_row(flipped)
    assert row.name == "rule engine"

    def md(name, by_source):
        rows = [{"name": name, "kind": "rules", "json_valid_rate": 1, "schema_valid_rate": 1, "verdict_accuracy": 0.6,
                 "verdict_macro_f1": 0.5, "field_f1": 0.5, "analyses_per_s": None}]
        return render_markdown({"rows": rows, "best_policy": None, "windows": [{"source": "synthetic", "verdict": "benign"}],
                                "by_source": {name: by_source}})

    d = {"windows": 4, "verdict_accuracy": 0.5, "verdict_macro_f1": 0.5, "field_f1": 0.5, "true_benign_rate": 0.5,
         "pred_benign_rate": 0.5, "non_benign_called_benign_rate": 0.5}
    text = md("rule engine", {"synthetic": d})
    assert "it is the ceiling" not in text and "agrees on the verdict of 60.0% of the windows" in text
    assert "Linux_2k" not in text and "Benign windows come from: synthetic" in text
    text = md("rule engine (wrote the annotations: the ceiling)", {"Linux": d, "OpenSSH": {**d, "true_benign_rate": 0.0}})
    assert "it is the ceiling, not a competitor" in text and "Every benign window comes from Linux_2k" in text


def test_the_best_policy_is_the_validation_windows_best_not_the_test_tables():
    """It was the best of the trained rows on the test windows themselves: the best of k rows on 43 windows is an
    optimistic row, and the bar it was held against (TF-IDF + LR) is one row."""
    from sectune.evaluation.analyst_eval import Row
    from sectune.evaluation.analyst_scoring import best_policy

    rows = [Row(name=n, kind=k, step=st, constrained=False, verdicts=[]) for n, k, st in
            [("base", "policy", "base"), ("SFT", "policy", "sft"), ("SFT+GRPO", "policy", "rl"), ("SFT+DPO", "policy", "dpo"),
             ("TF-IDF + LR", "baseline", None)]]
    val = {"SFT": {"verdict_macro_f1": 0.80, "field_f1": 0.6}, "SFT+GRPO": {"verdict_macro_f1": 0.85, "field_f1": 0.5},
           "SFT+DPO": {"verdict_macro_f1": 0.85, "field_f1": 0.55}}
    assert best_policy(rows, val).name == "SFT+DPO"  # a tie on verdict: field F1 decides
    val["SFT+GRPO"]["verdict_macro_f1"] = 0.9
    assert best_policy(rows, val).name == "SFT+GRPO"
    assert best_policy(rows, {}).name == "SFT+DPO"  # no validation windows: the last trained step, not a test argmax
    assert best_policy(rows[:1] + rows[4:], val) is None


def test_two_class_folders_holding_one_window_number_is_an_error_and_a_verdict_mismatch_is_said(folder, capsys):
    """auth_data/benign/auth_data_1_2.txt and auth_data/malicious/auth_data_1_2.txt both took Auth_bin/auth_text_1_2.json's
    analysis and one id; a window filed under a class its analysis disagrees with was taken silently."""
    txt, js = _first_pair(folder)
    other = next(c for c in A.CLASSES if c != txt.parent.name)
    (folder / "auth_data" / other).mkdir(exist_ok=True)
    twin = folder / "auth_data" / other / txt.name
    shutil.copy(txt, twin)
    with pytest.raises(DataError) as e:
        A.load_auth_folder(folder)
    assert str(txt) in str(e.value) and str(twin) in str(e.value) and "renumber one" in str(e.value)
    twin.unlink()
    moved = folder / "auth_data" / other / txt.name
    txt.rename(moved)
    samples = A.load_auth_folder(folder)
    assert next(s for s in samples if s.txt_path == moved).label == other
    err = capsys.readouterr().err
    assert "1 window(s) sit in a class folder their analysis's verdict disagrees with" in err and str(moved) in err


def test_analyst_rows_per_source_and_against_the_bar_equal_hand_computed_values():
    """score_by_source's host-name check and compare's beats/ties/loses were read only by the real-data pipeline run,
    which asserts neither: four windows worked out by hand."""
    from sectune.evaluation.analyst_eval import Row, Window
    from sectune.evaluation.analyst_scoring import compare, score_by_source

    def win(i, source, verdict):
        return Window(id=str(i), source=source, prompt="", log_text="", annotation={"verdict": verdict})

    windows = [win(0, "Linux", "benign"), win(1, "Linux", "malicious"), win(2, "Linux", "suspicious"), win(3, "OpenSSH", "malicious")]
    row = Row(name="SFT", kind="policy", verdicts=["benign", "benign", "suspicious", "malicious"], step="sft")
    by = score_by_source(row, windows)
    # Linux: 1 of 3 windows truly benign, 2 of 3 answered benign, 1 of its 2 non-benign windows called benign
    assert by["Linux"]["true_benign_rate"] == pytest.approx(1 / 3) and by["Linux"]["pred_benign_rate"] == pytest.approx(2 / 3)
    assert by["Linux"]["non_benign_called_benign_rate"] == pytest.approx(1 / 2)
    assert by["Linux"]["verdict_accuracy"] == pytest.approx(2 / 3) and by["OpenSSH"]["non_benign_called_benign_rate"] == 0.0
    truth = [w.label for w in windows]
    bar = Row(name="TF-IDF + LR", kind="baseline", verdicts=list(truth))
    worse = Row(name="worse", kind="policy", verdicts=["benign"] * 4, step="rl")
    same = Row(name="same", kind="policy", verdicts=list(truth), step="dpo")
    scores = {r.name: {"verdict_macro_f1": f1} for r, f1 in ((bar, 0.6), (row, 0.8), (worse, 0.2), (same, 0.6))}
    compare([bar, row, worse, same], scores, truth, bar, None, seed=0)
    assert [scores[n]["vs_tfidf_lr"] for n in ("SFT", "worse", "same")] == ["beats", "loses", "ties"]
    assert scores["worse"]["vs_tfidf_lr_diff"] == pytest.approx(-0.4)


def test_the_table_counts_the_analyses_that_invent_a_name_and_renders_the_column():
    """An analysis naming an address or user its window does not hold is counted per row (invented names %)."""
    from sectune.evaluation.analyst_eval import Row, Window
    from sectune.evaluation.analyst_report import render_markdown
    from sectune.evaluation.analyst_scoring import score

    text = "sshd[1]: Failed password for root from 10.0.0.1 port 22 ssh2"
    windows = [Window(id=str(i), source="OpenSSH", prompt="", log_text=text, annotation=analyze_auth_log([text])) for i in range(4)]
    good = analyze_auth_log([text])
    made_up = {**good, "source_ips": [{"ip": "183.62.140.253", "failures": 1}]}
    other_user = {**good, "targeted_users": ["admin"]}
    row = Row(name="SFT", kind="policy", verdicts=["suspicious"] * 4, analyses=[good, made_up, other_user, None],
              schema_valid=[True, True, True, False], step="sft")
    s = score(row, windows)
    assert s["invented_names_rate"] == pytest.approx(2 / 4)  # an unparseable answer invents nothing
    assert score(Row(name="TF-IDF + LR", kind="baseline", verdicts=["suspicious"] * 4), windows)["invented_names_rate"] is None
    table = {"rows": [{"name": "SFT", "kind": "policy", **s}], "by_source": {"SFT": {}}, "best_policy": None,
             "windows": [{"source": "OpenSSH", "verdict": "suspicious"}] * 4}
    lines = render_markdown(table).splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("| system |"))
    assert "invented names %" in lines[head] and lines[head + 2].split(" | ")[6] == "50.0"


# An audit of hostile inputs (session 26): The rule engine reads attacker-written lines whose counts exceed Python's
# 4,300-digit limit or the schema's maximum.
from sectune.data.auth_logs import validate_analysis
from sectune.data.auth_rules import analyze_auth_log

HUGE = "9" * 5000
LINES = [
    f"Dec 10 06:55:46 LabSZ sshd[24200]: message repeated {HUGE} times: [ Failed password for root from 1.2.3.4 port 22 ssh2]",
    f"Dec 10 06:55:46 combo sshd(pam_unix)[19939]: PAM {HUGE} more authentication failures; logname= uid=0 euid=0 "
    "tty=NODEVssh ruser= rhost=1.2.3.4  user=root",
    "Dec 10 06:55:46 LabSZ sshd[24200]: message repeated 99999999 times: [ Failed password for root from 1.2.3.4 port 22 ssh2]",
]


@pytest.mark.parametrize("line", LINES)
def test_huge_counts_give_a_schema_valid_analysis(line):
    a = analyze_auth_log([line, line.replace("[24200]", "[24201]").replace("[19939]", "[19940]")])
    assert a["verdict"] == "malicious"
    assert validate_analysis(a) == []


def test_a_build_finished_by_another_process_while_this_one_built_is_kept_not_renamed_aside(tmp_path):
    """Two processes finishing the same cache build at once each renamed the other's finished folder aside (the check
    and the rename were not one step), and a third's rename failed with FileNotFoundError (audit AA). The check and the
    rename now happen under one lock: this build waits for it, then finds the other's build and keeps it."""
    import fcntl
    import os
    import threading
    import time

    from sectune.data.auth_logs import build_auth_folder

    out = tmp_path / "cache" / "auth"
    out.parent.mkdir(parents=True)
    args = dict(seed=7, generated_lines=300)
    theirs = build_auth_folder(tmp_path / "other" / "auth", **args)  # the other process's build, made beside
    lock = os.open(out.parent, os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the other process is renaming its build into place
        errors: list = []
        mine = threading.Thread(target=lambda: errors.append(None) if build_auth_folder(out, **args) == theirs else errors.append("differs"))
        mine.start()
        deadline = time.monotonic() + 30
        while not list(out.parent.glob(".auth.building-*/BUILD_INFO.json")) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        assert not out.exists()  # this build waits for the lock
        os.replace(tmp_path / "other" / "auth", out)
        inode = out.stat().st_ino
    finally:
        os.close(lock)
    mine.join(60)
    assert errors == [None] and out.stat().st_ino == inode  # theirs kept, not renamed aside
    assert [p.name for p in out.parent.iterdir()] == ["auth"]  # its own build deleted


def test_log_bytes_that_are_not_utf8_are_named_as_infer_names_them(tmp_path, capsys):
    """The builder replaced a Latin-1 user name's byte with U+FFFD without a word, and SFT learnt the analysis holding it
    (audit AB); infer warned about the same bytes. A byte-order mark is not part of the first line."""
    from sectune.data.auth_logs import build_auth_folder, load_auth_folder
    from sectune.data.auth_rules import REAL_SOURCES
    from sectune.data.synthetic_auth import generate_auth_lines

    src = tmp_path / "src"
    log = src / REAL_SOURCES[0]
    log.parent.mkdir(parents=True)
    lines = generate_auth_lines(400, seed=5)
    log.write_bytes(("\n".join(lines) + "\n").encode())
    plain = load_auth_folder(build_auth_folder(tmp_path / "a", src, seed=1) and tmp_path / "a")
    bad = [i for i, ln in enumerate(lines) if "Invalid user " in ln][0]
    raw = [ln.encode() for ln in lines]
    raw[bad] = raw[bad].replace(b"Invalid user ", b"Invalid user caf\xe9")
    log.write_bytes(b"\xef\xbb\xbf" + b"\n".join(raw) + b"\n")
    capsys.readouterr()
    build_auth_folder(tmp_path / "b", src, seed=1)
    assert f"auth_logs: OpenSSH_2k.log: 1 line(s) not UTF-8 (line {bad + 1}); their bad bytes read as U+FFFD" in capsys.readouterr().out
    assert len(load_auth_folder(tmp_path / "b")) == len(plain)


def test_the_forms_of_one_address_are_one_source():
    """Session 44: ::ffff:1.2.3.4 and 1.2.3.4 (a dual-stack sshd), fe80::1%eth0 and fe80::1, 2001:0db8:0:0::1 and
    2001:db8::1 were counted as two sources: one attacker's 5 failures split 3 + 2, no brute force. The analysis names the
    form the window wrote first (a name it holds: grounded decoding and the invented-names check read the window)."""
    from sectune.data.auth_rules import analyze_auth_log, canonical_source
    from sectune.infer_inputs import absent_names

    for forms in (["::ffff:203.0.113.9", "203.0.113.9"], ["fe80::1%eth0", "fe80::1"], ["2001:0db8:0:0::1", "2001:db8::1"],
                  ["2001:DB8::1", "2001:db8:0::1"]):
        lines = [f"Dec 10 06:55:4{i} LabSZ sshd[2430{i}]: Failed password for root from {forms[i % 2]} port 4{i}22 ssh2" for i in range(5)]
        a = analyze_auth_log(lines)
        assert a["brute_force"] and a["verdict"] == "malicious", forms
        assert len(a["source_ips"]) == 1 and a["source_ips"][0]["failures"] == 5, forms
        assert absent_names(a, "\n".join(lines)) == [], forms
    assert {canonical_source(s) for s in ("::ffff:203.0.113.9", "203.0.113.9")} == {"203.0.113.9"}
    assert canonical_source("fe80::1%eth0") == "fe80::1" and canonical_source("2001:0DB8:0:0::1") == "2001:db8::1"
    assert canonical_source("host.example.com") == "host.example.com"
