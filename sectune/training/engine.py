"""Builds the trainer for a stage: TRL's trainers where they fit, shared callbacks, resume.

Nothing here is a training loop: Trainer/TRL own the loop, gradient accumulation, mixed precision,
checkpointing with optimizer/scheduler/RNG state, DDP and W&B reporting. This module maps the
``train`` node onto their arguments and adds what they lack (a fault-injection hook for resume tests,
peak-memory accounting); which checkpoint ``train.resume`` takes is :mod:`sectune.training.checkpoints`.
"""

from __future__ import annotations

import contextlib
import functools
import resource
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts
from transformers import TrainerCallback

from sectune import tracking
from sectune.config import PACKING
from sectune.errors import ConfigError
from sectune.models.modeling import device_for
from sectune.training.planner import OPTIMIZERS as PLANNED_OPTIMIZERS

#: train.optimizer's choices (sectune.training.planner.OPTIMIZERS, which the planner's memory model covers) as Trainer's ``optim``
OPTIMIZERS = {name: {"adamw": "adamw_torch"}.get(name, name) for name in PLANNED_OPTIMIZERS}
def require_examples(trainer, cfg: DictConfig, given: dict[str, int], tokenizer=None, prompts=()) -> None:
    """Stop with what to change when truncation to ``model.max_seq_length`` left a split with no
    example (TRL drops those with no answer token left): the sampler would fail on an empty dataset.
    ``given``: examples per split before truncation ({"training": n, "validation": n})."""
    datasets = {"training": trainer.train_dataset, "validation": trainer.eval_dataset}
    for split, n in given.items():
        ds = datasets.get(split)
        if n and ds is not None and len(ds) == 0:
            L = cfg.model.max_seq_length
            shortest = ""
            if tokenizer is not None and prompts:
                from sectune.inference import prompt_ids

                shortest = f"; the shortest prompt is {min(len(ids) for ids in prompt_ids(tokenizer, list(prompts)))} tokens"
            raise ConfigError(f"model.max_seq_length={L}: all {n} {split} examples were dropped, none keeps any answer token "
                              f"once truncated to {L} tokens{shortest}; raise model.max_seq_length")


def precision_flags(cfg: DictConfig) -> dict:
    p = cfg.train.precision
    if p == "fp32":
        if cfg.model.dtype != "fp32":  # the two are separate keys: say what fp32 does not cover (an audit, precision)
            print(f"sectune: warning: train.precision=fp32 with model.dtype={cfg.model.dtype}: the weights load in "
                  f"{cfg.model.dtype}, so the frozen base computes in {cfg.model.dtype}" + (" and the full fine-tune trains "
                  f"{cfg.model.dtype} weights with {cfg.model.dtype} optimizer state" if not cfg.lora.enabled else "")
                  + "; add model.dtype=fp32 for fp32 throughout", file=sys.stderr)
        return {"bf16": False, "fp16": False}
    if p == "bf16":
        return {"bf16": True, "fp16": False}
    if p == "fp16":
        if device_for(cfg) == "cpu":
            # CPU has no fp16 autocast worth the name; bf16 keeps the range and the speed.
            print("sectune: warning: train.precision=fp16 is not supported on CPU; using bf16 autocast instead")
            return {"bf16": True, "fp16": False}
        return {"bf16": False, "fp16": True}
    raise ConfigError(f"train.precision={p!r}: choose fp32, bf16 or fp16")


@contextlib.contextmanager
def trainable_weights_kept(model):
    """Around a TRL trainer's constructor: the trainable weights leave it as they entered it.

    TRL's SFT, DPO and GRPO trainers cast a 4/8-bit model's trainable LoRA weights to bf16 (their QLoRA recipe),
    whatever ``train.precision`` says: fp32 runs trained bf16 adapters with bf16 optimizer state, and under bf16
    autocast the adapters lost their fp32 master copy (at lr 2e-5 an AdamW step moved 6.7% of lora_A's entries,
    the rest rounded away). peft's fp32 adapter is what the other stages train and what the planner counts."""
    kept = [(p, p.data) for p in model.parameters() if p.requires_grad]
    yield
    for p, data in kept:
        if p.data.dtype != data.dtype:
            p.data = data


def packing_mode(cfg: DictConfig) -> str:
    mode = str(cfg.train.packing)
    if mode not in PACKING:
        raise ConfigError(f"train.packing={mode!r}: choose one of {', '.join(PACKING)}")
    return mode


def group_by_length(cfg: DictConfig) -> bool:
    """``train.group_by_length``, where null means: only where grouping saves padding.

    SFT's padding-free batches have none to save, and grouping would put the longest examples in
    one batch, raising the peak memory over a run of random batches (TRL's default) for nothing.
    Classify batches (padded to their longest prompt) are random too: on the injection prompts,
    grouping trained 1.5x faster but scored 0.898 vs 0.909 mean test macro-F1 over 5 seeds
    (experiments/ciciot_gpt2/README.md); ``train.group_by_length=true`` trades that back.
    """
    g = cfg.train.get("group_by_length")
    if g is None:
        return cfg.stage.name == "sft" and cfg.train.get("packing", "none") != "padding_free"
    return bool(g)


def training_kwargs(cfg: DictConfig, output_dir: Path, has_eval: bool) -> dict:
    """The ``train`` node as TrainingArguments keywords (shared by every training stage)."""
    t = cfg.train
    if t.optimizer not in OPTIMIZERS:
        raise ConfigError(f"train.optimizer={t.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
    if t.batch_size < 1 or t.grad_accum < 1:
        raise ConfigError("train.batch_size and train.grad_accum must be >= 1")
    device = device_for(cfg)
    eval_steps = t.eval_steps
    kwargs = dict(
        output_dir=str(output_dir),
        max_steps=t.max_steps,
        num_train_epochs=t.epochs,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.eval_batch_size or t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate,
        optim=OPTIMIZERS[t.optimizer],
        weight_decay=t.weight_decay,
        warmup_steps=float(t.warmup_ratio),  # < 1 is a fraction of the steps in transformers 5
        lr_scheduler_type=t.lr_scheduler,
        max_grad_norm=t.max_grad_norm,
        neftune_noise_alpha=t.neftune_noise_alpha,
        activation_checkpointing=t.gradient_checkpointing,  # transformers 5's name; the seeds say gradient_checkpointing
        logging_steps=t.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if (has_eval and eval_steps) else "no",
        eval_steps=eval_steps,
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        save_total_limit=t.save_total_limit,
        seed=t.seed,
        data_seed=t.seed,
        use_cpu=device == "cpu",
        torch_empty_cache_steps=t.empty_cache_steps,
        dataloader_num_workers=t.num_workers,
        report_to=tracking.report_to(cfg),
        # a NaN or inf step loss is logged as it is (Trainer's default logged it as the running mean: a run whose weights
        # went NaN reported a finite train_loss and was recorded as succeeded, an audit, session 36)
        logging_nan_inf_filter=False,
        run_name=f"{cfg.stage.name}",
        disable_tqdm=False,
        train_sampling_strategy="group_by_length" if group_by_length(cfg) else "random",
        **precision_flags(cfg),
    )
    if t.gradient_checkpointing:
        kwargs["activation_checkpointing_kwargs"] = {"use_reentrant": False}
    return kwargs


@functools.cache
def _saved_ops() -> frozenset:
    aten = torch.ops.aten
    names = ("mm", "addmm", "bmm", "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention", "_flash_attention_forward")
    return frozenset(getattr(aten, n).default for n in names if hasattr(aten, n))


def _keep_matmuls(ctx, op, *args, **kwargs):
    # called for every op inside a checkpointed layer, forward and recompute: the op set is built once
    return CheckpointPolicy.MUST_SAVE if op in _saved_ops() else CheckpointPolicy.PREFER_RECOMPUTE


def selective_checkpointing(model, cfg: DictConfig) -> bool:
    """``train.selective_checkpointing``: checkpoint every layer, but cache the matmul and attention outputs.

    torch's selective activation checkpointing (``create_selective_checkpoint_contexts``): backward
    re-runs each layer's forward with those ops answered from the cache, so only the cheap elementwise
    ops between them run twice. Enabled on the model itself (Trainer's own flag stays off, so it does
    not re-enable plain checkpointing).
    """
    if not cfg.train.selective_checkpointing or cfg.train.get("gradient_checkpointing"):
        return False  # off, or full checkpointing asked for (it takes precedence)
    context_fn = functools.partial(create_selective_checkpoint_contexts, _keep_matmuls)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False, "context_fn": context_fn})
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False
    return True


class FailAtStep(TrainerCallback):
    """``debug.fail_at_step``: die after that global step, as a crash or a kill would."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step >= self.step:
            raise RuntimeError(f"debug.fail_at_step={self.step}: simulated interruption after step {state.global_step}")


def fail_callbacks(cfg: DictConfig) -> list:
    from sectune.training import distributed

    rank = cfg.debug.fail_on_rank
    if not cfg.debug.fail_at_step or (rank is not None and int(rank) != distributed.rank()):
        return []
    return [FailAtStep(cfg.debug.fail_at_step)]


def train(trainer, resume: str | None):
    """``trainer.train(resume_from_checkpoint=resume)``, except that a checkpoint already at ``train.max_steps`` (a run
    killed after its last checkpoint, resumed to finish) trains nothing: transformers' Trainer checks the step count only
    after a step, so mid-epoch it trained step max_steps + 1 and reported it (an audit, session 25: GRPO 9 steps of 8).
    So does a checkpoint at which its run stopped early (it trained on to max_steps). The best checkpoint is loaded as
    Trainer would at the end (``load_best_model_at_end``)."""
    from transformers.trainer_utils import TrainOutput

    from sectune.training.resume_callbacks import (AtMaxSteps, LogAtSave, ResumedBestCheckpoint, ResumedLearningRate,
                                                   StopAtMaxSteps, stopped_early)

    trainer.add_callback(LogAtSave())
    if resume is None:
        return trainer.train()
    stopped = stopped_early(resume)
    added = [StopAtMaxSteps(stopped), ResumedLearningRate(), ResumedBestCheckpoint()]
    for cb in added:
        trainer.add_callback(cb)
    try:
        return trainer.train(resume_from_checkpoint=resume)
    except AtMaxSteps:
        why = "its run stopped early there" if stopped else "= train.max_steps"
        print(f"sectune: {resume} is at step {trainer.state.global_step} ({why}): nothing left to train; finishing the run from it")
        if trainer.args.load_best_model_at_end and trainer.state.best_model_checkpoint is not None:
            trainer._load_best_model()
        trainer.control = trainer.callback_handler.on_train_end(trainer.args, trainer.state, trainer.control)
        return TrainOutput(trainer.state.global_step, 0.0, {})
    except Exception as e:  # noqa: BLE001 - torch's refusal of a pickle holding more than tensors: said as what it means
        from sectune.errors import ConfigError

        if "size mismatch" in str(e):  # a checkpoint of another shape (other LoRA rank, model), its settings record gone
            first = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), "")
            raise ConfigError(f"train.resume: the weights in {resume} do not fit the model these settings build ({first}): "
                              "they were trained with other settings. Resume with the settings they were trained with, or "
                              "train.resume=null to train afresh with these") from None
        if "Weights only load failed" not in str(e):
            raise
        raise ConfigError(f"train.resume: a training-state file in {resume} holds pickled objects beyond tensors and plain "
                          "values, which sectune never loads (torch weights_only=True; loading it could run code): this "
                          "training did not write it as it is. Resume from another checkpoint, or start over") from None
    finally:
        for cb in added:
            trainer.remove_callback(cb)


def peak_rss_bytes() -> int:
    """This process's peak resident memory in bytes.

    On Linux it is ``VmHWM`` of ``/proc/self/status``, the high-water mark of this process's own
    address space. ``ru_maxrss`` is not used there: ``execve`` folds the old address space's
    high-water mark into it, and with ``vfork`` (what Python's ``subprocess`` uses) that old address
    space is the parent's, so a run started by a 1.5 GB pytest or launcher reported >= 1.5 GB
    whatever it used itself. Elsewhere (macOS: bytes) ``ru_maxrss`` is all there is."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss * (1 if sys.platform == "darwin" else 1024)


def reset_peak_rss() -> bool:
    """Restart the ``VmHWM`` high-water mark from the current RSS (Linux >= 4.0); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def reset_peaks() -> None:
    """Restart this process's peak RSS and (when CUDA is up) torch's peak GPU memory: a sweep's job or a pipeline's
    step then reports its own peaks in result.json, not the largest of everything the process ran before it."""
    reset_peak_rss()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory() -> dict:
    """Peak resident memory of this process (and of CUDA, when used), in bytes."""
    out = {"peak_rss_bytes": peak_rss_bytes()}
    if torch.cuda.is_available():
        out["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()  # live tensors
        # what the process held: torch's cache (reserved) + the CUDA context and workspaces outside it;
        # the figure to hold against stage=plan's prediction (bench/gpu_memory.py measures the same way)
        out["peak_cuda_footprint_bytes"] = torch.cuda.max_memory_reserved() + cuda_outside_allocator_bytes()
    return out


def cuda_outside_allocator_bytes() -> int:
    """GPU memory in use beyond torch's caching allocator: the CUDA context, cuBLAS/cuDNN workspaces
    (and other processes on the same GPU, which this cannot tell apart)."""
    free, total = torch.cuda.mem_get_info()
    return max(0, (total - free) - torch.cuda.memory_reserved())


def loss_history(trainer) -> dict[str, list]:
    """Per-step train loss, gradient norm and eval loss from Trainer's log history (survives resume)."""
    train, evals, grad_norm = [], [], []
    for rec in trainer.state.log_history:
        if "loss" in rec and "step" in rec:
            train.append((rec["step"], rec["loss"]))
        if "grad_norm" in rec and "step" in rec:
            grad_norm.append((rec["step"], rec["grad_norm"]))
        if "eval_loss" in rec and "step" in rec:
            evals.append((rec["step"], rec["eval_loss"]))
    return {"train": train, "eval": evals, "grad_norm": grad_norm}


def run_train_loss(trainer, train_out) -> float:
    """The mean train loss over the whole run. Trainer's ``training_loss`` covers the steps of this ``train()`` call
    only, so after ``train.resume`` it left out every step before the checkpoint; those come back from the loss
    the checkpoint's log history holds for them (Trainer logs it rounded to 4 digits), weighted by the steps each
    logged value covers."""
    start, end = int(getattr(trainer, "_initial_global_step", 0) or 0), int(trainer.state.global_step)
    if start <= 0 or end < start:
        return train_out.training_loss
    total, last = 0.0, 0
    for rec in trainer.state.log_history:
        if "loss" in rec and "step" in rec and last < rec["step"] <= start:
            total, last = total + float(rec["loss"]) * (rec["step"] - last), rec["step"]
    if end == start:  # resumed from a checkpoint at the last step: nothing trained here (Trainer reports a loss of 0.0)
        return total / last if last else train_out.training_loss
    return (total + train_out.training_loss * (end - start)) / (last + end - start)


def write_history(path: Path, trainer) -> None:
    from sectune.runner import finite_json, write_json_atomic

    write_json_atomic(path, finite_json(loss_history(trainer)))  # a NaN step as null: bare NaN is not JSON (session 36)


def plot_loss_curve(path: Path, history: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    if history["train"]:
        ax.plot(*zip(*history["train"]), label="train loss", lw=1.2)
    if history["eval"]:
        ax.plot(*zip(*history["eval"]), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


class PackedRowsCollator:
    """Packed rows as a ``[batch, longest_row]`` tensor with per-example ``position_ids``.

    TRL's padding-free collator flattens a batch into one long row, which is ideal for
    FlashAttention's varlen kernels but costs O((batch·len)²) attention with SDPA/eager (CPU,
    most consumer GPUs). Keeping the rows and passing ``position_ids`` without an attention mask
    lets transformers build a block-diagonal causal mask per row: no example attends to another.
    Pad tokens get position 0, so each is a one-token "document" that nothing real attends to.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = 8):
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        self._inner = DataCollatorForLanguageModeling(
            pad_token_id=pad_token_id, padding_free=False, return_position_ids=True, pad_to_multiple_of=pad_to_multiple_of
        )

    def __call__(self, examples: list[dict]) -> dict:
        batch = self._inner(examples)
        batch.pop("attention_mask", None)
        # No token predicts the first token of the next example packed after it.
        batch["labels"][batch["position_ids"] == 0] = -100
        # transformers detects packed rows only without a KV cache (TRL's compute_loss also sets this).
        batch["use_cache"] = False
        return batch


class FlatBatchCollator:
    """A batch of examples flattened into one ``[1, Σ lengths]`` row with per-example ``position_ids``.

    TRL's padding-free layout (``DataCollatorForLanguageModeling(padding_free=True)``): no padding
    beyond rounding the row up to ``pad_to_multiple_of``, and activation memory in proportion to the
    batch's real tokens. Attention stays within each example: :mod:`sectune.training.packed_attention` runs
    one causal SDPA call per example (FA2 reads the boundaries from ``position_ids`` itself).
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = 64):
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        # The row is padded to a multiple of 64 tokens (~0.6% of a 5k-token batch): oneDNN keeps
        # compiled kernels per matmul shape, so a new length every step would grow CPU memory step
        # after step (bench/README.md, "Memory that grows with every new shape").
        self._inner = DataCollatorForLanguageModeling(pad_token_id=pad_token_id, padding_free=True, pad_to_multiple_of=pad_to_multiple_of)

    def __call__(self, examples: list[dict]) -> dict:
        batch = self._inner(examples)
        batch["use_cache"] = False
        return batch


def real_lengths(position_ids: torch.Tensor) -> torch.Tensor:
    """Per ``PackedRowsCollator`` row, its length without padding (the trailing run of position 0)."""
    nonzero = position_ids != 0
    return torch.where(nonzero.any(-1), position_ids.shape[-1] - nonzero.flip(-1).int().argmax(-1), 0)


def real_tokens(position_ids: torch.Tensor) -> int:
    """Non-pad tokens in a batch of ``PackedRowsCollator`` rows."""
    return int(real_lengths(position_ids).sum())
