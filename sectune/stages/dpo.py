"""Direct preference optimisation (Rafailov et al. 2023) on chosen/rejected analyses, from an SFT adapter.

    L = -log σ(β·[(log π(y_c|x) − log π_ref(y_c|x)) − (log π(y_r|x) − log π_ref(y_r|x))])

(``sectune.losses.dpo_loss``; TRL's DPOTrainer computes the same sigmoid loss, tests/test_dpo.py holds
the two side by side.) Read top to bottom: pairs → policy (the SFT adapter, trainable) → TRL's
DPOTrainer → held-out preference accuracy before and after → artifacts.

The reference policy never costs a second copy of the weights (``dpo.reference``):
``base`` (default) is the same model with the LoRA adapter disabled; ``init`` is a frozen copy of the
starting adapter (the DPO paper's π_ref = π_SFT; TRL's own default for a loaded adapter, a copy of the
LoRA matrices only). With ``init`` every implicit reward is 0 before training, so
``preference_accuracy_start`` is 0 by construction. ``lora=none`` (full fine-tune) needs a reference
model beside the policy: a second copy of the weights, said on the console.

Held-out numbers come from batched no-grad passes over the test pairs (the reference once, the
policy before and after training): ``preference_accuracy`` (share of pairs whose implicit reward β·log π/π_ref
of the chosen analysis beats the rejected one), per corruption kind, and the policy's log-prob margin
log π(y_c|x) − log π(y_r|x).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import torch

from sectune import losses
from sectune.loss_settings import dpo_loss_types
from sectune.errors import ConfigError, first_line
from sectune.models import modeling
from sectune.run_records import read_policy_run, run_owning, warn_other_quantization
from sectune.runner import RunContext
from sectune.training import checkpoints, engine, packed_attention, samplers

REFERENCES = ("base", "init")


def run(ctx: RunContext) -> dict:
    from sectune.loss_settings import warn_unread_loss

    cfg, run_dir = ctx.cfg, ctx.run_dir
    t0 = time.perf_counter()
    warn_unread_loss(cfg)
    reference = str(cfg.dpo.reference)
    if reference not in REFERENCES:
        raise ConfigError(f"dpo.reference={reference!r}: choose base (the model with the adapter disabled) or init (a frozen copy of the starting adapter)")

    # 1. model: the policy starts from the SFT adapter (or weights); the reference shares its base weights
    path = modeling.model_path(cfg)
    model, ref_model, init_dir = build_policy(cfg, path)
    tokenizer = modeling.tokenizer_for(cfg, init_dir, path)  # the one saved with the weights it starts from
    trainable, total = modeling.trainable_parameters(model)
    start = init_dir or ("a fresh adapter" if cfg.lora.enabled else "the base model")
    print(f"sectune: {modeling.model_title(cfg.model)}: {trainable:,} trainable of {total:,} parameters; starting from {start}; reference: {reference_label(cfg, reference)}")

    # 2. data: pairs split by window; a pair that does not fit model.max_seq_length is left out, since
    # cutting it would cut the answer (or the log lines the answer counts)
    from sectune.data import preference_pairs

    splits = preference_pairs(cfg)
    too_long = 0
    for name in splits:
        splits[name], dropped = fitting_pairs(tokenizer, splits[name], cfg.model.max_seq_length)
        too_long += dropped
    if too_long:
        print(f"sectune: warning: {too_long} pairs exceed model.max_seq_length={cfg.model.max_seq_length} tokens (prompt + the longer answer) and are left out; raise it to keep them")
    train_pairs, val_pairs, test_pairs = splits["train"], splits["validation"], splits["test"]
    if not train_pairs:
        raise ConfigError(f"dataset={cfg.dataset.name}: no training pair fits model.max_seq_length={cfg.model.max_seq_length}")
    heldout, heldout_name = (test_pairs, "test") if test_pairs else (val_pairs, "validation")
    print(f"sectune: {len(train_pairs)} training, {len(val_pairs)} validation and {len(test_pairs)} test pairs ({cfg.dataset.name})")
    if not heldout:
        print("sectune: warning: no validation or test pairs (dataset.val_fraction/test_fraction are 0): no held-out preference accuracy")
    elif not test_pairs:
        print("sectune: warning: no test pairs (dataset.test_fraction=0, or no test example made a pair: an injection triplet "
              "makes one only with an attack target): the held-out numbers are on the validation pairs")

    # 3. trainer
    callbacks = [*engine.fail_callbacks(cfg)]
    trainer = build_dpo_trainer(cfg, model, ref_model, tokenizer, train_pairs, val_pairs, run_dir / "checkpoints", callbacks)
    main = trainer.accelerator.is_main_process
    # tokenized and prepared as the training pairs (EOS added, prompt/answer boundary): scored as training sees pairs
    heldout_ds = trainer._prepare_dataset(to_dataset(tokenizer, heldout), tokenizer, trainer.args, heldout_name) if heldout else None
    metrics: dict = {"train_pairs": len(train_pairs), "heldout_pairs": len(heldout), "too_long_pairs": too_long,
                     "trainable_params": trainable, "total_params": total,
                     **({"heldout_split": heldout_name} if heldout else {})}  # preference_accuracy's pairs
    beta = float(cfg.loss.beta)
    fresh_start = fresh_adapter_on_reference(trainer)  # the policy computes the reference's log-probs exactly
    if heldout_ds is not None:  # before train(): a resumed run loads its checkpoint inside train()
        ref_logps = pair_logps(trainer, heldout_ds, reference=True)  # fixed: training never changes the reference
        # a fresh LoRA adapter over the reference's weights computes the reference's log-probs exactly: no second pass
        start_logps = ref_logps if fresh_start else pair_logps(trainer, heldout_ds)
        start_metrics = preference_metrics(start_logps, ref_logps, heldout_ds["kind"], beta, suffix="_start")
        metrics.update(start_metrics)
        ctx.partial_metrics.update(start_metrics)  # kept in result.json even if training fails
    resume = checkpoints.resolve_resume(cfg, run_dir / "checkpoints")
    try:
        train_out = engine.train(trainer, resume)
    finally:  # the loss history so far is worth keeping even when training dies
        if main:
            engine.write_history(run_dir / "train_history.json", trainer)
    metrics.update(train_loss=engine.run_train_loss(trainer, train_out), train_steps=trainer.state.global_step)
    if heldout_ds is not None:
        metrics.update(preference_metrics(pair_logps(trainer, heldout_ds), ref_logps, heldout_ds["kind"], beta))
    if val_pairs and cfg.train.eval_steps:
        metrics["eval_loss"] = trainer.evaluate()["eval_loss"]  # validation DPO loss: the sweep objective

    # 4. artifacts: written under a temporary name, renamed when complete
    policy = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    is_peft = modeling_is_peft(policy)
    name = "adapter" if is_peft else "model"
    artifacts = {name: name, "checkpoints": "checkpoints", "train_history": "train_history.json"}
    weights = None if init_dir is None else Path(init_dir) if not (Path(init_dir) / "adapter_config.json").is_file() \
        else Path(modeling.adapter_base(init_dir, cfg))
    if is_peft and weights is not None and weights.resolve() != Path(path).resolve():
        artifacts["base_model"] = os.path.relpath(weights.resolve(), run_dir.resolve())  # the SFT weights it sits on
    if not main:
        trainer.accelerator.wait_for_everyone()
        return {"metrics": metrics, "artifacts": artifacts}
    if is_peft and "ref" in policy.peft_config:
        policy.delete_adapter("ref")  # the saved adapter is the policy alone, loadable with plain PEFT
    modeling.save_pretrained_atomic(policy, tokenizer, run_dir / name)
    engine.plot_loss_curve(run_dir / "plots" / "loss_curve.png", engine.loss_history(trainer), f"dpo · {modeling.model_title(cfg.model)} · β={beta}")
    artifacts["loss_curve"] = "plots/loss_curve.png"

    metrics.update(engine.peak_memory())
    metrics["train_runtime_s"] = round(time.perf_counter() - t0, 2)
    if heldout_ds is not None:
        # a fresh adapter is the reference exactly: every implicit reward is 0, a tie, which counts as not preferred
        tied = " (every pair tied: the fresh adapter is the reference)" if fresh_start else ""
        print(
            f"sectune: done · {name} at {run_dir / name} · {heldout_name} preference accuracy "
            f"{metrics['preference_accuracy_start']:.3f}{tied} → {metrics['preference_accuracy']:.3f} · log-prob margin "
            f"{metrics['logp_margin_start']:.2f} → {metrics['logp_margin']:.2f} · {metrics['train_runtime_s']:.0f}s"
        )
    else:
        print(f"sectune: done · {name} at {run_dir / name} · train loss {metrics['train_loss']:.4f} · {metrics['train_runtime_s']:.0f}s")
    trainer.accelerator.wait_for_everyone()
    return {"metrics": metrics, "artifacts": artifacts}


# ------------------------------------------------------------------------------------------ data
def fitting_pairs(tokenizer, pairs: list[dict], max_len: int) -> tuple[list[dict], int]:
    """The pairs whose prompt + answer + EOS (as they are trained, :func:`pair_ids`) fit ``max_len``, and how many did not."""
    from sectune.inference import pair_lengths

    if not pairs:
        return pairs, 0
    prompts = [p["prompt"] for p in pairs]
    chosen, rejected = pair_lengths(tokenizer, prompts, [p["chosen"] for p in pairs]), pair_lengths(tokenizer, prompts, [p["rejected"] for p in pairs])
    keep = [p for p, a, b in zip(pairs, chosen, rejected) if max(a, b) <= max_len]
    return keep, len(pairs) - len(keep)


def pair_ids(tokenizer, pair: dict) -> tuple[list[int], list[int], list[int]]:
    """(prompt, chosen + EOS, rejected + EOS) ids as TRL's DPOTrainer splits a pair (the answers start where the prompt's
    ids and either prompt + answer's ids first differ, TRL's ``common_prefix_length``), the text as text
    (:func:`sectune.inference.prompt_completion_ids`): given strings, TRL appends EOS as text and tokenizes the whole,
    so a ``</s>`` in a log line became an end of text inside the prompt (an audit, session 43)."""
    from trl.data_utils import common_prefix_length

    from sectune.inference import prompt_completion_ids

    prompt, chosen = prompt_completion_ids(tokenizer, pair["prompt"], pair["chosen"])
    rejected = prompt_completion_ids(tokenizer, pair["prompt"], pair["rejected"])[1]
    n = min(common_prefix_length(prompt, chosen), common_prefix_length(prompt, rejected))
    return prompt[:n], chosen[n:], rejected[n:]


def to_dataset(tokenizer, pairs: list[dict]):
    """The pairs tokenized (:func:`pair_ids`), which the trainer takes as they are (its ``_prepare_dataset``)."""
    from datasets import Dataset

    rows = []
    for p in pairs:
        prompt, chosen, rejected = pair_ids(tokenizer, p)
        rows.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected, "kind": p.get("kind") or "pair"})
    return Dataset.from_list(rows)


# ----------------------------------------------------------------------------------------- model
def modeling_is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def reference_label(cfg, reference: str) -> str:
    if not cfg.lora.enabled:
        return "a frozen copy of the starting weights (lora=none: a second copy of the weights in memory)"
    return "the model with the adapter disabled" if reference == "base" else "a frozen copy of the starting adapter"


def init_source(init_from: str, want: str) -> Path:
    """``dpo.init_from``: an SFT run dir (its result.json names the artifact) or the artifact folder itself.

    ``want`` is ``adapter`` (a LoRA adapter, adapter_config.json) or ``model`` (full weights, config.json).
    """
    marker = "adapter_config.json" if want == "adapter" else "config.json"
    p = Path(init_from).expanduser()
    key = f"dpo.init_from={init_from}"
    if not p.exists():
        raise ConfigError(f"{key}: {p} does not exist (give an SFT run dir with result.json, or its {want}/ folder)")
    is_adapter = (p / "adapter_config.json").is_file()
    owner = run_owning(p) if is_adapter or (p / "config.json").is_file() else None
    if owner is not None:  # <failed run>/adapter: refused as its run dir is (an audit, session 36)
        read_policy_run(owner, key)
    if want == "adapter" and is_adapter:
        return checkpoints.require_weights(p, want, key)
    if want == "model" and (p / "config.json").is_file() and not is_adapter:
        return checkpoints.require_weights(p, want, key)
    result = p / "result.json"
    if not result.is_file():
        if want == "model" and is_adapter:
            raise ConfigError(f"{key}: {p} holds a LoRA adapter; lora=none starts from full weights (an SFT run with lora=none), or drop lora=none")
        if want == "adapter" and (p / "config.json").is_file():
            raise ConfigError(f"{key}: {p} holds full model weights, not a LoRA adapter (use lora=none to start from them)")
        raise ConfigError(f"{key}: {p} has neither result.json (an SFT run dir) nor {marker} (an {want} folder)")
    res, artifacts = read_policy_run(result, key)
    rel = artifacts.get(want)
    if not rel:
        have = ", ".join(sorted(artifacts)) or "none"
        raise ConfigError(
            f"{key}: {result} lists no {want!r} artifact (stage={res.get('stage')}, status={res.get('status')}, "
            f"artifacts: {have}); a LoRA SFT run saves 'adapter', a lora=none run 'model'"
        )
    folder = p / rel
    if not (folder / marker).is_file():
        raise ConfigError(f"{key}: {folder} (artifacts.{want} of {result}) has no {marker}")
    return checkpoints.require_weights(folder, want, key)


def sft_weights(init_from: str) -> Path | None:
    """The full-weights folder when ``dpo.init_from`` is a ``lora=none`` SFT run (or its model/ folder), else None."""
    p = Path(init_from).expanduser()
    if (p / "config.json").is_file() and not (p / "adapter_config.json").is_file():
        return p
    try:
        arts = json.loads((p / "result.json").read_text(encoding="utf-8")).get("artifacts") or {}
    except (OSError, ValueError, AttributeError):
        return None
    if arts.get("adapter") or not arts.get("model"):
        return None
    return init_source(init_from, "model")


def build_policy(cfg, path: str):
    """(policy, reference model or None, the folder it started from or None).

    LoRA: the SFT adapter loaded trainable onto the base model (``init_from=null``: a fresh one);
    the reference is that same model (TRL switches the adapter off, or to a frozen copy, for it).
    ``lora=none``: full weights (the SFT run's, or the base model's), and a second copy as the reference.
    """
    init_from = cfg.dpo.init_from
    if not cfg.lora.enabled:
        start = str(init_source(init_from, "model")) if init_from else path
        if not init_from:
            print("sectune: warning: dpo.init_from is not set; DPO starts from the base model, not from an SFT run")
        policy = modeling.load_model(cfg, path=start)
        ref = modeling.load_model(cfg, path=start).eval().requires_grad_(False)
        return policy, ref, (Path(start) if init_from else None)
    if not init_from:
        print("sectune: warning: dpo.init_from is not set; DPO trains a fresh LoRA adapter on the base model, not an SFT policy")
        return modeling.apply_lora(modeling.load_model(cfg, path=path), cfg), None, None
    weights = sft_weights(init_from)
    if weights is not None:  # a lora=none SFT run: a fresh adapter on its weights, which are the reference
        print(f"sectune: the SFT run saved full weights ({weights}); DPO trains a fresh LoRA adapter on them")
        return modeling.apply_lora(modeling.load_model(cfg, path=str(weights)), cfg), None, weights
    folder = init_source(init_from, "adapter")
    warn_other_quantization(cfg, folder, f"dpo.init_from={init_from}")
    base = modeling.load_model(cfg, path=modeling.adapter_base(folder, cfg))  # an RL/contrastive adapter may sit on SFT weights
    from peft import PeftModel

    try:
        model = PeftModel.from_pretrained(base, str(folder), is_trainable=True)
    except Exception as e:  # noqa: BLE001 - any load failure is the same user error: this adapter, this model
        first = first_line(e)
        raise ConfigError(f"dpo.init_from={init_from}: cannot load the adapter in {folder} onto {modeling.model_label(cfg.model)} ({type(e).__name__}: {first})") from None
    print(f"sectune: LoRA settings come from the SFT adapter (r={model.peft_config['default'].r}); lora.* is not applied")
    return model, None, folder


# --------------------------------------------------------------------------------------- trainer
def build_dpo_trainer(cfg, model, ref_model, tokenizer, train_pairs, val_pairs, output_dir: Path, callbacks=()):
    from trl import DPOConfig, DPOTrainer

    has_eval = bool(val_pairs) and bool(cfg.train.eval_steps)
    loss_types, loss_weights = dpo_loss_types(cfg)
    kwargs = engine.training_kwargs(cfg, output_dir, has_eval=has_eval)
    # train.group_by_length: batches of similar total length (prompt + longer answer), a seeded order
    group = kwargs.pop("train_sampling_strategy") == "group_by_length"
    args = DPOConfig(
        **kwargs,
        beta=float(cfg.loss.beta),
        # the paper's loss (sectune.losses.dpo_loss), robust DPO with loss.label_smoothing > 0 (the flip probability),
        # plus dpo.sft_weight × the chosen answer's NLL (RPO): loss_settings.dpo_loss_types
        label_smoothing=float(cfg.loss.label_smoothing),
        loss_type=loss_types,
        loss_weights=loss_weights,
        # every pair fits (fitting_pairs): no truncation happens; were it to, the answer's start is kept
        max_length=cfg.model.max_seq_length,
        truncation_mode="keep_start",
        precompute_ref_log_probs=False,  # the reference forward is cheap (adapter off) and stays exact under resume
        dataset_num_proc=None,
    )

    class Trainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            # to_dataset tokenized the pairs, the text as text; TRL 1.16 tokenizes any dataset it is given again. What
            # it does after tokenizing is kept: a pair whose prompt alone fills max_length (keep_start) is dropped
            if "prompt_ids" not in dataset.column_names:
                return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
            if args.max_length is None or args.truncation_mode != "keep_start":  # TRL's own guard (keep_end drops none)
                return dataset
            return dataset.filter(lambda row: len(row["prompt_ids"]) < args.max_length)

        def _get_train_sampler(self, train_dataset=None):
            if not group:
                return super()._get_train_sampler(train_dataset)
            ds = train_dataset if train_dataset is not None else self.train_dataset
            lengths = [len(p) + max(len(c), len(r)) for p, c, r in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"])]
            return samplers.seeded_length_grouped_sampler(self, ds, lengths=lengths)

    with engine.trainable_weights_kept(model):
        trainer = Trainer(
            model=model,
            ref_model=ref_model,
            args=args,
            train_dataset=to_dataset(tokenizer, train_pairs),
            eval_dataset=to_dataset(tokenizer, val_pairs) if has_eval else None,
            processing_class=tokenizer,
            callbacks=list(callbacks),
        )
    if cfg.dpo.reference == "base" and modeling_is_peft(trainer.model) and "ref" in trainer.model.peft_config:
        # TRL copies a PEFT model's adapter to a frozen "ref" adapter; without one, its reference
        # forward disables the adapters instead
        trainer.model.delete_adapter("ref")
    packed_attention.compact_fused_lm_head()  # the LM head scores the answer tokens only, not the long prompt
    if engine.selective_checkpointing(trainer.model, cfg):
        keep_checkpointing_kwargs(trainer)
    return trainer


def keep_checkpointing_kwargs(trainer) -> None:
    """TRL switches checkpointing off around each reference forward and back on with ``args``' kwargs:
    hand it the selective policy's, or the first step would silently fall back to full checkpointing."""
    import functools

    for m in trainer.model.modules():
        fn = getattr(m, "_gradient_checkpointing_func", None)
        if getattr(m, "gradient_checkpointing", False) and isinstance(fn, functools.partial):
            trainer.args.gradient_checkpointing_kwargs = dict(fn.keywords)
            return


# ------------------------------------------------------------------------------------ evaluation
@contextlib.contextmanager
def as_reference(trainer):
    """The reference policy, as TRL's training forward uses it: the ref model, or the same PEFT model
    with its frozen "ref" adapter active, or with the adapters disabled."""
    if trainer.ref_model is not None:
        yield trainer.ref_model
        return
    from trl.trainer.utils import use_adapter

    model = trainer.model
    with use_adapter(model, adapter_name="ref" if "ref" in model.peft_config else None):
        yield model


def fresh_adapter_on_reference(trainer) -> bool:
    """The policy is the reference, exactly: the reference is this model with its adapters disabled, and
    the active adapter is LoRA whose every ``lora_B`` is still zero (PEFT's initialisation), so each
    adapted layer adds exactly 0 to the frozen layer's output."""
    model = trainer.model
    if trainer.ref_model is not None or not modeling_is_peft(model) or "ref" in model.peft_config:
        return False
    from peft import PeftType

    if model.peft_config[model.active_adapter].peft_type != PeftType.LORA or getattr(model.peft_config[model.active_adapter], "use_dora", False):
        return False
    bs = [p for n, p in model.named_parameters() if ".lora_B." in n or ".lora_embedding_B." in n]
    return bool(bs) and all(not p.any() for p in bs)


def completion_logps(model, batch: dict) -> torch.Tensor:
    """Summed log-probs of the completion tokens of each row (TRL's fused LM head: no full logits)."""
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels, fused_lm_head=True, use_cache=False)
    return out.log_probs.float().sum(dim=1)


@torch.no_grad()
def pair_logps(trainer, dataset, reference: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of every pair's chosen and rejected answer under the policy (or the reference),
    in dataset order: one no-grad pass, batches of ``train.eval_batch_size`` pairs of similar length."""
    model = trainer.model
    was_training = model.training
    model.eval()
    n = len(dataset)
    lengths = [len(p) + max(len(c), len(r)) for p, c, r in zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"])]
    order = sorted(range(n), key=lambda i: lengths[i])
    bs = trainer.args.per_device_eval_batch_size
    chosen, rejected = [], []
    try:
        for start in range(0, n, bs):
            batch = trainer.data_collator([dataset[i] for i in order[start : start + bs]])
            batch = {k: v.to(trainer.accelerator.device) for k, v in batch.items()}
            with trainer.accelerator.autocast(), (as_reference(trainer) if reference else contextlib.nullcontext(model)) as m:
                c, r = completion_logps(m, batch).cpu().chunk(2)
            chosen.append(c)
            rejected.append(r)
    finally:
        model.train(was_training)
    unsort = torch.empty(n, dtype=torch.long)
    unsort[torch.tensor(order)] = torch.arange(n)
    return torch.cat(chosen)[unsort], torch.cat(rejected)[unsort]


def preference_metrics(policy: tuple, ref: tuple, kinds: list[str], beta: float, suffix: str = "") -> dict:
    """Held-out preference accuracy (implicit reward of chosen > rejected; ties count as wrong),
    per corruption kind, the policy's log-prob margin, the implicit reward margin and the DPO loss."""
    args = (*policy, *ref)
    r_chosen, r_rejected = losses.dpo_implicit_rewards(*args, beta)
    correct = (r_chosen > r_rejected).float()
    out = {
        f"preference_accuracy{suffix}": correct.mean().item(),
        f"logp_margin{suffix}": (policy[0] - policy[1]).mean().item(),
        f"reward_margin{suffix}": (r_chosen - r_rejected).mean().item(),
        f"heldout_dpo_loss{suffix}": losses.dpo_loss(*args, beta).item(),
    }
    for kind in sorted(set(kinds)):
        mask = torch.tensor([k == kind for k in kinds])
        out[f"preference_accuracy_{kind}{suffix}"] = correct[mask].mean().item()
    return out
