"""Session 32: a log-aware SmoothLLM. Every held-out triplet's window, clean and injected, is renamed with seed
``SMOOTH_V`` (users, IPs, host names, ports, pids and timestamps, consistently, as the triplets' counterfactual is;
the rules' analysis is checked unchanged, else the window is kept as it is), then sectune's CLI runs as given:

    SMOOTH_V=1 OMP_NUM_THREADS=1 python experiments/injection_contrastive/smooth_eval.py +experiment=auth_grpo_tiny \\
        logger=none train.precision=fp32 generation.repetition_penalty=1.0 stage=evaluate dataset=injection_triplets \\
        infer.constrained=true dataset.injections_per_window=4 evaluate.split=validation evaluate.model_dir=<run> \\
        hydra.run.dir=<dir>

``SMOOTH_V=0`` (or ``python -m sectune``) is the window as it is. The vote of V = 0, 1, 2 over each triplet's answers
uses sectune's rule (sectune/evaluation/vote.py). Not kept (experiments/injection_contrastive/README.md).
"""

from __future__ import annotations

import os
import random
import sys

import sectune.data.injection as inj
from sectune.data.auth_rules import analyze_auth_log
from sectune.data.log_edits import analysis_signature, counterfactual_window

V = int(os.environ.get("SMOOTH_V", "0"))
_build = inj.build_auth_triplets


def renamed_triplets(cfg):
    recs, info = _build(cfg)
    kept = 0
    for r in recs if V else ():
        if r["split"] == "train":
            continue
        for key in ("benign", "injection"):
            base = analysis_signature(analyze_auth_log(r[key].splitlines()))
            for t in range(5):
                cand = counterfactual_window(r[key], random.Random(f"smooth{V}:{r['id']}:{key}:{t}"))
                if analysis_signature(analyze_auth_log(cand.splitlines())) == base:
                    r[key] = cand
                    break
            else:
                kept += 1
        inj._with_prompts(r)
    print(f"smooth V={V}: {kept} held-out windows kept as they were", file=sys.stderr)
    return recs, info


if __name__ == "__main__":
    inj.build_auth_triplets = renamed_triplets
    from sectune.cli import main

    main()
