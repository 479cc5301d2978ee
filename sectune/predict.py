"""Predictor API over a finished classify run (seed 004's ``NetworkTrafficPredictor``, batched).

    from sectune.predict import Predictor
    p = Predictor.from_run("outputs/2025-01-01/12-00-00")
    p.predict_flow({"Header_Length": 19.2, ...})   # {"label": "Benign", "scores": {label: prob}}
    p.predict_texts(["Ignore all previous instructions ..."])
    p.predict_csv("flows.csv", "predictions.csv")   # + predicted_label and score_<label> columns

It reads only JSON (labels, classifier metadata, normalizer, the run's config) and safetensors
weights, never pickle. Flows are normalised with the run's train-split statistics and rendered
with the run's template, so the predictor sees exactly what training and evaluation saw.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from sectune.errors import ConfigError, DataError

LABELS_FILE = "labels.json"
META_FILE = "classifier.json"
NORMALIZER_FILE = "normalizer.json"


def read_classify_run(run_dir) -> tuple[DictConfig, dict]:
    """The run's composed config and its result.json; a clear error unless it is a succeeded classify run."""
    from sectune import config

    run_dir = Path(run_dir)
    result_path = run_dir / "result.json"
    if not result_path.is_file():
        raise ConfigError(f"evaluate.model_dir={run_dir}: no result.json there; point it at a classify run dir")
    try:
        result = json.loads(result_path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{result_path}: not valid JSON ({e.msg})") from None
    if result.get("stage") != "classify" or result.get("status") != "succeeded":
        raise ConfigError(
            f"{run_dir}: not a succeeded classify run (stage={result.get('stage')!r}, status={result.get('status')!r})"
        )
    cfg_path = run_dir / ".hydra" / "config.yaml"
    if not cfg_path.is_file():
        raise ConfigError(f"{run_dir}: .hydra/config.yaml is missing (Hydra writes it for every run)")
    config.register()  # the saved config interpolates sectune's resolvers
    return OmegaConf.load(cfg_path), result


def load_classifier(run_dir, cfg: DictConfig, meta: dict):
    """(model, tokenizer, members) from the run's saved adapter(s) (+ base model) or full model(s).

    ``members`` lists ``(model, adapter_name)`` pairs to score with: one for a single classifier;
    one per fold for a ``classify.folds`` ensemble. LoRA members share one base model (each fold's
    adapter is loaded under its own name); full fine-tuned members are separate models.
    """
    from sectune import modeling

    run_dir = Path(run_dir)
    arts = [run_dir / a for a in (meta.get("members") or [meta["artifact"]])]
    missing = [str(a) for a in arts if not a.is_dir()]
    if missing:
        raise ConfigError(f"{run_dir}: saved classifier weights are missing: {', '.join(missing)}")
    task = "seq_cls" if meta["head"] == "seq_cls" else "causal_lm"
    num_labels = len(meta["labels"]) if task == "seq_cls" else None
    tokenizer = modeling.load_tokenizer(cfg, str(arts[0]))

    def _ready(model):
        if task == "seq_cls":
            from sectune.classification import set_pooling

            set_pooling(model, meta.get("pooling") or "last")  # runs from before classify.pooling: last
        model = modeling.to_run_device(model, cfg)  # was left on the CPU on GPU machines too
        model.eval()
        return model

    if meta["artifact"] == "model":
        members = [(_ready(modeling.load_model(cfg, task=task, num_labels=num_labels, path=str(a))), None) for a in arts]
    else:
        from peft import PeftModel

        base = modeling.load_model(cfg, task=task, num_labels=num_labels)
        single = len(arts) == 1
        model = PeftModel.from_pretrained(base, str(arts[0]), adapter_name="default" if single else "fold0", is_trainable=False)
        for i, a in enumerate(arts[1:], 1):
            model.load_adapter(str(a), adapter_name=f"fold{i}", is_trainable=False)
        model = _ready(model)
        members = [(model, None)] if single else [(model, f"fold{i}") for i in range(len(arts))]
    return members[0][0], tokenizer, members


class Predictor:
    def __init__(self, model, tokenizer, meta: dict, normalizer=None, batch_size: int = 32, members=None):
        self.model, self.tokenizer, self.meta = model, tokenizer, meta
        #: ``(model, adapter_name)`` pairs whose mean probability is the prediction (one unless
        #: the run trained ``classify.folds`` members)
        self.members = members or [(model, None)]
        self.labels: List[str] = list(meta["labels"])
        self.normalizer = normalizer
        self.batch_size = batch_size

    @classmethod
    def from_run(cls, run_dir, batch_size: int = 32, device: Optional[str] = None) -> "Predictor":
        run_dir = Path(run_dir)
        cfg, _ = read_classify_run(run_dir)
        if device:
            cfg.train.device = device
        meta = json.loads((run_dir / META_FILE).read_text())
        meta["labels"] = json.loads((run_dir / LABELS_FILE).read_text())["labels"]
        normalizer = None
        if meta["format"] == "flows":
            from sectune.data.flows import FlowNormalizer

            normalizer = FlowNormalizer.from_dict(json.loads((run_dir / NORMALIZER_FILE).read_text()))
        model, tokenizer, members = load_classifier(run_dir, cfg, meta)
        return cls(model, tokenizer, meta, normalizer, batch_size, members)

    # ------------------------------------------------------------------ core

    def score(self, prompts: Sequence[str]) -> tuple[np.ndarray, List[float]]:
        """Class probabilities ``[N, K]`` of rendered prompts (the members' mean) and each batch's time."""
        from sectune.classify_scoring import score_members

        return score_members(
            self.members, self.tokenizer, prompts, head=self.meta["head"], labels=self.labels,
            batch_size=self.batch_size, max_length=self.meta["max_length"], autocast=self.meta.get("autocast"),
        )

    def _score_prompts(self, prompts: Sequence[str]) -> tuple[np.ndarray, List[str]]:
        from sectune.classify_scoring import decide

        if not prompts:
            return np.zeros((0, len(self.labels))), []
        probs, _ = self.score(prompts)
        return probs, decide(probs, self.labels, self.meta.get("threshold"))

    def _results(self, probs: np.ndarray, preds: List[str]) -> List[Dict]:
        return [{"label": p, "scores": {lab: float(v) for lab, v in zip(self.labels, row)}} for p, row in zip(preds, probs)]

    def flow_prompts(self, frame: pd.DataFrame, source: str = "flows") -> List[str]:
        """Normalise (train statistics) and render flows; missing feature columns → DataError naming them."""
        from sectune.data.flows import render_flow

        if self.meta["format"] != "flows":
            raise ConfigError(f"this classifier was trained on {self.meta['format']} data, not flows; use predict_texts")
        features = self.normalizer.features
        missing = [c for c in features if c not in frame.columns]
        if missing:
            raise DataError(f"{source}: missing feature column(s): {', '.join(map(repr, missing))}")
        X = frame[features].apply(pd.to_numeric, errors="coerce").astype("float64")
        X = X.where(np.isfinite(X))  # non-numeric / inf → NaN → train-median imputation
        Z = self.normalizer.transform(X)
        sep, fmt = self.meta.get("feature_sep", "; "), self.meta.get("feature_format", "{name}={value}")
        return [render_flow(z, features, self.meta["template"], self.meta["precision"], sep, fmt) for z in Z.to_dict("records")]

    # ------------------------------------------------------------------ public

    def predict_flows(self, flows: Sequence[Mapping]) -> List[Dict]:
        prompts = self.flow_prompts(pd.DataFrame(list(flows)), source="flow")
        return self._results(*self._score_prompts(prompts))

    def predict_flow(self, flow: Mapping) -> Dict:
        """One flow ``{feature: value}`` → ``{"label", "scores": {label: prob}}``."""
        return self.predict_flows([flow])[0]

    def predict_texts(self, texts: Sequence[str]) -> List[Dict]:
        """Texts through the run's prompt template (for a flow model: already-rendered prompts)."""
        from sectune.classification import render_text

        texts = [str(t) for t in texts]
        prompts = texts if self.meta["format"] == "flows" else [render_text(self.meta["template"], t) for t in texts]
        return self._results(*self._score_prompts(prompts))

    def predict_csv(self, in_path, out_path) -> pd.DataFrame:
        """The CSV with ``predicted_label`` and ``score_<label>`` columns, written to ``out_path``."""
        from sectune.data.flows import read_csv_checked

        in_path = Path(in_path)
        df = read_csv_checked(in_path)
        if self.meta["format"] == "flows":
            prompts = self.flow_prompts(df, source=str(in_path))
            probs, preds = self._score_prompts(prompts)
        else:
            col = self.meta.get("text_column", "text")
            if col not in df.columns:
                raise DataError(f"{in_path}: missing column {col!r}; found {list(df.columns)}")
            from sectune.classification import render_text

            probs, preds = self._score_prompts([render_text(self.meta["template"], str(t)) for t in df[col]])
        out = df.copy()
        out["predicted_label"] = preds
        for k, lab in enumerate(self.labels):
            out[f"score_{lab}"] = probs[:, k] if len(preds) else []
        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_path.with_name(f".{out_path.name}.tmp")
        out.to_csv(tmp, index=False)
        tmp.replace(out_path)
        return out
