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

import contextlib
import json
import sys
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from sectune.console import new_head_quietly
from sectune.errors import ConfigError, DataError, SectuneError, first_line

LABELS_FILE = "labels.json"
META_FILE = "classifier.json"
NORMALIZER_FILE = "normalizer.json"
#: prompts scored per call (their token ids held at once); progress is said per chunk past it
CHUNK = 4096

#: what to do about a classify run dir whose files do not load
RETRAIN = "retrain with stage=classify, or point evaluate.model_dir at another classify run"
DAMAGED = f"the run's files are damaged; {RETRAIN}"
#: keys of classifier.json that the predictor reads without a default
META_KEYS = ("head", "format", "artifact", "template", "max_length")


def read_normalizer(run_dir: Path):
    """A flow classify run's train-split statistics (``normalizer.json``); missing, damaged or malformed: one error naming it."""
    from sectune.data.flow_normalizer import FlowNormalizer

    path = Path(run_dir) / NORMALIZER_FILE
    try:
        return FlowNormalizer.from_dict(read_run_json(path, "a JSON object (method, features, ...)"))
    except DataError as e:  # "normalizer state is malformed (...)": say which file
        raise ConfigError(f"{path}: {e}; {DAMAGED}") from None


def read_run_json(path: Path, what: str = "a JSON object"):
    """A JSON object the classify run wrote; missing, unparsable or not an object → ConfigError naming the file."""
    if not path.is_file():
        raise ConfigError(f"{path}: missing; every classify run writes it; {DAMAGED}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); {DAMAGED}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: unreadable ({type(e).__name__}: {e}); {DAMAGED}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected {what}, found a JSON {_json_type(data)}; {DAMAGED}")
    return data


def _json_type(v) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}.get(type(v), "null")


def read_meta(run_dir: Path) -> dict:
    """classifier.json with labels.json's labels under ``labels``; a wrong shape → ConfigError naming file and key."""
    meta_path, labels_path = run_dir / META_FILE, run_dir / LABELS_FILE
    meta = read_run_json(meta_path, "a JSON object (head, format, artifact, ...)")
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise ConfigError(f"{meta_path}: missing key(s) {', '.join(map(repr, missing))}; {DAMAGED}")
    for k in ("head", "format", "artifact"):
        if not isinstance(meta[k], str) or not meta[k]:
            raise ConfigError(f"{meta_path}: key {k!r} should be a non-empty string, found {meta[k]!r}; {DAMAGED}")
    members = meta.get("members")
    if members is not None and not (isinstance(members, list) and members and all(isinstance(m, str) and m for m in members)):
        raise ConfigError(f"{meta_path}: key 'members' should be a list of folder names, found {members!r}; {DAMAGED}")
    labels = read_run_json(labels_path, 'a JSON object {"labels": [...]}').get("labels")
    if not (isinstance(labels, list) and labels and all(isinstance(lab, (str, int, float)) for lab in labels)):
        raise ConfigError(f"{labels_path}: key 'labels' should be a non-empty list of label names, found {labels!r}; {DAMAGED}")
    meta["labels"] = labels
    return meta


def damaged_weights(folder: Path) -> tuple[Path, str] | None:
    """(file, why) for a saved adapter/model folder whose safetensors are cut short or unreadable, or None
    (:func:`sectune.training.checkpoints.damaged_safetensors`: reads no tensor data)."""
    from sectune.training.checkpoints import damaged_safetensors

    damage = damaged_safetensors(folder)
    return None if damage is None else (folder / damage[0], damage[1])


def read_classify_run(run_dir) -> tuple[DictConfig, dict]:
    """The run's composed config and its result.json; a clear error unless it is a succeeded classify run."""
    from sectune import config

    run_dir = Path(run_dir)
    result_path = run_dir / "result.json"
    if not result_path.is_file():
        raise ConfigError(f"evaluate.model_dir={run_dir}: no result.json there; point it at a classify run dir")
    result = read_run_json(result_path, "a JSON object (stage, status, metrics, ...)")
    if result.get("stage") != "classify" or result.get("status") != "succeeded":
        analyst = result.get("stage") in ("sft", "dpo", "rl", "contrastive", "pipeline")
        if analyst and _run_dataset(run_dir) == "hdfs":  # a log-key model: it was pointed at infer and injections
            hint = "; an HDFS run's anomaly detection is scored by stage=evaluate dataset=hdfs evaluate.model_dir=<it>"
        else:
            hint = ("; an analyst run answers logs with stage=infer infer.model_dir=<it>, and its attack success is "
                    "stage=evaluate dataset=injection_triplets") if analyst else ""
        # a run that failed says why (its result.json's error): "status='failed'" alone sent a user to read the file
        error = str(result.get("error") or "").strip()
        why = f": {error.splitlines()[0][:300]}" if result.get("status") != "succeeded" and error else ""
        raise ConfigError(
            f"{run_dir}: not a succeeded classify run (stage={result.get('stage')!r}, status={result.get('status')!r}{why}){hint}")
    cfg_path = run_dir / ".hydra" / "config.yaml"
    if not cfg_path.is_file():
        raise ConfigError(f"{run_dir}: .hydra/config.yaml is missing (Hydra writes it for every run)")
    return config.load_run_config(cfg_path), result


def _run_dataset(run_dir: Path) -> str | None:
    """The dataset name a run (or a pipeline's first step) was configured with, read from its saved config; None if unknown."""
    import yaml

    for cfg_path in (run_dir / ".hydra" / "config.yaml", *sorted(run_dir.glob("*/.hydra/config.yaml"))):
        try:
            return str(((yaml.safe_load(cfg_path.read_text(encoding="utf-8")) or {}).get("dataset") or {}).get("name"))
        except (OSError, yaml.YAMLError, AttributeError):
            continue
    return None


def load_classifier(run_dir, cfg: DictConfig, meta: dict):
    """(model, tokenizer, members) from the run's saved adapter(s) (+ base model) or full model(s).

    ``members`` lists ``(model, adapter_name)`` pairs to score with: one for a single classifier;
    one per fold for a ``classify.folds`` ensemble. LoRA members share one base model (each fold's
    adapter is loaded under its own name); full fine-tuned members are separate models.
    """
    import torch

    from sectune.models import modeling

    run_dir = Path(run_dir)
    arts = [run_dir / a for a in (meta.get("members") or [meta["artifact"]])]
    missing = [str(a) for a in arts if not a.is_dir()]
    if missing:
        raise ConfigError(f"{run_dir}: saved classifier weights are missing: {', '.join(missing)}")
    for a in arts:  # before the base model loads: a file cut short is named, not a safetensors traceback
        damage = damaged_weights(a)
        if damage:
            raise ConfigError(f"{damage[0]}: {damage[1]}; {DAMAGED}")
    task = "seq_cls" if meta["head"] == "seq_cls" else "causal_lm"
    num_labels = len(meta["labels"]) if task == "seq_cls" else None

    def _load(folder: Path, load):
        """``load()``; any failure but a sectune error or running out of memory names ``folder``."""
        try:
            return load()
        except (SectuneError, MemoryError, torch.OutOfMemoryError):
            raise
        except Exception as e:  # noqa: BLE001 - any other load failure is the same user error: this folder's files
            first = first_line(e)
            raise ConfigError(f"{folder}: cannot load the saved classifier onto {modeling.model_label(cfg.model)} "
                              f"({type(e).__name__}: {first}); the run's files may be damaged; {RETRAIN}") from None

    tokenizer = _load(arts[0], lambda: modeling.load_tokenizer(cfg, str(arts[0])))

    def _ready(model):
        if task == "seq_cls":
            from sectune.training.classification import set_pooling

            set_pooling(model, meta.get("pooling") or "last")  # runs from before classify.pooling: last
            modeling.pad_like_tokenizer(model, tokenizer)
        model = modeling.to_run_device(model, cfg)  # was left on the CPU on GPU machines too
        model.eval()
        return model

    if meta["artifact"] == "model":
        members = [(_ready(_load(a, lambda a=a: modeling.load_model(cfg, task=task, num_labels=num_labels, path=str(a)))), None)
                   for a in arts]
    else:
        from peft import PeftModel

        with new_head_quietly() if task == "seq_cls" else contextlib.nullcontext():
            base = modeling.load_model(cfg, task=task, num_labels=num_labels)
        single = len(arts) == 1
        model = _load(arts[0], lambda: PeftModel.from_pretrained(base, str(arts[0]), adapter_name="default" if single else "fold0",
                                                                 is_trainable=False))
        for i, a in enumerate(arts[1:], 1):
            _load(a, lambda a=a, i=i: model.load_adapter(str(a), adapter_name=f"fold{i}", is_trainable=False))
        model = _ready(model)
        members = [(model, None)] if single else [(model, f"fold{i}") for i in range(len(arts))]
    return members[0][0], tokenizer, members


class Predictor:
    def __init__(self, model, tokenizer, meta: dict, normalizer=None, batch_size: int = 32, members=None):
        self.last_imputed: List[List[str]] = []  # per flow of the last flow_prompts call: features not given as numbers
        self.model, self.tokenizer, self.meta = model, tokenizer, meta
        #: ``(model, adapter_name)`` pairs whose mean probability is the prediction (one unless
        #: the run trained ``classify.folds`` members)
        self.members = members or [(model, None)]
        self.labels: List[str] = list(meta["labels"])
        self.normalizer = normalizer
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size={batch_size!r}: must be a positive number of rows per forward pass")
        self.batch_size = batch_size
        #: the run dir the weights came from (:meth:`from_run`): what an interrupted predict_csv's saved rows are keyed to
        self.source: Optional[Path] = None

    @classmethod
    def from_run(cls, run_dir, batch_size: int = 32, device: Optional[str] = None) -> "Predictor":
        run_dir = Path(run_dir)
        cfg, _ = read_classify_run(run_dir)
        if device:
            cfg.train.device = device
        meta = read_meta(run_dir)
        normalizer = read_normalizer(run_dir) if meta["format"] == "flows" else None
        model, tokenizer, members = load_classifier(run_dir, cfg, meta)
        predictor = cls(model, tokenizer, meta, normalizer, batch_size, members)
        predictor.source = run_dir
        return predictor

    # ------------------------------------------------------------------ core

    def score(self, prompts: Sequence[str]) -> tuple[np.ndarray, List[float]]:
        """Class probabilities ``[N, K]`` of rendered prompts (the members' mean) and each batch's time."""
        from sectune.evaluation.classify_scoring import score_members

        return score_members(
            self.members, self.tokenizer, prompts, head=self.meta["head"], labels=self.labels,
            batch_size=self.batch_size, max_length=self.meta["max_length"], autocast=self.meta.get("autocast"),
        )

    def _score_prompts(self, prompts: Sequence[str], partial: Optional[Path] = None) -> tuple[np.ndarray, List[str]]:
        """Scored :data:`CHUNK` prompts at a time: the token ids of a whole file at once took ~44 KB a row (57,756 flows:
        3.5 GB), and a long file's progress is said. With ``partial`` (a file beside the output), an interrupt keeps the
        chunks scored so far there, and the same call with the same run and prompts goes on from them."""
        import time

        from sectune.evaluation.classify_scoring import decide

        if not prompts:
            return np.zeros((0, len(self.labels))), []
        key = self._resume_key(prompts) if partial is not None else None
        parts = _resumed(partial, key, len(prompts)) if key else []
        done, t0 = sum(len(p) for p in parts), time.perf_counter()
        try:
            for start in range(done, len(prompts), CHUNK):
                parts.append(self.score(prompts[start:start + CHUNK])[0])
                if len(prompts) > CHUNK:
                    print(f"sectune: predict: {min(start + CHUNK, len(prompts))}/{len(prompts)} rows scored "
                          f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
        except KeyboardInterrupt:
            if key and parts:
                _save_partial(partial, key, np.concatenate(parts))
                print(f"sectune: predict: interrupted: the {sum(len(p) for p in parts)} of {len(prompts)} rows scored so far "
                      f"are in {partial}; the same call scores the rest", file=sys.stderr)
            raise
        probs = np.concatenate(parts)
        return probs, decide(probs, self.labels, self.meta.get("threshold"))

    def _resume_key(self, prompts: Sequence[str]) -> Optional[str]:
        """What an interrupted call's rows are valid for: the run's weight and metadata files (name, size, modification
        time), its metadata and the prompts. None (nothing kept) for a predictor not made by :meth:`from_run`."""
        import hashlib

        if self.source is None:
            return None
        files = sorted([str(f.relative_to(self.source)), f.stat().st_size, f.stat().st_mtime_ns]
                       for f in self.source.rglob("*") if f.is_file() and (f.suffix == ".safetensors" or f.name in
                                                                           (META_FILE, NORMALIZER_FILE, LABELS_FILE))
                       and "checkpoint" not in str(f.relative_to(self.source)))
        what = {"files": files, "meta": self.meta, "chunk": CHUNK,
                "prompts": hashlib.sha256("\0".join(prompts).encode()).hexdigest()}
        return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()

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
            from sectune.data.csv_files import delimiter_hint

            raise DataError(f"{source}: missing feature column(s): {', '.join(map(repr, missing))}{delimiter_hint(frame.columns)}")
        X = frame[features].apply(pd.to_numeric, errors="coerce").astype("float64")
        X = X.where(np.isfinite(X))  # non-numeric / inf → NaN → train-median imputation
        empty = [c for c in features if len(X) > 1 and X[c].isna().all()]
        if empty:  # every flow scored at the median, unsaid; training and evaluate.data_path refuse it (an audit, session 42)
            first = frame[empty[0]].iloc[0]
            print(f"sectune: warning: {source}: feature column(s) {', '.join(map(repr, empty))} hold no finite number in any of "
                  f"the {len(X)} rows (first value: {first!r}): every flow is scored at the training median there; a text or "
                  "mis-mapped column?", file=sys.stderr)
        # which features each flow did not give as a finite number (a result says so: "fast" or None scored as the median)
        self.last_imputed = [[c for c, bad in zip(features, row) if bad] for row in X.isna().to_numpy().tolist()]
        Z = self.normalizer.transform(X)
        sep, fmt = self.meta.get("feature_sep", "; "), self.meta.get("feature_format", "{name}={value}")
        return [render_flow(z, features, self.meta["template"], self.meta["precision"], sep, fmt) for z in Z.to_dict("records")]

    # ------------------------------------------------------------------ public

    def predict_flows(self, flows: Sequence[Mapping]) -> List[Dict]:
        """Each flow's ``{"label", "scores", "imputed_features"}``: the features it did not give as a finite number
        (missing, None, text, inf), scored at the training median. A feature that no flow of the call gives at all is
        an error naming it (a misspelt name is not a missing value), as in :meth:`predict_flow` and :meth:`predict_csv`."""
        if not flows:
            return []
        prompts = self.flow_prompts(pd.DataFrame(list(flows)), source="flow")
        return [{**r, "imputed_features": imp} for r, imp in zip(self._results(*self._score_prompts(prompts)), self.last_imputed)]

    def predict_flow(self, flow: Mapping) -> Dict:
        """One flow ``{feature: value}`` → ``{"label", "scores": {label: prob}, "imputed_features": [...]}``."""
        return self.predict_flows([flow])[0]

    def predict_texts(self, texts: Sequence[str]) -> List[Dict]:
        """Texts through the run's prompt template (for a flow model: already-rendered prompts)."""
        from sectune.training.classification import render_text

        if isinstance(texts, (str, bytes)):  # a lone string was scored one character at a time
            raise TypeError("predict_texts takes a list of texts; for one text: predict_texts([text])[0]")
        texts = [str(t) for t in texts]
        prompts = texts if self.meta["format"] == "flows" else [render_text(self.meta["template"], t) for t in texts]
        return self._results(*self._score_prompts(prompts))

    def predict_csv(self, in_path, out_path) -> pd.DataFrame:
        """The CSV with ``predicted_label`` and ``score_<label>`` columns, written to ``out_path``."""
        from sectune.data.csv_files import read_csv_checked

        in_path, out_path = Path(in_path), Path(out_path)
        if out_path.is_dir():
            raise DataError(f"{out_path}: is a folder; give predict_csv the output CSV's path (e.g. {out_path / 'predictions.csv'})")
        # the input itself, or a file of the run it predicts with (normalizer.json: the next from_run failed), was replaced
        target, source = out_path.expanduser().resolve(), in_path.expanduser().resolve()
        run_file = (self.source is not None and target.exists() and target.suffix.lower() != ".csv"
                    and target.is_relative_to(Path(self.source).resolve()))
        if target == source or run_file:
            raise DataError(f"{out_path}: is " + ("the input CSV itself" if target == source else f"a file of the run "
                            f"{self.source} the predictor loaded") + "; write the predictions to a new CSV")
        df = read_csv_checked(in_path, strings=self.meta["format"] != "flows")
        partial = out_path.with_name(f".{out_path.name}.partial.npz")
        if self.meta["format"] == "flows":
            prompts = self.flow_prompts(df, source=str(in_path))
            probs, preds = self._score_prompts(prompts, partial)
        else:
            col = self.meta.get("text_column", "text")
            if col not in df.columns:
                from sectune.data.csv_files import delimiter_hint

                raise DataError(f"{in_path}: missing column {col!r}; found {list(df.columns)}{delimiter_hint(df.columns)}")
            from sectune.training.classification import render_text

            probs, preds = self._score_prompts([render_text(self.meta["template"], str(t)) for t in df[col]], partial)
        out = df.copy()
        out["predicted_label"] = preds
        if self.meta["format"] == "flows":  # the features a row did not give as a finite number (scored at the train median)
            out["imputed_features"] = [";".join(imp) for imp in self.last_imputed]
        for k, lab in enumerate(self.labels):
            out[f"score_{lab}"] = probs[:, k] if len(preds) else []
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_path.with_name(f".{out_path.name}.tmp")
        try:
            out.to_csv(tmp, index=False)
            tmp.replace(out_path)
        finally:
            tmp.unlink(missing_ok=True)
        partial.unlink(missing_ok=True)  # in the output now
        return out


def _save_partial(partial: Path, key: str, probs: np.ndarray) -> None:
    """The rows scored so far and their key, written whole or not at all (numpy arrays only: read back without pickle)."""
    tmp = partial.with_name(partial.name + ".tmp")
    partial.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(tmp, "wb") as f:
            np.savez(f, probs=probs, key=np.array(key))
        tmp.replace(partial)
    finally:
        tmp.unlink(missing_ok=True)


def _resumed(partial: Path, key: str, total: int) -> list:
    """The scored chunks an interrupted call of the same run and prompts saved in ``partial``, else []."""
    if not partial.is_file():
        return []
    try:
        with np.load(partial, allow_pickle=False) as saved:
            same, probs = str(saved["key"]) == key, saved["probs"]
    except (OSError, ValueError, KeyError) as e:
        print(f"sectune: note: predict: {partial} is unreadable ({type(e).__name__}): scoring from the start", file=sys.stderr)
        return []
    if not same or probs.ndim != 2 or len(probs) >= total or len(probs) % CHUNK:
        print(f"sectune: note: predict: {partial} holds another run's, file's or chunking's scores: not reused", file=sys.stderr)
        return []
    print(f"sectune: predict: resuming: {len(probs)} of {total} rows were scored by the interrupted call ({partial})",
          file=sys.stderr)
    return [probs]
