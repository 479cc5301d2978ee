"""Two defences probed on saved answers (session 33, validation only; not kept in sectune): TF-IDF + LR as one more voter
beside the analysts, and the verdict derived from the analyst's own evidence by the rules' verdict policy.

    python experiments/injection_contrastive/verdict_probes.py validation <eval dir> ...   # 3, 6 or 9 dirs: disjoint triplets

Each <eval dir> is a ``stage=evaluate dataset=injection_triplets dataset.injections_per_window=4 infer.constrained=true``
run of one analyst on that split (its injection_eval.json); the triplets are the dirs in the order given, three at a time,
each in its voting order. The TF-IDF + LR classifier is sectune's baseline (char 1-4-grams, C picked on the validation
windows, clean and injected), fitted on the training windows and the training split's injected windows with their
expected verdicts: the adversarial training the analysts had. Nothing here is evaluated from model output: answers are
parsed as JSON (sectune.inference.parse_json_output) and checked against the schema.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sectune.data.auth_logs import validate_analysis  # noqa: E402
from sectune.data.auth_rules import BRUTE_FORCE_FAILURES  # noqa: E402
from sectune.evaluation.vote import winner  # noqa: E402
from sectune.inference import parse_json_output  # noqa: E402

OVERRIDES = ["+experiment=auth_grpo_tiny", "logger=none", "stage=evaluate", "dataset=injection_triplets",
             "dataset.injections_per_window=4"]


def policy_verdict(text: str) -> str | None:
    """The rules' verdict policy (sectune/data/auth_rules.py) applied to the answer's own fields: malicious on its
    brute_force flag with a source of >= 5 failures, or break-in warnings with failed logins; suspicious on failed logins,
    invalid users or break-in warnings; else benign. The rules' own answers get their own verdict back from it in 2,307 of
    2,312 analyses (the 5 others: 'user unknown' lines, which the answer does not carry)."""
    try:
        o, _ = parse_json_output(text)
    except ValueError:
        return None
    if validate_analysis(o):
        return None
    most = max([s["failures"] for s in o["source_ips"]] + [0])
    if (o["brute_force"] and most >= BRUTE_FORCE_FAILURES) or (o["break_in_attempts"] and o["failed_logins"]):
        return "malicious"
    return "suspicious" if o["failed_logins"] or o["invalid_users"] or o["break_in_attempts"] else "benign"


def tfidf_verdicts(data: dict[str, list[dict]], split: str) -> tuple[list[str], dict[str, str]]:
    """TF-IDF + LR's verdict on each injected window of the split, and on each window clean (by window id)."""
    from sectune.evaluation.baselines import tfidf_logreg_baseline

    expected = lambda r: json.loads(r["injection_output"])["verdict"]  # noqa: E731
    clean = {r["window_id"]: (r["benign"], r["label"]) for r in data["train"]}
    val_clean = {r["window_id"]: (r["benign"], r["label"]) for r in data["validation"]}
    res = tfidf_logreg_baseline([t for t, _ in clean.values()] + [r["injection"] for r in data["train"]],
                                [y for _, y in clean.values()] + [expected(r) for r in data["train"]],
                                [r["injection"] for r in data[split]] + [r["benign"] for r in data[split]], seed=0,
                                val_texts=[t for t, _ in val_clean.values()] + [r["injection"] for r in data["validation"]],
                                val_y=[y for _, y in val_clean.values()] + [expected(r) for r in data["validation"]])
    n = len(data[split])
    return [str(p) for p in res.predictions[:n]], {r["window_id"]: str(p) for r, p in zip(data[split], res.predictions[n:])}


def main(split: str, dirs: list[str]) -> None:
    runs = [json.loads((Path(d) / "injection_eval.json").read_text())["windows"] for d in dirs]
    expected = [w["expected_verdict"] for w in runs[0]]
    from sectune.data.injection import triplet_data
    from sectune.stages.pipeline import compose

    data = triplet_data(compose(OVERRIDES)).splits  # the triplets, built once
    tfidf, tfidf_clean = tfidf_verdicts(data, split)
    window = [w["id"].rsplit("-", 1)[0] for w in runs[0]]
    first = {k: i for i, k in reversed(list(enumerate(window)))}  # each window's first injected copy: its clean answer
    lost = lambda verdicts: sum(v != e for v, e in zip(verdicts, expected))  # noqa: E731
    voted = lambda cols: [c[winner(c)] for c in zip(*cols)]  # noqa: E731
    stated = [[w["verdict"] if w["schema_valid"] else None for w in ws] for ws in runs]
    policy = [[policy_verdict(w["injected_answer"]) for w in ws] for ws in runs]
    stated_clean = [[ws[first[k]]["clean_verdict"] for k in first] for ws in runs]
    policy_clean = [[policy_verdict(ws[first[k]]["clean_answer"]) for k in first] for ws in runs]
    labels = {r["window_id"]: r["label"] for r in data[split]}
    right = lambda verdicts: sum(v == labels[k] for v, k in zip(verdicts, first))  # noqa: E731
    n, trips = len(expected), [list(range(k, k + 3)) for k in range(0, len(runs) - len(runs) % 3, 3)]
    print(f"{split}: {n} attacks per analyst; TF-IDF + LR alone loses {lost(tfidf)} ({100 * lost(tfidf) / n:.1f}%)")
    m, tf_clean = len(first), [tfidf_clean[k] for k in first]
    print(f"TF-IDF + LR clean: {right(tf_clean)} of {m} right")
    for name, cols, clean in (("stated verdicts", stated, stated_clean), ("verdicts from the analyst's evidence", policy, policy_clean)):
        alone = [lost(c) for c in cols]
        print(f"{name}: alone {alone} ({100 * sum(alone) / (n * len(cols)):.1f}%), clean right {[right(c) for c in clean]} of {m}")
        for how, members in (("vote of 3", lambda t, c: [c[i] for i in t]),
                             ("vote of 3 + TF-IDF last", lambda t, c: [c[i] for i in t] + [tfidf if c is cols else tf_clean]),
                             ("TF-IDF first + vote of 3", lambda t, c: [tfidf if c is cols else tf_clean] + [c[i] for i in t])):
            per = [lost(voted(members(t, cols))) for t in trips]
            ok = [right(voted(members(t, clean))) for t in trips]
            print(f"  {how}: {per} of {n} each, pooled {100 * sum(per) / (n * len(trips)):.1f}%; clean right {ok} of {m}")


if __name__ == "__main__":
    if len(sys.argv) < 5 or sys.argv[1] not in ("validation", "test"):
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])
