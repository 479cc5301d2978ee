"""Data, encoding and objective of the classify/evaluate stages and the predictor.

* :func:`build_labelled_data` turns a dataset config (flows, ``text,label`` CSV, deepset
  injections) into train/validation/test records ``{"text": prompt, "label", ...}``;
* :class:`WeightedCETrainer` is the ``transformers.Trainer`` subclass that calls the objective,
  :func:`sectune.losses.weighted_cross_entropy` (a pure tensor function), for both heads;
* :func:`encode_examples`, :func:`pad_rows` and :class:`ClassifyCollator` (in
  :mod:`sectune.training.classify_encoding`) turn records into token rows.

Scoring (probabilities from a model), decisions and split evaluation are in
:mod:`sectune.evaluation.classify_scoring`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from transformers import Trainer

from sectune.config_stages import POOLINGS  # noqa: F401 (re-exported)
from sectune.data import warn_duplicates_across_splits  # noqa: F401 (re-exported)
from sectune.errors import ConfigError, DataError
from sectune.losses import weighted_cross_entropy_terms

HEADS = ("seq_cls", "generative")
FORMATS = ("flows", "text_csv", "injections")
#: where ``path: null`` finds its data, per dataset name (relative to ``dataset.source_dir``)
DEFAULT_SOURCES = {
    "cic_iot_2023_merged": "ciciot2023_merged39_family_sample/CICIoT2023_sample.csv",
    "prompt_injections": "deepset_prompt_injections",
}


# --------------------------------------------------------------------------- data


@dataclass
class LabelledData:
    format: str
    splits: Dict[str, List[dict]]  # train / validation / test → records
    labels: List[str]
    template: str
    source: str
    normalizer: Optional[object] = None  # FlowNormalizer for flows
    features: List[str] = field(default_factory=list)
    cleaning: Dict[str, object] = field(default_factory=dict)


def render_text(template: str, text: str) -> str:
    if not template:
        return text
    if "{text}" not in template:
        raise ConfigError("dataset.prompt_template must contain '{text}' for a text dataset")
    return template.replace("{text}", text)


def _stratified_cut(records: List[dict], frac: float, seed: int, source: str):
    """(rest, cut) with ``frac`` of the records in ``cut``, stratified by label."""
    from sklearn.model_selection import train_test_split

    if frac <= 0:
        return list(records), []
    try:
        rest, cut = train_test_split(records, test_size=frac, random_state=seed, stratify=[r["label"] for r in records])
    except ValueError as e:
        raise DataError(f"{source}: cannot split stratified ({e}); raise dataset.max_samples or lower dataset.val_fraction / "
                        "dataset.test_fraction") from None
    return list(rest), list(cut)


def _subsample(records: List[dict], n: Optional[int], seed: int) -> List[dict]:
    if n is None or len(records) <= n:
        return records
    from sklearn.model_selection import train_test_split

    from sectune.data.flows import warn_unstratified

    try:
        kept, _ = train_test_split(records, train_size=n, random_state=seed, stratify=[r["label"] for r in records])
        stratified = True
    except ValueError:
        kept = [records[i] for i in sorted(np.random.default_rng(seed).choice(len(records), n, replace=False))]
        stratified = False
    warn_unstratified([r["label"] for r in records], [r["label"] for r in kept], n, stratified)
    return list(kept)


def dataset_format(cfg: DictConfig) -> str:
    fmt = cfg.dataset.format
    if fmt not in FORMATS:
        raise ConfigError(
            f"dataset={cfg.dataset.name} has no classification form (dataset.format={fmt!r}); "
            f"use cic_iot_2023, cic_iot_2023_merged, text_label_csv or prompt_injections"
        )
    return fmt


def _flow_path(cfg: DictConfig) -> Path:
    d = cfg.dataset
    if d.path:
        return Path(d.path)
    if d.name in DEFAULT_SOURCES:
        p = Path(d.source_dir) / DEFAULT_SOURCES[d.name]
        if not p.is_file():
            raise DataError(f"{p}: the real sample for dataset={d.name} is missing (where it comes from: the README's Data "
                            f"table); set dataset.path=/path/to/flows.csv, or use dataset=cic_iot_2023, which generates flows")
        return p
    # no real 46-column CIC-IoT-2023 file ships: generate one in that schema (NOT real data)
    from sectune.data.synthetic_flows import generate_cic_iot_46

    out = Path(cfg.paths.cache_dir) / "datasets" / f"cic_iot_46_synthetic-n{d.synthetic_rows}-s{d.split_seed}.csv"
    if not out.is_file():
        generate_cic_iot_46(d.synthetic_rows, d.split_seed, out)
    from sectune.data import note_generated

    note_generated(d.name, out, f"sectune: dataset.path is null and no real 46-column CIC-IoT-2023 CSV is available: using "
                   f"{d.synthetic_rows} GENERATED flows in that schema ({out}); set dataset.path for real data")
    return out


def build_labelled_data(cfg: DictConfig, normalizer=None) -> LabelledData:
    """Train/validation/test records for ``cfg.dataset``; every statistic fitted on train only (flows: ``normalizer``, a
    run's saved one, instead of a fresh fit)."""
    d = cfg.dataset
    fmt = dataset_format(cfg)
    seed = d.split_seed
    if fmt == "flows":
        from sectune.data.flows import DEFAULT_TEMPLATE, prepare_flow_splits

        path = _flow_path(cfg)
        template = d.prompt_template or DEFAULT_TEMPLATE
        try:
            prep = prepare_flow_splits(
                path, list(d.features), d.label_column, d.granularity, val_fraction=d.val_fraction,
                test_fraction=d.test_fraction, seed=seed, nan_policy=d.nan_policy, max_rows=d.max_samples,
                template=template, precision=d.render_precision, method=d.normalizer, bins=d.quantile_bins,
                sep=d.feature_sep, fmt=d.feature_format, normalizer=normalizer,
            )
        except DataError as e:
            if d.path or d.name in DEFAULT_SOURCES:
                raise
            # the flows are the ones sectune generated: the value to change is the number generated (or kept), not the file
            if d.max_samples is not None and d.max_samples < d.synthetic_rows:
                raise ConfigError(f"dataset.max_samples={d.max_samples}: too few flows kept for this split (raise it, or null "
                                  f"for all {d.synthetic_rows} generated): {e}") from e
            raise ConfigError(f"dataset.synthetic_rows={d.synthetic_rows}: too few generated flows for this split "
                              f"(raise it, or set dataset.path to a real flow CSV): {e}") from e
        # a flow repeated across splits (a file of repeated rows: the RF baseline's test macro-F1 0.75 → 0.93) is said too
        warn_duplicates_across_splits(prep.records, str(path), key=lambda r: tuple(sorted(r["features"].items())), what="feature values")
        return _two_labels(LabelledData(fmt, prep.records, prep.labels, template, str(path), prep.normalizer, list(d.features), prep.cleaning))

    template = d.prompt_template
    if fmt == "text_csv":
        from sectune.data.text_classification import load_text_label_csv

        if not d.path:
            raise ConfigError("dataset=text_label_csv needs dataset.path=/path/to/file.csv (columns text,label)")
        source = str(d.path)
        rows = _subsample(load_text_label_csv(d.path, d.text_column, d.label_column), d.max_samples, seed)
        if not 0 <= d.test_fraction < 1 or not 0 <= d.val_fraction < 1 or d.val_fraction + d.test_fraction >= 1:
            raise ConfigError("dataset.val_fraction + dataset.test_fraction must be < 1")
        rest, test = _stratified_cut(rows, d.test_fraction, seed, source)
        train, val = _stratified_cut(rest, d.val_fraction / (1 - d.test_fraction), seed, source)
    else:  # injections: its own test split; validation carved out of train
        from sectune.data.text_classification import load_prompt_injections

        source = str(d.path or Path(d.source_dir) / DEFAULT_SOURCES["prompt_injections"])
        raw = load_prompt_injections(source)
        train, val = _stratified_cut(_subsample(raw["train"], d.max_samples, seed), d.val_fraction, seed, source)
        test = raw["test"]
    splits = {
        name: [{"text": render_text(template, r["text"]), "label": r["label"], "raw_text": r["text"]} for r in recs]
        for name, recs in (("train", train), ("validation", val), ("test", test))
    }
    if not splits["train"]:
        raise DataError(f"{source}: no training rows")
    warn_duplicates_across_splits(splits, source)
    labels = sorted({r["label"] for recs in splits.values() for r in recs})
    return _two_labels(LabelledData(fmt, splits, labels, template, source))


def _two_labels(data: LabelledData) -> LabelledData:
    """A classifier needs two labels in its training rows; with one it trained, then crashed in the TF-IDF
    baseline or reported macro-F1 1.0 for the majority class."""
    seen = sorted({r["label"] for r in data.splits["train"]})
    if len(seen) < 2:
        raise DataError(f"{data.source}: every training row has the label {seen[0]!r}; classification needs at least 2 labels "
                        "(check dataset.label_column, or dataset.granularity for flows)")
    val = data.splits.get("validation") or []
    unseen = sorted(set(seen) - {r["label"] for r in val})
    if val and unseen:  # a rare class split 2/0/1: the checkpoint and thresholds were chosen blind to it
        print(f"sectune: warning: {data.source}: label(s) {', '.join(map(repr, unseen))} have no validation row: the checkpoint "
              "and any threshold chosen on validation never see them (more rows of them, or a larger dataset.val_fraction)")
    return data


def class_weight_vector(spec, labels: Sequence[str], train_labels: Sequence[str]) -> Optional[List[float]]:
    """``loss.class_weights``: null → None; ``balanced`` → n / (k · count_c) on train; a mapping → as given."""
    if spec is None or spec == "none":
        return None
    if OmegaConf.is_config(spec):
        spec = OmegaConf.to_container(spec, resolve=True)
    labels = list(labels)
    if spec == "balanced":
        counts = {lab: 0 for lab in labels}
        for y in train_labels:
            counts[y] += 1
        n, k = len(train_labels), len(labels)
        return [n / (k * counts[lab]) if counts[lab] else 0.0 for lab in labels]
    if isinstance(spec, dict):
        unknown = sorted(set(map(str, spec)) - set(labels))
        if unknown:
            raise ConfigError(f"loss.class_weights: unknown label(s) {unknown}; labels are {labels}")
        w = {}
        for k, v in spec.items():  # 'high' or .nan (a string from the command line) died in float() naming no key
            try:
                w[str(k)] = float(v) if not isinstance(v, bool) else math.nan
            except (TypeError, ValueError):
                w[str(k)] = math.nan
            if not (math.isfinite(w[str(k)]) and w[str(k)] >= 0):
                raise ConfigError(f"loss.class_weights.{k}={v!r}: must be a number >= 0 (the weight of that label's rows)")
        out = [w.get(lab, 1.0) for lab in labels]
        if not any(out):  # every row weighs 0: the loss is 0, nothing trains, and the run said done (an audit, session 42)
            raise ConfigError(f"loss.class_weights={spec}: every label's weight is 0, so no row trains; give at least one > 0")
        return out
    raise ConfigError(f"loss.class_weights={spec!r}: use null, balanced or {{label: weight}}")


# --------------------------------------------------------------------------- objective


class WeightedCETrainer(Trainer):
    """Trainer whose loss is :func:`weighted_cross_entropy`, for either head.

    ``seq_cls``: CE over the head's class logits. ``generative``: token CE over the label tokens
    (the prompt is masked), each token weighted by its example's class weight. Rows are left-padded
    so every label ends at the last position: only the last ``label_len + 1`` positions' logits are
    computed (``logits_to_keep``), never a ``[batch, seq, vocab]`` tensor for the prompt.
    """

    def __init__(self, *args, head: str = "seq_cls", class_weights=None, label_smoothing: float = 0.0, label_len: int = 1,
                 val_rows: Optional[Sequence[dict]] = None, labels: Optional[Sequence[str]] = None, max_length: int = 512,
                 autocast: Optional[str] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.head, self.autocast = head, autocast
        self.val_rows, self.labels, self.max_length = val_rows, labels, max_length
        self.class_weights = None if class_weights is None else torch.tensor(class_weights, dtype=torch.float32)
        self.label_smoothing = label_smoothing
        self.label_len = label_len

    # The loss of an optimizer step is the weighted mean over every item (row, or label token for ``generative``) of
    # the step, all train.grad_accum micro-batches: Σ w·ℓ / Σ w with both sums over the step, as transformers'
    # ``num_items_in_batch`` does for tokens. A per-micro-batch weighted mean / grad_accum weighted an item by
    # 1/(Σ w of its micro-batch): class weights cancelled out entirely at train.batch_size=1, and generative labels of
    # more tokens counted less in a micro-batch of long labels.
    loss_is_scaled_for_ga = True  # compute_loss divides by the step's Σ w itself (transformers >= 5.19)

    def _get_train_sampler(self, train_dataset=None):
        # train.group_by_length: Trainer's sampler draws from the global RNG a checkpoint restores mid-run, so a classify
        # run resumed after its first epoch trained other batches (an audit, session 41; SFT and DPO had this since 35)
        if self.args.train_sampling_strategy == "group_by_length":
            from sectune.training import samplers

            return samplers.seeded_length_grouped_sampler(self, train_dataset)
        return super()._get_train_sampler(train_dataset)

    def _targets(self, labels: torch.Tensor) -> torch.Tensor:
        """The targets the loss reads: the class per row, or ``generative``'s last ``label_len`` label positions."""
        if self.head == "seq_cls":
            return labels
        return labels[:, -(min(self.label_len + 1, labels.shape[1]) - 1):]

    def _item_weights(self, labels: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        """Each item's weight w in :func:`weighted_cross_entropy` (0 where the target is ignored)."""
        targets = self._targets(labels)
        w = (targets != -100).float()
        if self.class_weights is not None:
            cw = self.class_weights.to(targets.device)
            w = w * (cw[targets.clamp(min=0)] if self.head == "seq_cls" else cw[cls].unsqueeze(1))
        return w

    def _get_num_items_in_batch(self, batch_samples: list, device) -> torch.Tensor:
        """Σ w over the optimizer step (every micro-batch of the accumulation, summed over the processes)."""
        n = sum(self._item_weights(b["labels"], b["class_index"]).sum().to(device) for b in batch_samples)
        n = torch.as_tensor(n, dtype=torch.float32, device=device)
        if self.args.world_size > 1:
            n = self.accelerator.gather(n).sum()
        return n

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        cls = inputs.pop("class_index")
        targets = self._targets(labels)
        if self.head == "seq_cls":
            out = model(**inputs)
            terms = weighted_cross_entropy_terms(out.logits, labels, self.class_weights, label_smoothing=self.label_smoothing)
        else:
            keep = min(self.label_len + 1, labels.shape[1])
            out = model(**inputs, logits_to_keep=keep)
            logits = out.logits[:, :-1]
            sw = None
            if self.class_weights is not None:
                sw = self.class_weights.to(cls.device)[cls].unsqueeze(1).expand_as(targets).reshape(-1)
            terms = weighted_cross_entropy_terms(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), sample_weight=sw, label_smoothing=self.label_smoothing
            )
        num, den = terms
        if num_items_in_batch is not None:  # Σ w·ℓ of this micro-batch over Σ w of the whole step (every process)
            step = torch.as_tensor(num_items_in_batch, dtype=num.dtype, device=num.device).clamp_min(1e-12)
            # DDP averages the processes' gradients: × num_processes makes that average the step's weighted mean (each
            # process's own mean averaged was another loss whenever their rows weighed differently: 2 processes drifted
            # 4.5% from 1 by step 2 with class weights)
            loss = num / step * self.accelerator.num_processes
        else:
            loss = num / den.clamp_min(1e-12)
        return (loss, out) if return_outputs else loss

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """Trainer's eval loss, plus ``<prefix>_macro_f1`` and ``<prefix>_accuracy`` of the validation rows.

        Scored the way predictions are made (:func:`sectune.evaluation.classify_scoring.score_texts`, argmax), so
        ``metric_for_best_model="eval_macro_f1"`` keeps the weights that classify the validation split best.
        """
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        if eval_dataset is None and self.val_rows:
            from sectune.evaluation.classifier import label_scores
            from sectune.evaluation.classify_scoring import decide, score_texts_across_ranks

            was_training = self.model.training
            # every rank scores its share and gets all rows back: the ranks keep the same best checkpoint
            probs, _ = score_texts_across_ranks(self.model, self.processing_class, [r["text"] for r in self.val_rows], head=self.head,
                                   labels=self.labels, batch_size=self.args.per_device_eval_batch_size, max_length=self.max_length,
                                   autocast=self.autocast)
            self.model.train(was_training)
            s = label_scores([r["label"] for r in self.val_rows], decide(probs, self.labels), list(self.labels))
            extra = {f"{metric_key_prefix}_macro_f1": s["macro_f1"], f"{metric_key_prefix}_accuracy": s["accuracy"]}
            metrics.update(extra)
            self.log(extra)
        return metrics


# --------------------------------------------------------------------------- pooling


def running_mean(logits: torch.Tensor) -> torch.Tensor:
    """``[B, T, C]`` → ``[B, T, C]``: position t holds the mean of positions 0..t (in fp32).

    The score head of a decoder ``…ForSequenceClassification`` is linear, so the mean of its
    per-token logits is the head applied to the mean hidden state. Rows are right-padded, so at
    the last real token (the one transformers picks) this is the mean over every real token.
    """
    x = logits.float()
    n = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=x.dtype).view(1, -1, 1)
    return x.cumsum(1) / n


def pooling_description(model, pooling: str) -> str:
    """What ``classify.pooling`` does on this model, for the console: ``last`` is the last real token only on a decoder
    (a ``score`` head); an encoder's head pools as the model does ([CLS] through BERT's pooler), which the line called
    "last-token pooling"."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if pooling == "last" and not isinstance(getattr(inner, "score", None), torch.nn.Module):
        return f"{type(inner).__name__}'s own pooling"
    return f"{pooling}-token pooling"


def set_pooling(model, pooling: str):
    """``classify.pooling``: ``last`` leaves the model as transformers built it; ``mean`` hooks its
    ``score`` head so the class logits are the mean over the real tokens (a no-op on the weights:
    a saved model is reloaded with the same pooling from ``classifier.json``)."""
    if pooling not in POOLINGS:
        raise ConfigError(f"classify.pooling={pooling!r}: choose one of {', '.join(POOLINGS)}")
    if pooling == "last":
        return model
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    score = getattr(inner, "score", None)
    if not isinstance(score, torch.nn.Module):
        raise ConfigError(
            f"classify.pooling=mean needs a decoder …ForSequenceClassification with a `score` head; "
            f"{type(inner).__name__} has none: use classify.pooling=last (the model's own pooling)"
        )
    if not getattr(score, "_sectune_mean_pooling", False):
        score.register_forward_hook(lambda _module, _args, out: running_mean(out) if out.dim() == 3 else out)
        score._sectune_mean_pooling = True
    return model


def member_wandb_logs(trainer, member: str) -> None:
    """A k-fold member's Trainer logs under its name in the W&B run (``train/fold0/loss``, ``eval/fold0/macro_f1``):
    the k members logged the same keys over the same steps, drawn over each other, and the last member's ``train_loss``
    sat in the run's summary beside the ensemble's ``final/train_loss`` (an audit, session 39)."""
    from transformers.integrations import WandbCallback

    callback = next((c for c in trainer.callback_handler.callbacks if isinstance(c, WandbCallback)), None)
    if callback is None:
        return
    on_log = callback.on_log

    def named(args, state, control, model=None, logs=None, **kwargs):
        logs = {(f"eval_{member}/{k[5:]}" if k.startswith("eval_") else f"{member}/{k}"): v for k, v in (logs or {}).items()}
        return on_log(args, state, control, model=model, logs=logs, **kwargs)

    callback.on_log = named  # the handler calls getattr(callback, "on_log"): this member's logs go through it
