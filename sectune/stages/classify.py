"""Classification fine-tuning (seeds 001, 004): flows or texts → one label out of a fixed set.

Read top to bottom: labelled splits (statistics fitted on train) → model with a ``seq_cls`` head
(LoRA SEQ_CLS, the score head trained and saved via modules_to_save; or full fine-tune) or a
causal LM that learns to generate the label (``generative``) → WeightedCETrainer → artifacts →
validation (threshold choice for binary tasks) → test evaluation with baselines beside the model.
"""

from __future__ import annotations

import json
import shutil
import sys
import time

import numpy as np

from sectune.errors import ConfigError
from sectune.evaluation import classify_scoring as S
from sectune.models import modeling
from sectune.predict import LABELS_FILE, META_FILE, NORMALIZER_FILE
from sectune.runner import RunContext, write_json_atomic
from sectune.training import checkpoints, distributed, engine
from sectune.training import classification as C
from sectune.training import classify_encoding as E


def run(ctx: RunContext) -> dict:
    cfg, run_dir = ctx.cfg, ctx.run_dir
    from sectune.loss_settings import warn_unread_loss

    warn_unread_loss(cfg)  # loss.* keys this stage's loss does not read, said
    t0 = time.perf_counter()
    head = cfg.classify.head
    if head not in C.HEADS:
        raise ConfigError(f"classify.head={head!r}: choose one of {', '.join(C.HEADS)}")
    if head == "generative" and cfg.classify.pooling != "mean":  # the seq_cls head's setting (its default: mean)
        print(f"sectune: warning: classify.pooling={cfg.classify.pooling} is the seq_cls head's; classify.head=generative "
              "scores each label's tokens after the prompt and pools nothing", file=sys.stderr)
    # checked before anything is read or written: a rerun into a finished run dir must leave its files as they are
    folds = int(cfg.classify.folds)
    if folds < 1:
        raise ConfigError(f"classify.folds={folds}: 1 trains one model; k >= 2 trains a k-fold cross-fitted ensemble")
    if folds > 1 and cfg.train.resume not in (None, "", "null", "none", "auto"):
        raise ConfigError(f"train.resume={cfg.train.resume}: a classify.folds={folds} run keeps one checkpoint directory per "
                          f"member (checkpoints/fold<i>); resume it with train.resume=auto")

    # 1. data: splits written as JSON (seed 004's train/validation/test files)
    data = C.build_labelled_data(cfg)
    n = {k: len(v) for k, v in data.splits.items()}
    print(f"sectune: {cfg.dataset.name} ({data.source}): {n['train']} train / {n['validation']} validation / "
          f"{n['test']} test rows, {len(data.labels)} labels")
    if data.cleaning:
        print(f"sectune: cleaning ({cfg.dataset.nan_policy}): {json.dumps({k: v for k, v in data.cleaning.items() if k != 'bad_cells_by_column'})}")
        worst = sorted((data.cleaning.get("bad_cells_by_column") or {}).items(), key=lambda kv: -kv[1])[:5]
        if worst:  # which columns they were in (a mis-mapped column shows here first)
            print(f"sectune: cleaning: bad cells by column (most first): {', '.join(f'{c} {n}' for c, n in worst)}")
    # what the data can refuse (no validation rows, too few rows of a label for the folds, a class weight for no label),
    # before a file is written
    if not data.splits["validation"] and folds <= 1:  # k folds choose on their out-of-fold rows instead
        raise ConfigError(f"dataset.val_fraction={cfg.dataset.val_fraction}: no validation rows; stage=classify chooses its "
                          "checkpoint and threshold and reports its model on them (set dataset.val_fraction above 0, "
                          "or classify.folds=k to choose on out-of-fold rows)")
    train_recs = data.splits["train"]
    parts = S.stratified_folds([r["label"] for r in train_recs], folds, cfg.dataset.split_seed) if folds > 1 else None
    C.class_weight_vector(cfg.loss.class_weights, data.labels, [r["label"] for r in train_recs])
    from sectune.data.flows import write_splits_json

    # Under torchrun every rank runs this file: training and the scoring are collective, writing is rank 0's.
    main = distributed.is_main_process()
    artifacts = {"splits": "splits", "labels": LABELS_FILE}
    if main:
        write_splits_json(run_dir / "splits", data.splits)
        write_json_atomic(run_dir / LABELS_FILE, {"labels": data.labels})
    if data.normalizer is not None:
        if main:
            write_json_atomic(run_dir / NORMALIZER_FILE, data.normalizer.to_dict())
        artifacts["normalizer"] = NORMALIZER_FILE

    # 2-4. one classifier, or ``classify.folds`` members cross-fitted on the train split
    max_len = cfg.model.max_seq_length
    autocast = S.scoring_autocast(cfg)  # every scoring below runs in the training precision
    to_score = {"validation": [r["text"] for r in data.splits["validation"]]}
    if cfg.classify.evaluate_test and data.splits["test"]:
        to_score["test"] = [r["text"] for r in data.splits["test"]]
    if folds == 1:
        member = _train_member(cfg, data, head, data.splits["train"], data.splits["validation"],
                               run_dir, run_dir / "checkpoints", cfg.train.seed, to_score, autocast)
        metrics, history, name = member["metrics"], member["history"], member["artifact"]
        scored = member["scored"]
        members = None
        artifacts.update({name: name, "checkpoints": "checkpoints"})
    else:
        oof = np.zeros((len(train_recs), len(data.labels)))
        runs, members = [], []
        from transformers import set_seed

        for i, held in enumerate(parts):
            held_set = set(held.tolist())
            fit = [r for j, r in enumerate(train_recs) if j not in held_set]
            print(f"sectune: fold {i + 1}/{folds}: training on {len(fit)} rows, selecting on the {len(held)} held out")
            set_seed(cfg.train.seed + i)  # each member's new score head is drawn differently, reproducibly
            m = _train_member(cfg, data, head, fit, [train_recs[j] for j in held], run_dir / "folds" / str(i),
                              run_dir / "checkpoints" / f"fold{i}", cfg.train.seed + i,
                              {**to_score, "held_out": [train_recs[j]["text"] for j in held]}, autocast, member=f"fold{i}")
            oof[held] = m["scored"]["held_out"][0]
            runs.append(m)
            members.append(f"folds/{i}/{m['artifact']}")
        name, history = runs[0]["artifact"], runs[0]["history"]
        scored = {k: S.combine_scores([m["scored"][k] for m in runs]) for k in to_score}  # the members' mean
        metrics = {k: float(np.mean([m["metrics"][k] for m in runs])) for k in ("train_loss", "train_steps")}
        metrics.update(trainable_params=runs[0]["metrics"]["trainable_params"], total_params=runs[0]["metrics"]["total_params"],
                       folds=folds, fold_best_steps=[m["metrics"].get("best_step") for m in runs])
        artifacts.update(folds="folds", checkpoints="checkpoints")
    artifacts.update(loss_curve="plots/loss_curve.png", train_history="train_history.json" if members is None else "folds")
    title = f"classify · {modeling.model_title(cfg.model)} · {cfg.dataset.name}" + ("" if members is None else f" · fold 1 of {folds}")
    if main:
        engine.plot_loss_curve(run_dir / "plots" / "loss_curve.png", history, title)

    # 5. the decision threshold for two labels (on the out-of-fold predictions of every train row
    #    with folds, else on validation; never on test), then the validation metrics
    from sectune.evaluation.classifier import label_scores

    def _score(y, probs, prefix):  # the macro-F1 the test metrics use (evaluation.label_scores), not another one
        s = label_scores(list(y), list(S.decide(probs, data.labels, threshold)), list(data.labels))
        metrics[f"{prefix}_accuracy"], metrics[f"{prefix}_macro_f1"] = s["accuracy"], s["macro_f1"]

    threshold = None
    binary = cfg.classify.tune_threshold and len(data.labels) == 2
    vy = [r["label"] for r in data.splits["validation"]]
    if members:
        ty = [r["label"] for r in data.splits["train"]]
        if binary:
            threshold, _ = S.tune_threshold(oof, ty, data.labels)
            print(f"sectune: decision threshold on p({data.labels[1]}) chosen on the out-of-fold train predictions: {threshold:.4f}")
        _score(ty, oof, "cv")
        print(f"sectune: out-of-fold macro-F1 over {len(ty)} train rows: {metrics['cv_macro_f1']:.4f}")
    elif binary and vy:
        threshold, _ = S.tune_threshold(scored["validation"][0], vy, data.labels)
        print(f"sectune: decision threshold on p({data.labels[1]}) chosen on validation: {threshold:.4f}")
    if vy:
        _score(vy, scored["validation"][0], "val")
    if not main:  # rank 0 writes the classifier, the test evaluation (and its baselines) and the metrics
        distributed.barrier()
        return {"metrics": metrics, "artifacts": artifacts}
    meta = {
        "head": head, "format": data.format, "artifact": name, "labels": data.labels, "template": data.template,
        "features": data.features, "precision": cfg.dataset.render_precision, "max_length": max_len,
        "feature_format": cfg.dataset.feature_format, "feature_sep": cfg.dataset.feature_sep,
        "autocast": autocast, "pooling": cfg.classify.pooling if head == "seq_cls" else None,
        "threshold": threshold, "text_column": cfg.dataset.text_column, "dataset": cfg.dataset.name, "source": data.source,
    }
    if members:
        meta["members"] = members
    write_json_atomic(run_dir / META_FILE, meta)
    artifacts["classifier"] = META_FILE

    # 6. test evaluation, model beside the classic baseline and the majority class
    if cfg.classify.evaluate_test and data.splits["test"]:
        probs, lat = scored["test"]
        ev = S.evaluate_split(data, "test", probs, lat, run_dir / "evaluation", threshold=threshold,
                              seed=cfg.train.seed, rf_estimators=cfg.evaluate.rf_estimators,
                              folds=int(cfg.classify.folds), fold_seed=int(cfg.dataset.split_seed),
                              extra={"model": cfg.model.name, "head": head, "run_dir": str(run_dir), "members": len(members or [name])})
        metrics.update(ev)
        artifacts["evaluation"] = "evaluation"
    elif (run_dir / "evaluation").is_dir():  # an earlier run's here scored another model: nothing stale may look current
        if (run_dir / "evaluation").is_symlink():
            (run_dir / "evaluation").unlink()  # the link, never what it points to
        else:
            shutil.rmtree(run_dir / "evaluation")
        print(f"sectune: removed {run_dir / 'evaluation'}: it scored the model this run replaced (classify.evaluate_test=false)")

    metrics.update(engine.peak_memory())
    metrics["train_runtime_s"] = round(time.perf_counter() - t0, 2)
    write_json_atomic(run_dir / "training_metrics.json", {**metrics, "loss_history": history})
    artifacts["training_metrics"] = "training_metrics.json"
    where = f"{name} at {run_dir / name}" if members is None else f"{folds}-fold ensemble ({name}s) at {run_dir / 'folds'}"
    line = f"sectune: done · {where} · train loss {metrics['train_loss']:.4f}"
    if "test_macro_f1" in metrics:
        line += (f" · test macro-F1 {metrics['test_macro_f1']:.4f} (baseline {metrics.get('baseline_test_macro_f1', float('nan')):.4f},"
                 f" majority {metrics.get('majority_test_macro_f1', float('nan')):.4f})")
    print(line + f" · {metrics['train_runtime_s']:.0f}s")
    distributed.barrier()
    return {"metrics": metrics, "artifacts": artifacts}


def _train_member(cfg, data, head: str, train_recs: list, val_recs: list, out_dir, ckpt_dir, seed: int,
                  to_score: dict, autocast, member: str | None = None) -> dict:
    """Train one classifier on ``train_recs`` (checkpoints selected on ``val_recs``), save it under
    ``out_dir`` and score each text list of ``to_score`` with it → its metrics and ``{key: (probs, times)}``.
    The model is freed before returning, so a k-fold run holds one model at a time."""
    from transformers import TrainingArguments

    weights = C.class_weight_vector(cfg.loss.class_weights, data.labels, [r["label"] for r in train_recs])
    if weights:
        print(f"sectune: class weights {dict(zip(data.labels, [round(w, 3) for w in weights]))}")
    path = modeling.model_path(cfg)
    tokenizer = modeling.load_tokenizer(cfg, path)
    if head == "seq_cls":
        model = modeling.load_model(cfg, task="seq_cls", num_labels=len(data.labels), path=path)
        modeling.pad_like_tokenizer(model, tokenizer)
        model.config.id2label = dict(enumerate(data.labels))
        model.config.label2id = {lab: i for i, lab in enumerate(data.labels)}
        model = modeling.apply_lora(model, cfg, task_type="SEQ_CLS")  # PEFT adds the score head to modules_to_save
        C.set_pooling(model, cfg.classify.pooling)
    else:
        model = modeling.apply_lora(modeling.load_model(cfg, path=path), cfg, task_type="CAUSAL_LM")
    trainable, total = modeling.trainable_parameters(model)
    pool = f", {C.pooling_description(model, cfg.classify.pooling)}" if head == "seq_cls" else ""
    print(f"sectune: {modeling.model_title(cfg.model)} ({head} head{pool}): {trainable:,} trainable of {total:,} parameters")

    max_len = cfg.model.max_seq_length
    p_drop = float(cfg.classify.subword_dropout)
    dropout = None
    if p_drop:
        from sectune.models.subword import SubwordDropout

        budget = max_len if head == "seq_cls" else E.prompt_budget(tokenizer, data.labels, max_len)
        dropout = SubwordDropout(tokenizer, p_drop, budget, "right" if head == "seq_cls" else "left")
        print(f"sectune: subword dropout {p_drop}: every epoch re-tokenizes the train rows with BPE merges dropped")
    train_ds = E.encode_examples(tokenizer, train_recs, data.labels, head, max_len, keep_text=dropout is not None)
    callbacks = engine.fail_callbacks(cfg)
    if dropout is not None:
        from sectune.models.subword import DropoutRows

        train_ds = DropoutRows(train_ds, dropout, seed, head)
        callbacks.append(train_ds.callback())
    val_ds = E.encode_examples(tokenizer, val_recs, data.labels, head, max_len)
    label_len = max(map(len, E.label_token_ids(tokenizer, data.labels))) if head == "generative" else 1
    kwargs = engine.training_kwargs(cfg, ckpt_dir, has_eval=bool(val_ds))
    kwargs.update(seed=seed, data_seed=seed)
    select = bool(cfg.classify.select_best and val_ds)
    if select:
        # evaluate at every checkpoint (each epoch, or every train.eval_steps; with train.save_steps alone, every
        # save_steps) and reload the checkpoint with the best validation macro-F1 at the end. train.save_steps was
        # dropped for the epoch's or eval_steps' without a word: a run killed mid-epoch had nothing to resume from
        every = cfg.train.eval_steps or cfg.train.save_steps
        kwargs.update(eval_strategy="steps" if every else "epoch", save_strategy="steps" if every else "epoch",
                      eval_steps=every, save_steps=cfg.train.save_steps or every or kwargs["save_steps"], load_best_model_at_end=True,
                      metric_for_best_model="eval_macro_f1", greater_is_better=True)
    args = TrainingArguments(**kwargs, remove_unused_columns=False, label_names=["labels"], prediction_loss_only=True)
    trainer = C.WeightedCETrainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds or None, processing_class=tokenizer,
        data_collator=E.ClassifyCollator(tokenizer.pad_token_id, head), callbacks=callbacks,
        head=head, class_weights=weights, label_smoothing=cfg.loss.label_smoothing, label_len=label_len,
        val_rows=val_recs if select else None, labels=data.labels, max_length=max_len, autocast=autocast,
    )
    engine.selective_checkpointing(trainer.model, cfg)
    if member is not None:
        C.member_wandb_logs(trainer, member)
    main = trainer.accelerator.is_main_process
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        train_out = engine.train(trainer, checkpoints.resolve_resume(cfg, ckpt_dir))
    finally:
        if main:
            engine.write_history(out_dir / "train_history.json", trainer)
    metrics = {"train_loss": engine.run_train_loss(trainer, train_out), "train_steps": trainer.state.global_step,
               "trainable_params": trainable, "total_params": total}
    if select and trainer.state.best_global_step:
        best_step = trainer.state.best_global_step
        metrics.update(best_step=best_step, best_val_macro_f1=trainer.state.best_metric)
        print(f"sectune: kept the weights of step {best_step} (validation macro-F1 {trainer.state.best_metric:.4f}, "
              f"best of {sum('eval_macro_f1' in r for r in trainer.state.log_history)} evaluations)")
    history = engine.loss_history(trainer)

    # the adapter (safetensors, incl. the score head) or the full model, + tokenizer
    model = trainer.model
    name = "adapter" if hasattr(model, "peft_config") else "model"
    if main:
        modeling.save_pretrained_atomic(model, tokenizer, out_dir / name)
    # every rank scores its share of each text list and receives all of it (collective: every rank calls it)
    scored = {k: S.score_texts_across_ranks(model, tokenizer, texts, head=head, labels=data.labels, batch_size=cfg.evaluate.batch_size,
                               max_length=max_len, autocast=autocast) if texts else (np.zeros((0, len(data.labels))), [])
              for k, texts in to_score.items()}
    del trainer, model
    import gc

    gc.collect()
    return {"metrics": metrics, "history": history, "artifact": name, "scored": scored}
