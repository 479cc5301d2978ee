"""Round twenty-six: do SFT analysts trained with different seeds miss different windows? Each run's SFT model answers
the validation and test windows (greedy, the preset's decoding); every 3 of the runs vote on the verdict (a tie goes to
the member with the best validation verdict macro-F1), scored with the held-out table's own scorer beside each member.

    python experiments/auth_grpo/seed_vote.py <pipeline run dir> <pipeline run dir> <pipeline run dir> [...]

Each run dir is a `+experiment=auth_grpo_tiny` pipeline (at least its sft step: <dir>/sft/model).
"""

from __future__ import annotations

import itertools
import sys
from collections import Counter
from pathlib import Path

from sectune.evaluation import analyst_eval as ae
from sectune.evaluation.analyst_scoring import verdict_scores
from sectune.stages.pipeline import compose


def vote(answers: list[list[str]]) -> list[str]:
    """Per window, the verdict most members gave; a tie goes to the earliest member (the caller orders them)."""
    out = []
    for given in zip(*answers):
        counts = Counter(given)
        top = max(counts.values())
        out.append(next(v for v in given if counts[v] == top))
    return out


def main(run_dirs: list[str]) -> None:
    if len(run_dirs) < 3:
        sys.exit("seed_vote.py: give at least 3 pipeline run dirs")
    cfg = compose(["+experiment=auth_grpo_tiny", "dataset.subwindows=1"])
    windows = ae.load_windows(cfg)
    verdicts: dict[tuple[str, str], list[str]] = {}
    for run in run_dirs:
        model, tok = ae.load_policy(cfg, "model", Path(run) / "sft" / "model")
        for split in ("validation", "test"):
            verdicts[run, split] = ae.generate_row("SFT", model, tok, windows[split], cfg, 16).verdicts
        del model
    f1 = {(run, split): verdict_scores([w.label for w in windows[split]], verdicts[run, split])["macro_f1"]
          for run in run_dirs for split in ("validation", "test")}
    for split in ("validation", "test"):
        truth = [w.label for w in windows[split]]
        print(f"{split}: single runs: " + ", ".join(f"{Path(r).name} {f1[r, split]:.3f}" for r in run_dirs))
        print(f"{split}: windows each run gets wrong: "
              + "; ".join(f"{Path(r).name} {[i for i, (t, v) in enumerate(zip(truth, verdicts[r, split])) if t != v]}" for r in run_dirs))
        for members in itertools.combinations(run_dirs, 3):
            ordered = sorted(members, key=lambda r: -f1[r, "validation"])
            voted = verdict_scores(truth, vote([verdicts[r, split] for r in ordered]))["macro_f1"]
            mean = sum(f1[r, split] for r in members) / 3
            print(f"{split}: vote of {' + '.join(Path(r).name for r in members)}: {voted:.3f} "
                  f"(members' mean {mean:.3f}, best member {max(f1[r, split] for r in members):.3f})")


if __name__ == "__main__":
    main(sys.argv[1:])
