"""Test-split evaluation of a classify run (seed 004's ``evaluate_model.py``), baselines beside it.

``evaluate.model_dir`` names a classify run dir. Its ``result.json`` must say succeeded; its
``.hydra/config.yaml`` rebuilds the same data and splits and the same model. The evaluate run's
own model/dataset choices are ignored (only ``evaluate.*`` is taken from this run), so one
command cannot silently score a model on data it was not built for.

With ``dataset=injection_triplets``, ``evaluate.model_dir`` is an analyst run (sft, dpo, rl,
contrastive or a pipeline) and the run scores its attack success rate: :mod:`sectune.evaluation.injection_eval`.
With ``dataset=hdfs``, ``evaluate.model_dir`` is an sft run (or a pipeline with one) trained on normal
sessions, and the run detects anomalous sessions by next-key prediction: :mod:`sectune.evaluation.anomaly`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from sectune.errors import ConfigError, DataError
from sectune.evaluation import classify_scoring as S
from sectune.predict import NORMALIZER_FILE, Predictor, read_classify_run, read_normalizer
from sectune.runner import RunContext
from sectune.training import classification as C
from sectune.training import distributed


def run(ctx: RunContext) -> dict:
    cfg, run_dir = ctx.cfg, ctx.run_dir
    if not distributed.is_main_process() and not distributed.group_is_up():
        # torchrun with no training before it: no process group to share the scoring out over, so every rank scored it all
        # (rank 0 alone writes); rank 0 evaluates alone. With one up (a pipeline's evaluate step after training) the ranks
        # share the generation and scoring out (distributed.gathered), so all take part.
        return {"metrics": {}, "artifacts": {}}
    for key, d in (("evaluate.model_dir", cfg.evaluate.model_dir), *(("evaluate.vote_with", v) for v in cfg.evaluate.vote_with or ())):
        if d and Path(str(d)).expanduser().resolve() == Path(run_dir).resolve():  # it said "not a succeeded run (status running)"
            raise ConfigError(f"hydra.run.dir is {key} ({run_dir}): the evaluation goes to a run dir of its own; "
                              "give hydra.run.dir another folder (the model's run is left as it was)")
    if cfg.dataset.name == "injection_triplets":  # the analyst under prompt injection (issue 15)
        from sectune.evaluation.injection_eval import evaluate_injections

        return evaluate_injections(ctx)
    if cfg.dataset.name == "hdfs":  # log-session anomaly detection by next-key prediction (issue 16)
        from sectune.evaluation.anomaly import evaluate_hdfs

        return evaluate_hdfs(ctx)
    ev = cfg.evaluate
    if not ev.model_dir:
        raise ConfigError("stage=evaluate needs evaluate.model_dir=<a classify run dir>")
    model_dir = Path(ev.model_dir).expanduser().resolve()
    if not model_dir.is_dir():
        raise ConfigError(f"evaluate.model_dir={ev.model_dir}: not a directory")
    run_cfg, _ = read_classify_run(model_dir)
    run_cfg.evaluate = cfg.evaluate
    run_cfg.train.device = cfg.train.device
    where = f"the new labelled file {ev.data_path}" if ev.data_path else f"dataset={run_cfg.dataset.name} split={ev.split}"
    print(f"sectune: evaluating {model_dir} ({run_cfg.model.name}, {run_cfg.classify.head} head) on {where}; "
          "this run's model/dataset settings are ignored")

    # its own bins: refitted, a run from before session 42's quantile rule read other prompts than it trained on ("the
    # data changed"; a review)
    saved_norm = read_normalizer(model_dir) if (model_dir / NORMALIZER_FILE).is_file() else None
    try:
        data = C.build_labelled_data(run_cfg, normalizer=saved_norm)
    except DataError as e:  # its hint "set dataset.path=" is for training: evaluate reads the run's saved settings
        # with evaluate.data_path given, the run's own data is still read: the baselines beside the model are refitted on
        # its train split (the hint pointed at evaluate.data_path, the option just passed: an audit, session 36)
        tail = ("the baselines beside the model are refitted on its training data, so evaluate.data_path needs it too"
                if ev.data_path else "or score a labelled file of your own with evaluate.data_path=<csv>")
        raise DataError(f"{e} [stage=evaluate rebuilds the data of {model_dir} from its saved config, whatever this command's "
                        "dataset.* says: make that data readable again (paths.shared_data / SECTUNE_SHARED_DATA for the real "
                        f"samples; the run's dataset.path for a file of yours); {tail}]") from None
    split = "external" if ev.data_path else ev.split
    if split not in data.splits and not ev.data_path:
        raise ConfigError(f"evaluate.split={ev.split!r}: choose train, validation or test")
    # the rows scored (their split as the run saved it), and the train and validation rows the baselines are fitted and
    # tuned on again here: a changed training row refitted TF-IDF + LR silently, and the model's lead over it moved
    for name in dict.fromkeys(["train", "validation", *([] if ev.data_path else [split])]):
        saved = model_dir / "splits" / f"{name}.json"
        if not saved.is_file() or name not in data.splits:
            continue
        try:
            old = [(r["text"], r["label"]) for r in json.loads(saved.read_text(encoding="utf-8"))]
        except (ValueError, TypeError, KeyError) as e:  # was a JSONDecodeError traceback naming no file
            raise DataError(f"{saved}: damaged ({type(e).__name__}: {e}); the classify run's saved split cannot be "
                            "compared with the rebuilt one") from None
        if old != [(r["text"], r["label"]) for r in data.splits[name]]:
            raise DataError(f"{data.source}: the rebuilt {name} split differs from {saved}; the data changed since the classify "
                            f"run (the {'rows scored' if name == split else 'baselines would be fitted on other rows'})")
    if ev.data_path:
        data.splits[split] = S.external_records(data, run_cfg, ev.data_path)
        dup = {r["text"] for r in data.splits["train"]} & {r["text"] for r in data.splits[split]}
        if dup:
            print(f"sectune: warning: {len(dup)} distinct row(s) of {ev.data_path} render to the same prompt as a training row "
                  "of this run (for flows: values normalised and binned alike, though the raw rows may differ): the model sees "
                  "inputs it trained on, so their scores partly measure memory", file=sys.stderr)

    predictor = Predictor.from_run(model_dir, batch_size=ev.batch_size, device=cfg.train.device)
    recs = data.splits[split]
    if not recs:  # was an IndexError traceback from the tokenizer
        fraction = "test_fraction" if split == "test" else "val_fraction"
        raise ConfigError(f"{model_dir}: the run has no {split} rows (trained with dataset.{fraction}="
                          f"{run_cfg.dataset.get(fraction)}): score it on a labelled file with evaluate.data_path=<file>")
    probs, lat = predictor.score([r["text"] for r in recs])
    if predictor.labels != data.labels:
        raise DataError(f"{model_dir}: labels.json {predictor.labels} differ from the rebuilt data's {data.labels}")
    metrics = S.evaluate_split(data, split, probs, lat, run_dir / "evaluation",
                               threshold=predictor.meta.get("threshold"), seed=run_cfg.train.seed,
                               rf_estimators=ev.rf_estimators, folds=int(run_cfg.classify.folds),
                               fold_seed=int(run_cfg.dataset.split_seed),
                               extra={"model_dir": str(model_dir), "model": run_cfg.model.name,
                                      "head": predictor.meta["head"], "members": len(predictor.members)})
    sp = split
    if ev.data_path:
        metrics["external_file"] = str(ev.data_path)
    print(f"sectune: {sp} accuracy {metrics[f'{sp}_accuracy']:.4f} · macro-F1 {metrics[f'{sp}_macro_f1']:.4f} · "
          f"baseline {metrics.get(f'baseline_{sp}_macro_f1', float('nan')):.4f} · majority {metrics[f'majority_{sp}_macro_f1']:.4f}"
          f" → {run_dir / 'evaluation'}")
    if sp not in ("test", "external"):
        print(f"sectune: note: {sp} rows{' chose the threshold and the baseline settings' if sp == 'validation' else ' were trained on'}: "
              f"these scores are optimistic; the test split is the honest one")
    return {"metrics": metrics, "artifacts": {"evaluation": "evaluation", "model_dir": str(model_dir)}}
