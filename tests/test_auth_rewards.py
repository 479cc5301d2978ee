"""The analyst's rewards (pure functions) and the heuristic reward model. Fast, no model."""

from __future__ import annotations

import json
import math
import random
import re

import pytest

from sectune.data import auth_rewards as R
from sectune.data.auth_logs import _auth_relevant, render_completion, render_prompt
from sectune.data.auth_rules import CLASSES, REAL_SOURCES, analyze_auth_log
from sectune.paths import shared_data_dir
from conftest import requires_real_data

# --------------------------------------------------------------- hand-written windows
MAL = """\
Dec 10 09:00:01 host sshd[101]: Failed password for root from 10.0.0.5 port 40001 ssh2
Dec 10 09:00:02 host sshd[102]: Failed password for root from 10.0.0.5 port 40002 ssh2
Dec 10 09:00:03 host sshd[103]: Failed password for invalid user admin from 10.0.0.5 port 40003 ssh2
Dec 10 09:00:04 host sshd[104]: Failed password for root from 10.0.0.5 port 40004 ssh2
Dec 10 09:00:05 host sshd[105]: Failed password for root from 10.0.0.5 port 40005 ssh2
Dec 10 09:00:06 host sshd[106]: Accepted password for alice from 192.168.1.7 port 50000 ssh2"""
#: what the rules say of MAL, written out by hand (5 failures from one source = brute force)
MAL_ANALYSIS = {
    "verdict": "malicious",
    "failed_logins": 5,
    "accepted_logins": 1,
    "invalid_users": ["admin"],
    "targeted_users": ["root"],
    "source_ips": [{"ip": "10.0.0.5", "failures": 5}, {"ip": "192.168.1.7", "failures": 0}],
    "brute_force": True,
    "break_in_attempts": 0,
    "summary": "Malicious: brute force from 10.0.0.5 (5 failures); 5 failed, 1 accepted logins.",
}
BENIGN = """\
Jun 15 04:06:18 combo su(pam_unix)[21416]: session opened for user cyrus by (uid=0)
Jun 15 04:06:19 combo su(pam_unix)[21416]: session closed for user cyrus
Jun 15 12:12:34 combo sshd(pam_unix)[23397]: session opened for user bob by (uid=0)
Jun 15 12:20:01 combo sshd(pam_unix)[23397]: session closed for user bob"""
SUSPICIOUS = """\
Dec 10 06:55:46 LabSZ sshd[24200]: reverse mapping checking getaddrinfo for ns.example.com [173.234.31.186] failed - POSSIBLE BREAK-IN ATTEMPT!
Dec 10 06:55:46 LabSZ sshd[24200]: Invalid user webmaster from 173.234.31.186
Dec 10 06:55:46 LabSZ sshd[24200]: input_userauth_request: invalid user webmaster [preauth]
Dec 10 06:55:48 LabSZ sshd[24200]: Connection closed by 173.234.31.186 [preauth]"""
CHOSEN = render_completion(MAL_ANALYSIS)


def test_hand_written_window_is_annotated_as_written_out():
    assert analyze_auth_log(MAL.splitlines()) == MAL_ANALYSIS


# ------------------------------------------------------------------------ json_valid
@pytest.mark.parametrize(
    "completion, expected",
    [
        (CHOSEN, 1.0),
        ("Here is the analysis:\n" + json.dumps(MAL_ANALYSIS, indent=2) + "\nDone.", 1.0),  # prose around: not a repair
        (CHOSEN[:-1] + ",}", 0.5),  # trailing comma
        ("{'verdict': 'malicious', 'failed_logins': 5}", 0.5),  # single quotes
        (CHOSEN[:60], 0.5),  # cut off: repaired
        ("The logs look malicious.", 0.0),  # no object
        ("{}", 0.0),
        ("[1, 2]", 0.0),
        ("", 0.0),
    ],
)
def test_json_valid(completion, expected):
    assert R.json_valid(MAL, MAL_ANALYSIS, completion) == expected


def test_parse_completion_reports_repair_and_hands_out_a_copy():
    p = R.parse_completion(CHOSEN[:-1] + ",}")
    assert p.obj == MAL_ANALYSIS and p.repaired and p.error is None
    p.obj["verdict"] = "benign"  # mutating the copy does not poison the cache
    assert R.parse_completion(CHOSEN[:-1] + ",}").obj["verdict"] == "malicious"
    bad = R.parse_completion("nothing here")
    assert bad.obj is None and "no '{'" in bad.error
    with pytest.raises(TypeError, match="str"):
        R.parse_completion([{"role": "assistant", "content": CHOSEN}])


# ---------------------------------------------------------------------- schema_valid
def test_schema_valid():
    assert R.schema_valid(MAL, None, CHOSEN) == 1.0
    assert R.schema_valid(MAL, None, CHOSEN[:-1] + ",}") == 1.0  # repaired but valid: repair is json_valid's business
    missing = {k: v for k, v in MAL_ANALYSIS.items() if k != "summary"}
    assert R.schema_valid(MAL, None, json.dumps(missing)) == 0.0
    assert R.schema_valid(MAL, None, json.dumps({**MAL_ANALYSIS, "severity": "high"})) == 0.0
    assert R.schema_valid(MAL, None, json.dumps({**MAL_ANALYSIS, "failed_logins": "5"})) == 0.0
    assert R.schema_valid(MAL, None, "garbage") == 0.0


# --------------------------------------------------------------------------- verdict
def test_verdict():
    assert R.verdict(MAL, MAL_ANALYSIS, CHOSEN) == 1.0
    assert R.verdict(MAL, MAL_ANALYSIS, json.dumps({**MAL_ANALYSIS, "verdict": "suspicious"})) == 0.0
    assert R.verdict(MAL, MAL_ANALYSIS, json.dumps({**MAL_ANALYSIS, "verdict": "Malicious"})) == 0.0  # exact string
    assert R.verdict(MAL, MAL_ANALYSIS, "malicious") == 0.0  # unparseable
    # the annotation is the reference, not the rules; None falls back to the rules
    other = {**MAL_ANALYSIS, "verdict": "suspicious"}
    assert R.verdict(MAL, other, CHOSEN) == 0.0
    assert R.verdict(MAL, None, CHOSEN) == 1.0


# ---------------------------------------------------------------------------- fields
def test_set_f1():
    assert R.set_f1(set(), set()) == 1.0
    assert R.set_f1({"a"}, set()) == 0.0
    assert R.set_f1(set(), {"a"}) == 0.0
    assert R.set_f1({"a", "b"}, {"b", "c", "d"}) == pytest.approx(2 * 1 / 5)


def test_field_f1_partial_by_hand():
    pred = {
        **MAL_ANALYSIS,
        "failed_logins": 4,  # wrong: 0
        "invalid_users": [],  # admin dropped
        "targeted_users": ["guest", "root"],  # guest extra
        "source_ips": [{"ip": "10.0.0.5", "failures": 5}],  # 192.168.1.7 dropped
    }
    scores = R.field_scores(pred, MAL_ANALYSIS)
    assert scores == {
        "failed_logins": 0.0,
        "accepted_logins": 1.0,
        "break_in_attempts": 1.0,
        "brute_force": 1.0,
        # {(targeted, guest), (targeted, root)} vs {(invalid, admin), (targeted, root)}: 2·1/(2+2)
        "users": 0.5,
        "source_ips": pytest.approx(2 / 3),  # {10.0.0.5} vs {10.0.0.5, 192.168.1.7}
        "source_ip_failures": pytest.approx(2 / 3),
    }
    expected = (0 + 1 + 1 + 1 + 0.5 + 2 / 3 + 2 / 3) / 7  # = 29/42
    assert R.field_f1(pred, MAL_ANALYSIS) == pytest.approx(29 / 42) == pytest.approx(expected)
    assert R.fields(MAL, MAL_ANALYSIS, json.dumps(pred)) == pytest.approx(29 / 42)


def test_field_f1_edge_cases():
    assert R.field_f1(MAL_ANALYSIS, MAL_ANALYSIS) == 1.0
    assert R.fields(MAL, None, "not json") == 0.0
    assert R.field_f1("not a dict", MAL_ANALYSIS) == 0.0
    # a user in the wrong list is a miss and a false alarm: 2·1/(2+2)
    swapped = {**MAL_ANALYSIS, "invalid_users": ["root"], "targeted_users": ["admin"]}
    assert R.field_scores(swapped, MAL_ANALYSIS)["users"] == 0.0
    # types matter: "5" and True are not the integer 5 / 1
    assert R.field_scores({**MAL_ANALYSIS, "failed_logins": "5"}, MAL_ANALYSIS)["failed_logins"] == 0.0
    assert R.field_scores({**MAL_ANALYSIS, "accepted_logins": True}, MAL_ANALYSIS)["accepted_logins"] == 0.0
    assert R.field_scores({**MAL_ANALYSIS, "brute_force": 1}, MAL_ANALYSIS)["brute_force"] == 0.0
    # ... but 5.0 is the integer 5 as JSON Schema reads it (schema-valid, so scored as the count it is: an audit, session 41)
    as_floats = {**MAL_ANALYSIS, "failed_logins": float(MAL_ANALYSIS["failed_logins"]),
                 "source_ips": [{**s, "failures": float(s["failures"])} for s in MAL_ANALYSIS["source_ips"]]}
    assert R.field_f1(as_floats, MAL_ANALYSIS) == 1.0
    assert R.field_scores({**MAL_ANALYSIS, "failed_logins": MAL_ANALYSIS["failed_logins"] + 0.5}, MAL_ANALYSIS)["failed_logins"] == 0.0
    # right ip, wrong failure count: source_ips full, source_ip_failures 2·1/(2+2)
    wrong_n = {**MAL_ANALYSIS, "source_ips": [{"ip": "10.0.0.5", "failures": 6}, {"ip": "192.168.1.7", "failures": 0}]}
    s = R.field_scores(wrong_n, MAL_ANALYSIS)
    assert s["source_ips"] == 1.0 and s["source_ip_failures"] == 0.5
    # missing / malformed lists count as empty: right for a window with none
    benign = analyze_auth_log(BENIGN.splitlines())
    bare = {k: v for k, v in benign.items() if k not in ("invalid_users", "source_ips")}
    assert R.field_f1({**bare, "targeted_users": "nobody"}, benign) == 1.0


# ------------------------------------------------------------------- combined_reward
def test_combined_reward_weights():
    pred = {**MAL_ANALYSIS, "failed_logins": 4, "invalid_users": [], "targeted_users": ["guest", "root"],
            "source_ips": [{"ip": "10.0.0.5", "failures": 5}]}
    text = json.dumps(pred)[:-1] + ",}"  # repaired: json_valid 0.5
    total, values = R.combined_reward(MAL, MAL_ANALYSIS, text, {"json_valid": 1.0, "verdict": 2.0, "fields": 0.5})
    assert values == {"json_valid": 0.5, "verdict": 1.0, "fields": pytest.approx(29 / 42)}
    assert total == pytest.approx(0.5 + 2.0 + 0.5 * 29 / 42)
    total, values = R.combined_reward(MAL, MAL_ANALYSIS, "garbage", {"schema_valid": 3, "fields": 1})
    assert (total, values) == (0.0, {"schema_valid": 0.0, "fields": 0.0})


def test_combined_reward_takes_the_reward_model_precomputed():
    w = {"verdict": 1.0, "reward_model": 0.5}
    total, values = R.combined_reward(MAL, MAL_ANALYSIS, CHOSEN, w, extra={"reward_model": -2.0})
    assert values == {"verdict": 1.0, "reward_model": -2.0} and total == pytest.approx(0.0)
    with pytest.raises(ValueError, match=r"'reward_model'.*extra="):
        R.combined_reward(MAL, MAL_ANALYSIS, CHOSEN, w)
    # extra values that are not weighted are ignored; a clash with a built-in name is an error
    assert R.combined_reward(MAL, None, CHOSEN, {"verdict": 1}, extra={"reward_model": 9.0})[1] == {"verdict": 1.0}
    with pytest.raises(ValueError, match="shadow"):
        R.combined_reward(MAL, None, CHOSEN, {"verdict": 1}, extra={"verdict": 0.0})
    with pytest.raises(ValueError, match="finite"):
        R.combined_reward(MAL, None, CHOSEN, w, extra={"reward_model": math.nan})


def test_unknown_reward_name_lists_the_valid_ones():
    with pytest.raises(ValueError) as e:
        R.combined_reward(MAL, None, CHOSEN, {"verdict": 1.0, "json_vaild": 1.0})
    msg = str(e.value)
    assert "'json_vaild'" in msg and all(n in msg for n in (*R.REWARDS, "reward_model"))
    with pytest.raises(ValueError, match="no reward weighted"):
        R.check_reward_weights({})
    with pytest.raises(ValueError, match="finite"):
        R.check_reward_weights({"verdict": math.inf})
    with pytest.raises(ValueError, match="number"):
        R.check_reward_weights({"verdict": "high"})
    assert R.check_reward_weights({"verdict": 1, "reward_model": 0}) == {"verdict": 1.0, "reward_model": 0.0}
    assert set(R.REWARDS) == {"json_valid", "schema_valid", "verdict", "fields"}


# ------------------------------------------------------------------ heuristic (hand)
def corruptions(a: dict) -> list[tuple[str, str]]:
    """Hand-written rejected analyses of ``a``: every kind the preference data uses, where it applies."""
    out: list[tuple[str, str]] = []
    add = lambda kind, b: out.append((kind, render_completion(b)))  # noqa: E731

    def with_counts(b):  # a self-consistent wrong analyst repeats its counts in the summary
        b["summary"] = re.sub(r"\d+ failed, \d+ accepted", f"{b['failed_logins']} failed, {b['accepted_logins']} accepted", b["summary"])
        return b

    for v in CLASSES:
        if v != a["verdict"]:
            add("verdict", {**a, "verdict": v})
    add("counts", with_counts({**a, "failed_logins": a["failed_logins"] + 1}))
    add("counts", with_counts({**a, "accepted_logins": a["accepted_logins"] + 2}))
    add("counts", {**a, "break_in_attempts": a["break_in_attempts"] + 1})
    if a["failed_logins"]:
        add("counts", with_counts({**a, "failed_logins": a["failed_logins"] - 1}))
    add("users", {**a, "targeted_users": sorted([*a["targeted_users"], "zz_extra"])[:5]} if len(a["targeted_users"]) < 5 else {**a, "targeted_users": a["targeted_users"][1:]})
    for key in ("invalid_users", "targeted_users"):
        if a[key]:
            add("users", {**a, key: a[key][1:]})
    if len(a["source_ips"]) < 3:
        add("source_ip", {**a, "source_ips": [*a["source_ips"], {"ip": "203.0.113.77", "failures": 1}]})
    if a["source_ips"]:
        add("source_ip", {**a, "source_ips": a["source_ips"][1:]})
    add("brute_force", {**a, "brute_force": not a["brute_force"]})
    other = next(c for c in CLASSES if c != a["verdict"])
    add("summary", {**a, "summary": re.sub(r"^\w+", other.capitalize(), a["summary"])})
    add("summary", {**a, "summary": re.sub(r"\d+ failed", f"{a['failed_logins'] + 7} failed", a["summary"])})
    add("summary", {**a, "summary": "Benign: no failed logins; 0 failed, 0 accepted logins." if a["verdict"] != "benign"
                    else "Malicious: brute force from 198.51.100.9 (12 failures); 12 failed, 0 accepted logins."})
    add("schema_invalid", {**a, "severity": "high"})
    add("schema_invalid", {**a, "verdict": a["verdict"].capitalize()})
    add("schema_invalid", {**a, "failed_logins": str(a["failed_logins"])})
    add("schema_invalid", {k: v for k, v in a.items() if k != "summary"})
    text = render_completion(a)
    out += [("truncated", text[: len(text) // 2]), ("truncated", text[:-2]), ("truncated", text[: int(len(text) * 0.3)])]
    return out


def ranking_accuracy(windows: list[str]) -> dict[str, tuple[int, int]]:
    """Per kind: (pairs where heuristic(chosen) > heuristic(rejected), pairs)."""
    acc: dict[str, list[int]] = {}
    for w in windows:
        a = analyze_auth_log(w.splitlines())
        chosen = R.heuristic_reward(w, render_completion(a))
        for kind, rejected in corruptions(a):
            hit = acc.setdefault(kind, [0, 0])
            hit[0] += R.heuristic_reward(w, rejected) < chosen  # ties count as failures
            hit[1] += 1
    return {k: (h, n) for k, (h, n) in acc.items()}


@pytest.mark.parametrize("window", [MAL, BENIGN, SUSPICIOUS], ids=["malicious", "benign", "suspicious"])
def test_heuristic_scores_the_annotation_highest_on_every_component(window):
    a = analyze_auth_log(window.splitlines())
    assert R.heuristic_components(window, render_completion(a)) == dict.fromkeys(R.HEURISTIC_WEIGHTS, 1.0)
    assert R.heuristic_reward(window, render_completion(a)) == pytest.approx(1.0)
    # a rendered prompt works as the window too: its instruction lines carry no evidence
    assert R.heuristic_reward(render_prompt(window), render_completion(a)) == pytest.approx(1.0)


def test_heuristic_ranks_chosen_above_each_hand_corruption_on_hand_windows():
    acc = ranking_accuracy([MAL, BENIGN, SUSPICIOUS])
    assert set(acc) == {"verdict", "counts", "users", "source_ip", "brute_force", "summary", "schema_invalid", "truncated"}
    assert {k: h for k, (h, n) in acc.items()} == {k: n for k, (h, n) in acc.items()}


def test_heuristic_components_by_hand():
    garbage = R.heuristic_components(MAL, "I cannot tell.")
    assert garbage == {"json_valid": 0.0, "schema_valid": 0.0, "verdict": 0.0, "fields": 0.0, "consistency": 0.0, "keywords": 0.5}
    assert R.heuristic_reward(MAL, "I cannot tell.") == pytest.approx(0.10 * 0.5)
    # the seed's keyword score, direction taken from the rules: alert words pay on an attack, calm words on a quiet window
    assert R.keyword_score(MAL, "suspicious and anomalous") == 1.0
    assert R.keyword_score(MAL, "benign, legitimate, suspicious, brute-force") == 0.5
    assert R.keyword_score(BENIGN, "benign, legitimate, suspicious, anomalous") == 0.5
    assert R.keyword_score(BENIGN, "normal and legitimate") == 1.0
    assert R.keyword_score(BENIGN, "brute_force break_in_attempts") == 0.5  # JSON keys are not keywords
    assert R.heuristic_reward(BENIGN, "looks benign") > R.heuristic_reward(BENIGN, "looks suspicious")
    # a contradicting summary: fields right, so only consistency (2 of its checks) and keywords drop
    b = {**MAL_ANALYSIS, "summary": "Benign: no failed logins; 0 failed, 1 accepted logins."}
    checks = R.consistency_checks(b)
    assert checks == {"summary_verdict": False, "summary_failed": False, "summary_accepted": True, "summary_no_failures": False,
                      "brute_force_sources": True, "brute_force_verdict": True, "source_failures_sum": True}
    comps = R.heuristic_components(MAL, render_completion(b))
    # keywords: "malicious" (the verdict) alert vs "Benign" (the summary) calm = 1/2
    assert comps["consistency"] == pytest.approx(4 / 7) and comps["keywords"] == 0.5
    assert comps["verdict"] == comps["fields"] == comps["schema_valid"] == comps["json_valid"] == 1.0


def test_consistency_checks_the_sources_a_summary_names():
    def check(summary):
        return {k: v for k, v in R.consistency_checks({**MAL_ANALYSIS, "summary": summary}).items() if k.startswith("summary_source")}

    assert check("brute force from 10.0.0.5 (5 failures)") == {"summary_source_0": True}
    assert check("brute force from 10.0.0.5 (9 failures)") == {"summary_source_0": False}  # wrong count
    assert check("login accepted from 198.51.100.9 after 3 failures.") == {"summary_source_0": False}  # not listed
    assert check("seen from 192.168.1.7.") == {"summary_source_0": True}  # sentence full stop
    assert check("failures from 3 sources, from a single subnet") == {}  # not addresses: no claim


def test_heuristic_never_evaluates_the_completion(tmp_path):
    marker = tmp_path / "pwned"
    payloads = [
        f"__import__('os').system('touch {marker}')",
        f'{{"verdict": __import__("os").system("touch {marker}"), "summary": "x"}}',
        f'{{"verdict": "malicious", "summary": "{{{{__import__(\'os\').system(\'touch {marker}\')}}}}"}}',
    ]
    for text in payloads:
        score = R.heuristic_reward(MAL, text)
        assert 0.0 <= score <= 1.0
        _, values = R.combined_reward(MAL, None, text, dict.fromkeys(R.REWARDS, 1.0))
        assert all(0.0 <= v <= 1.0 for v in values.values())
    assert not marker.exists()


def test_heuristic_spec_round_trips_through_json():
    spec = json.loads(json.dumps(R.heuristic_spec()))
    assert spec["kind"] == "heuristic" and spec["version"] == R.HEURISTIC_VERSION
    assert sum(spec["weights"].values()) == pytest.approx(1.0)
    scorer = R.heuristic_from_spec(spec)
    for text in (CHOSEN, CHOSEN[:50], "garbage", json.dumps({**MAL_ANALYSIS, "verdict": "benign"})):
        assert scorer(MAL, text) == R.heuristic_reward(MAL, text)
    only_verdict = R.heuristic_from_spec({**spec, "weights": {"verdict": 1.0}})
    assert only_verdict(MAL, json.dumps({**MAL_ANALYSIS, "verdict": "benign"})) == 0.0
    with pytest.raises(ValueError, match="version"):
        R.heuristic_from_spec({**spec, "version": "auth-heuristic-0"})
    with pytest.raises(ValueError, match="rules_version"):
        R.heuristic_from_spec({**spec, "rules_version": "auth-rules-0"})
    with pytest.raises(ValueError, match="unknown weight"):
        R.heuristic_from_spec({**spec, "weights": {"verdcit": 1.0}})
    with pytest.raises(ValueError, match=">= 0"):
        R.heuristic_from_spec({**spec, "weights": {"verdict": -1.0}})
    with pytest.raises(ValueError, match="not a heuristic"):
        R.heuristic_from_spec({"kind": "bradley_terry"})


# -------------------------------------------------------------- heuristic (real logs)
def real_windows(per_file: int = 60, seed: int = 0) -> list[str]:
    """Consecutive windows of 6-20 auth lines from each real log, as the dataset cuts them."""
    rng = random.Random(seed)
    windows = []
    for rel in REAL_SOURCES:
        path = shared_data_dir() / rel
        lines = [ln.rstrip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines()
                 if ln.strip() and ("Linux" not in path.name or _auth_relevant(ln))]
        i, cut = 0, []
        while len(lines) - i >= 6:
            n = rng.randint(6, 20)
            cut.append("\n".join(lines[i : i + n]))
            i += n
        windows += cut[:: max(1, len(cut) // per_file)][:per_file]  # spread over the whole file
    return windows


@requires_real_data
def test_heuristic_ranks_chosen_above_every_corruption_kind_on_real_windows():
    windows = real_windows()
    verdicts = {analyze_auth_log(w.splitlines())["verdict"] for w in windows}
    assert verdicts == set(CLASSES), "the sample should hold every class"
    for w in windows:  # the annotation is at the top of every component: no corruption can tie it
        a = analyze_auth_log(w.splitlines())
        assert R.heuristic_components(w, render_completion(a)) == dict.fromkeys(R.HEURISTIC_WEIGHTS, 1.0), w
    acc = ranking_accuracy(windows)
    rates = {k: h / n for k, (h, n) in acc.items()}
    print("heuristic ranking accuracy per kind on", len(windows), "real windows:", {k: f"{h}/{n}" for k, (h, n) in acc.items()})
    assert len(rates) == 8 and all(n >= 20 for _, n in acc.values())
    assert sum(h for h, _ in acc.values()) / sum(n for _, n in acc.values()) >= 0.8
    assert rates == dict.fromkeys(rates, 1.0)


def test_heuristic_weighs_its_components_as_documented_on_hand_worked_answers():
    """The documented weights (json 0.10, schema 0.15, verdict 0.20, fields 0.30, consistency 0.15, keywords 0.10),
    written out here, not read from HEURISTIC_WEIGHTS: only a sum of 1 and scores of 0, 0.05 and 1 were pinned, so two
    weights could trade places unnoticed."""
    # a wrong verdict, every field right: consistency loses summary_verdict and brute_force_verdict (5 of 7 hold);
    # keywords: "suspicious", "Malicious", "brute force" all alert words on an attack window: 1
    wrong_verdict = render_completion({**MAL_ANALYSIS, "verdict": "suspicious"})
    assert R.heuristic_reward(MAL, wrong_verdict) == pytest.approx(0.10 + 0.15 + 0.0 + 0.30 + 0.15 * 5 / 7 + 0.10)
    # one count wrong (4 failed for 5): fields 6/7; consistency loses summary_failed ("5 failed") and
    # source_failures_sum (5 > 4): 5 of 7
    wrong_count = render_completion({**MAL_ANALYSIS, "failed_logins": 4})
    assert R.heuristic_reward(MAL, wrong_count) == pytest.approx(0.10 + 0.15 + 0.20 + 0.30 * 6 / 7 + 0.15 * 5 / 7 + 0.10)


# An audit of hostile inputs (session 26): Reward functions return a number for completions holding integers past
# Python's 4,300-digit str->int limit.
from sectune.data import auth_rewards

WINDOW = "Dec 10 06:55:46 LabSZ sshd[24200]: Failed password for root from 1.2.3.4 port 22 ssh2\n"
HUGE = "9" * 5000
COMPLETIONS = [
    '{"verdict": "malicious", "failed_logins": ' + HUGE + "}",
    '{"verdict": "malicious", "failed_logins": ' + HUGE + ",}",
    '{"verdict": "malicious", "failed_logins": 3, "summary": "' + HUGE + ' failed, ' + HUGE + ' accepted"}',
    '{"verdict": "malicious", "source_ips": [{"ip": "1.2.3.4", "failures": 1}], "summary": "from 1.2.3.4 (' + HUGE + ' failures)"}',
]


@pytest.mark.parametrize("completion", COMPLETIONS)
def test_rewards_return_a_number_for_huge_integers(completion):
    for name, fn in auth_rewards.REWARDS.items():
        assert 0.0 <= fn(WINDOW, None, completion) <= 1.0, name
    assert 0.0 <= auth_rewards.heuristic_reward(WINDOW, completion) <= 1.0
