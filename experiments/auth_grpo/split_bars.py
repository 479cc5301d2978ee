"""TF-IDF + LR's verdict scores on the real auth logs under each ``dataset.split_by`` (window, time, source), with how
many test windows share a source with a training window or precede one of their log. No model is trained.
    python experiments/auth_grpo/split_bars.py [split_seed ...]        (README: the analyst's held-out table)"""

import sys
from collections import Counter

from sectune.data.window_splits import window_logs, window_sources
from sectune.evaluation import analyst_eval
from sectune.evaluation.analyst_scoring import score
from sectune.stages.pipeline import compose

for seed in sys.argv[1:] or ["0", "1", "2"]:
    for how in ("window", "time", "source"):
        cfg = compose(["stage=sft", "dataset=auth_logs", "logger=none", f"dataset.split_by={how}", f"dataset.split_seed={seed}"])
        sp = analyst_eval.load_windows(cfg)
        train, test = sp["train"], sp["test"]
        train_sources = set().union(*(window_sources(w.log_text) for w in train))
        logs = window_logs([w.id for w in train + sp["validation"] + test])
        last = {}
        for w in train:
            log, first_line = logs[w.id]
            last[log] = max(last.get(log, 0), first_line)
        row = analyst_eval.tfidf_row(train, sp["validation"], test, int(cfg.train.seed))
        s = score(row, test)
        print(f"split_seed={seed} split_by={how}: windows {', '.join(f'{k} {len(v)}' for k, v in sp.items())}; test "
              f"{dict(Counter(w.source for w in test))}; sharing a source with train "
              f"{sum(bool(window_sources(w.log_text) & train_sources) for w in test)}, before a train window of their log "
              f"{sum(logs[w.id][1] < last.get(logs[w.id][0], 0) for w in test)}; TF-IDF + LR verdict macro-F1 "
              f"{s['verdict_macro_f1']:.3f}, accuracy {s['verdict_accuracy']:.3f}", flush=True)
