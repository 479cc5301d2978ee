"""Scoring and decisions of the classify/evaluate stages and the predictor.

* :func:`score_texts` is batched scoring: ``seq_cls`` → softmax of the head's logits;
  ``generative`` → softmax over the label set of each label's summed log-likelihood after the
  prompt (:func:`label_log_likelihoods`: the prompt run once, every label scored against its KV
  cache; no free text, no parse failures); :func:`score_members` averages a k-fold ensemble;
* :func:`decide` turns probabilities into labels (argmax, or a tuned threshold for two labels:
  :func:`tune_threshold`); :func:`stratified_folds` are ``classify.folds``' held-out rows;
* :func:`evaluate_split` scores a split's predictions with the classic baselines beside them.

The data, the encoding of rows into token ids and the training objective are in
:mod:`sectune.training.classification`.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch
from omegaconf import DictConfig

from sectune.errors import ConfigError, DataError
from sectune.training.classification import HEADS, LabelledData, render_text
from sectune.training.classify_encoding import _prompt_ids, label_token_ids, pad_rows


# --------------------------------------------------------------------------- scoring


def scoring_autocast(cfg: DictConfig) -> Optional[str]:
    """The autocast dtype scoring runs in: the training precision (``train.precision``), fp32 → none."""
    p = cfg.train.precision
    return p if p in ("bf16", "fp16") else None


def autocast_context(device: torch.device, dtype: Optional[str]):
    if dtype is None:
        return contextlib.nullcontext()
    # CPU has no fp16 autocast worth the name: bf16 there, as in training (engine.precision_flags)
    dt = torch.float16 if dtype == "fp16" and device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dt)


@torch.no_grad()
def score_texts(model, tokenizer, texts: Sequence[str], *, head: str, labels: Sequence[str], batch_size: int = 32,
                max_length: int = 512, autocast: Optional[str] = None):
    """Class probabilities ``[N, K]`` (rows in input order) and the wall time of each batch.

    Prompts are sorted by length before batching so a batch holds similar lengths (little padding).
    ``autocast`` (``bf16`` | ``fp16`` | None) is the precision the model was trained in
    (:func:`scoring_autocast`); probabilities are computed in fp32 either way.
    """
    if head not in HEADS:
        raise ConfigError(f"classify.head={head!r}: choose one of {HEADS}")
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    K = len(labels)
    if head == "seq_cls":
        prompts = _prompt_ids(tokenizer, texts, max_length, "right")
    else:
        lab_ids = label_token_ids(tokenizer, labels)
        longest = max(map(len, lab_ids))
        prompts = _prompt_ids(tokenizer, texts, max(1, max_length - longest), "left")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    probs = np.zeros((len(prompts), K), dtype=np.float64)
    latencies = []
    with autocast_context(device, autocast):
        for start in range(0, len(order), max(1, batch_size)):
            idx = order[start : start + batch_size]
            t0 = time.perf_counter()
            if head == "seq_cls":
                ids, mask, _ = pad_rows([prompts[i] for i in idx], pad, "right")
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
                p = torch.softmax(logits, dim=-1)
            else:
                seq = label_log_likelihoods(model, [prompts[i] for i in idx], lab_ids, pad, device)
                p = torch.softmax(seq.float(), dim=-1)
            probs[idx] = p.cpu().double().numpy()
            latencies.append(time.perf_counter() - t0)
    return probs, latencies


def score_texts_across_ranks(model, tokenizer, texts: Sequence[str], **kw):
    """:func:`score_texts` with the rows shared out across the ranks (torchrun / accelerate) and gathered back:
    every rank scores its share and receives every row's probabilities (so every rank takes the same checkpoint,
    threshold and metrics); the batch times are every rank's. One process: :func:`score_texts` itself."""
    from sectune.training import distributed

    times: list = []

    def share(rows):
        probs, lat = score_texts(model, tokenizer, list(rows), **kw)
        times.extend(lat)
        return list(probs)

    rows = distributed.gathered(share, list(texts))
    probs = np.asarray(rows, dtype=np.float64).reshape(len(rows), len(kw["labels"]))
    return probs, distributed.gathered_lists(times)


def score_members(members, tokenizer, texts: Sequence[str], **kw):
    """:func:`score_texts` for ``(model, adapter_name)`` pairs, combined by :func:`combine_scores`."""
    runs = []
    for model, adapter in members:
        if adapter is not None:
            model.set_adapter(adapter)
        runs.append(score_texts(model, tokenizer, texts, **kw))
    return combine_scores(runs)


def combine_scores(runs):
    """``(probs, batch_times)`` of several members on the same rows → their mean probabilities and,
    per batch, their summed times (an ensemble row costs every member's forward pass)."""
    if len(runs) == 1:
        return runs[0]
    return np.mean([p for p, _ in runs], axis=0), [sum(t) for t in zip(*(lat for _, lat in runs))]


def label_log_likelihoods(model, prompts: Sequence[Sequence[int]], lab_ids: Sequence[Sequence[int]], pad: int, device) -> torch.Tensor:
    """``[len(prompts), K]``: log p(label tokens | prompt) for every label, the prompt run once.

    The prompts (left-padded) go through the model once with a KV cache. The rest of every label
    (all tokens but the first, whose log-probability the prompt's last logits already give) is
    scored against that cache in a second, short forward: with SDPA, all K continuations share one
    row per prompt, a 4D mask letting each token see the prompt and its own label's earlier tokens
    only (no copy of the cache); other attention kernels, and sliding-window models whose window
    the row would exceed, repeat the cache K times instead.
    Scoring K full (prompt + label) rows would cost K prompt forwards instead of one.
    """
    ids, mask, pos = pad_rows(prompts, pad, "left")
    ids, mask, pos = ids.to(device), mask.to(device), pos.to(device)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # predicts each label's first token
    seq = first[:, [lab[0] for lab in lab_ids]]  # [B, K]
    if max(map(len, lab_ids)) == 1:
        return seq
    window = getattr(model.config, "sliding_window", None)  # a custom 4D mask would bypass the window
    fits = not window or ids.shape[1] + sum(map(len, lab_ids)) <= window
    if getattr(model.config, "_attn_implementation", None) == "sdpa" and fits:
        return seq + _shared_row_continuations(model, out.past_key_values, mask, lab_ids, device)
    return seq + _repeated_cache_continuations(model, out.past_key_values, mask, lab_ids, pad, device)


def _shared_row_continuations(model, cache, mask: torch.Tensor, lab_ids, device) -> torch.Tensor:
    """``[B, K]``: Σ log p(label token j+1 | prompt, label tokens ≤ j), all labels in one row per prompt."""
    B, P = mask.shape
    seg = [(k, j, lab[j], lab[j + 1]) for k, lab in enumerate(lab_ids) for j in range(len(lab) - 1)]
    owner, offset, inp, tgt = (torch.tensor(c, device=device) for c in zip(*seg))
    n = len(seg)
    own = (owner[:, None] == owner[None, :]) & (offset[None, :] <= offset[:, None])  # [n, n]: causal within a label
    m4 = torch.cat([mask.bool()[:, None, None, :].expand(B, 1, n, P), own.expand(B, 1, n, n)], dim=-1)
    positions = mask.sum(-1, keepdim=True) + offset[None, :]
    logits = model(input_ids=inp.expand(B, n), attention_mask=m4, position_ids=positions, past_key_values=cache,
                   use_cache=False).logits
    tok = torch.log_softmax(logits.float(), dim=-1).gather(-1, tgt.expand(B, n).unsqueeze(-1)).squeeze(-1)  # [B, n]
    return torch.zeros(B, len(lab_ids), device=device).index_add_(1, owner, tok)


def _repeated_cache_continuations(model, cache, mask: torch.Tensor, lab_ids, pad: int, device) -> torch.Tensor:
    """The same as :func:`_shared_row_continuations` with the cache repeated K times (any attention kernel)."""
    B, K = mask.shape[0], len(lab_ids)
    longest = max(map(len, lab_ids))
    cache.batch_repeat_interleave(K)
    cont = torch.full((K, longest - 1), pad, dtype=torch.long)
    cont_mask = torch.zeros((K, longest - 1), dtype=torch.long)
    tgt = torch.full((K, longest - 1), -100, dtype=torch.long)
    for k, lab in enumerate(lab_ids):
        cont[k, : len(lab) - 1] = torch.tensor(lab[:-1])
        cont_mask[k, : len(lab) - 1] = 1
        tgt[k, : len(lab) - 1] = torch.tensor(lab[1:])
    cont, cont_mask, tgt = (t.to(device).repeat(B, 1) for t in (cont, cont_mask, tgt))  # row b*K + k
    full_mask = torch.cat([mask.repeat_interleave(K, dim=0), cont_mask], dim=1)
    cont_pos = mask.sum(-1).repeat_interleave(K).unsqueeze(1) + torch.arange(longest - 1, device=device)
    logits = model(input_ids=cont, attention_mask=full_mask, position_ids=cont_pos, past_key_values=cache, use_cache=False).logits
    logp = torch.log_softmax(logits.float(), dim=-1)
    tok = logp.gather(-1, tgt.clamp_min(0).unsqueeze(-1)).squeeze(-1) * (tgt != -100)
    return tok.sum(-1).view(B, K)


def stratified_folds(y: Sequence[str], k: int, seed: int) -> List[np.ndarray]:
    """``classify.folds``: the held-out row indices of each of ``k`` stratified folds (seeded)."""
    from collections import Counter

    from sklearn.model_selection import StratifiedKFold

    label, count = min(Counter(y).items(), key=lambda kv: kv[1])
    if count < k:
        raise ConfigError(f"classify.folds={k}: the train split has only {count} row(s) of label {label!r}; "
                          f"every label needs at least k rows (lower classify.folds)")
    skf = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    return [held for _, held in skf.split(np.zeros(len(y)), list(y))]


def decide(probs: np.ndarray, labels: Sequence[str], threshold: Optional[float] = None) -> List[str]:
    """Argmax, or for two labels ``labels[1]`` when its probability ≥ ``threshold``."""
    if threshold is not None and len(labels) == 2:
        return [labels[1] if p >= threshold else labels[0] for p in probs[:, 1]]
    return [labels[i] for i in probs.argmax(axis=1)]


def tune_threshold(probs: np.ndarray, y_true: Sequence[str], labels: Sequence[str]) -> tuple[float, float]:
    """The threshold on ``p(labels[1])`` with the best macro-F1 (ties → closest to 0.5), and that F1."""
    from sklearn.metrics import f1_score

    if len(set(y_true)) < 2:  # any threshold fits one class: it tuned to near all-positive, unsaid (an audit, session 42)
        print(f"sectune: warning: the rows the threshold is tuned on hold one label only ({next(iter(set(y_true)), None)}): "
              "kept at 0.5", file=sys.stderr)
        return 0.5, float(f1_score(list(y_true), decide(probs, labels, 0.5), labels=list(labels), average="macro", zero_division=0))
    best = (-1.0, 0.0, 0.5)
    # each score (p >= t flags it) and one above the top score: flagging no row was out of reach (an audit, session 42)
    for t in np.unique(np.concatenate([probs[:, 1], [0.5, np.nextafter(probs[:, 1].max(), np.inf)]])):
        f1 = f1_score(list(y_true), decide(probs, labels, float(t)), labels=list(labels), average="macro", zero_division=0)
        key = (f1, -abs(t - 0.5), float(t))
        if key > best:
            best = key
    return best[2], best[0]


# --------------------------------------------------------------------------- evaluation


def external_records(data: LabelledData, cfg: DictConfig, path) -> list[dict]:
    """The rows of a new labelled file (``evaluate.data_path``) in the run's own format and columns, rendered as its
    training rows were, with its TRAIN split's statistics (flows: medians and scaling; nothing is fitted on the file).
    A label the run never saw is an error naming it: the model cannot answer it."""
    d, path = cfg.dataset, Path(str(path)).expanduser()
    if d.name == "prompt_injections" and (path.is_dir() or path.suffix in (".jsonl", ".parquet")):
        # that dataset's own forms ({"text", "label": 0|1} lines; a folder's test split), not a CSV
        from sectune.data import text_classification as T

        rows = (T.load_prompt_injections(path)["test"] if path.is_dir() else
                T._read_injection_jsonl(path) if path.suffix == ".jsonl" else T._read_injection_parquet(path))
        recs = [{"text": render_text(data.template, r["text"]), "label": r["label"], "raw_text": r["text"]} for r in rows]
        return _known_labels(recs, data, path)
    if not path.is_file():
        raise DataError(f"evaluate.data_path={path}: no such file" + (" (a folder: give the labelled file)" if path.is_dir() else ""))
    if data.format == "flows":
        from sectune.data.flows import load_flows, render_flow

        # the run's own policy for bad cells (a run trained with nan_policy=drop drops them here too), said aloud
        t = load_flows(path, data.features, d.label_column, d.granularity, nan_policy=str(d.nan_policy))
        c = t.cleaning
        if c.get("rows_with_bad_cells") or c.get("rows_without_label"):
            print(f"sectune: evaluate.data_path: {path}: {c.get('nan_cells', 0)} NaN, {c.get('inf_cells', 0)} inf and "
                  f"{c.get('non_numeric_cells', 0)} non-numeric cells in {c.get('rows_with_bad_cells', 0)} rows; "
                  f"dataset.nan_policy={d.nan_policy} (the run's): {c.get('rows_dropped', 0)} rows dropped, the rest "
                  f"filled with the training split's medians; {c.get('rows_without_label', 0)} rows without a label left out")
        X = data.normalizer.impute(t.X)
        Z = data.normalizer.transform(X)
        recs = [{"text": render_flow(z, data.features, data.template, d.render_precision, d.feature_sep, d.feature_format),
                 "label": lab, "features": raw} for z, raw, lab in zip(Z.to_dict("records"), X.to_dict("records"), t.y)]
    else:
        from sectune.data.text_classification import load_text_label_csv

        recs = [{"text": render_text(data.template, r["text"]), "label": r["label"], "raw_text": r["text"]}
                for r in load_text_label_csv(path, d.text_column, d.label_column)]
    return _known_labels(recs, data, path)


def _known_labels(recs: list[dict], data: LabelledData, path: Path) -> list[dict]:
    unknown = sorted({r["label"] for r in recs} - set(data.labels))
    if unknown:
        n = sum(r["label"] in set(unknown) for r in recs)
        raise DataError(f"{path}: {n} row(s) carry label(s) the run never trained on: {', '.join(map(repr, unknown[:10]))} "
                        f"(its labels: {', '.join(map(repr, data.labels[:20]))}); drop or relabel them")
    if not recs:
        raise DataError(f"{path}: no labelled rows")
    return recs




def baseline_folds(labels: Sequence[str], folds: int, seed: int) -> Optional[List[np.ndarray]]:
    """The folds the text baseline picks its C over when there are no validation rows: ``classify.folds``' own
    (the same seed, the same rows), else 5; fewer where a label has fewer rows; None below 2."""
    from collections import Counter

    k = min(folds if folds > 1 else 5, min(Counter(labels).values(), default=0))
    return stratified_folds(labels, k, seed) if k >= 2 else None


def baseline_predictions(data: LabelledData, split: str, seed: int, rf_estimators: int = 200, *, folds: int = 0,
                         fold_seed: int = 0, tuned: bool = False) -> tuple[dict, dict]:
    """The classic baseline (RF on raw features for flows, TF-IDF+LR for text) and the majority class. ``tuned`` (two
    labels, the model's threshold tuned): the baseline's threshold on p(labels[1]) is tuned the same way, on the same
    rows (:func:`tuned_baseline`)."""
    from sectune.evaluation.baselines import majority_baseline, random_forest_baseline, tfidf_logreg_baseline

    train, val, test = data.splits["train"], data.splits["validation"], data.splits[split]
    ytr = [r["label"] for r in train]
    if data.format == "flows":
        X = lambda recs: [[r["features"][f] for f in data.features] for r in recs]  # noqa: E731
        b = random_forest_baseline(X(train), ytr, X(test), seed=seed, n_estimators=rf_estimators)
    else:
        X = lambda recs: [r["raw_text"] for r in recs]  # noqa: E731
        b = tfidf_logreg_baseline(
            X(train), ytr, X(test), seed=seed,
            val_texts=X(val) or None, val_y=[r["label"] for r in val] or None,
            cv_folds=None if val else baseline_folds(ytr, folds, fold_seed),
        )
    if tuned and len(data.labels) == 2:  # the model's rows: out-of-fold train rows with classify.folds, else validation
        oof = baseline_folds(ytr, folds, fold_seed) if folds > 1 else None
        tuned_baseline(b, data.labels, X(test), [] if oof else X(val), [r["label"] for r in val], X(train), ytr, oof)
    maj = majority_baseline(ytr, [r["label"] for r in test])
    return {b.name: b.predictions, "majority": maj.predictions}, {b.name: b.to_dict(), "majority": maj.to_dict()}


def tuned_baseline(b, labels: Sequence[str], test_rows, val_rows, val_y, train_rows, train_y, folds) -> None:
    """The model's decision rule for the bar too: its threshold on p(labels[1]) tuned for macro-F1 on the validation rows
    (without them, on out-of-fold train rows, as the model's is), applied to its test probabilities. The bar took argmax
    while the model got a tuned threshold: on the real CIC sample's binary task the RF read 0.771 where the same rule gave
    it 0.797 (an audit, session 42). ``b`` is updated in place (``params.threshold``, ``threshold_chosen_on``)."""
    from sklearn.model_selection import cross_val_predict

    def ordered(p, classes):  # columns in ``labels`` order (a class a fold lacks: probability 0)
        return np.stack([p[:, classes.index(lab)] if lab in classes else np.zeros(len(p)) for lab in labels], axis=1)

    if val_rows:
        held, held_y, on = ordered(b.predict_proba(val_rows), b.classes), list(val_y), "validation"
    elif folds:
        every = np.arange(len(train_y))
        cv = [(np.setdiff1d(every, f), np.asarray(f)) for f in folds]
        rows = train_rows if isinstance(train_rows[0], str) else np.asarray(train_rows, dtype=float)
        held = cross_val_predict(b.unfitted(), rows, np.asarray(train_y, dtype=str), cv=cv, method="predict_proba")
        held, held_y, on = ordered(held, sorted(set(map(str, train_y)))), list(train_y), f"{len(folds)}-fold out-of-fold train rows"
    else:
        return
    threshold, _ = tune_threshold(held, held_y, labels)
    b.predictions = decide(ordered(b.predict_proba(test_rows), b.classes), labels, threshold)
    b.params.update(threshold=float(threshold), threshold_chosen_on=on)


def evaluate_split(data: LabelledData, split: str, probs: np.ndarray, latencies: Sequence[float], out_dir: Path, *,
                   threshold: Optional[float], seed: int, rf_estimators: int, extra: Optional[dict] = None,
                   folds: int = 0, fold_seed: int = 0) -> dict:
    """Model predictions from ``probs`` + baselines on the same rows → ``write_evaluation``. ``folds`` /
    ``fold_seed``: the run's ``classify.folds`` and ``dataset.split_seed`` (the baseline's C without validation rows)."""
    from sectune.data import is_generated
    from sectune.evaluation.classifier import write_evaluation

    recs = data.splits[split]
    if not recs:
        raise DataError(f"{data.source}: the {split} split is empty; set dataset.test_fraction > 0")
    preds = decide(probs, data.labels, threshold)
    base_preds, base_info = baseline_predictions(data, split, seed, rf_estimators, folds=folds, fold_seed=fold_seed,
                                                 tuned=threshold is not None)
    scores = [{lab: float(p) for lab, p in zip(data.labels, row)} for row in probs]
    metrics = write_evaluation(
        out_dir, y_true=[r["label"] for r in recs], y_pred=preds, labels=data.labels, latencies_s=latencies,
        scores=scores, baselines=base_preds,
        extra={"split": split, "source": data.source, "threshold": threshold, "baselines": base_info,
               "model_rows_per_s": len(recs) / max(sum(latencies), 1e-9), **(extra or {})},
        generated=[data.source] if is_generated(data.source) else [], split=split,
    )
    metrics["model_rows_per_s"] = len(recs) / max(sum(latencies), 1e-9)
    for name, info in base_info.items():
        metrics[f"{name}_rows_per_s"] = info["rows_per_s"] if np.isfinite(info["rows_per_s"]) else None
    return metrics
