"""Bradley-Terry reward model on chosen/rejected analyses (seed 000's reward stage, done better).

Read top to bottom: preference pairs (split by window) → memory check (stage=plan's estimate vs
the device's free memory; seed 000's "≥ 7 GB?" branch) → either the heuristic reward model or a
one-output ``…ForSequenceClassification`` (LoRA SEQ_CLS; PEFT saves the ``score`` head with the
adapter) trained by Trainer with :func:`sectune.losses.bradley_terry_loss` → held-out pairwise
accuracy, overall and per corruption kind → ``reward_model/`` (+ ``reward_model.json``).

Why not TRL's RewardTrainer: it runs prompt + chosen and prompt + rejected as two padded rows per
pair, encoding the shared prompt (~600 of ~700 tokens of an auth-log pair) twice. Here the pairs of
a prompt are one row (:class:`sectune.models.reward_model.SharedPromptCollator`): the prompt once, then
the chosen and every rejected analysis, each attending to the prompt and itself only, and the head
reads only their last positions (bench/reward_throughput.py measures the difference). A batch is
``train.batch_size`` prompts with all their pairs. Trainer still owns the loop, accumulation,
precision, checkpoints and W&B.
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import torch
from omegaconf import OmegaConf
from transformers import Trainer, TrainingArguments

from sectune.data.auth_preferences import preference_splits
from sectune.errors import ConfigError
from sectune.losses import bradley_terry_loss
from sectune.models import modeling
from sectune.models import reward_model as RM
from sectune.runner import RunContext, init_source, write_json_atomic
from sectune.training import checkpoints, distributed, engine
from sectune.training.memory import levers_left, memory_check

FALLBACKS = ("error", "heuristic")


def run(ctx: RunContext) -> dict:
    from sectune.loss_settings import warn_unread_loss

    cfg, run_dir = ctx.cfg, ctx.run_dir
    t0 = time.perf_counter()
    warn_unread_loss(cfg)
    if cfg.reward.fallback not in FALLBACKS:
        raise ConfigError(f"reward.fallback={cfg.reward.fallback!r}: choose one of {', '.join(FALLBACKS)}")

    # 1. data
    splits = preference_splits(cfg)
    held_out = splits["test"] or splits["validation"]
    held_name = "test" if splits["test"] else "validation"
    print(f"sectune: {len(splits['train'])} train / {len(splits['validation'])} validation / {len(splits['test'])} test pairs "
          f"({cfg.dataset.name}, split by window)")

    # 2. memory check, then the heuristic or a trained reward model
    fits, why = memory_check(cfg, sequences_per_example=2)
    if cfg.reward.force_fallback or not fits:
        if not cfg.reward.force_fallback and cfg.reward.fallback == "error":
            left = ", ".join([*levers_left(cfg), "a smaller train.batch_size or model.max_seq_length"]
                             + ([] if str(cfg.lora.name) == "r4_attention" else ["lora=r4_attention"]))
            raise ConfigError(f"stage=reward does not fit: {why}. Lower it ({left}) or set "
                              f"reward.fallback=heuristic to use the heuristic reward model")
        reason = "reward.force_fallback=true" if cfg.reward.force_fallback else why
        print(f"sectune: using the HEURISTIC reward model instead of training one ({reason})")
        return heuristic(cfg, run_dir, held_out, held_name, reason, t0)
    print(f"sectune: memory check: {why}")
    return train(ctx, splits, held_out, held_name, t0)


# ----------------------------------------------------------------------------- heuristic


def heuristic(cfg, run_dir: Path, held_out: list[dict], held_name: str, reason: str, t0: float) -> dict:
    scorer = RM.HeuristicRewardModel()
    metrics = {"fallback": 1, **pair_metrics(scorer.score, held_out)}
    out = run_dir / "reward_model"
    if distributed.is_main_process():  # no Trainer here: under torchrun every rank wrote it through one temporary folder
        tmp = out.with_name(".reward_model.tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        write_json_atomic(tmp / RM.HEURISTIC_FILE, scorer.spec)
        write_json_atomic(tmp / RM.META_FILE, {"kind": "heuristic", "reason": reason})
        _replace_dir(tmp, out)
    metrics["heldout_split"] = held_name  # reward_accuracy is on these pairs (validation where there is no test)
    metrics["runtime_s"] = round(time.perf_counter() - t0, 2)
    _report(metrics, held_name, "heuristic reward model")
    return {"metrics": metrics, "artifacts": {"reward_model": "reward_model"}}


# ------------------------------------------------------------------------------- training


class BradleyTerryTrainer(Trainer):
    """Trainer whose loss is :func:`bradley_terry_loss` over a padding-free row of pairs.

    A batch row is a prompt with *all* its pairs, so micro-batches of ``train.batch_size`` prompts can hold different
    numbers of pairs. The loss of an optimizer step is the mean over every pair of the step (all ``train.grad_accum``
    micro-batches, all processes): each micro-batch contributes its pair sum over the step's pair count, as
    transformers' ``num_items_in_batch`` does for tokens. A per-micro-batch mean divided by ``grad_accum`` weighted a
    pair by 1/(pairs of its micro-batch), so ``batch_size=4 grad_accum=1`` and ``batch_size=2 grad_accum=2`` trained
    (and logged) different things on the same pairs."""

    loss_is_scaled_for_ga = True  # compute_loss divides by the step's pair count itself (transformers >= 5.19)

    def __init__(self, *args, margin: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.margin = margin

    def _get_num_items_in_batch(self, batch_samples: list, device) -> torch.Tensor:
        """Pairs in the optimizer step: every micro-batch of the accumulation, summed over the processes."""
        n = torch.tensor(sum(int(b["pairs"].shape[0]) for b in batch_samples), device=device)
        if self.args.world_size > 1:
            n = self.accelerator.gather(n).sum()
        return n

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        r = RM.sequence_rewards(model, inputs)
        pairs = inputs["pairs"]
        loss = bradley_terry_loss(r[pairs[:, 0]], r[pairs[:, 1]], self.margin)
        if num_items_in_batch is not None:  # training: this micro-batch's share of the step's mean over pairs
            # DDP averages the processes' gradients: × num_processes makes that average the sum over the step's pairs
            loss = loss * (pairs.shape[0] * self.accelerator.num_processes / torch.as_tensor(num_items_in_batch).clamp(min=1))
        return (loss, {"rewards": r[pairs]}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, out = self.compute_loss(model, inputs, return_outputs=True)
        return loss.detach(), None if prediction_loss_only else out["rewards"].detach(), None


def train(ctx: RunContext, splits: dict, held_out: list[dict], held_name: str, t0: float) -> dict:
    from datasets import Dataset

    cfg, run_dir = ctx.cfg, ctx.run_dir
    path = start_weights(cfg)
    tokenizer = modeling.load_tokenizer(cfg, path)
    model = modeling.load_model(cfg, task="seq_cls", num_labels=1, path=path)
    modeling.pad_like_tokenizer(model, tokenizer)
    model = modeling.apply_lora(model, cfg, task_type="SEQ_CLS")  # PEFT adds the score head to modules_to_save
    trainable, total = modeling.trainable_parameters(model)
    print(f"sectune: {modeling.model_title(cfg.model)} (one-output score head): {trainable:,} trainable of {total:,} parameters")

    max_len = int(cfg.model.max_seq_length)
    train_rows, cut = RM.encode_pair_groups(tokenizer, splits["train"], max_len)
    val_rows, vcut = RM.encode_pair_groups(tokenizer, splits["validation"], max_len)
    if cut + vcut:
        print(f"sectune: warning: {cut + vcut} prompts + completions exceed model.max_seq_length={max_len}; the prompt's middle was cut (as infer cuts it)")
    kwargs = engine.training_kwargs(cfg, run_dir / "checkpoints", has_eval=bool(val_rows))
    # (under torchrun / accelerate the process group starts here: the scoring below is shared out across the ranks)
    args = TrainingArguments(**kwargs, remove_unused_columns=False, label_names=[], prediction_loss_only=True)
    scorer = RM.TrainedRewardModel(model, tokenizer, max_len, batch_size=int(cfg.train.eval_batch_size or cfg.train.batch_size))
    score = _shared_across_ranks(scorer.score)
    start = pair_metrics(score, held_out)
    print(f"sectune: before training: held-out pairwise accuracy {start['reward_accuracy']:.3f}")

    trainer = BradleyTerryTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(val_rows) if val_rows else None, processing_class=tokenizer,
        data_collator=RM.SharedPromptCollator(tokenizer.pad_token_id), callbacks=engine.fail_callbacks(cfg),
        margin=float(cfg.loss.margin),
    )
    engine.selective_checkpointing(trainer.model, cfg)
    # Under torchrun every rank runs this: training, evaluate() and the scoring are collective, writing is rank 0's.
    main = trainer.accelerator.is_main_process
    try:
        train_out = engine.train(trainer, checkpoints.resolve_resume(cfg, run_dir / "checkpoints"))
    finally:
        if main:
            engine.write_history(run_dir / "train_history.json", trainer)

    # before the unwrap below, which takes accelerate's autocast off the model in place: in train.precision, as during training
    eval_loss = trainer.evaluate()["eval_loss"] if val_rows else None
    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    scorer.model = model.eval()
    metrics = {"fallback": 0, "train_loss": engine.run_train_loss(trainer, train_out), "train_steps": trainer.state.global_step,
               "trainable_params": trainable, "total_params": total, "truncated_prompts": cut + vcut,
               "quantized_modules": modeling.quantized_module_count(model),
               "reward_accuracy_start": start["reward_accuracy"], "reward_margin_start": start["reward_margin"]}
    if eval_loss is not None:
        metrics["eval_loss"] = eval_loss
    metrics.update(pair_metrics(score, held_out))
    # the classic baseline on the same pairs: seed 000's heuristic fallback (rules, no weights)
    metrics.update({f"heuristic_{k}": v for k, v in pair_metrics(RM.HeuristicRewardModel().score, held_out).items()
                    if k in ("reward_accuracy", "reward_margin")})
    norm = score_stats(score, splits["validation"] or splits["train"])
    metrics.update(score_mean=norm["score_mean"], score_std=norm["score_std"])
    artifacts = {"reward_model": "reward_model", "checkpoints": "checkpoints", "train_history": "train_history.json",
                 "loss_curve": "plots/loss_curve.png"}
    if not main:  # rank 0 saves and plots; the others wait at the same barrier
        trainer.accelerator.wait_for_everyone()
        return {"metrics": metrics, "artifacts": artifacts}

    out = run_dir / "reward_model"
    modeling.save_pretrained_atomic(model, tokenizer, out)
    write_json_atomic(out / RM.META_FILE, {"kind": "trained", "base_model": path, "max_length": max_len,
                                           "model": cfg.model.name, "lora": bool(cfg.lora.enabled), "quantization": cfg.quantization.name,
                                           # every setting of it: rl scores on the very base it trained on (a name alone
                                           # let fp4 or int8 settings under the name nf4 pass: an audit, session 41)
                                           "quantization_settings": OmegaConf.to_container(cfg.quantization, resolve=True), **norm})
    RM.check_head(out)
    engine.plot_loss_curve(run_dir / "plots" / "loss_curve.png", engine.loss_history(trainer), f"reward · {modeling.model_title(cfg.model)}")
    metrics.update(engine.peak_memory())
    metrics["heldout_split"] = held_name  # reward_accuracy is on these pairs (validation where there is no test)
    metrics["runtime_s"] = round(time.perf_counter() - t0, 2)
    _report(metrics, held_name, f"reward model at {out}")
    trainer.accelerator.wait_for_everyone()
    return {"metrics": metrics, "artifacts": artifacts}


def _shared_across_ranks(score):
    """``score(prompts, completions)`` with the prompts shared out across the ranks (each prompt's completions on one
    rank, encoded once) and the scores gathered back on every rank: under torchrun each rank holds the same trained
    weights, so every rank reports the same held-out numbers. One process: ``score`` itself."""
    return lambda prompts, completions: distributed.gathered(score, prompts, completions, key=prompts)


def start_weights(cfg) -> str:
    """The folder the reward model's weights start from: ``reward.init_from``'s SFT full weights, else the base model."""
    init_from = cfg.reward.get("init_from")
    if not init_from:
        return modeling.model_path(cfg)
    if str(init_from) == "sft":
        raise ConfigError("reward.init_from=sft names a pipeline's sft step; outside a pipeline give the SFT run dir")
    kind, folder = init_source(str(init_from), "reward.init_from")
    if kind != "model":
        raise ConfigError(f"reward.init_from={init_from}: {folder} is a LoRA adapter; the reward model starts from full SFT "
                          f"weights (an SFT run with lora=none), or leave reward.init_from unset to start from the base model")
    print(f"sectune: the reward model starts from the SFT weights in {folder}")
    return str(folder)


# ------------------------------------------------------------------------------- metrics


def score_stats(score, pairs: list[dict]) -> dict:
    """Mean and standard deviation of the scores of ``pairs``' chosen and rejected completions (the
    validation pairs; the training pairs when there are none): what GRPO standardises the reward model's
    score by (``TrainedRewardModel.unit_score``), so its ``rl.rewards`` weight means what the rule rewards' do."""
    prompts = [p["prompt"] for p in pairs] * 2
    s = torch.tensor(score(prompts, [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]), dtype=torch.float64)
    std = s.std().item() if len(s) > 1 else 0.0
    return {"score_mean": s.mean().item(), "score_std": std if std > 1e-6 else 1.0, "score_stats_from": len(s)}


def pair_metrics(score, pairs: list[dict]) -> dict:
    """Held-out pairwise accuracy (chosen strictly above rejected), per corruption kind, and the mean
    reward margin r_chosen − r_rejected."""
    if not pairs:
        return {}
    prompts = [p["prompt"] for p in pairs]
    # one call: a window's chosen and rejected answers (and its other pairs') share one encoding of its prompt
    rc, rr = torch.tensor(score(prompts * 2, [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs])).chunk(2)
    right = (rc > rr).float()
    out = {"reward_accuracy": right.mean().item(), "reward_margin": (rc - rr).mean().item(), "heldout_pairs": len(pairs)}
    by = defaultdict(list)
    for p, ok in zip(pairs, right.tolist()):
        by[p["kind"]].append(ok)
    out.update({f"reward_accuracy_{k}": sum(v) / len(v) for k, v in sorted(by.items())})
    return out


def _report(metrics: dict, split: str, what: str) -> None:
    kinds = {k[len("reward_accuracy_"):]: v for k, v in metrics.items() if k.startswith("reward_accuracy_") and k != "reward_accuracy_start"}
    beside = (f" (the heuristic fallback on the same pairs: {metrics['heuristic_reward_accuracy']:.3f})"
              if "heuristic_reward_accuracy" in metrics else "")
    print(f"sectune: {what}: {split} pairwise accuracy {metrics.get('reward_accuracy', float('nan')):.3f}, "
          f"margin {metrics.get('reward_margin', float('nan')):.3f}{beside}")
    if kinds:
        print("sectune: per kind: " + ", ".join(f"{k} {v:.2f}" for k, v in kinds.items()))


def _replace_dir(tmp: Path, out: Path) -> None:
    modeling.replace_dir(tmp, out)
