"""The auth-log analyst's rewards: pure functions of (window, annotation, completion).

No model, no I/O, deterministic; a completion is only ever *parsed* (``extract_json``), never
evaluated. ``window`` is the raw log text (a rendered prompt works too: its instruction lines
carry no evidence for the rules); ``annotation`` is the reference analysis, or ``None`` when
unknown, in which case the rule engine's analysis of the window (``analyze_auth_log``, which
wrote the annotations) is the reference.

Rewards (each in [0, 1]; ``REWARDS`` maps name → function)
----------------------------------------------------------
* ``json_valid``: 1.0 when the text after the first ``{`` parses as a JSON object as written,
  0.5 when only ``extract_json``'s repair recovers one (trailing comma, single quotes, cut-off
  text), 0.0 when there is none. Repair is half credit so RL pushes toward output that needs none.
* ``schema_valid``: 1.0 when the parsed object (repaired or not) has no schema error.
* ``verdict``: 1.0 when the parsed ``verdict`` equals the reference's (exact string), else 0.0.
* ``fields``: ``field_f1(parsed, reference)``, 0.0 when unparseable.

``field_f1`` is the mean of seven per-field scores (``field_scores``):

* ``failed_logins``, ``accepted_logins``, ``break_in_attempts``: 1 if the integer is exactly the
  reference's, else 0 (missing, a string or a bool scores 0);
* ``brute_force``: 1 if the same boolean, else 0;
* ``users``: set F1 over (list, name) pairs of ``invalid_users`` and ``targeted_users``, so a name
  in the wrong list is one miss and one false alarm;
* ``source_ips``: set F1 over the ``ip`` strings of ``source_ips``;
* ``source_ip_failures``: set F1 over (ip, failures) pairs, so per-source counts are scored too.

Set F1 is ``2·|P∩R| / (|P| + |R|)``, 1.0 when both sets are empty. A missing or malformed list
counts as empty (the schema reward catches the missing key). The verdict and the free-text
summary are not fields (verdict has its own reward; the summary is judged by the heuristic).

``combined_reward`` adds weighted rewards; values that are not pure functions of the text (the
trained ``reward_model``) are computed by the caller and passed in ``extra``.

Heuristic reward model (``heuristic_reward``; seed 000's fallback when memory is short)
--------------------------------------------------------------------------------------
Needs no annotation: the rule engine's analysis of the window is the reference. Score in [0, 1]:
``Σ HEURISTIC_WEIGHTS[c] · c`` over the components

* ``json_valid`` 0.10, ``schema_valid`` 0.15 (as above);
* ``verdict`` 0.20 and ``fields`` 0.30: agreement with the rule engine;
* ``consistency`` 0.15: the share of the analysis' own claims that agree (``consistency_checks``:
  the summary's verdict word, its "N failed" / "N accepted" numbers, "no failed logins", the
  sources it names and their failure counts against the fields; ``brute_force`` iff a listed
  source has ≥ 5 failures; ``brute_force`` ⇒ malicious; benign ⇒ no failure, invalid user or
  break-in; listed sources' failures ≤ ``failed_logins``); 1.0 when none applies, 0.0 unparseable;
* ``keywords`` 0.10: seed 000's keyword score made direction-aware: of the alert words
  (suspicious, anomalous, malicious, attack, intrusion, compromise, brute force, break-in) and
  calm words (benign, legitimate, normal, routine, harmless) in the text, the share that points
  the way the rule engine does (alert when its verdict is not benign); 0.5 when there are none.

The exact annotation scores 1.0 on every component (checked on every real window in the tests),
so any corruption that changes a scored field, the summary's claims, validity or the text's
completeness scores strictly less: there are no ties to break between chosen and rejected.
"""

from __future__ import annotations

import functools
import json
import math
import re
from typing import Callable, Mapping, NamedTuple

from sectune.data.auth_logs import validate_analysis
from sectune.data.auth_rules import BRUTE_FORCE_FAILURES, CLASSES, RULES_VERSION, analyze_auth_log
from sectune.inference import extract_json

HEURISTIC_VERSION = "auth-heuristic-1"
JSON_PLAIN, JSON_REPAIRED, JSON_NONE = 1.0, 0.5, 0.0
COUNT_FIELDS = ("failed_logins", "accepted_logins", "break_in_attempts")
USER_FIELDS = ("invalid_users", "targeted_users")
#: rewards that are not pure functions of the text: the caller passes their values in ``extra``
PRECOMPUTED_REWARDS = ("reward_model",)
HEURISTIC_WEIGHTS: dict[str, float] = {
    "json_valid": 0.10,
    "schema_valid": 0.15,
    "verdict": 0.20,
    "fields": 0.30,
    "consistency": 0.15,
    "keywords": 0.10,
}
ALERT_WORDS = ("suspicious", "anomalous", "malicious", "attack", "intrusion", "compromise", "brute force", "break-in")
CALM_WORDS = ("benign", "legitimate", "normal", "routine", "harmless")
_ALERT = re.compile(r"\b(?:suspicious|anomal\w*|malicious|attack\w*|intrusions?|compromis\w*|brute[ -]forc\w*|break-ins?)\b", re.I)
_CALM = re.compile(r"\b(?:benign|legitimate(?:ly)?|normal(?:ly)?|routine|harmless)\b", re.I)
_VERDICT_WORD = re.compile(r"\b(benign|suspicious|malicious)\b", re.I)
_N_FAILED = re.compile(r"\b(\d+)\s+failed\b", re.I)
_N_ACCEPTED = re.compile(r"\b(\d+)\s+accepted\b", re.I)
_NO_FAILED = re.compile(r"\bno (?:failed logins?|failures?|failed)\b", re.I)
# "from SRC (N failures)" / "from SRC after N failures"; SRC looks like an address or host name
# (an inner '.' or ':'), so "from 3 sources" or "from a single source" is not a claim about one
_FROM_SOURCE = re.compile(r"\bfrom\s+(?P<src>[^\s,;()]*[.:][\w:][^\s,;()]*?)\.?(?=[\s,;()]|$)(?:\s*\((?P<n1>\d+) failures?\)|\s+after (?P<n2>\d+) failures?)?", re.I)


# ------------------------------------------------------------------------------- parsing
class ParsedCompletion(NamedTuple):
    """What a completion holds: the object (or None), whether repair was needed, why not."""

    obj: dict | None
    repaired: bool
    error: str | None


@functools.lru_cache(maxsize=4096)
def _parse(completion: str) -> ParsedCompletion:
    # cached: combined_reward and the heuristic look at the same text several times; callers
    # below never mutate the object (parse_completion hands out a copy)
    try:
        obj = extract_json(completion)
    except ValueError as e:
        return ParsedCompletion(None, False, str(e))
    try:
        plain, _ = json.JSONDecoder().raw_decode(completion, completion.find("{"))
    except (ValueError, RecursionError):  # JSONDecodeError, or an integer past Python's digit limit: not plain JSON
        plain = None
    return ParsedCompletion(obj, plain != obj, None)


def parse_completion(completion: str) -> ParsedCompletion:
    """Parse a model's completion (never evaluated); the object is the caller's own copy."""
    if not isinstance(completion, str):
        raise TypeError(f"a completion must be text (str), got {type(completion).__name__}")
    p = _parse(completion)
    return p._replace(obj=json.loads(json.dumps(p.obj))) if p.obj is not None else p


@functools.lru_cache(maxsize=1024)
def _rule_analysis(window: str) -> dict:
    return analyze_auth_log(window.splitlines())


def _reference(window: str, annotation: dict | None) -> dict:
    return annotation if annotation is not None else _rule_analysis(window)


# ---------------------------------------------------------------------------- field F1
def set_f1(pred: set, ref: set) -> float:
    """F1 of a predicted set against a reference set; 1.0 when both are empty."""
    if not pred and not ref:
        return 1.0
    return 2 * len(pred & ref) / (len(pred) + len(ref))


def _is_int(x) -> bool:
    """An integer as the schema reads one: JSON Schema's ``integer`` holds ``3.0`` too (jsonschema calls it valid, so a
    count written ``3.0`` was schema-valid and scored as a wrong count: an audit, session 41)."""
    if isinstance(x, float):
        return x.is_integer()
    return isinstance(x, int) and not isinstance(x, bool)


def _list(obj: dict, key: str) -> list:
    v = obj.get(key)
    return v if isinstance(v, list) else []


def _users(obj: dict) -> set[tuple[str, str]]:
    return {(k, u) for k in USER_FIELDS for u in _list(obj, k) if isinstance(u, str)}


def _sources(obj: dict) -> list[dict]:
    return [s for s in _list(obj, "source_ips") if isinstance(s, dict) and isinstance(s.get("ip"), str)]


def field_scores(pred: dict, ref: dict) -> dict[str, float]:
    """Per-field scores of ``pred`` against ``ref`` (module docstring); each in [0, 1]."""
    if not isinstance(pred, dict):
        return {k: 0.0 for k in (*COUNT_FIELDS, "brute_force", "users", "source_ips", "source_ip_failures")}
    scores = {k: float(_is_int(pred.get(k)) and pred.get(k) == ref.get(k)) for k in COUNT_FIELDS}
    scores["brute_force"] = float(isinstance(pred.get("brute_force"), bool) and pred["brute_force"] == ref.get("brute_force"))
    scores["users"] = set_f1(_users(pred), _users(ref))
    p_src, r_src = _sources(pred), _sources(ref)
    scores["source_ips"] = set_f1({s["ip"] for s in p_src}, {s["ip"] for s in r_src})
    pairs = lambda src: {(s["ip"], s.get("failures")) for s in src if _is_int(s.get("failures"))}  # noqa: E731
    scores["source_ip_failures"] = set_f1(pairs(p_src), pairs(r_src))
    return scores


def field_f1(pred: dict, ref: dict) -> float:
    """Field-level F1: the mean of ``field_scores`` (0.0 when ``pred`` is not an object)."""
    scores = field_scores(pred, ref)
    return sum(scores.values()) / len(scores)


# ------------------------------------------------------------------------------ rewards
def json_valid(window: str, annotation: dict | None, completion: str) -> float:
    """1.0 a JSON object as written, 0.5 one only after repair, 0.0 none."""
    p = _parse(completion)
    return JSON_NONE if p.obj is None else JSON_REPAIRED if p.repaired else JSON_PLAIN


def schema_valid(window: str, annotation: dict | None, completion: str) -> float:
    """1.0 when the parsed object (repaired or not) matches ``auth_schema.json``."""
    obj = _parse(completion).obj
    return float(obj is not None and not validate_analysis(obj))


def verdict(window: str, annotation: dict | None, completion: str) -> float:
    """1.0 when the parsed verdict is exactly the reference's; 0.0 otherwise or unparseable."""
    obj = _parse(completion).obj
    return float(obj is not None and isinstance(obj.get("verdict"), str) and obj["verdict"] == _reference(window, annotation)["verdict"])


def fields(window: str, annotation: dict | None, completion: str) -> float:
    """``field_f1`` of the parsed object against the reference; 0.0 when unparseable."""
    obj = _parse(completion).obj
    return 0.0 if obj is None else field_f1(obj, _reference(window, annotation))


RewardFn = Callable[[str, "dict | None", str], float]
REWARDS: dict[str, RewardFn] = {"json_valid": json_valid, "schema_valid": schema_valid, "verdict": verdict, "fields": fields}


def check_reward_weights(weights: Mapping[str, float], precomputed: tuple[str, ...] = PRECOMPUTED_REWARDS) -> dict[str, float]:
    """``{name: weight}`` as floats; an unknown name or a non-finite weight raises ValueError."""
    valid = [*REWARDS, *precomputed]
    if not weights:
        raise ValueError(f"no reward weighted; give weights for some of: {', '.join(valid)}")
    out = {}
    for name, w in dict(weights).items():
        if name not in valid:
            raise ValueError(f"unknown reward {name!r}; valid rewards: {', '.join(valid)}")
        try:
            out[name] = float(w)
        except (TypeError, ValueError):
            raise ValueError(f"reward {name!r}: weight must be a number, got {w!r}") from None
        if not math.isfinite(out[name]):
            raise ValueError(f"reward {name!r}: weight must be finite, got {w!r}")
    return out


def combined_reward(
    window: str,
    annotation: dict | None,
    completion: str,
    weights: Mapping[str, float],
    extra: Mapping[str, float] | None = None,
) -> tuple[float, dict[str, float]]:
    """``(Σ weight·value, {name: value})`` over the weighted rewards (a plain weighted sum).

    Names come from ``REWARDS`` or are precomputed by the caller and passed in ``extra`` (the
    trained ``reward_model``'s score, any extra name the caller weights); ``extra`` values are
    used as given (a reward model's score need not lie in [0, 1]).
    """
    extra = dict(extra or {})
    clash = sorted(set(extra) & set(REWARDS))
    if clash:
        raise ValueError(f"extra {clash} would shadow the built-in reward(s) of that name; rename them")
    w = check_reward_weights(weights, tuple(dict.fromkeys([*PRECOMPUTED_REWARDS, *extra])))
    values = {}
    for name in w:
        if name in REWARDS:
            values[name] = REWARDS[name](window, annotation, completion)
        elif name in extra:
            values[name] = float(extra[name])
            if not math.isfinite(values[name]):
                raise ValueError(f"extra[{name!r}] must be finite, got {extra[name]!r}")
        else:
            raise ValueError(f"reward {name!r} is not a pure function of the text: pass its value as extra={{{name!r}: ...}}")
    return sum(w[n] * values[n] for n in w), values


# ---------------------------------------------------------------- heuristic reward model
def consistency_checks(obj: dict) -> dict[str, bool]:
    """The analysis' own claims that can be checked against each other (applicable ones only)."""
    checks: dict[str, bool] = {}
    v, failed, accepted = obj.get("verdict"), obj.get("failed_logins"), obj.get("accepted_logins")
    summary = obj.get("summary") if isinstance(obj.get("summary"), str) else ""
    sources = {s["ip"]: s.get("failures") for s in _sources(obj)}
    if (m := _VERDICT_WORD.search(summary)) and isinstance(v, str):
        checks["summary_verdict"] = m[1].lower() == v
    if said := _N_FAILED.findall(summary):
        checks["summary_failed"] = _is_int(failed) and all(_said_int(n) == failed for n in said)
    if said := _N_ACCEPTED.findall(summary):
        checks["summary_accepted"] = _is_int(accepted) and all(_said_int(n) == accepted for n in said)
    if _NO_FAILED.search(summary):
        checks["summary_no_failures"] = failed == 0 and not isinstance(failed, bool)
    for i, m in enumerate(_FROM_SOURCE.finditer(summary)):
        n = m["n1"] or m["n2"]
        checks[f"summary_source_{i}"] = m["src"] in sources and (n is None or sources[m["src"]] == _said_int(n))
    counts = [f for f in sources.values() if _is_int(f)]
    brute = obj.get("brute_force")
    if isinstance(brute, bool) and len(counts) == len(sources):
        checks["brute_force_sources"] = brute == (max(counts, default=0) >= BRUTE_FORCE_FAILURES)
    if brute is True and v in CLASSES:
        checks["brute_force_verdict"] = v == "malicious"
    if v == "benign":
        checks["benign_clean"] = failed == 0 and obj.get("break_in_attempts") == 0 and not _list(obj, "invalid_users")
    if _is_int(failed) and counts:
        checks["source_failures_sum"] = sum(counts) <= failed
    return checks


def _said_int(digits: str) -> int | None:
    """A number the summary states, or None past 18 digits (no count is that large, and ``int()`` of more than 4,300
    digits raises: one such summary crashed the reward function, and a GRPO run with it)."""
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= 18 else None


def keyword_score(window: str, completion: str) -> float:
    """Share of alert/calm words in the text pointing the rule engine's way; 0.5 with none."""
    alert, calm = len(_ALERT.findall(completion)), len(_CALM.findall(completion))
    if not alert + calm:
        return 0.5
    expect_alert = _rule_analysis(window)["verdict"] != "benign"
    return (alert if expect_alert else calm) / (alert + calm)


def heuristic_components(window: str, completion: str) -> dict[str, float]:
    """The heuristic's components (``HEURISTIC_WEIGHTS``' names), each in [0, 1]."""
    if not isinstance(completion, str):
        raise TypeError(f"a completion must be text (str), got {type(completion).__name__}")
    obj = _parse(completion).obj
    checks = consistency_checks(obj) if obj is not None else {}
    return {
        "json_valid": json_valid(window, None, completion),
        "schema_valid": schema_valid(window, None, completion),
        "verdict": verdict(window, None, completion),
        "fields": fields(window, None, completion),
        "consistency": 0.0 if obj is None else (sum(checks.values()) / len(checks) if checks else 1.0),
        "keywords": keyword_score(window, completion),
    }


def heuristic_reward(window: str, completion: str, *, weights: Mapping[str, float] | None = None) -> float:
    """Annotation-free score of an analysis of ``window``; higher = better (module docstring)."""
    w = HEURISTIC_WEIGHTS if weights is None else weights
    comps = heuristic_components(window, completion)
    return sum(float(w.get(k, 0.0)) * comps[k] for k in comps)


def heuristic_spec() -> dict:
    """What the reward stage writes as the heuristic reward model (``heuristic_reward.json``)."""
    return {
        "kind": "heuristic",
        "version": HEURISTIC_VERSION,
        "rules_version": RULES_VERSION,
        "scorer": "sectune.data.auth_rewards.heuristic_reward",
        "weights": dict(HEURISTIC_WEIGHTS),
        "json_valid_scores": {"plain": JSON_PLAIN, "repaired": JSON_REPAIRED, "unparseable": JSON_NONE},
        "alert_keywords": list(ALERT_WORDS),
        "calm_keywords": list(CALM_WORDS),
        "brute_force_failures": BRUTE_FORCE_FAILURES,
        "score_range": [0.0, 1.0],
        "description": "weighted sum of JSON validity, schema validity, verdict and field-F1 agreement with the rule "
        "engine (auth_rules.analyze_auth_log on the window), internal consistency of the analysis, and a "
        "direction-aware alert/calm keyword score; needs no annotation",
    }


def heuristic_from_spec(spec: Mapping) -> Callable[[str, str], float]:
    """The scorer ``(window, completion) -> float`` a ``heuristic_spec()`` describes.

    Raises ValueError when the spec is not a heuristic, or was written by another heuristic or
    rules version (the scorer would differ: rerun the reward stage), or has unknown weights.
    """
    if not isinstance(spec, Mapping) or spec.get("kind") != "heuristic":
        raise ValueError(f"not a heuristic reward spec (kind={spec.get('kind') if isinstance(spec, Mapping) else type(spec).__name__!r})")
    for key, have in (("version", HEURISTIC_VERSION), ("rules_version", RULES_VERSION)):
        if spec.get(key) != have:
            raise ValueError(f"heuristic reward spec has {key}={spec.get(key)!r}, this sectune has {have!r}; rerun the reward stage")
    weights = dict(spec.get("weights") or {})
    unknown = sorted(set(weights) - set(HEURISTIC_WEIGHTS))
    if unknown:
        raise ValueError(f"heuristic reward spec: unknown weight(s) {unknown}; valid: {', '.join(HEURISTIC_WEIGHTS)}")
    if not weights or any(not isinstance(x, (int, float)) or isinstance(x, bool) or not math.isfinite(x) or x < 0 for x in weights.values()):
        raise ValueError(f"heuristic reward spec: weights must be finite numbers >= 0, got {weights}")
    return functools.partial(heuristic_reward, weights={k: float(x) for k, x in weights.items()})
