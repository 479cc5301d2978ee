"""Supervised fine-tuning: prompt → expert answer, loss on the answer tokens only.

Read top to bottom: data → model (+ quantization, + LoRA) → TRL's SFTTrainer → artifacts.
TRL owns the loop; by default (``train.packing=padding_free``) each batch of examples is flattened
into one row with position ids restarting per example: padding only up to a multiple of 64 tokens,
no example attends to another, and memory follows the real tokens (see bench/sft_throughput.py).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from sectune import data, engine, modeling, packed_attention
from sectune.runner import RunContext, write_json_atomic

PROBE_FILE = "checks/probe_logits.safetensors"


def run(ctx: RunContext) -> dict:
    cfg, run_dir = ctx.cfg, ctx.run_dir
    t0 = time.perf_counter()

    # 1. data
    splits = data.sft_splits(cfg)  # by window; the test windows are held out for stage=infer/evaluate
    train_recs, val_recs = splits["train"], splits["validation"]
    records = train_recs + val_recs
    print(f"sectune: {len(train_recs)} training and {len(val_recs)} validation examples, {data.held_out_windows(splits['test'])} test windows "
          f"held out ({cfg.dataset.name})")

    # 2. model
    path = modeling.model_path(cfg)
    tokenizer = modeling.load_tokenizer(cfg, path)
    model = modeling.apply_lora(modeling.load_model(cfg, path=path), cfg)
    trainable, total = modeling.trainable_parameters(model)
    too_long = count_too_long(tokenizer, train_recs + val_recs, cfg.model.max_seq_length)
    if too_long:
        print(
            f"sectune: warning: {too_long} of {len(records)} examples exceed model.max_seq_length="
            f"{cfg.model.max_seq_length} tokens and lose the end of their answer; raise it or shorten the inputs"
        )
    print(f"sectune: {cfg.model.name}: {trainable:,} trainable of {total:,} parameters")

    # 3. trainer
    resume = engine.resolve_resume(cfg, run_dir / "checkpoints")
    start_file = run_dir / "checkpoints" / "eval_loss_start.json"
    if val_recs and resume and start_file.exists():
        ctx.partial_metrics["eval_loss_start"] = json.loads(start_file.read_text())["eval_loss_start"]
    # The eval loss before training comes from Trainer's own eval_on_start, inside train(): a
    # trainer.evaluate() before train() leaves the model un-wrapped by DDP under torchrun, so the
    # ranks would never sync their gradients (tests/test_distributed.py catches it).
    eval_on_start = bool(val_recs) and "eval_loss_start" not in ctx.partial_metrics
    callbacks = [*engine.fail_callbacks(cfg)]
    if eval_on_start:
        callbacks.append(RecordStartEval(start_file, ctx.partial_metrics))
    trainer = build_sft_trainer(cfg, model, tokenizer, train_recs, val_recs, run_dir / "checkpoints", callbacks, eval_on_start=eval_on_start)
    engine.require_examples(trainer, cfg, {"training": len(train_recs), "validation": len(val_recs)}, tokenizer,
                            [r["prompt"] for r in records])
    # Under torchrun every rank runs this file; evaluate/train are collective, writing is rank 0's.
    main = trainer.accelerator.is_main_process
    try:
        train_out = trainer.train(resume_from_checkpoint=resume)
    finally:  # the loss history so far is worth keeping even when training dies
        if main:
            engine.write_history(run_dir / "train_history.json", trainer)
    metrics = {
        "train_loss": train_out.training_loss,
        "train_steps": trainer.state.global_step,
        "trainable_params": trainable,
        "total_params": total,
        "quantized_modules": modeling.quantized_module_count(model),
        "truncated_examples": too_long,
    }
    if val_recs:
        if "eval_loss_start" in ctx.partial_metrics:
            metrics["eval_loss_start"] = ctx.partial_metrics["eval_loss_start"]
        else:
            print("sectune: warning: no eval loss from before training (resumed without checkpoints/eval_loss_start.json)")
        metrics["eval_loss"] = trainer.evaluate()["eval_loss"]

    # 4. artifacts: written under a temporary name, renamed when complete
    # Without accelerate's mixed-precision wrapper: what is saved is what a reload computes (fp32 forward).
    model_unwrapped = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    is_peft = hasattr(model_unwrapped, "peft_config")
    name = "adapter" if is_peft else "model"
    artifacts = {name: name, "checkpoints": "checkpoints", "train_history": "train_history.json"}
    if not main:  # rank 0 saves, probes and previews; the others wait at the same barrier
        trainer.accelerator.wait_for_everyone()
        return {"metrics": metrics, "artifacts": artifacts}
    modeling.save_pretrained_atomic(model_unwrapped, tokenizer, run_dir / name)
    history = engine.loss_history(trainer)
    engine.plot_loss_curve(run_dir / "plots" / "loss_curve.png", history, f"sft · {cfg.model.name} · {cfg.dataset.name}")
    artifacts["loss_curve"] = "plots/loss_curve.png"
    if cfg.quantization.name == "none":
        save_probe_logits(model_unwrapped, tokenizer, [r["prompt"] + r["completion"] for r in (val_recs or train_recs)[:2]], run_dir / PROBE_FILE)
        artifacts["probe_logits"] = PROBE_FILE

    # 5. a look at what the trained model generates
    if cfg.generation.preview_samples and val_recs:
        preview = preview_generations(model_unwrapped, tokenizer, val_recs[: cfg.generation.preview_samples], cfg.generation)
        write_json_atomic(run_dir / "samples" / "preview.json", preview)
        artifacts["preview"] = "samples/preview.json"
        metrics["preview_json_valid_rate"] = sum(p["valid_json"] for p in preview) / len(preview)
        metrics["preview_schema_valid_rate"] = sum(p["schema_valid"] for p in preview) / len(preview)

    metrics.update(engine.peak_memory())
    metrics["train_runtime_s"] = round(time.perf_counter() - t0, 2)
    print(
        f"sectune: done · {name} at {run_dir / name} · train loss {metrics['train_loss']:.4f}"
        + (f" · eval loss {metrics.get('eval_loss_start', float('nan')):.3f} → {metrics['eval_loss']:.3f}" if val_recs else "")
        + f" · {metrics['train_runtime_s']:.0f}s · peak RSS {metrics['peak_rss_bytes'] / 2**30:.2f} GiB"
    )
    trainer.accelerator.wait_for_everyone()
    return {"metrics": metrics, "artifacts": artifacts}


class RecordStartEval(TrainerCallback):
    """Keeps the step-0 eval loss (``eval_on_start``) in the metrics and, on rank 0, in a file a resume reads."""

    def __init__(self, path: Path, metrics: dict):
        self.path, self.metrics = path, metrics

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        if state.global_step != 0 or not metrics or "eval_loss" not in metrics:
            return
        self.metrics["eval_loss_start"] = metrics["eval_loss"]
        if state.is_world_process_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path, {"eval_loss_start": metrics["eval_loss"]})


def build_sft_trainer(cfg, model, tokenizer, train_recs, val_recs, output_dir: Path, callbacks=(), eval_on_start=False):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    def to_ds(recs):
        return Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in recs])

    packing = engine.packing_mode(cfg)
    args = SFTConfig(
        **engine.training_kwargs(cfg, output_dir, has_eval=bool(val_recs)),
        max_length=cfg.model.max_seq_length,  # each example is truncated to it (bfd: each packed row)
        packing=packing == "bfd",
        packing_strategy="bfd",
        completion_only_loss=True,
        dataset_num_proc=None,
        eval_on_start=eval_on_start,
        label_smoothing_factor=cfg.loss.label_smoothing,  # loss=causal_lm's label_smoothing (0 = off)
    )
    class Trainer(SFTTrainer):
        def _get_train_sampler(self, train_dataset=None):
            if self.args.train_sampling_strategy == "group_by_length":
                return engine.seeded_length_grouped_sampler(self, train_dataset)
            return super()._get_train_sampler(train_dataset)

        # Per-example attention for packed rows, over the forward and the backward (checkpoint recompute).
        def training_step(self, model, inputs, *args, **kwargs):
            with packed_attention.packed_segments(inputs):
                return super().training_step(model, inputs, *args, **kwargs)

        def prediction_step(self, model, inputs, *args, **kwargs):
            with packed_attention.packed_segments(inputs):
                return super().prediction_step(model, inputs, *args, **kwargs)

        def compute_loss(self, model, inputs, *args, **kwargs):
            before = self._total_train_tokens
            out = super().compute_loss(model, inputs, *args, **kwargs)
            if self.model.training and "attention_mask" not in inputs and "position_ids" in inputs:
                # TRL counts position_ids.size(1), one row, per mask-free batch; packed rows are [B, L]
                local = torch.tensor(engine.real_tokens(inputs["position_ids"]), device=inputs["position_ids"].device)
                self._total_train_tokens = before + self.accelerator.gather_for_metrics(local).sum().item() // self._tp_size
                self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
            return out

    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=to_ds(train_recs),
        eval_dataset=to_ds(val_recs) if val_recs else None,
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )
    # Set after construction: TRL refuses a custom collator together with its padding-free flag.
    if packing == "bfd":
        trainer.data_collator = engine.PackedRowsCollator(tokenizer.pad_token_id)
    elif packing == "padding_free":
        trainer.data_collator = engine.FlatBatchCollator(tokenizer.pad_token_id)
    if packing != "none":
        packed_attention.install()
    packed_attention.compact_fused_lm_head()
    engine.selective_checkpointing(trainer.model, cfg)
    return trainer


def count_too_long(tokenizer, recs: list[dict], max_len: int) -> int:
    lengths = [len(ids) + 1 for ids in tokenizer([r["prompt"] + r["completion"] for r in recs])["input_ids"]]
    return sum(n > max_len for n in lengths)


@torch.no_grad()
def save_probe_logits(model, tokenizer, texts: list[str], path: Path) -> None:
    """Logits of the in-memory trained model on fixed text: a reload must reproduce them."""
    from safetensors.torch import save_file

    model.eval()
    device = next(model.parameters()).device
    enc = tokenizer(texts[:1], return_tensors="pt", truncation=True, max_length=128).to(device)
    logits = model(**enc).logits.float().cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"input_ids": enc["input_ids"].cpu(), "logits": logits.contiguous()}, str(path))


def preview_generations(model, tokenizer, recs: list[dict], gen_cfg) -> list[dict]:
    from sectune.data.auth_logs import validate_analysis
    from sectune.inference import extract_json, generate

    outs = generate(model, tokenizer, [r["prompt"] for r in recs], gen_cfg)
    preview = []
    for rec, text in zip(recs, outs):
        item = {"id": rec.get("id"), "expected": rec["completion"], "generated": text, "valid_json": False, "schema_valid": False}
        try:
            obj = extract_json(text)
            item.update(valid_json=True, parsed=obj, schema_valid=not validate_analysis(obj))
        except ValueError as e:
            item["parse_error"] = str(e)
        preview.append(item)
    return preview
