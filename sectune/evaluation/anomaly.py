"""Log-session anomaly detection by next-log-key prediction (DeepLog; seed 003), and its evaluate branch.

A session ``k_1 … k_n`` is scored position by position: at position i (0..n) the predictor sees the
keys before it and gives a distribution over the candidates ``END, 1, …, K`` (candidate 0 is the end
of the session, candidate k is key k); the true next key is ``k_{i+1}``, and after the last key it is
END. For a causal LM fed ``prompt + k_1 … k_n`` the distribution for ``k_{i+1}`` is read from the
logits at the token BEFORE it (the one-position shift): position ``len(prompt) - 1 + i``. Seed 003
checked top-k membership at the key's own position, without the shift; that is not done here.

Two session scores come out of that: ``max_rank``, the worst rank of a true next key among the
candidates (1 = the most likely; ties count against it), and ``max_nll``, the worst −log p of a
true next key. Two rules decide: top-g (anomalous when some true next key is outside the top g,
i.e. ``max_rank > g``: DeepLog's rule) and a threshold on ``max_nll``. g and the threshold are chosen
on the VALIDATION split (best F1; among equal F1 the cut that flags fewest, placed at the midpoint of the gap between
the scores either side of it, g its floor), and only then applied to test;
the rule with the higher validation F1 is the system's headline. Seed 003 tuned its threshold on
the test set; nothing here reads a test label before the choice is made.

Baselines in the same run, from the normal training sessions the model trained on (also when other logs are scored): a bigram next-key model with a
start and an end marker (add-α smoothed counts) under both rules, the top-g one being DeepLog's
rule on it, and the same bigram without the end marker (a session cut short then goes unnoticed).

Keys the run never saw: the run's key vocabulary is keys 1..K of the logs it trained on (DeepLog's keys 1..num_log_keys,
the structured CSV's EventIds, drain3's templates numbered as in its log), each one token of its tokenizer (stage=sft checks
that). A position whose key is past K (a template new in other logs, whether or not the trained tokenizer happens to hold a
token for it) is a miss of top-g at every g, g = every candidate included: rank K + 2 and −log p = ∞, in the model and in
every baseline alike, so its session is flagged (DeepLog: a key never seen in training is anomalous there). A key in 1..K
that no training session holds (on DeepLog's sessions, the keys only anomalous sessions have) is a candidate every system
ranks as it ranks any other (the model's probability, the bigram's add-α count), as on the run's own logs; both are counted
in hdfs_detection.json's ``unseen_keys``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from sectune.errors import ConfigError, DataError
from sectune.evaluation.anomaly_runs import (  # noqa: F401 (re-exported)
    RETRAIN_HINT, _run_config, _trained_sessions, unseen_keys, unseen_keys_note)

END = 0


# ----------------------------------------------------------------------------- predictors
class BigramModel:
    """p(next | previous key) from counts, with START before the first key and (optionally) END after the last."""

    def __init__(self, num_keys: int, end_marker: bool = True, alpha: float = 0.01):
        self.num_keys, self.end_marker, self.alpha = num_keys, end_marker, alpha
        self.counts = np.zeros((num_keys + 1, num_keys + 1))  # row 0 = START, row k = after key k; col 0 = END

    def fit(self, sessions) -> "BigramModel":
        for keys in sessions:
            prev = 0
            for k in keys:
                self.counts[prev, k] += 1
                prev = k
            if self.end_marker:
                self.counts[prev, END] += 1
        smoothed = self.counts + self.alpha
        if not self.end_marker:
            smoothed[:, END] = 0.0  # never predicted, never scored
        with np.errstate(divide="ignore", invalid="ignore"):
            self._logp = np.log(smoothed / smoothed.sum(axis=1, keepdims=True))
        return self

    def logprobs(self, keys: Sequence[int]) -> np.ndarray:
        """(n+1, K+1): row i = log p(candidate | the keys before position i)."""
        return self._logp[[0, *keys]]


def key_token_ids(tokenizer, num_keys: int, prompt: str, hint: str = "") -> tuple[list[int], list[int]]:
    """(prompt token ids, candidate token ids: [EOS, key 1, …, key K]); every key must be one token (``hint``: what
    to do otherwise; by default, before training, the tiny model's extra tokens)."""
    from sectune.data.hdfs import render_keys

    cand = [tokenizer.eos_token_id]
    multi = []
    for k in range(1, num_keys + 1):
        ids = tokenizer(render_keys([k]), add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            multi.append(k)
        cand.append(ids[0] if ids else -1)
    if multi:
        raise ConfigError(f"the model's tokenizer splits log keys {multi[:10]} into several tokens; the detector scores one token "
                          f"per key ({hint or f'for the tiny model add them whole: model.tiny.extra_tokens=[{chr(39)} {multi[0]}{chr(39)}, …]'})")
    if len(set(cand)) != len(cand):
        raise ConfigError("two log keys (or a key and EOS) share one token in the model's tokenizer")
    from sectune.inference import prompt_completion_ids

    # the same ids stage=sft and the federated clients train on (the text as text, the real EOS appended)
    probe = [1, 2, num_keys]
    prompt_ids, full = prompt_completion_ids(tokenizer, prompt, render_keys(probe))
    if full != prompt_ids + [cand[k] for k in probe] + [cand[END]]:
        raise ConfigError(f"the tokenizer does not split {prompt!r} + keys + EOS at the key boundaries; set dataset.prompt_template "
                          "to text that ends on a token boundary")
    return prompt_ids, cand


def lm_logprobs(model, sessions: Sequence[Sequence[int]], prompt_ids: list[int], cand_ids: list[int],
                batch_size: int = 64, pad_id: int = 0) -> list[np.ndarray]:
    """(n+1, K+1) log-probabilities over the candidates for each session, restricted to them (the
    softmax over END and the K key tokens). The model is fed ``prompt + keys`` (the END token itself
    is never input); the logits at ``P-1+i`` (P = prompt length) predict the key at ``P+i``."""
    import torch

    device = next(model.parameters()).device
    cand = torch.tensor(cand_ids, device=device)
    P = len(prompt_ids)
    if P < 1:
        raise ConfigError("the prompt is empty: the first key needs a token before it to be predicted from")
    order = sorted(range(len(sessions)), key=lambda i: len(sessions[i]))
    out: list[np.ndarray] = [None] * len(sessions)  # type: ignore[list-item]
    with torch.no_grad():
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            seqs = [prompt_ids + [cand_ids[k] for k in sessions[i]] for i in idx]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for r, s in enumerate(seqs):  # right padding: a causal model's earlier positions never see it
                ids[r, :len(s)] = torch.tensor(s)
                mask[r, :len(s)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            lp = torch.log_softmax(logits[:, :, cand].float(), dim=-1).cpu().numpy()
            for r, i in enumerate(idx):
                n = len(sessions[i])
                out[i] = lp[r, P - 1:P + n]
    return out


# ----------------------------------------------------------------------------- scores and rules
def session_scores(logprobs: np.ndarray, keys: Sequence[int], score_end: bool = True) -> tuple[int, float]:
    """(max rank, max −log p) of the true next keys (END after the last key when ``score_end``)."""
    targets = [*keys, END] if score_end else list(keys)
    rows = logprobs[: len(targets)]
    true = rows[np.arange(len(targets)), targets]
    ranks = (rows >= true[:, None]).sum(axis=1)  # ties count against the true key
    return int(ranks.max()), float(-true.min())


def score_all(predict, sessions: Sequence[Sequence[int]], score_end: bool = True, known: int | None = None
              ) -> dict[str, np.ndarray]:
    """``{"max_rank", "max_nll"}`` arrays; ``predict(unique_sessions) -> [logprobs]``, each distinct sequence once.
    ``known``: the run's key vocabulary, keys 1..known; a session holding a key past it gets rank ``known + 2`` (after
    every candidate: a miss of top-g at every g) and −log p = ∞, and is never given to ``predict`` (which has no candidate
    for that key); None: every key is a candidate (the predictor's own logs)."""
    uniq = list(dict.fromkeys(tuple(s) for s in sessions))
    seen = [s for s in uniq if known is None or max(s, default=0) <= known]
    scored = dict(zip(seen, (session_scores(lp, s, score_end) for lp, s in zip(predict(seen), seen))))
    scored.update({s: (known + 2, math.inf) for s in uniq if s not in scored})
    ranks, nll = zip(*(scored[tuple(s)] for s in sessions)) if sessions else ((), ())
    return {"max_rank": np.asarray(ranks, dtype=float), "max_nll": np.asarray(nll, dtype=float)}


def choose_threshold(scores, labels) -> tuple[float, float]:
    """(threshold, F1) maximising F1 of ``score > threshold`` on these (validation) labels: the midpoint
    between two adjacent distinct scores; among equal F1 the highest threshold (fewest alarms)."""
    s, y = np.asarray(scores, dtype=float), np.asarray(labels, dtype=bool)
    if not y.any() or y.all():
        raise DataError("choosing a threshold needs normal and anomalous validation sessions")
    u = np.unique(s)
    pos, neg = np.sort(s[y]), np.sort(s[~y])
    tp = len(pos) - np.searchsorted(pos, u, side="left")  # alarms when score >= u[i]
    fp = len(neg) - np.searchsorted(neg, u, side="left")
    f1 = 2 * tp / (2 * tp + fp + (len(pos) - tp))
    best = int(np.flatnonzero(f1 == f1.max()).max())
    thr = (u[best - 1] + u[best]) / 2 if best > 0 else u[0] - 1.0
    if not np.isfinite(thr):  # the cut below an unseen key's −log p = ∞ (the midpoint, ∞, flagged nothing): 1 above the
        finite = u[np.isfinite(u)]  # finite score under it (every finite −log p passes it and every ∞ is flagged)
        thr = finite.max() + 1.0 if finite.size else np.finfo(float).max
    return float(thr), float(f1[best])


def binary_metrics(y_true, y_pred, score) -> dict[str, float]:
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, roc_auc_score

    y_true, y_pred = np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)
    p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, average="binary", zero_division=0)
    tn, fp, fn, tp = confusion_matrix(y_true, y_pred, labels=[0, 1]).ravel()
    score = np.asarray(score, dtype=float)
    if np.isinf(score).any():  # an unseen key's −log p = ∞ (sklearn refuses ∞): above every finite score, the same order
        finite = score[np.isfinite(score)]
        score = np.where(np.isinf(score), (finite.max() if finite.size else 0.0) + 1.0, score)
    auc = roc_auc_score(y_true, score) if 0 < y_true.sum() < len(y_true) else float("nan")
    return {"precision": float(p), "recall": float(r), "f1": float(f), "fpr": float(fp / max(1, fp + tn)),
            "roc_auc": float(auc), "tp": int(tp), "fp": int(fp), "tn": int(tn), "fn": int(fn)}


def detect(val: dict, val_y, test: dict, test_y) -> dict:
    """Both rules fitted on validation, applied to test: ``{"top_g": {...}, "threshold": {...}, "chosen": rule}``.
    ``test_y`` is used only to score the already-fixed decisions."""
    g_thr, g_f1 = choose_threshold(val["max_rank"], val_y)
    g = max(0, math.floor(g_thr))
    t_thr, t_f1 = choose_threshold(val["max_nll"], val_y)
    out = {
        "top_g": {"g": g, "val_f1": g_f1, "pred": (test["max_rank"] > g).astype(int)},
        "threshold": {"threshold": t_thr, "val_f1": t_f1, "pred": (test["max_nll"] > t_thr).astype(int)},
    }
    for name, rule in out.items():  # each rule's ROC-AUC over its own score (top-g ranks, the threshold NLLs)
        rule["test"] = binary_metrics(test_y, rule["pred"], test["max_rank"] if name == "top_g" else test["max_nll"])
    out["chosen"] = "top_g" if g_f1 >= t_f1 else "threshold"
    return out


# ----------------------------------------------------------------------------- stage=evaluate dataset=hdfs
def evaluate_hdfs(ctx) -> dict:
    from sectune.data.hdfs import ANOMALOUS, DEFAULT_PROMPT, load_hdfs
    from sectune.evaluation.classifier import write_evaluation
    from sectune.evaluation.injection_eval import choose_analyst
    from sectune.runner import write_json_atomic, write_text_atomic
    from sectune.stages import infer

    cfg, run_dir, ev = ctx.cfg, ctx.run_dir, ctx.cfg.evaluate
    if not ev.model_dir:
        raise ConfigError("stage=evaluate dataset=hdfs needs evaluate.model_dir=<an sft run dir, or a pipeline dir with an sft step>")
    if ev.split != "test":
        raise ConfigError(f"evaluate.split={ev.split!r}: dataset=hdfs chooses g/threshold on validation and reports test; leave it at test")
    model_dir = Path(str(ev.model_dir)).expanduser().resolve()
    choice = choose_analyst(model_dir)
    trained: dict = {}
    run_cfg = _run_config(cfg, choice, model_dir, trained)
    data = load_hdfs(run_cfg)
    own, dropped = _trained_sessions(trained, data)
    val, test, train = data.splits["validation"], data.splits["test"], own.splits["train"]
    val_y = np.array([s.label == ANOMALOUS for s in val], dtype=int)
    test_y = np.array([s.label == ANOMALOUS for s in test], dtype=int)
    if any(s.label == ANOMALOUS for s in train):
        raise DataError(f"{own.source}: the train split holds anomalous sessions")

    model, tokenizer, model_ref = infer.load_model(run_cfg, choice)
    # the model's candidates are the run's key vocabulary, as sft checked them (they were the scored logs' keys: other logs
    # with fewer keys took the rest out of its softmax, and a key past the run's was refused); a key past it is a template
    # the run never saw, scored by the rule in this module's docstring, by the model and every baseline alike
    vocab = int(trained.get("num_keys") or own.num_keys)
    prompt_ids, cand_ids = key_token_ids(tokenizer, vocab, str(run_cfg.dataset.prompt_template or DEFAULT_PROMPT), RETRAIN_HINT)
    unseen = unseen_keys({"validation": val, "test": test}, vocab, {k for s in train for k in s.keys})
    if (note := unseen_keys_note(unseen, data.source)):
        print(f"sectune: note: {note}")
    print(f"sectune: evaluate: {len(val)} validation / {len(test)} test sessions ({int(test_y.sum())} anomalous), "
          f"{choice.describe(model_ref)}; g and threshold chosen on validation")
    limit = int(run_cfg.model.max_seq_length)  # a session is the prompt, one token per key and the end: training cut it here
    long = sum(len(prompt_ids) + len(s.keys) + 1 > limit for s in val + test)
    if long:
        print(f"sectune: warning: {long} of {len(val) + len(test)} validation/test sessions are longer than model.max_seq_length="
              f"{limit} tokens, which training cut them to; they are scored whole, at positions the model never trained on")

    def lm(uniq):
        return lm_logprobs(model, uniq, prompt_ids, cand_ids, batch_size=int(ev.batch_size), pad_id=int(tokenizer.pad_token_id or 0))

    # the baselines learn from the normal training sessions the model was trained on (its own logs' train split, also when
    # other logs are scored: they learnt from the scored logs' split, an in-domain bigram beside a transferred model, while
    # a comment here said otherwise: an audit, session 42), are tuned on the same validation rows, scored on the same test rows
    # (their table is the run's key vocabulary, as the model's candidates; only where the run's own logs cannot be read do
    # they learn from the scored logs' train split, whose sessions with keys past it are no training of the run's)
    train_keys = [s.keys for s in train if max(s.keys) <= vocab]
    bigram = BigramModel(vocab, end_marker=True, alpha=float(ev.bigram_alpha)).fit(train_keys)
    bigram_noend = BigramModel(vocab, end_marker=False, alpha=float(ev.bigram_alpha)).fit(train_keys)
    systems, timing = {}, {}
    for name, predict, score_end in (
        ("model", lm, True),
        ("bigram", lambda uniq: [bigram.logprobs(s) for s in uniq], True),
        ("bigram_noend", lambda uniq: [bigram_noend.logprobs(s) for s in uniq], False),
    ):
        t0 = time.perf_counter()
        v = score_all(predict, [s.keys for s in val], score_end, known=vocab)
        t1 = time.perf_counter()
        t = score_all(predict, [s.keys for s in test], score_end, known=vocab)
        timing[name] = time.perf_counter() - t1
        systems[name] = detect(v, val_y, t, test_y)
        systems[name]["val_scoring_s"] = t1 - t0

    metrics = _metrics(systems, timing, len(test))
    table = _table(systems, timing, len(test))
    out = run_dir / "evaluation"
    labels = np.array(["normal", "anomalous"])
    chosen = {n: s[s["chosen"]]["pred"] for n, s in systems.items()}
    write_evaluation(out, y_true=labels[test_y], y_pred=labels[chosen["model"]], labels=list(labels),
                     baselines={"bigram": labels[chosen["bigram"]], "bigram_topg": labels[systems["bigram"]["top_g"]["pred"]],
                                "bigram_noend": labels[chosen["bigram_noend"]]},
                     extra={"model_dir": str(model_dir), "rule": systems["model"]["chosen"]},
                     generated=[str(data.source)] if data.info.get("generated") else [])
    summary = {
        "model_dir": str(model_dir), "model_used": choice.used, "data": data.info,
        "systems": {n: {"chosen": s["chosen"], "val_scoring_s": s["val_scoring_s"], "test_scoring_s": timing[n],
                        **{r: {k: v for k, v in s[r].items() if k != "pred"} for r in ("top_g", "threshold")}}
                    for n, s in systems.items()},
        "test_ids": [s.id for s in test], "baselines_trained_on": own.source, "dropped_trained_sessions": dropped,
        "unseen_keys": unseen,
    }
    write_json_atomic(out / "hdfs_detection.json", summary)
    if trained.get("other"):  # which train split the baseline rows learnt from, in the report itself
        table = (f"Other logs than the run's: {data.source}. The bigram rows learnt from {own.source}'s train split, "
                 + ("the sessions the model learnt from" if own is not data else "NOT the sessions the model learnt from")
                 + f"; {sum(dropped.values())} held-out sessions the run trained on were dropped.\n\n" + table)
    if (note := unseen_keys_note(unseen, data.source, past_only=True)):  # sessions flagged by rule, not by a score
        table = note + "\n\n" + table
    if data.info.get("generated"):  # the report says so, as the console did
        table = (f"**These sessions are generated** ({data.source}: sectune's synthetic sessions in the DeepLog format, the "
                 "real ones were not found), so the numbers describe the pipeline, not detection on real HDFS logs.\n\n" + table)
    write_text_atomic(out / "hdfs_report.md", table + "\n")
    print(table)
    return {"metrics": metrics, "artifacts": {"evaluation": "evaluation", "report": "evaluation/hdfs_report.md",
                                              "confusion_matrix": "evaluation/confusion_matrix.png", "model": model_ref}}


def _metrics(systems: dict, timing: dict, n_test: int) -> dict:
    m: dict = {}
    for name, prefix in (("model", ""), ("bigram", "baseline_")):
        s = systems[name]
        for k, v in s[s["chosen"]]["test"].items():
            m[f"{prefix}test_{k}"] = v
        m[f"{prefix}rule_is_top_g"] = int(s["chosen"] == "top_g")
    # the chosen rule's validation F1 under the name federated runs report: what a sweep of detectors is ranked by (the
    # report's default; without it an hdfs_detect sweep was sorted by the 0/1 rule_is_top_g: an audit, session 36)
    m["val_f1"] = systems["model"][systems["model"]["chosen"]]["val_f1"]
    for name, s in systems.items():
        m[f"{name}_top_g"] = s["top_g"]["g"]
        m[f"{name}_threshold"] = s["threshold"]["threshold"]
        for rule in ("top_g", "threshold"):
            m[f"{name}_{rule}_val_f1"] = s[rule]["val_f1"]
            for k in ("f1", "fpr", "precision", "recall"):
                m[f"{name}_{rule}_test_{k}"] = s[rule]["test"][k]
        m[f"{name}_sessions_per_s"] = n_test / max(timing[name], 1e-9)
    return m


def _table(systems: dict, timing: dict, n_test: int) -> str:
    rows = ["| system | rule (chosen on validation) | val F1 | test precision | test recall | test F1 | test FPR | ROC-AUC | TP/FP/TN/FN | sessions/s |",
            "|---|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    names = {"model": "LM (next key)", "bigram": "bigram + end marker", "bigram_noend": "bigram, no end marker"}
    for name, s in systems.items():
        for rule in ("top_g", "threshold"):
            r, t = s[rule], s[rule]["test"]
            how = f"top-g, g={r['g']}" if rule == "top_g" else f"max −log p > {r['threshold']:.3f}"
            star = " ←" if s["chosen"] == rule else ""
            rows.append(f"| {names[name]} | {how}{star} | {r['val_f1']:.4f} | {t['precision']:.4f} | {t['recall']:.4f} | {t['f1']:.4f} | "
                        f"{t['fpr']:.4f} | {t['roc_auc']:.4f} | {t['tp']}/{t['fp']}/{t['tn']}/{t['fn']} | {n_test / max(timing[name], 1e-9):.0f} |")
    return "\n".join(rows)
