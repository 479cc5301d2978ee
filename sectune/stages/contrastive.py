"""Causal-contrastive training of the analyst on injection triplets (seed 002).

Read top to bottom: triplets (benign / counterfactual / injected windows, rendered into the analyst's prompt
as SFT and infer render them) → model (an SFT run's adapter or weights, ``contrastive.init_from``, or the base
model; LoRA or full fine-tune) → :class:`sectune.training.contrastive_trainer.CausalContrastiveTrainer` with
L = λc·(−cos(r_b, r_cf)/τ) + λs·(cos(r_b, r_inj)/τ) + λt·CE(benign answer) → artifacts.

Before training, the representation metrics of the held-out triplets (test split, else validation) give
``causal_discrimination_start``; after it, ``causal_stability``, ``spurious_separation`` and
``causal_discrimination`` on the same triplets. The attack is scored the same way (``contrastive.attack_eval``,
on by default): the model answers the held-out injected windows, and the same windows clean, with
stage=infer's generation (sectune.evaluation.injection_eval), before and after training → ``attack_success_rate_start`` /
``attack_success_rate``, ``targeted_attack_success_rate``, ``clean_verdict_accuracy`` (and their ``_start``),
per-window answers in ``injection_eval.json``; ``evaluate.max_samples`` takes the first N windows, as
stage=evaluate does. An adapter trained on SFT full weights records them as ``artifacts.base_model``, where
infer and evaluate load it (modeling.adapter_base). Every ``train.eval_steps`` the validation triplets are
scored (``eval_causal_stability``, …); Trainer's EarlyStoppingCallback stops on ``contrastive.early_stopping``
and the best checkpoint by that metric is kept (``artifacts.best_checkpoint``), its weights loaded at the end
unless ``contrastive.load_best_at_end=false``. ``train.resume=auto`` resumes exactly (checkpoints.resolve_resume).
``debug.enabled=true``: ``debug.max_steps`` steps on ``debug.max_samples`` triplets with anomaly detection;
a NaN/inf loss stops any run with the step, the last good checkpoint and seed 002's list of what to try.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from sectune.errors import ConfigError, SectuneError, first_line
from sectune.models import modeling
from sectune.runner import RunContext, init_source, write_json_atomic
from sectune.run_records import warn_other_quantization
from sectune.training import checkpoints, engine
from sectune.training import contrastive_trainer as CT

MODES = ("max", "min")
#: the eval metrics the trainer logs (eval_<name>), which early stopping and the best checkpoint can follow
EVAL_METRICS = ("causal_stability", "spurious_separation", "causal_discrimination", "task_loss", "loss")


def run(ctx: RunContext) -> dict:
    cfg, run_dir = ctx.cfg, ctx.run_dir
    from sectune.loss_settings import warn_unread_loss

    warn_unread_loss(cfg)  # loss.* keys this stage's loss does not read, said
    t0 = time.perf_counter()
    check_config(cfg)

    # 1. data: the three inputs rendered as the analyst's prompts
    loaded = load_triplets(cfg)
    records, data_info = loaded.splits, loaded.info
    if cfg.debug.enabled:
        records = {k: v[: int(cfg.debug.max_samples)] for k, v in records.items()}
    splits = {k: [triplet_prompts(r) for r in v] for k, v in records.items()}
    held_name = "test" if splits["test"] else "validation"
    held_out = splits[held_name]
    if held_name == "validation" and splits["validation"]:
        print("sectune: warning: no test triplets (dataset.test_fraction=0): the held-out numbers are the validation "
              "triplets', which also chose the kept checkpoint and early stopping: optimistic, not a test result", file=sys.stderr)
    # the windows the attack is scored on: the first evaluate.max_samples held-out ones, as stage=evaluate takes them
    attacked = [{**r, **p} for r, p in zip(records[held_name], held_out)][: cfg.evaluate.max_samples or None]
    if not splits["train"] or not held_out:
        raise ConfigError(f"dataset={cfg.dataset.name}: stage=contrastive needs train triplets and held-out (test or validation) ones; "
                          f"got {len(splits['train'])} train / {len(splits['validation'])} validation / {len(splits['test'])} test")
    if float(cfg.loss.lambda_consistency) > 0 and all(r["benign_cf"].strip() == r["benign"].strip() for r in records["train"]):
        raise ConfigError(f"dataset={cfg.dataset.name}: every training triplet's benign_cf equals its benign input "
                          f"({data_info.get('source')}), so loss.lambda_consistency={cfg.loss.lambda_consistency} trains nothing "
                          "and causal stability is 1.0 by construction: give counterfactuals that differ (a triplet file), or "
                          "set loss.lambda_consistency=0")
    if cfg.contrastive.attack_eval and any("injection_output" not in r for r in attacked):
        raise ConfigError(f"dataset={cfg.dataset.name}: the {held_name} triplets carry no injection_output, so the attack cannot be "
                          "scored; set contrastive.attack_eval=false")
    print(f"sectune: {len(splits['train'])} train / {len(splits['validation'])} validation / {len(splits['test'])} test triplets ({cfg.dataset.name})")

    # 2. model
    path = modeling.model_path(cfg)
    model, start, sft_weights, init_folder = build_model(cfg, path)
    tokenizer = modeling.tokenizer_for(cfg, init_folder, path)  # the one saved with the weights it starts from
    trainable, total = modeling.trainable_parameters(model)
    print(f"sectune: {modeling.model_title(cfg.model)}: {trainable:,} trainable of {total:,} parameters; starting from {start}")
    max_len = int(cfg.model.max_seq_length)
    rows = {}
    cut = 0
    for name, recs in splits.items():
        rows[name], n = CT.encode_triplets(tokenizer, recs, max_len)
        cut += n
    if cut:
        print(f"sectune: warning: {cut} triplets exceed model.max_seq_length={max_len} tokens: their prompts are cut in the "
              "middle (start and end kept, so an injection at either end stays) and the benign answer at its end")

    # 3. trainer; the held-out metrics before training
    # (under torchrun / accelerate the process group starts here: every rank trains; the held-out representation numbers
    # are computed on every rank (no generation: cheap), the attack's generations shared out across the ranks and gathered)
    trainer = build_trainer(cfg, model, tokenizer, rows["train"], rows["validation"], run_dir / "checkpoints")
    main = trainer.accelerator.is_main_process
    collator, fwd = trainer.data_collator, trainer.fwd
    batch = int(cfg.train.eval_batch_size or cfg.train.batch_size)
    start_metrics = CT.representation_metrics(trainer.model, rows[held_name], collator, batch, **fwd)
    ctx.partial_metrics.update({f"{k}_start": v for k, v in start_metrics.items()})
    print(f"sectune: before training, {held_name} causal discrimination {start_metrics['causal_discrimination']:.4f} "
          f"(stability {start_metrics['causal_stability']:.4f}, separation {start_metrics['spurious_separation']:.4f})")
    attack = {}
    if cfg.contrastive.attack_eval:
        attack["start"] = attack_eval(cfg, trainer.model, tokenizer, attacked, held_name, "before")
        ctx.partial_metrics.update({f"{k}_start": v for k, v in attack["start"][0].items()})
    try:
        with anomaly_detection(cfg):
            train_out = engine.train(trainer, checkpoints.resolve_resume(cfg, run_dir / "checkpoints"))
    except RuntimeError as e:  # anomaly detection's "Function 'XBackward0' returned nan values in its 0th output"
        if not (cfg.debug.enabled and "nan values" in str(e)):
            raise
        raise CT.NonFiniteLossError(f"stage=contrastive: autograd anomaly detection found NaN at step {trainer.state.global_step + 1}: "
                                    f"{str(e).splitlines()[0]}; last good checkpoint: {checkpoints.last_finite_checkpoint(run_dir / 'checkpoints') or 'none saved'}. "
                                    f"What to try (seed 002): {CT.nan_advice(True)}") from None
    finally:
        if main:
            engine.write_history(run_dir / "train_history.json", trainer)

    # 4. metrics on the same held-out triplets (and injected windows), with the model as before training: without the
    # autocast wrapper accelerate put on its forward for training (a bf16 run generated its "after" answers in bf16, its
    # "before" ones in fp32)
    unwrapped = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    end = CT.representation_metrics(unwrapped, rows[held_name], collator, batch, **fwd)
    if attack:
        attack["end"] = attack_eval(cfg, unwrapped, tokenizer, attacked, held_name, "after")
        end.update(attack["end"][0])
    metrics = {**ctx.partial_metrics, **end, "heldout_triplets": len(held_out), "heldout_split": held_name,
               "train_loss": engine.run_train_loss(trainer, train_out), "train_steps": trainer.state.global_step,
               "trainable_params": trainable, "total_params": total, "truncated_triplets": cut,
               "quantized_modules": modeling.quantized_module_count(model), "fresh_start": int(not cfg.contrastive.init_from),
               "skipped_lines": int(data_info.get("skipped_lines", 0))}  # dataset.skip_bad_lines: in result.json, not only said
    metrics["early_stopped"] = int(0 < trainer.state.global_step < trainer.state.max_steps)
    if trainer.state.best_metric is not None:
        metrics[f"best_eval_{cfg.contrastive.early_stopping.metric}"] = trainer.state.best_metric

    # 5. artifacts: rank 0 writes them; the others wait at the same barrier
    name = "adapter" if hasattr(unwrapped, "peft_config") else "model"
    artifacts = {name: name, "checkpoints": "checkpoints", "train_history": "train_history.json"}
    if not main:
        trainer.accelerator.wait_for_everyone()
        return {"metrics": metrics, "artifacts": artifacts}
    modeling.save_pretrained_atomic(unwrapped, tokenizer, run_dir / name)
    if name == "adapter":  # an adapter on SFT full weights: infer/evaluate load it there (modeling.adapter_base)
        from sectune.stages.rl import base_model_artifact

        artifacts.update(base_model_artifact(sft_weights, run_dir))
    if attack:  # the classic bar on the same windows, by rank 0 alone (it writes the metrics)
        from sectune.evaluation.injection_baseline import baseline_beside

        baseline_metrics, attack_baseline = baseline_beside(records, attacked, held_name)
        metrics.update(baseline_metrics)
        write_json_atomic(run_dir / "injection_eval.json", {"split": held_name, "windows": len(attacked), "baseline": attack_baseline,
                                                            **{k: {"metrics": m, "windows": w} for k, (m, w) in attack.items()}})
        artifacts["injection_eval"] = "injection_eval.json"
    if trainer.state.best_model_checkpoint:
        artifacts["best_checkpoint"] = os.path.relpath(Path(trainer.state.best_model_checkpoint).resolve(), run_dir.resolve())
    engine.plot_loss_curve(run_dir / "plots" / "loss_curve.png", engine.loss_history(trainer), f"contrastive · {modeling.model_title(cfg.model)}")
    artifacts["loss_curve"] = "plots/loss_curve.png"
    metrics.update(engine.peak_memory())
    metrics["train_runtime_s"] = round(time.perf_counter() - t0, 2)
    print(f"sectune: done · {name} at {run_dir / name} · {held_name} causal discrimination "
          f"{metrics['causal_discrimination_start']:.4f} → {metrics['causal_discrimination']:.4f} · {metrics['train_steps']} steps")
    if attack:
        from sectune.evaluation.injection_eval import accuracy_name

        print(f"sectune: attack success {metrics['attack_success_rate_start']:.3f} → {metrics['attack_success_rate']:.3f} · clean "
              f"{accuracy_name(attacked)} {metrics['clean_verdict_accuracy_start']:.3f} → {metrics['clean_verdict_accuracy']:.3f} "
              f"({len(attacked)} {held_name} windows)")
    trainer.accelerator.wait_for_everyone()
    return {"metrics": metrics, "artifacts": artifacts}


def check_config(cfg: DictConfig) -> None:
    if cfg.loss.name != "causal_contrastive":
        raise ConfigError(f"stage=contrastive loss={cfg.loss.name}: use loss=causal_contrastive")
    c = cfg.contrastive
    if c.forward not in CT.FORWARDS:
        raise ConfigError(f"contrastive.forward={c.forward!r}: choose one of {', '.join(CT.FORWARDS)}")
    if c.pooling not in CT.POOLINGS:
        raise ConfigError(f"contrastive.pooling={c.pooling!r}: choose one of {', '.join(CT.POOLINGS)}")
    # the eval metrics CausalContrastiveTrainer logs (eval_<name>): what early stopping and the best checkpoint can follow
    # (a typo failed after the first evaluation with transformers' KeyError on metric_for_best_model)
    if c.early_stopping.metric not in EVAL_METRICS:
        raise ConfigError(f"contrastive.early_stopping.metric={c.early_stopping.metric!r}: choose one of {', '.join(EVAL_METRICS)}")
    if int(c.early_stopping.patience) < 0 or not (math.isfinite(c.early_stopping.min_delta) and c.early_stopping.min_delta >= 0):
        raise ConfigError(f"contrastive.early_stopping: patience={c.early_stopping.patience} must be >= 0 (0 = never stop early) and "
                          f"min_delta={c.early_stopping.min_delta} >= 0")
    if c.early_stopping.mode not in MODES:
        raise ConfigError(f"contrastive.early_stopping.mode={c.early_stopping.mode!r}: choose max or min")
    if not (math.isfinite(cfg.loss.temperature) and cfg.loss.temperature > 0):
        raise ConfigError(f"loss.temperature={cfg.loss.temperature}: must be > 0 (τ divides the cosine similarities)")
    weights = ("lambda_consistency", "lambda_separation", "lambda_task")
    for key in weights:
        if not (math.isfinite(cfg.loss[key]) and cfg.loss[key] >= 0):
            raise ConfigError(f"loss.{key}={cfg.loss[key]}: must be >= 0 (a term's weight; 0 = that term off; a negative "
                              "weight trains the model the wrong way on it)")
    if not any(cfg.loss[key] for key in weights):
        raise ConfigError(f"{', '.join(f'loss.{key}' for key in weights)}: all 0, so nothing trains; weight at least one")


def load_triplets(cfg: DictConfig):
    """The dataset's triplets (``sectune.data.injection.TripletData``: ``splits`` and ``info``, e.g. skipped lines)."""
    from sectune.data.injection import triplet_data

    return triplet_data(cfg)


def triplet_prompts(rec: dict) -> dict:
    """The three prompts a model sees and the benign answer: the record's rendered ones, else auth-log windows
    rendered with ``auth_logs.render_prompt`` (the SFT/infer prompt)."""
    from sectune.data.auth_logs import render_prompt

    def prompt(rendered: str, raw: str) -> str:
        if rec.get(rendered):
            return rec[rendered]
        return rec[raw] if rec.get("format") == "prompt" else render_prompt(rec[raw])

    return {"id": rec.get("id"), "output": rec["output"], "prompt": prompt("prompt", "benign"),
            "cf_prompt": prompt("cf_prompt", "benign_cf"), "injection_prompt": prompt("injection_prompt", "injection")}


def build_model(cfg: DictConfig, path: str):
    """(trainable model, where it started, the SFT full-weights folder a trained adapter sits on or None, the
    ``init_from`` folder or None).

    ``contrastive.init_from``: an SFT (or DPO/RL) adapter is loaded trainable onto the weights it was trained on
    (``modeling.adapter_base``: the model, or the SFT weights its run's ``artifacts.base_model`` names; with
    ``lora=none`` it is merged into them, which are then trained in full); SFT full weights are the base (under a
    fresh adapter with LoRA); unset = the base model."""
    from peft import PeftModel

    init_from = cfg.contrastive.init_from
    if not init_from:
        return modeling.apply_lora(modeling.load_model(cfg, path=path), cfg), f"the base model {path}", None, None
    kind, folder = init_source(str(init_from), "contrastive.init_from")
    try:
        if kind == "model":
            model = modeling.apply_lora(modeling.load_model(cfg, path=str(folder)), cfg)
            return model, f"the SFT weights in {folder}", folder if cfg.lora.enabled else None, folder
        base_path = modeling.adapter_base(folder, cfg)
        warn_other_quantization(cfg, folder, f"contrastive.init_from={init_from}", merged=not cfg.lora.enabled)
        on_sft = Path(base_path).resolve() if base_path != path else None
        base = modeling.load_model(cfg, path=base_path)
        where = f"the adapter in {folder}" + (f" on the SFT weights in {on_sft}" if on_sft else "")
        if cfg.lora.enabled:
            return PeftModel.from_pretrained(base, str(folder), is_trainable=True), f"{where} (its LoRA settings)", on_sft, folder
        model = PeftModel.from_pretrained(base, str(folder))
        if modeling.untie_lora_bases(model):
            print(f"sectune: the adapter in {folder} adapts the LM head, which {modeling.model_label(cfg.model)} ties to its input "
                  "embeddings: merged into its own copy (the embeddings stay as the adapter left them), so the full weights "
                  "trained and saved here hold both matrices (tie_word_embeddings false)")
        return model.merge_and_unload(), f"{where}, merged (full fine-tune)", None, folder
    except SectuneError:
        raise
    except Exception as e:  # noqa: BLE001 - every load failure is the same user error: this folder, this model
        first = first_line(e)
        raise ConfigError(f"contrastive.init_from={init_from}: cannot load the {kind} in {folder} for {modeling.model_label(cfg.model)} "
                          f"({type(e).__name__}: {first})") from None


def attack_eval(cfg: DictConfig, model, tokenizer, records: list[dict], split: str, when: str) -> tuple[dict, list[dict]]:
    """The attack on the held-out injected windows with the model as it is now (``sectune.evaluation.injection_eval``:
    stage=infer's generation, greedy by default), and the same windows clean."""
    from sectune.evaluation.injection_eval import accuracy_name, rate, schema_constraint
    from sectune.evaluation.injection_eval import attack_eval as generate_and_score

    # infer.constrained: schema-constrained decoding, as stage=evaluate scores it (it was ignored here)
    constraint = schema_constraint(cfg, model, tokenizer) if cfg.infer.constrained else None
    # evaluate.batch_size: the batches stage=evaluate generates in, so its numbers for this run's start match _start
    metrics, windows = generate_and_score(model, tokenizer, records, cfg.generation, int(cfg.evaluate.batch_size), constraint=constraint,
                                          max_seq_length=int(cfg.model.max_seq_length))
    metrics["constrained"] = int(constraint is not None)
    print(f"sectune: {when} training, attack success {metrics['attack_success_rate']:.3f} · targeted "
          f"{rate(metrics['targeted_attack_success_rate'])} · clean {accuracy_name(records)} {metrics['clean_verdict_accuracy']:.3f} "
          f"({len(records)} {split} windows, {metrics['generation_s']:.0f}s)")
    return metrics, windows


def training_arguments(cfg: DictConfig, output_dir: Path, has_eval: bool):
    """engine.training_kwargs plus the best-checkpoint settings: checkpoints at the evaluations (so the best one
    exists), the early-stopping metric as Trainer's metric_for_best_model."""
    from transformers import TrainingArguments

    kwargs = engine.training_kwargs(cfg, output_dir, has_eval=has_eval)
    if cfg.debug.enabled:
        kwargs.update(max_steps=int(cfg.debug.max_steps))
    es = cfg.contrastive.early_stopping
    if has_eval and not cfg.train.eval_steps and (int(es.patience) > 0 or cfg.contrastive.load_best_at_end):
        print("sectune: warning: train.eval_steps is null: no evaluation during training, so no early stopping and no best "
              f"checkpoint by {es.metric} (the last step's weights are kept); set train.eval_steps=N for them", file=sys.stderr)
    if not has_eval and (cfg.train.eval_steps and (int(es.patience) > 0 or cfg.contrastive.load_best_at_end)):
        print("sectune: warning: no validation triplets (dataset.val_fraction=0): no evaluation during training, so no early "
              f"stopping and no best checkpoint by {es.metric} (the last step's weights are kept)", file=sys.stderr)
    if has_eval and cfg.train.eval_steps:
        eval_steps = int(cfg.train.eval_steps)
        save_steps = int(cfg.train.save_steps or eval_steps)
        if save_steps % eval_steps:
            raise ConfigError(f"train.save_steps={save_steps} must be a multiple of train.eval_steps={eval_steps}: the best checkpoint is picked at evaluations")
        kwargs.update(save_strategy="steps", save_steps=save_steps, metric_for_best_model=f"eval_{es.metric}",
                      greater_is_better=es.mode == "max", load_best_model_at_end=bool(cfg.contrastive.load_best_at_end))
    return TrainingArguments(**kwargs, remove_unused_columns=False, label_names=[], prediction_loss_only=True,
                             restore_callback_states_from_checkpoint=True)


def build_trainer(cfg: DictConfig, model, tokenizer, train_rows: list[dict], val_rows: list[dict], output_dir: Path, callbacks=()):
    from datasets import Dataset
    from transformers import EarlyStoppingCallback

    args = training_arguments(cfg, output_dir, has_eval=bool(val_rows))
    callbacks = [*engine.fail_callbacks(cfg), *callbacks]
    es = cfg.contrastive.early_stopping
    if args.metric_for_best_model and int(es.patience) > 0:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=int(es.patience), early_stopping_threshold=float(es.min_delta)))
    loss = cfg.loss
    trainer = CT.CausalContrastiveTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(val_rows) if val_rows else None, processing_class=tokenizer,
        data_collator=CT.TripletCollator(tokenizer.pad_token_id), callbacks=callbacks,
        loss_weights={"tau": float(loss.temperature), "lambda_causal": float(loss.lambda_consistency),
                      "lambda_spurious": float(loss.lambda_separation), "lambda_task": float(loss.lambda_task)},
        layer=int(cfg.contrastive.layer), pooling=str(cfg.contrastive.pooling), forward=str(cfg.contrastive.forward),
        share_prefix=bool(cfg.contrastive.share_prefix),
    )
    engine.selective_checkpointing(trainer.model, cfg)
    return trainer


@contextlib.contextmanager
def anomaly_detection(cfg: DictConfig):
    if not cfg.debug.enabled:
        yield
        return
    with torch.autograd.detect_anomaly(check_nan=True):
        yield
