"""Supervised fine-tuning: prompt → expert answer, loss on the answer tokens only.

Read top to bottom: data → model (+ quantization, + LoRA) → TRL's SFTTrainer → artifacts.
TRL owns the loop; by default (``train.packing=padding_free``) each batch of examples is flattened
into one row with position ids restarting per example: padding only up to a multiple of 64 tokens,
no example attends to another, and memory follows the real tokens (see bench/sft_throughput.py).
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from sectune import data
from sectune.errors import ConfigError
from sectune.models import modeling
from sectune.runner import RunContext, write_json_atomic
from sectune.training import checkpoints, engine, packed_attention, samplers
from sectune.stages.sft_warmup import WARMUP_DIR, warmup

PROBE_FILE = "checks/probe_logits.safetensors"
#: how many of each position's largest logits the probe keeps (:func:`save_probe_logits`)
PROBE_TOP_K = 16


def run(ctx: RunContext) -> dict:
    cfg, run_dir = ctx.cfg, ctx.run_dir
    from sectune.loss_settings import warn_unread_loss

    warn_unread_loss(cfg)  # loss.* keys this stage's loss does not read, said
    t0 = time.perf_counter()
    warm = warmup(ctx)  # sft.warmup_lines: first the generated windows, in <run dir>/warmup/
    if warm is not None:
        cfg = copy.deepcopy(cfg)
        cfg.model.name_or_path = str(run_dir / WARMUP_DIR / warm["artifacts"]["model"])
        # the seed again: a warm-up trained here advanced the random state and a reused one did not, so the SFT's LoRA
        # (lora_A is drawn) differed between a run and its rerun or resume (an audit, session 41: adapter max |d| 0.19)
        from transformers import set_seed

        set_seed(int(cfg.train.seed))

    # 1. data
    splits = data.sft_splits(cfg)  # by window; the test windows are held out for stage=infer/evaluate
    train_recs, val_recs = splits["train"], splits["validation"]
    records = train_recs + val_recs
    if run_dir.name == WARMUP_DIR:  # the generated windows: their test cut is never scored
        print(f"sectune: warm-up: {len(train_recs)} training and {len(val_recs)} validation examples of generated windows")
    else:
        print(f"sectune: {len(train_recs)} training and {len(val_recs)} validation examples, {data.held_out_windows(splits['test'])} test "
              f"{'sessions' if cfg.dataset.name == 'hdfs' else 'windows'} held out ({cfg.dataset.name})")

    # 2. model
    path = modeling.model_path(cfg)
    tokenizer = modeling.load_tokenizer(cfg, path)
    model = modeling.apply_lora(modeling.load_model(cfg, path=path), cfg)
    if cfg.dataset.name == "hdfs":  # stage=evaluate scores one token per log key: refuse before training, not after
        from sectune.data.hdfs import DEFAULT_PROMPT, load_hdfs
        from sectune.evaluation.anomaly import key_token_ids

        hdfs_data = load_hdfs(cfg)
        num_keys = hdfs_data.num_keys
        try:
            key_token_ids(tokenizer, num_keys, str(cfg.dataset.prompt_template or DEFAULT_PROMPT))
        except ConfigError as e:  # +experiment=hdfs_detect lists HDFS_v1's 28 keys; a user's logs may have more
            raise ConfigError(f"dataset=hdfs: stage=evaluate could not score a model trained with this tokenizer: {e} "
                              f"(+experiment=hdfs_detect adds ' 1' … ' 28' whole; these logs have {num_keys} keys, "
                              f"so model.tiny.extra_tokens must list ' 1' … ' {num_keys}')") from None
    trainable, total = modeling.trainable_parameters(model)
    too_long = count_too_long(tokenizer, train_recs + val_recs, cfg.model.max_seq_length)
    print(f"sectune: {modeling.model_title(cfg.model)}: {trainable:,} trainable of {total:,} parameters")

    # 3. trainer
    resume = checkpoints.resolve_resume(cfg, run_dir / "checkpoints")
    start_file = run_dir / "checkpoints" / "eval_loss_start.json"
    if val_recs and resume and start_file.exists():
        try:
            ctx.partial_metrics["eval_loss_start"] = float(json.loads(start_file.read_text(encoding="utf-8"))["eval_loss_start"])
        except (OSError, ValueError, KeyError, TypeError) as e:  # damaged: resumed as if it were missing, said
            print(f"sectune: warning: {start_file} is damaged ({type(e).__name__}: {e}); the eval loss from before "
                  "training is not known for this resumed run", file=sys.stderr)
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
    dropped = dropped_examples(trainer, cfg, len(train_recs), len(val_recs))
    if too_long:
        print(f"sectune: warning: {too_long} of {len(records)} examples exceed model.max_seq_length={cfg.model.max_seq_length} "
              f"tokens: {truncation_note(too_long, dropped)}; raise it or shorten the inputs")
    # Under torchrun every rank runs this file; evaluate/train are collective, writing is rank 0's.
    main = trainer.accelerator.is_main_process
    try:
        train_out = engine.train(trainer, resume)
    finally:  # the loss history so far is worth keeping even when training dies
        if main:
            engine.write_history(run_dir / "train_history.json", trainer)
    metrics = {
        "train_loss": engine.run_train_loss(trainer, train_out),
        "train_steps": trainer.state.global_step,
        "trainable_params": trainable,
        "total_params": total,
        "quantized_modules": modeling.quantized_module_count(model),
        "truncated_examples": too_long,
        **({"dropped_examples": sum(dropped.values())} if dropped is not None else {}),
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
    if cfg.dataset.name == "hdfs":  # the split it trained on, which stage=evaluate checks (an audit, session 42)
        from sectune.data.hdfs_splits import RECORD_FILE, split_record

        write_json_atomic(run_dir / RECORD_FILE, split_record(hdfs_data))
        artifacts["splits"] = RECORD_FILE
    history = engine.loss_history(trainer)
    engine.plot_loss_curve(run_dir / "plots" / "loss_curve.png", history, f"sft · {modeling.model_title(cfg.model)} · {cfg.dataset.name}")
    artifacts["loss_curve"] = "plots/loss_curve.png"
    if cfg.quantization.name == "none":
        save_probe_logits(model_unwrapped, tokenizer, [r["prompt"] + r["completion"] for r in (val_recs or train_recs)[:2]], run_dir / PROBE_FILE)
        artifacts["probe_logits"] = PROBE_FILE

    # 5. a look at what the trained model generates
    if cfg.generation.preview_samples and val_recs:
        preview = preview_generations(model_unwrapped, tokenizer, val_recs[: cfg.generation.preview_samples], cfg.generation,
                                      int(cfg.model.max_seq_length))
        write_json_atomic(run_dir / "samples" / "preview.json", preview)
        artifacts["preview"] = "samples/preview.json"
        metrics["preview_json_valid_rate"] = sum(p["valid_json"] for p in preview) / len(preview)
        metrics["preview_schema_valid_rate"] = sum(p["schema_valid"] for p in preview) / len(preview)

    if warm is not None:
        artifacts["warmup"] = WARMUP_DIR
        artifacts["base_model"] = f"{WARMUP_DIR}/{warm['artifacts']['model']}"  # an adapter belongs on these weights
        for k in ("train_loss", "train_steps", "eval_loss", "windows"):
            if k in warm["metrics"]:
                metrics[f"warmup_{k}"] = warm["metrics"][k]
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


def answer_key_weights(cfg, tokenizer, completions: list[str]):
    """``loss.key_weight`` != 1: ``input_ids -> weights`` (:func:`sectune.losses.key_value_weights`) for the first
    tokens of ``loss.weighted_keys``' values; else None. Each key is matched as the tokens of ``"key":``; a key that
    no training answer holds, or that this tokenizer splits otherwise inside an answer, is an error naming it."""
    from functools import partial

    from sectune.losses import key_value_weights

    weight, keys = float(cfg.loss.get("key_weight", 1.0)), list(cfg.loss.get("weighted_keys") or [])
    if weight == 1.0:
        return None
    if cfg.loss.get("label_smoothing"):
        raise ConfigError(f"loss.key_weight={weight:g} with loss.label_smoothing={cfg.loss.label_smoothing}: the smoothed loss is "
                          f"computed from full logits, which the key weights do not reach; use one of the two")
    if weight <= 0 or not keys:
        raise ConfigError(f"loss.key_weight={weight:g} needs a weight > 0 and loss.weighted_keys (the answer keys whose values it stresses); "
                          f"got weighted_keys={keys}")
    patterns = [tokenizer.encode(f'"{k}":', add_special_tokens=False) for k in keys]
    quote = tokenizer.encode('"', add_special_tokens=False)
    fn = partial(key_value_weights, key_patterns=patterns, quote_id=quote[0] if len(quote) == 1 else None, weight=weight)
    for key, pat in zip(keys, patterns):
        holders = [c for c in completions if f'"{key}":' in c][:20]  # a few answers holding the key, tokenized
        if not holders:
            raise ConfigError(f"loss.weighted_keys: no training answer holds the key {key!r} (as \"{key}\":)")
        if not any((key_value_weights(torch.tensor([tokenizer.encode(c, add_special_tokens=False)]), [pat], None, 2.0) > 1).any()
                   for c in holders):
            raise ConfigError(f"loss.weighted_keys: {key!r}: this tokenizer ({modeling.model_title(cfg.model)}) splits \"{key}\": otherwise inside "
                              f"an answer than alone, so its value cannot be found by tokens; leave the key out or use loss.key_weight=1")
    return fn


def build_sft_trainer(cfg, model, tokenizer, train_recs, val_recs, output_dir: Path, callbacks=(), eval_on_start=False):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    def to_ds(recs):
        return Dataset.from_list(sft_rows(tokenizer, recs))

    key_weights = answer_key_weights(cfg, tokenizer, [r["completion"] for r in train_recs])
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
                return samplers.seeded_length_grouped_sampler(self, train_dataset)
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
            if key_weights is None or not self.model.training:
                out = super().compute_loss(model, inputs, *args, **kwargs)
            else:  # loss.key_weight: TRL's own loss and metrics, over per-token log-probs scaled by key_value_weights
                fused = model.forward

                def weighted(*a, **kw):
                    o = fused(*a, **kw)
                    if kw.get("fused_lm_head"):  # log_probs[:, t] scores token t + 1; zero where it is not a label
                        o.log_probs = o.log_probs * key_weights(kw["input_ids"])[:, 1:].to(o.log_probs)
                    return o

                model.forward = weighted
                try:
                    out = super().compute_loss(model, inputs, *args, **kwargs)
                finally:
                    model.forward = fused
            if self.model.training and "attention_mask" not in inputs and "position_ids" in inputs:
                # TRL counts position_ids.size(1), one row, per mask-free batch; packed rows are [B, L]
                local = torch.tensor(engine.real_tokens(inputs["position_ids"]), device=inputs["position_ids"].device)
                self._total_train_tokens = before + self.accelerator.gather_for_metrics(local).sum().item() // self._tp_size
                self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
            return out

    with engine.trainable_weights_kept(model):
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


def sft_rows(tokenizer, recs: list[dict]) -> list[dict]:
    """``{"input_ids", "completion_mask"}`` per record: prompt + completion + EOS as TRL's SFTTrainer tokenizes them,
    the text as text (:func:`sectune.inference.prompt_completion_ids`). Given strings, TRL appends EOS as text and
    tokenizes the whole, so a ``</s>`` in a log line (an attacker's user name) became an end of text inside the
    prompt (an audit, session 43); given ``input_ids`` it tokenizes nothing and truncates, masks and packs as before."""
    from trl.data_utils import common_prefix_length

    from sectune.inference import prompt_completion_ids

    rows, cut = [], []
    for r in recs:
        prompt, full = prompt_completion_ids(tokenizer, r["prompt"], r["completion"])
        n = common_prefix_length(prompt, full)
        rows.append({"input_ids": full, "completion_mask": [0] * n + [1] * (len(full) - n)})
        if n < len(prompt):  # a token spans the boundary: the prompt's end trains as answer (TRL's warning, which
            cut.append(tokenizer.decode(prompt[n:]))  # pre-tokenized rows skip: a review, session 43)
    if cut:
        print(f"sectune: warning: {len(cut)} of {len(recs)} examples' prompts end inside a token that the answer continues "
              f"(e.g. {cut[0]!r}): from there on they train as answer; end the prompt on a token boundary", file=sys.stderr)
    return rows


def dropped_examples(trainer, cfg, n_train: int, n_val: int) -> dict[str, int] | None:
    """Examples TRL left out per split because truncation to ``model.max_seq_length`` kept none of their answer tokens
    (a prompt alone filling it): with ``model.max_seq_length=300`` 188 of 203 training and 40 of 43 validation windows
    went, and the eval loss was over 3 windows without a word (audit AB). None with ``train.packing=bfd``, whose rows
    are packed sequences, not examples."""
    if engine.packing_mode(cfg) == "bfd":
        return None
    kept = {"training": len(trainer.train_dataset), "validation": len(trainer.eval_dataset) if trainer.eval_dataset is not None else 0}
    return {split: n - kept[split] for split, n in (("training", n_train), ("validation", n_val)) if n - kept[split] > 0}


def truncation_note(too_long: int, dropped: dict[str, int] | None) -> str:
    if dropped is None:
        return "each is cut at that length, answer included (train.packing=bfd)"
    if not dropped:
        return "each loses the end of its answer"
    left_out = ", ".join(f"{n} {split}" for split, n in dropped.items())
    rest = too_long - sum(dropped.values())
    return (f"left out, with no answer token once cut: {left_out} (the losses are over the others)"
            + (f"; the other {rest} lose the end of their answer" if rest else ""))


def count_too_long(tokenizer, recs: list[dict], max_len: int) -> int:
    from sectune.inference import pair_lengths

    lengths = pair_lengths(tokenizer, [r["prompt"] for r in recs], [r["completion"] for r in recs])
    return sum(n > max_len for n in lengths)


@torch.no_grad()
def save_probe_logits(model, tokenizer, texts: list[str], path: Path) -> None:
    """The in-memory trained model's :data:`PROBE_TOP_K` largest logits at each position of fixed text (``top_logits``)
    and their token ids (``top_ids``): a reload must reproduce them (every logit was 1 MB on the tiny model, 66 MB on
    Llama-3's vocabulary: session 44)."""
    from safetensors.torch import save_file

    model.eval()
    device = next(model.parameters()).device
    enc = tokenizer(texts[:1], return_tensors="pt", truncation=True, max_length=128).to(device)
    logits = model(**enc).logits.float().cpu()
    top = logits.topk(min(PROBE_TOP_K, logits.shape[-1]), dim=-1)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"input_ids": enc["input_ids"].cpu().contiguous(), "top_logits": top.values.contiguous(),
               "top_ids": top.indices.to(torch.int32).contiguous()}, str(path))


def preview_generations(model, tokenizer, recs: list[dict], gen_cfg, max_seq_length: int | None = None) -> list[dict]:
    from sectune.data.auth_logs import validate_analysis
    from sectune.inference import extract_json, generate
    from sectune.run_records import finite_json

    outs = generate(model, tokenizer, [r["prompt"] for r in recs], gen_cfg, max_seq_length=max_seq_length)
    preview = []
    for rec, text in zip(recs, outs):
        item = {"id": rec.get("id"), "expected": rec["completion"], "generated": text, "valid_json": False, "schema_valid": False}
        try:
            obj = extract_json(text)
            # a count of 1e400 parses as inf, which preview.json wrote as Infinity: not JSON to a strict reader (null, as infer)
            item.update(valid_json=True, parsed=finite_json(obj), schema_valid=not validate_analysis(obj))
        except ValueError as e:
            item["parse_error"] = str(e)
        preview.append(item)
    return preview
