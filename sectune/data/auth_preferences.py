"""The ``auth_preferences`` dataset: chosen/rejected analyses of the same auth-log window.

Chosen = the window's annotation (the rule engine's analysis, as the SFT stage's answer).
Rejected = a plausible wrong analysis of the same window: one corruption per pair, its kind
recorded, so held-out accuracy can be reported per kind. ``dataset.pairs_per_window`` pairs per
window, each with a different kind drawn by ``dataset.corruptions`` weights (every kind equally
by default). Splits are by window (stratified by verdict): no window's lines are in two splits.

A user's own JSONL of ``{"prompt", "chosen", "rejected"}`` (optional ``kind``, ``id``, ``label``: strings) is read
with ``dataset.path=FILE.jsonl``; pairs sharing a prompt stay in one split.

Corruptions keep the rest of the analysis consistent where a wrong analyst would (a changed count
is repeated in the summary), so the pair differs in the one thing the kind names.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig

from sectune.data.auth_logs import render_completion, render_prompt
from sectune.data.jsonl import given_splits, json_lines
from sectune.data.auth_rules import CLASSES
from sectune.data import SPLITS, window_texts, split_auth_windows
from sectune.data.window_splits import check_split_by
from sectune.errors import ConfigError, DataError

_COUNTS_IN_SUMMARY = re.compile(r"(\d+) failed, (\d+) accepted logins")
_USER_POOL = ("admin", "root", "oracle", "test", "guest", "ubuntu", "postgres", "git", "ftpuser", "support", "pi", "mysql")


def _with_summary_counts(a: dict) -> dict:
    """Repeat the (possibly changed) counts in the summary, as a self-consistent analyst would."""
    a["summary"] = _COUNTS_IN_SUMMARY.sub(f"{a['failed_logins']} failed, {a['accepted_logins']} accepted logins", a["summary"])
    return a


def _other_ip(rng: random.Random, taken: set[str]) -> str:
    while True:
        ip = f"{rng.choice((10, 45, 61, 103, 115, 173, 185, 203, 212, 218))}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
        if ip not in taken:
            return ip


def corrupt_verdict(a: dict, rng: random.Random) -> str:
    """Flipped (benign <-> malicious) or shifted one step (to/from suspicious) verdict."""
    v = a["verdict"]
    choices = {"benign": ("suspicious", "malicious"), "suspicious": ("benign", "malicious"), "malicious": ("suspicious", "benign")}[v]
    return render_completion({**a, "verdict": rng.choice(choices)})


def corrupt_counts(a: dict, rng: random.Random) -> str:
    """One wrong count: failed logins, accepted logins or break-in attempts (summary kept in step)."""
    key = rng.choice(("failed_logins", "accepted_logins", "break_in_attempts"))
    old = a[key]
    delta = rng.choice([d for d in (-3, -2, -1, 1, 2, 3, 5, 10) if old + d >= 0])
    return render_completion(_with_summary_counts({**a, key: old + delta}))


def corrupt_users(a: dict, rng: random.Random) -> str:
    """A missing or an extra user in invalid_users / targeted_users."""
    b = {**a, "invalid_users": list(a["invalid_users"]), "targeted_users": list(a["targeted_users"])}
    present = [(k, u) for k in ("invalid_users", "targeted_users") for u in b[k]]
    key = rng.choice(("invalid_users", "targeted_users"))
    if present and (rng.random() < 0.5 or len(b[key]) >= 5):
        k, u = rng.choice(present)
        b[k].remove(u)
    else:
        taken = set(a["invalid_users"]) | set(a["targeted_users"])
        b[key] = sorted(b[key] + [rng.choice([u for u in _USER_POOL if u not in taken])])
    return render_completion(b)


def corrupt_source_ip(a: dict, rng: random.Random) -> str:
    """A hallucinated source (an address not in the window) or a dropped one."""
    ips = [dict(s) for s in a["source_ips"]]
    if ips and (rng.random() < 0.5 or len(ips) >= 3):
        ips.pop(rng.randrange(len(ips)))
    else:
        ips.append({"ip": _other_ip(rng, {s["ip"] for s in ips}), "failures": rng.choice((0, 1, 2, 6, 12))})
    return render_completion({**a, "source_ips": ips})


def corrupt_brute_force(a: dict, rng: random.Random) -> str:
    return render_completion({**a, "brute_force": not a["brute_force"]})


def corrupt_summary(a: dict, rng: random.Random) -> str:
    """A summary that contradicts the fields: another verdict and other counts."""
    verdict = rng.choice([c for c in CLASSES if c != a["verdict"]])
    failed = rng.choice([n for n in (0, 1, 3, 8, 25) if n != a["failed_logins"]])
    why = {"benign": "no failed logins", "suspicious": "failed logins", "malicious": "brute force from a single source"}[verdict]
    return render_completion({**a, "summary": f"{verdict.capitalize()}: {why}; {failed} failed, {a['accepted_logins']} accepted logins."})


def corrupt_schema_invalid(a: dict, rng: random.Random) -> str:
    """Valid JSON that breaks the schema: a bad enum, a count as text, a negative count, a missing or an unknown key."""
    how = rng.choice(("enum", "type", "negative", "missing", "extra"))
    b = dict(a)
    if how == "enum":
        b["verdict"] = rng.choice(("unknown", "Malicious", "attack", "normal"))
    elif how == "type":
        b["failed_logins"] = str(b["failed_logins"])
    elif how == "negative":
        b["break_in_attempts"] = -1 - b["break_in_attempts"]
    elif how == "missing":
        b.pop(rng.choice(("verdict", "failed_logins", "source_ips", "brute_force", "summary")))
    else:
        b["severity"] = rng.choice(("high", "low"))
    return render_completion(b)


def corrupt_truncated(a: dict, rng: random.Random) -> str:
    """The JSON cut off between 30% and 90% of its length (a generation that ran out of tokens)."""
    text = render_completion(a)
    return text[: rng.randint(int(0.3 * len(text)), int(0.9 * len(text)))]


CORRUPTIONS: dict[str, Callable[[dict, random.Random], str]] = {
    "verdict": corrupt_verdict,
    "counts": corrupt_counts,
    "users": corrupt_users,
    "source_ip": corrupt_source_ip,
    "brute_force": corrupt_brute_force,
    "summary": corrupt_summary,
    "schema_invalid": corrupt_schema_invalid,
    "truncated": corrupt_truncated,
}


def corruption_weights(spec) -> dict[str, float]:
    """``dataset.corruptions`` ({kind: weight}; empty = all kinds equally), validated."""
    if not spec:
        return {k: 1.0 for k in CORRUPTIONS}
    weights = {str(k): float(v) for k, v in dict(spec).items()}
    unknown = sorted(set(weights) - set(CORRUPTIONS))
    if unknown:
        raise ConfigError(f"dataset.corruptions: unknown kind(s) {unknown}; choose from {', '.join(CORRUPTIONS)}")
    # finite too: inf reached random.choices (a traceback naming no key), nan dropped its kind (an audit, session 36)
    if any(not math.isfinite(w) or w < 0 for w in weights.values()) or not any(w > 0 for w in weights.values()):
        raise ConfigError(f"dataset.corruptions: weights must be finite numbers >= 0 with at least one > 0, got {weights}")
    return {k: w for k, w in weights.items() if w > 0}


def _draw_kinds(weights: dict[str, float], n: int, rng: random.Random) -> list[str]:
    """``n`` distinct kinds, drawn by weight without replacement."""
    pool = dict(weights)
    kinds = []
    for _ in range(min(n, len(pool))):
        k = rng.choices(list(pool), weights=list(pool.values()))[0]
        kinds.append(k)
        del pool[k]
    return kinds


def make_pairs(window_id: str, log_text: str, analysis: dict, kinds: list[str], seed: int) -> list[dict]:
    """One pair per kind for a window; the rejected text always differs from the chosen one."""
    chosen = render_completion(analysis)
    prompt = render_prompt(log_text)
    pairs = []
    for kind in kinds:
        rng = random.Random(f"{seed}:{window_id}:{kind}")
        for _ in range(10):  # a corruption can, rarely, reproduce the original (e.g. re-sorted users)
            rejected = CORRUPTIONS[kind](analysis, rng)
            if rejected != chosen:
                break
        else:
            continue
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "kind": kind, "window_id": window_id,
                      "label": analysis["verdict"], "window": log_text, "annotation": analysis})
    return pairs


def preference_splits(cfg: DictConfig) -> dict[str, list[dict]]:
    """train / validation / test pairs for ``dataset=auth_preferences`` (built from the auth folder, or a JSONL)."""
    d = cfg.dataset
    if d.name != "auth_preferences":
        raise ConfigError(f"stage={cfg.stage.name} trains on preference pairs: use dataset=auth_preferences (got dataset={d.name})")
    if d.path and Path(d.path).suffix == ".jsonl":
        pairs = read_pairs_jsonl(Path(d.path), d.max_samples)
        groups = [(p["window_id"], p.get("label") or "") for p in pairs]
    elif d.path and Path(d.path).is_file():
        raise DataError(f"{d.path}: not a .jsonl pairs file or an auth_logs folder; dataset={d.name} reads {{prompt, chosen, rejected}}"
                        f" lines from a file named *.jsonl (rename it if it holds JSON lines) or builds pairs from an auth_logs folder")
    else:
        pairs = build_pairs(cfg)
        groups = [(p["window_id"], p["label"]) for p in pairs]
    # a pairs file's own "split" wins (a window's pairs share it); the rest are split by the fractions over their ids,
    # which is the SFT's split only for pairs built from the same auth folder
    given = given_splits(Path(d.path), pairs, lambda p: p["window_id"]) if d.path and Path(d.path).suffix == ".jsonl" else {}
    # one entry per window, labelled by its first line that gives a label: (id, label) pairs made a window whose lines
    # disagree on "label" (or give it on the first pair only) two entries, split apart: test pairs trained on (an audit,
    # session 37)
    label_of: dict = {}
    for wid, label in groups:
        if not label_of.get(wid):
            label_of[wid] = label
    unique = [(wid, label) for wid, label in label_of.items() if wid not in given]
    how = check_split_by(d.get("split_by") or "window")
    if how != "window" and unique and d.path and Path(d.path).suffix == ".jsonl":
        raise ConfigError(f"dataset.split_by={how}: {d.path} is a pairs file, whose windows have no log, line order or source "
                          "sectune reads; give each line its \"split\" (as the SFT run's windows were split), or dataset.split_by=window")
    # the SFT's split of the same folder (split_by time/source read each window's text)
    texts = dict(zip((wid for wid, _ in unique), window_texts(cfg, [{"id": wid} for wid, _ in unique]))) if unique else {}
    where = split_auth_windows([(wid, lab, texts[wid]) for wid, lab in unique], d) if unique else {s: set() for s in SPLITS}
    for wid, s in given.items():
        where[s].add(wid)
    if d.path and Path(d.path).suffix == ".jsonl" and unique:
        print(f"sectune: note: {d.path}: {len(unique)} window(s) without a \"split\" are split by dataset.val_fraction/"
              "test_fraction over their ids, not as an SFT run split its windows: if the policy trained on some of them, "
              "give each line the split its window had there (\"split\": \"train\" | \"validation\" | \"test\")")
    out = {s: [p for p in pairs if p["window_id"] in where[s]] for s in SPLITS}
    if not out["train"]:
        raise DataError(f"dataset={d.name}: no training pairs")
    return out


def build_pairs(cfg: DictConfig) -> list[dict]:
    from sectune.data import auth_logs, auth_logs_folder

    d = cfg.dataset
    if d.pairs_per_window < 1:
        raise ConfigError(f"dataset.pairs_per_window={d.pairs_per_window}: must be >= 1")
    weights = corruption_weights(d.corruptions)
    if d.pairs_per_window > len(weights):  # each pair of a window is another kind: it was capped without a word (session 36)
        raise ConfigError(f"dataset.pairs_per_window={d.pairs_per_window}: each of a window's pairs is another kind, and "
                          f"dataset.corruptions weights {len(weights)} ({', '.join(weights)}); at most {len(weights)}")
    samples = auth_logs.load_auth_folder(auth_logs_folder(cfg), max_samples=d.max_samples)
    pairs = []
    for s in samples:
        rng = random.Random(f"{d.split_seed}:{s.id}")
        pairs.extend(make_pairs(s.id, s.log_text, s.analysis, _draw_kinds(weights, d.pairs_per_window, rng), d.split_seed))
    return pairs


def _group_by_prompt_or_id(pairs: list[dict]) -> None:
    """Pairs that share a prompt, or an ``id``, get one ``window_id`` (the first of their group), so a split never
    holds a prompt that another split holds too (per-line ids used to put one prompt's pairs in train and test)."""
    parent: dict[str, str] = {}

    def root(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for p in pairs:
        a, b = root("id:" + p["window_id"]), root("prompt:" + p["prompt"])
        if a != b:
            parent[b] = a
    first: dict[str, str] = {}
    for p in pairs:
        p["window_id"] = first.setdefault(root("id:" + p["window_id"]), p["window_id"])


def read_pairs_jsonl(path: Path, max_samples: int | None = None) -> list[dict]:
    """A user's ``{prompt, chosen, rejected}`` lines; any bad line is an error naming the file and line."""
    if not path.is_file():
        raise DataError(f"{path}: preference pairs file does not exist")
    pairs = []
    for n, obj, why in json_lines(path):
        if why:
            raise DataError(f"{path}: line {n}: {why}")
        if not isinstance(obj, dict):
            raise DataError(f"{path}: line {n}: expected an object with prompt, chosen, rejected; got {type(obj).__name__}")
        missing = [k for k in ("prompt", "chosen", "rejected") if not isinstance(obj.get(k), str) or not obj.get(k)]
        if missing:
            raise DataError(f"{path}: line {n}: missing or non-string {', '.join(missing)} (each pair needs prompt, chosen, rejected strings)")
        if obj["chosen"] == obj["rejected"]:
            raise DataError(f"{path}: line {n}: chosen and rejected are the same text")
        for k in ("id", "kind", "label"):  # optional; a number is read as its text (bool is an int, as in injection.py)
            if obj.get(k) is not None and not isinstance(obj[k], (str, int)):
                raise DataError(f"{path}: line {n}: {k} must be a string, got {type(obj[k]).__name__}")
        if obj.get("split") is not None and obj["split"] not in SPLITS:
            raise DataError(f"{path}: line {n}: split={obj['split']!r}: one of {', '.join(SPLITS)} (or none)")
        kind = str(obj.get("kind") or "user")
        if kind == "start" or kind.endswith("_start"):  # reward_accuracy_<kind> wrote over reward_accuracy_start (session 36)
            raise DataError(f"{path}: line {n}: kind={kind!r}: each kind names a metric (reward_accuracy_<kind>), and "
                            "'<metric>_start' is the number before training; name the kind otherwise")
        wid = str(obj.get("id") or hashlib.sha256(obj["prompt"].encode()).hexdigest()[:12])
        label = obj.get("label")
        pairs.append({"prompt": obj["prompt"], "chosen": obj["chosen"], "rejected": obj["rejected"],
                      "kind": kind, "window_id": wid, "label": None if label is None else str(label),
                      "split": obj.get("split"), "_line": n})
    if not pairs:
        raise DataError(f"{path}: no preference pairs (empty file)")
    _group_by_prompt_or_id(pairs)
    if max_samples is not None:
        keep = list(dict.fromkeys(p["window_id"] for p in pairs))[:max_samples]
        pairs = [p for p in pairs if p["window_id"] in set(keep)]
    return pairs
