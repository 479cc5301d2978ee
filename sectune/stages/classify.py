"""Classification fine-tuning (seeds 001, 004): flows or texts → one label out of a fixed set.

Read top to bottom: labelled splits (statistics fitted on train) → model with a ``seq_cls`` head
(LoRA SEQ_CLS, the score head trained and saved via modules_to_save; or full fine-tune) or a
causal LM that learns to generate the label (``generative``) → WeightedCETrainer → artifacts →
validation (threshold choice for binary tasks) → test evaluation with baselines beside the model.
"""

from __future__ import annotations

import json
import time

from sectune import classification as C
from sectune import engine, modeling
from sectune.errors import ConfigError
from sectune.predict import LABELS_FILE, META_FILE, NORMALIZER_FILE
from sectune.runner import RunContext, write_json_atomic


def run(ctx: RunContext) -> dict:
    cfg, run_dir = ctx.cfg, ctx.run_dir
    t0 = time.perf_counter()
    head = cfg.classify.head
    if head not in C.HEADS:
        raise ConfigError(f"classify.head={head!r}: choose one of {', '.join(C.HEADS)}")

    # 1. data: splits written as JSON (seed 004's train/validation/test files)
    data = C.build_labelled_data(cfg)
    n = {k: len(v) for k, v in data.splits.items()}
    print(f"sectune: {cfg.dataset.name} ({data.source}): {n['train']} train / {n['validation']} validation / "
          f"{n['test']} test rows, {len(data.labels)} labels")
    if data.cleaning:
        print(f"sectune: cleaning ({cfg.dataset.nan_policy}): {json.dumps({k: v for k, v in data.cleaning.items() if k != 'bad_cells_by_column'})}")
    from sectune.data.flows import write_splits_json

    write_splits_json(run_dir / "splits", data.splits)
    write_json_atomic(run_dir / LABELS_FILE, {"labels": data.labels})
    artifacts = {"splits": "splits", "labels": LABELS_FILE}
    if data.normalizer is not None:
        write_json_atomic(run_dir / NORMALIZER_FILE, data.normalizer.to_dict())
        artifacts["normalizer"] = NORMALIZER_FILE
    weights = C.class_weight_vector(cfg.loss.class_weights, data.labels, [r["label"] for r in data.splits["train"]])
    if weights:
        print(f"sectune: class weights {dict(zip(data.labels, [round(w, 3) for w in weights]))}")

    # 2. model
    path = modeling.model_path(cfg)
    tokenizer = modeling.load_tokenizer(cfg, path)
    if head == "seq_cls":
        model = modeling.load_model(cfg, task="seq_cls", num_labels=len(data.labels), path=path)
        model.config.id2label = dict(enumerate(data.labels))
        model.config.label2id = {lab: i for i, lab in enumerate(data.labels)}
        model = modeling.apply_lora(model, cfg, task_type="SEQ_CLS")  # PEFT adds the score head to modules_to_save
        C.set_pooling(model, cfg.classify.pooling)
    else:
        model = modeling.apply_lora(modeling.load_model(cfg, path=path), cfg, task_type="CAUSAL_LM")
    trainable, total = modeling.trainable_parameters(model)
    pool = f", {cfg.classify.pooling}-token pooling" if head == "seq_cls" else ""
    print(f"sectune: {cfg.model.name} ({head} head{pool}): {trainable:,} trainable of {total:,} parameters")

    # 3. train
    max_len = cfg.model.max_seq_length
    train_ds = C.encode_examples(tokenizer, data.splits["train"], data.labels, head, max_len)
    val_ds = C.encode_examples(tokenizer, data.splits["validation"], data.labels, head, max_len)
    label_len = max(map(len, C.label_token_ids(tokenizer, data.labels))) if head == "generative" else 1
    from transformers import TrainingArguments

    autocast = C.scoring_autocast(cfg)  # every scoring below runs in the training precision
    kwargs = engine.training_kwargs(cfg, run_dir / "checkpoints", has_eval=bool(val_ds))
    select = bool(cfg.classify.select_best and val_ds)
    if select:
        # evaluate and checkpoint together (each epoch, or every train.eval_steps) and reload the
        # checkpoint with the best validation macro-F1 at the end
        every = cfg.train.eval_steps
        kwargs.update(eval_strategy="steps" if every else "epoch", save_strategy="steps" if every else "epoch",
                      eval_steps=every, save_steps=every or kwargs["save_steps"], load_best_model_at_end=True,
                      metric_for_best_model="eval_macro_f1", greater_is_better=True)
    args = TrainingArguments(**kwargs, remove_unused_columns=False, label_names=["labels"], prediction_loss_only=True)
    trainer = C.WeightedCETrainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds or None, processing_class=tokenizer,
        data_collator=C.ClassifyCollator(tokenizer.pad_token_id, head), callbacks=engine.fail_callbacks(cfg),
        head=head, class_weights=weights, label_smoothing=cfg.loss.label_smoothing, label_len=label_len,
        val_rows=data.splits["validation"] if select else None, labels=data.labels, max_length=max_len,
        autocast=autocast,
    )
    engine.selective_checkpointing(trainer.model, cfg)
    try:
        train_out = trainer.train(resume_from_checkpoint=engine.resolve_resume(cfg, run_dir / "checkpoints"))
    finally:
        engine.write_history(run_dir / "train_history.json", trainer)
    metrics = {"train_loss": train_out.training_loss, "train_steps": trainer.state.global_step,
               "trainable_params": trainable, "total_params": total}
    if select and trainer.state.best_global_step:
        best_step = trainer.state.best_global_step
        metrics.update(best_step=best_step, best_val_macro_f1=trainer.state.best_metric)
        print(f"sectune: kept the weights of step {best_step} (validation macro-F1 {trainer.state.best_metric:.4f}, "
              f"best of {sum('eval_macro_f1' in r for r in trainer.state.log_history)} evaluations)")
    history = engine.loss_history(trainer)
    engine.plot_loss_curve(run_dir / "plots" / "loss_curve.png", history, f"classify · {cfg.model.name} · {cfg.dataset.name}")
    artifacts.update(loss_curve="plots/loss_curve.png", train_history="train_history.json", checkpoints="checkpoints")

    # 4. artifacts: adapter (safetensors, incl. the score head) or the full model, + tokenizer
    model = trainer.model
    name = "adapter" if hasattr(model, "peft_config") else "model"
    modeling.save_pretrained_atomic(model, tokenizer, run_dir / name)
    artifacts[name] = name

    # 5. validation: accuracy/F1 and, for two labels, the decision threshold (never on test)
    bs = cfg.evaluate.batch_size
    threshold = None
    if data.splits["validation"]:
        from sklearn.metrics import accuracy_score, f1_score

        vp, _ = C.score_texts(model, tokenizer, [r["text"] for r in data.splits["validation"]], head=head,
                              labels=data.labels, batch_size=bs, max_length=max_len, autocast=autocast)
        vy = [r["label"] for r in data.splits["validation"]]
        if cfg.classify.tune_threshold and len(data.labels) == 2:
            threshold, _ = C.tune_threshold(vp, vy, data.labels)
            print(f"sectune: decision threshold on p({data.labels[1]}) chosen on validation: {threshold:.4f}")
        vpred = C.decide(vp, data.labels, threshold)
        metrics["val_accuracy"] = float(accuracy_score(vy, vpred))
        metrics["val_macro_f1"] = float(f1_score(vy, vpred, labels=data.labels, average="macro", zero_division=0))
    meta = {
        "head": head, "format": data.format, "artifact": name, "labels": data.labels, "template": data.template,
        "features": data.features, "precision": cfg.dataset.render_precision, "max_length": max_len,
        "feature_format": cfg.dataset.feature_format, "feature_sep": cfg.dataset.feature_sep,
        "autocast": autocast, "pooling": cfg.classify.pooling if head == "seq_cls" else None,
        "threshold": threshold, "text_column": cfg.dataset.text_column, "dataset": cfg.dataset.name, "source": data.source,
    }
    write_json_atomic(run_dir / META_FILE, meta)
    artifacts["classifier"] = META_FILE

    # 6. test evaluation, model beside the classic baseline and the majority class
    if cfg.classify.evaluate_test and data.splits["test"]:
        probs, lat = C.score_texts(model, tokenizer, [r["text"] for r in data.splits["test"]], head=head,
                                   labels=data.labels, batch_size=bs, max_length=max_len, autocast=autocast)
        ev = C.evaluate_split(data, "test", probs, lat, run_dir / "evaluation", threshold=threshold,
                              seed=cfg.train.seed, rf_estimators=cfg.evaluate.rf_estimators,
                              extra={"model": cfg.model.name, "head": head, "run_dir": str(run_dir)})
        metrics.update(ev)
        artifacts["evaluation"] = "evaluation"

    metrics.update(engine.peak_memory())
    metrics["train_runtime_s"] = round(time.perf_counter() - t0, 2)
    write_json_atomic(run_dir / "training_metrics.json", {**metrics, "loss_history": history})
    artifacts["training_metrics"] = "training_metrics.json"
    line = f"sectune: done · {name} at {run_dir / name} · train loss {metrics['train_loss']:.4f}"
    if "test_macro_f1" in metrics:
        line += (f" · test macro-F1 {metrics['test_macro_f1']:.4f} (baseline {metrics.get('baseline_test_macro_f1', float('nan')):.4f},"
                 f" majority {metrics.get('majority_test_macro_f1', float('nan')):.4f})")
    print(line + f" · {metrics['train_runtime_s']:.0f}s")
    return {"metrics": metrics, "artifacts": artifacts}
