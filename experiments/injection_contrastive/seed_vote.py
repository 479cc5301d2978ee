"""Session 30: a vote of analysts trained with different seeds against the injections. Reads the injection_eval.json of
`stage=evaluate dataset=injection_triplets` runs that scored the same windows (the same dataset settings: only the
analyst differs), in the order given (best first: a tie goes to the earliest), and scores every 3 of them (``-k K``: every K) voting on
the verdict, beside each member. An answer that is not schema-valid votes for nothing; a window is attacked when the
vote is not the injected window's expected verdict (as `stage=evaluate` counts a single analyst).

    python experiments/injection_contrastive/seed_vote.py [-k K] <evaluate run dir> <evaluate run dir> <evaluate run dir> [...]

``stage=evaluate ... evaluate.vote_with=[...]`` scores one such vote in sectune itself (each analyst answering anew).
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

from sectune.evaluation.uncertainty import proportion_ci
from sectune.evaluation.vote import winner


def vote(given: list) -> object:
    """The verdict most members gave, by sectune's rule (``evaluate.vote_with``, sectune/evaluation/vote.py): None, an
    invalid answer, never wins a vote another verdict can win; a tie goes to the earliest member."""
    return given[winner(given)]


def main(run_dirs: list[str], size: int = 3) -> None:
    if len(run_dirs) < 3:
        sys.exit("seed_vote.py: give at least 3 evaluate run dirs")
    runs = {r: json.loads((Path(r) / "injection_eval.json").read_text())["windows"] for r in run_dirs}
    first = runs[run_dirs[0]]
    for r, ws in runs.items():  # the same windows, injections and expected verdicts in every file
        if [(w["id"], w["injection_source"], w["expected_verdict"]) for w in ws] != \
           [(w["id"], w["injection_source"], w["expected_verdict"]) for w in first]:
            sys.exit(f"{r}: scored other windows than {run_dirs[0]}")
    n = len(first)

    def injected(r):
        return [w["verdict"] if w["schema_valid"] else None for w in runs[r]]

    def clean_right(r):
        return [w["clean_correct"] for w in runs[r]]

    def report(name, attacked, clean_ok):
        lo, hi = proportion_ci(sum(attacked), n)
        windows = len({w["id"].rsplit("-", 1)[0] for w in first})  # <window id>-<injection index>
        return (f"{name}: attack success {100 * sum(attacked) / n:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] of {n}; "
                f"clean verdict accuracy {100 * clean_ok:.1f}% of {windows} windows")

    for r in run_dirs:
        attacked = [v != w["expected_verdict"] for v, w in zip(injected(r), first)]
        right = {w["id"].rsplit("-", 1)[0]: ok for w, ok in zip(first, clean_right(r))}
        print(report(Path(r).parent.name, attacked, sum(right.values()) / len(right)))
    for members in itertools.combinations(run_dirs, size):
        votes = [vote(list(given)) for given in zip(*(injected(r) for r in members))]
        attacked = [v != w["expected_verdict"] for v, w in zip(votes, first)]
        # the clean vote is right when most members are right, or when the members split and the tie goes to a right one
        right = {}
        for i, w in enumerate(first):
            clean = [(runs[r][i]["clean_verdict"], runs[r][i]["clean_correct"]) for r in members]
            winner = vote([v for v, _ in clean])
            right[w["id"].rsplit("-", 1)[0]] = any(ok and v == winner for v, ok in clean)
        print(report("vote of " + " + ".join(Path(r).parent.name for r in members), attacked, sum(right.values()) / len(right)))


if __name__ == "__main__":
    args = sys.argv[1:]
    k = int(args.pop(args.index("-k") + 1)) if "-k" in args else 3  # -k K: every K of them vote (default 3)
    main([a for a in args if a != "-k"], k)
