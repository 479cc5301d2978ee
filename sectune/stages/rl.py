"""Reinforcement learning from an SFT policy: ``loss=grpo`` (real GRPO) or ``loss=simplified_ppo`` (seed 000's recipe).

``loss=grpo`` — group relative policy optimisation (Shao et al. 2024) on TRL's GRPOTrainer. For each train
window the policy samples G = ``rl.num_generations`` analyses; each is scored by the weighted rewards of
``rl.rewards`` (``sectune.data.auth_rewards``: json_valid, schema_valid, verdict, fields; ``reward_model``
from a ``stage=reward`` run); advantages are the rewards normalised within their group, and the loss is
the clipped surrogate plus β·KL to the reference (``sectune.losses.grpo_loss``, which TRL computes).
The policy is a LoRA adapter; the reference is the same model with the adapter disabled
(``rl.reference=base``) or a frozen copy of the starting adapter (``init``): never a second copy of the
base weights. TRL 1.16 itself copies a loaded adapter to a frozen "ref" adapter (``init``); with
``base`` that copy is dropped. Each reward is its own TRL reward function, so TRL logs its mean and std
every step beside the total reward, KL, clip fraction and completion length (W&B through Trainer's
``report_to``, ``train_history.json``, ``plots/reward_curve.png``). The generation and scoring passes share
each prompt across its G completions (``sectune.training.grpo_trainer``, ``rl.shared_prompt``).

``loss=simplified_ppo`` — kept to reproduce seed 000, and said plainly: it is supervised fine-tuning under
another name, not PPO. Causal-LM loss on the answer tokens of the highest-quality train windows
(:func:`highest_quality`), the seed's settings (conf/loss/simplified_ppo.yaml): learning rate halved,
at most 50 steps, batch 1, grad-accum 4, Adafactor.

Both start from ``rl.init_from`` (an SFT run dir or its adapter/model folder) and train on the train windows
only: the test windows stay held out for the analyst's table. The memory check (``stage=plan``'s estimate
for batch × G sequences) runs first.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from sectune import data
from sectune.errors import ConfigError, SectuneError, first_line
from sectune.evaluation.rl_rewards import heldout_rewards, reward_functions
from sectune.inference import pair_lengths, prompt_ids
from sectune.losses import GRPO_SCALES
from sectune.models import modeling
from sectune.runner import RunContext, finite_json, init_source, write_json_atomic
from sectune.run_records import warn_other_quantization
from sectune.training import checkpoints, distributed, engine
from sectune.training.memory import levers_left, memory_check
from sectune.training.rl_progress import HeldOutBest, curve_metrics, plot_reward_curve, rl_history

LOSSES = ("grpo", "simplified_ppo")
REFERENCES = ("base", "init")
LOSS_TYPES = ("dapo", "grpo")
#: seed 000's simplified PPO trained on its 20 best examples
SIMPLIFIED_PPO_EXAMPLES = 20
SFT_NOTE = ("loss=simplified_ppo is supervised fine-tuning under another name (seed 000's 'simplified PPO'): causal-LM "
            "loss on the best train examples; no reward, no sampling, no clipped policy ratio. It is not PPO.")


def run(ctx: RunContext) -> dict:
    cfg = ctx.cfg
    loss = cfg.loss.name
    if loss not in LOSSES:
        raise ConfigError(f"stage=rl loss={loss}: choose loss=grpo (group relative policy optimisation) or loss=simplified_ppo (seed 000's recipe)")
    if not cfg.lora.enabled:
        raise ConfigError("stage=rl trains a LoRA adapter (its reference is the same model with the adapter off): choose a lora preset, e.g. lora=r4_attention")
    G = int(cfg.rl.num_generations) if loss == "grpo" else 1
    fits, why = memory_check(cfg, sequences_per_example=G)
    if not fits:
        left = levers_left(cfg)
        raise ConfigError(f"stage=rl does not fit: {why} for train.batch_size={cfg.train.batch_size} × {G} sequences. Lower "
                          f"rl.num_generations, train.batch_size, rl.max_completion_length or model.max_seq_length"
                          + (f", or use {' / '.join(left)}" if left else ""))
    print(f"sectune: memory check: {why}")
    return run_grpo(ctx) if loss == "grpo" else run_simplified_ppo(ctx)


# ----------------------------------------------------------------------------------------- policy
def build_policy(cfg, path: str):
    """(trainable PEFT policy, what it started from, fresh adapter?, the SFT weights folder or None, the folder it
    started from (weights or adapter) or None). An SFT
    adapter is loaded trainable; SFT full weights get a fresh LoRA adapter on top (the policy is still π_SFT at
    step 0, and the saved adapter belongs on those weights). An unset or unloadable ``rl.init_from`` is an
    error unless ``rl.allow_fresh_adapter=true``."""
    from peft import PeftModel

    init_from = cfg.rl.init_from
    try:
        if not init_from:
            raise ConfigError("rl.init_from is not set (give the SFT run dir the policy starts from)")
        kind, folder = init_source(str(init_from))
        try:
            if kind == "model":
                model = modeling.apply_lora(modeling.load_model(cfg, path=str(folder)), cfg)
                return model, f"the SFT weights in {folder} under a fresh LoRA adapter", False, folder, folder
            # the weights the SFT adapter was trained on: model.name_or_path, or its run's artifacts.base_model (sft.warmup_lines;
            # an earlier RL run's on SFT full weights); recorded again, so that this run's adapter is loaded on them too
            base = modeling.adapter_base(folder, cfg)
            warn_other_quantization(cfg, folder, f"rl.init_from={init_from}")
            model = PeftModel.from_pretrained(modeling.load_model(cfg, path=base), str(folder), is_trainable=True)
        except SectuneError:
            raise
        except Exception as e:  # noqa: BLE001 - every load failure is the same user error: this folder, this model
            first = first_line(e)
            raise ConfigError(f"rl.init_from={init_from}: cannot load the {kind} in {folder} for {modeling.model_label(cfg.model)} ({type(e).__name__}: {first})") from None
        weights = Path(base) if Path(base).resolve() != Path(modeling.model_path(cfg)).resolve() else None
        return model, f"the SFT adapter in {folder} (its LoRA settings; lora.* not applied)", False, weights, folder
    except ConfigError as e:
        if not cfg.rl.allow_fresh_adapter:
            raise ConfigError(f"{e}; or set rl.allow_fresh_adapter=true to start from a fresh adapter") from None
        print(f"sectune: warning: {e}. rl.allow_fresh_adapter=true: starting from a FRESH LoRA adapter on the base model (metrics.fresh_adapter=1)")
        return modeling.apply_lora(modeling.load_model(cfg, path=path), cfg), "a fresh LoRA adapter (rl.allow_fresh_adapter)", True, None, None


def policy_weights(cfg) -> str:
    """The weights :func:`build_policy`'s adapter will sit on, read without loading them: ``rl.init_from``'s SFT full
    weights, the base its SFT adapter was trained on (``modeling.adapter_base``), else ``model.name_or_path`` (no or an
    unloadable ``rl.init_from``: the fresh adapter's, or the stage refuses it by name). The memory check decides with it
    whether the reward model rides on the policy's model (``reward_model.share_with_policy``), as the stage will."""
    path = modeling.model_path(cfg)
    if not cfg.rl.init_from:
        return path
    try:
        kind, folder = init_source(str(cfg.rl.init_from))
        return str(folder) if kind == "model" else modeling.adapter_base(folder, cfg)
    except ConfigError:
        return path


def policy_bias(cfg) -> str:
    """``bias`` of the adapter :func:`build_policy` trains (an SFT adapter's own, else ``lora.bias``): other than none, it
    trains the base's biases in place, so a reward model cannot score on the policy's base (``share_with_policy``)."""
    try:
        kind, folder = init_source(str(cfg.rl.init_from)) if cfg.rl.init_from else ("", None)
        if kind == "adapter":
            return str(json.loads((folder / "adapter_config.json").read_text(encoding="utf-8")).get("bias") or "none")
    except (ConfigError, OSError, ValueError):
        pass
    return str(cfg.lora.bias)


def base_model_artifact(sft_weights: Path | None, run_dir: Path) -> dict:
    """``artifacts.base_model``: when the adapter sits on SFT full weights rather than ``model.name_or_path``,
    where those weights are (relative to the run dir; adapter_config.json names them too)."""
    return {"base_model": os.path.relpath(sft_weights.resolve(), run_dir.resolve())} if sft_weights else {}


def save_policy(trainer, tokenizer, out: Path):
    """The adapter alone (TRL's frozen "ref" copy and a shared reward adapter dropped), loadable with plain
    ``PeftModel.from_pretrained``."""
    from sectune.models.reward_model import SHARED_ADAPTER

    policy = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    for name in ("ref", SHARED_ADAPTER):  # TRL's frozen reference copy; the reward model riding on the policy's base
        if name in policy.peft_config:
            policy.delete_adapter(name)
    modeling.save_pretrained_atomic(policy, tokenizer, out)


# ------------------------------------------------------------------------------------------- data
def stratified(records: list[dict], n: int | None, key=None) -> list[dict]:
    """``n`` records taking turns across labels (each label's records in ``key`` order, else as given)."""
    if n is None or n >= len(records):
        return list(records)
    by_label: dict[str, list[dict]] = {}
    for r in sorted(records, key=key) if key else records:
        by_label.setdefault(r["label"], []).append(r)
    out, queues = [], [list(v) for _, v in sorted(by_label.items())]
    while len(out) < n:
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop(0))
    return out


def evidence(analysis: dict) -> int:
    """How many facts an analysis states: login counts, break-in attempts, users and sources named."""
    return (sum(int(analysis.get(k) or 0) for k in ("failed_logins", "accepted_logins", "break_in_attempts"))
            + len(analysis.get("invalid_users") or []) + len(analysis.get("targeted_users") or [])
            + len(analysis.get("source_ips") or []))


def highest_quality(records: list[dict], n: int, fits=lambda r: True) -> list[dict]:
    """simplified_ppo's "highest-quality examples": the windows whose annotation states the most evidence
    (:func:`evidence`; ties by window id), taken in turns across verdicts so every class is there, and only
    those that fit ``model.max_seq_length`` whole (a cut answer teaches a cut answer)."""
    usable = [r for r in records if fits(r)]
    return stratified(usable, n, key=lambda r: (-evidence(json.loads(r["completion"])), r["id"]))


def fitting_prompts(tokenizer, records: list[dict], max_len: int) -> tuple[list[dict], int]:
    """The records whose prompt leaves ``rl.max_completion_length`` tokens within ``model.max_seq_length``."""
    if not records:  # a tokenizer given no text raises IndexError (dataset.val_fraction=0: an audit, session 40)
        return [], 0
    lengths = [len(ids) for ids in prompt_ids(tokenizer, [r["prompt"] for r in records])]  # as GRPO tokenizes them
    keep = [r for r, n in zip(records, lengths) if n <= max_len]
    return keep, len(records) - len(keep)


# ------------------------------------------------------------------------------------------- grpo
def run_grpo(ctx: RunContext) -> dict:
    from sectune.loss_settings import warn_unread_loss

    cfg, run_dir, rl = ctx.cfg, ctx.run_dir, ctx.cfg.rl
    t0 = time.perf_counter()
    warn_unread_loss(cfg)
    if rl.reference not in REFERENCES:
        raise ConfigError(f"rl.reference={rl.reference!r}: choose base (the model with the adapter disabled) or init (a frozen copy of the starting adapter)")
    if rl.loss_type not in LOSS_TYPES:
        raise ConfigError(f"rl.loss_type={rl.loss_type!r}: choose dapo (token mean over the batch) or grpo (per-completion mean)")
    if rl.scale_rewards not in GRPO_SCALES:
        raise ConfigError(f"rl.scale_rewards={rl.scale_rewards!r}: choose group (the std of each group's rewards), batch (the std of the "
                          "batch's rewards) or none (no scaling, Dr. GRPO)")
    if int(rl.num_generations) < 2:
        raise ConfigError(f"rl.num_generations={rl.num_generations}: GRPO needs at least 2 completions per prompt to compare them")
    save = int(cfg.train.save_steps or 0)
    if int(rl.num_iterations) > 1 and save and save % int(rl.num_iterations):
        # TRL keeps a generation's completions in memory for num_iterations steps and no checkpoint holds them: a run
        # resumed mid-cycle sampled them again from the updated policy
        raise ConfigError(f"train.save_steps={save}: must be a multiple of rl.num_iterations={rl.num_iterations} (each generation "
                          "is trained on that many steps and a checkpoint in between could not resume it exactly)")
    if not float(rl.keep_best_se) >= 0:
        raise ConfigError(f"rl.keep_best_se={rl.keep_best_se}: must be >= 0 (standard errors a later step's held-out gain must exceed; 0 = any gain)")
    # 1. model: the SFT policy, trainable
    path = modeling.model_path(cfg)
    model, start, fresh, sft_weights, init_folder = build_policy(cfg, path)
    tokenizer = modeling.tokenizer_for(cfg, init_folder, path)  # the one saved with the weights it starts from
    trainable, total = modeling.trainable_parameters(model)
    print(f"sectune: {modeling.model_title(cfg.model)}: {trainable:,} trainable of {total:,} parameters; starting from {start}")
    # a LoRA reward model trained on the weights the policy's adapter sits on scores on the policy's model
    reward_funcs, weights, reward_kind = reward_functions(cfg, policy=model, policy_base=str(sft_weights or path))
    # the weights in force: rl.rewards={verdict: 1} on the command line merges into the defaults (Hydra), which kept the
    # other rewards' weights without a word (an audit, session 36); rl.rewards.<name>=0 turns one off
    print("sectune: rl: reward weights " + ", ".join(f"{getattr(f, '__name__', 'reward')}={w:g}" for f, w in zip(reward_funcs, weights))
          + " (rl.rewards.<name>=0 turns one off)")

    # 2. data: the train windows' prompts; the annotation rides along for the rewards
    splits = data.sft_splits(cfg)
    max_prompt = int(cfg.model.max_seq_length) - int(rl.max_completion_length)
    train_recs, too_long = fitting_prompts(tokenizer, splits["train"], max_prompt)
    if too_long:
        print(f"sectune: warning: {too_long} train windows have prompts over model.max_seq_length - rl.max_completion_length = {max_prompt} tokens; left out")
    if not train_recs:
        raise ConfigError(f"dataset={cfg.dataset.name}: no train window's prompt fits model.max_seq_length - rl.max_completion_length = {max_prompt} tokens")
    step_prompts = int(cfg.train.batch_size) * int(cfg.train.grad_accum) * distributed.world_size()
    if len(train_recs) < step_prompts:  # TRL's sampler yields whole batches only: 0 steps, "succeeded", the SFT adapter passed on
        raise ConfigError(f"dataset: {len(train_recs)} train windows fit, fewer than one GRPO step's {step_prompts} prompts "
                          f"(train.batch_size={cfg.train.batch_size} × train.grad_accum={cfg.train.grad_accum}"
                          f"{f' × {distributed.world_size()} processes' if distributed.world_size() > 1 else ''}); raise "
                          "dataset.max_samples or lower train.batch_size / train.grad_accum")
    print(f"sectune: GRPO on {len(train_recs)} train windows × G={rl.num_generations} completions ({len(splits['test'])} test windows held out)")

    # 3. trainer
    val_recs = fitting_prompts(tokenizer, splits["validation"], max_prompt)[0][: rl.heldout_windows or 0]
    if not val_recs and rl.keep_best and rl.eval_steps:
        why = "rl.heldout_windows=0" if not rl.heldout_windows else "no validation window (dataset.val_fraction)"
        print(f"sectune: warning: {why}: no held-out reward during training, so rl.keep_best keeps no best step (the last "
              "step's weights are kept)", file=sys.stderr)
    best = (HeldOutBest(lambda m: heldout_rewards(cfg, m, tokenizer, val_recs, reward_funcs, weights), int(rl.eval_steps), rl.keep_best_se)
            if val_recs else None)
    callbacks = [*engine.fail_callbacks(cfg), *([best] if best else [])]
    trainer = build_grpo_trainer(cfg, model, tokenizer, train_recs, reward_funcs, weights, run_dir / "checkpoints", callbacks)
    main = trainer.accelerator.is_main_process
    # with rl.keep_best a checkpoint is whole only with the held-out scores its callback adds after Trainer's files
    resume = checkpoints.resolve_resume(cfg, run_dir / "checkpoints", needs=(HeldOutBest.STATE_FILE,) if best else ())
    heldout = {}
    if best and resume is None:
        heldout["reward_heldout_start"] = best.evaluate(trainer.model, 0)
    elif best:
        try:
            best.load(Path(resume))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"train.resume: {resume}: its held-out scores cannot be read ({e}); resume from another checkpoint") from None
        if 0 in best.scores:
            heldout["reward_heldout_start"] = best.scores[0]
    try:
        train_out = engine.train(trainer, resume)
    finally:  # the reward history so far is worth keeping even when training dies
        if main:
            write_json_atomic(run_dir / "train_history.json", finite_json({**rl_history(trainer), **({"heldout": best.scores} if best else {})}))
    history = rl_history(trainer)
    metrics = {"train_loss": engine.run_train_loss(trainer, train_out), "train_steps": trainer.state.global_step, "fresh_adapter": int(fresh),
               "train_prompts": len(train_recs), "too_long_prompts": too_long, "num_generations": int(rl.num_generations),
               "learning_rate": trainer.args.learning_rate, "trainable_params": trainable, "total_params": total,
               **curve_metrics(history["steps"])}
    if reward_kind:
        metrics["reward_model_heuristic"] = int(reward_kind == "heuristic")
    if best:
        step = trainer.state.global_step
        heldout["reward_heldout_end"] = best.scores.get(step) if step in best.scores else best.evaluate(trainer.model, step)
        metrics.update(heldout, reward_heldout_windows=len(val_recs))
        kept = ""
        if rl.keep_best and best.step is not None and best.step != step:
            best.restore(trainer.model)
            why = (f": no later evaluation beat it by more than {rl.keep_best_se:g} standard error(s) of the per-window differences"
                   if rl.keep_best_se else ", the best held-out reward")
            kept = f"; kept step {best.step}'s adapter ({best.score:.3f}){why}"
        # best_step / reward_heldout_best: one evaluation (rl.keep_best=false saved another: kept_step)
        metrics.update(best_step=best.step, reward_heldout_best=best.score, kept_step=best.step if rl.keep_best else step)
        if main:  # the end evaluation came after the history was written
            write_json_atomic(run_dir / "train_history.json", finite_json({**history, "heldout": best.scores}))
        print(f"sectune: held-out reward (greedy, {len(val_recs)} validation windows): "
              f"{heldout.get('reward_heldout_start', float('nan')):.3f} → {heldout['reward_heldout_end']:.3f}{kept}")

    # 4. artifacts
    artifacts = {"adapter": "adapter", "checkpoints": "checkpoints", "train_history": "train_history.json", "reward_curve": "plots/reward_curve.png",
                 **base_model_artifact(sft_weights, run_dir)}
    if not main:
        trainer.accelerator.wait_for_everyone()
        return {"metrics": metrics, "artifacts": artifacts}
    save_policy(trainer, tokenizer, run_dir / "adapter")
    plot_reward_curve(run_dir / "plots" / "reward_curve.png", history["steps"], f"grpo · {modeling.model_title(cfg.model)} · G={rl.num_generations} · β={cfg.loss.beta}",
                      dict(zip(trainer.reward_func_names, weights)), heldout=best.scores if best else None)
    metrics.update(engine.peak_memory())
    metrics["train_runtime_s"] = round(time.perf_counter() - t0, 2)
    kl = f" · KL {metrics['kl_mean']:.4f}" if metrics.get("kl_mean") is not None else ""
    print(f"sectune: done · adapter at {run_dir / 'adapter'} · mean reward {metrics.get('reward_mean_start', float('nan')):.3f} → "
          f"{metrics.get('reward_mean_end', float('nan')):.3f}{kl} · {metrics['train_steps']} steps · {metrics['train_runtime_s']:.0f}s")
    trainer.accelerator.wait_for_everyone()
    return {"metrics": metrics, "artifacts": artifacts}


def build_grpo_trainer(cfg, model, tokenizer, records: list[dict], reward_funcs, weights, output_dir: Path, callbacks=()):
    from datasets import Dataset
    from trl import GRPOConfig

    from sectune.models.reward_model import window_from_prompt
    from sectune.training.grpo_trainer import SharedPromptGRPOTrainer

    rl, G = cfg.rl, int(cfg.rl.num_generations)
    kwargs = engine.training_kwargs(cfg, output_dir, has_eval=False)
    kwargs.pop("train_sampling_strategy")  # GRPO's own sampler repeats each prompt G times
    kwargs["learning_rate"] = float(cfg.train.learning_rate) * float(rl.lr_scale)
    kwargs["per_device_train_batch_size"] = int(cfg.train.batch_size) * G  # train.batch_size counts prompts
    args = GRPOConfig(
        **kwargs,
        num_generations=G,
        max_completion_length=int(rl.max_completion_length),
        temperature=float(rl.temperature),
        top_p=float(rl.top_p),
        # as the held-out evaluations and stage=infer decode (1.0 in the tiny preset: sectune's shared-prompt sampler;
        # another value samples through TRL's generate, which applies it)
        repetition_penalty=float(cfg.generation.repetition_penalty),
        beta=float(cfg.loss.beta),
        epsilon=float(cfg.loss.clip_epsilon),
        num_iterations=int(rl.num_iterations),
        loss_type=str(rl.loss_type),
        scale_rewards=str(rl.scale_rewards),
        reward_weights=list(weights),
        disable_dropout=True,  # π_θ, π_old and π_ref must score a token the same way
        log_completions=False,
    )
    dataset = Dataset.from_list([{"prompt": r["prompt"], "window": window_from_prompt(r["prompt"]), "annotation": r["completion"], "id": r["id"]} for r in records])
    from sectune.chat_frame import stop_at_turn_end

    # a completion ends where the run's answers end, as the held-out rewards, infer and the export stop: TRL also stops
    # at every EOS the model's generation_config names, a framed run's base's own EOS among them
    stop_at_turn_end(model, tokenizer)
    with engine.trainable_weights_kept(model):
        trainer = SharedPromptGRPOTrainer(
            model=model, reward_funcs=reward_funcs, args=args, train_dataset=dataset, processing_class=tokenizer,
            callbacks=list(callbacks), shared_prompt=bool(rl.shared_prompt),
        )
    if rl.reference == "base" and "ref" in trainer.model.peft_config:
        trainer.model.delete_adapter("ref")  # without it, TRL's reference forward disables the adapter
    return trainer


# -------------------------------------------------------------------------------- simplified ppo
def run_simplified_ppo(ctx: RunContext) -> dict:
    """Seed 000's "simplified PPO": SFT on the best train examples. Said on the console and in result.json."""
    cfg, run_dir = ctx.cfg, ctx.run_dir
    t0 = time.perf_counter()
    print(f"sectune: NOTE: {SFT_NOTE}")
    path = modeling.model_path(cfg)
    model, start, fresh, sft_weights, init_folder = build_policy(cfg, path)
    tokenizer = modeling.tokenizer_for(cfg, init_folder, path)  # the one saved with the weights it starts from

    max_len = int(cfg.model.max_seq_length)
    recs = simplified_ppo_windows(cfg, fits=lambda r: pair_lengths(tokenizer, [r["prompt"]], [r["completion"]])[0] <= max_len)
    if not recs:
        raise ConfigError(f"dataset={cfg.dataset.name}: no train window fits model.max_seq_length={max_len} whole")
    labels = {lab: sum(r["label"] == lab for r in recs) for lab in sorted({r["label"] for r in recs})}
    print(f"sectune: the {len(recs)} highest-quality train windows (most evidence, by verdict: {labels}); starting from {start}")

    trainer = build_sft_trainer(cfg, model, tokenizer, recs, run_dir / "checkpoints", engine.fail_callbacks(cfg))
    main = trainer.accelerator.is_main_process
    try:
        out = engine.train(trainer, checkpoints.resolve_resume(cfg, run_dir / "checkpoints"))
    finally:
        if main:
            engine.write_history(run_dir / "train_history.json", trainer)
    metrics = {"is_supervised_finetuning": 1, "train_loss": engine.run_train_loss(trainer, out), "train_steps": trainer.state.global_step,
               "train_examples": len(recs), "fresh_adapter": int(fresh), "learning_rate": trainer.args.learning_rate}
    artifacts = {"adapter": "adapter", "checkpoints": "checkpoints", "train_history": "train_history.json", "loss_curve": "plots/loss_curve.png",
                 **base_model_artifact(sft_weights, run_dir)}
    if main:
        save_policy(trainer, tokenizer, run_dir / "adapter")
        engine.plot_loss_curve(run_dir / "plots" / "loss_curve.png", engine.loss_history(trainer), f"simplified_ppo (= SFT) · {modeling.model_title(cfg.model)}")
        (run_dir / "NOTE.txt").write_text(SFT_NOTE + "\n", encoding="utf-8")
        artifacts["note"] = "NOTE.txt"
        metrics.update(engine.peak_memory())
    metrics["train_runtime_s"] = round(time.perf_counter() - t0, 2)
    print(f"sectune: done · adapter at {run_dir / 'adapter'} · train loss {metrics['train_loss']:.4f} · {SFT_NOTE}")
    return {"metrics": metrics, "artifacts": artifacts}


def simplified_ppo_windows(cfg, fits=lambda r: True) -> list[dict]:
    """The split of every window (as an SFT run with dataset.max_samples=null), then the best n train windows. With
    dataset.max_samples (seed 000's --samples: n here) every other stage splits n windows, so a window held out there
    (validation or test: the pipeline's table, infer, evaluate) is not trained on here either: it was (an audit,
    session 25: 10 of 150 windows trained on were test windows of the 150-window split)."""
    from omegaconf import OmegaConf

    n = cfg.dataset.max_samples or SIMPLIFIED_PPO_EXAMPLES
    how = cfg.dataset.get("split_by") or "window"
    if cfg.dataset.max_samples and how != "window":  # every window's split by time or source is not the n windows' one:
        # one of its training windows can follow a held-out window of its log, or share its source (a review, session 43)
        raise ConfigError(f"stage=rl loss=simplified_ppo picks its dataset.max_samples={cfg.dataset.max_samples} best windows "
                          f"out of every window's split, which under dataset.split_by={how} can train on a window sharing "
                          "the held-out windows' sources or logs: use dataset.max_samples=null or dataset.split_by=window")
    train = data.sft_splits(OmegaConf.merge(cfg, {"dataset": {"max_samples": None}}))["train"]
    if cfg.dataset.max_samples:
        own = data.sft_splits(cfg)
        held = {_parent_id(r["id"]) for r in own["validation"] + own["test"]}
        train = [r for r in train if _parent_id(r["id"]) not in held]
    return highest_quality(train, n, fits=fits)


def _parent_id(record_id) -> str:
    """The window a training record was cut from (``<id>~j``: a sub-window; ``<id>^j``: a counterfactual)."""
    return str(record_id).split("~")[0].split("^")[0]


def build_sft_trainer(cfg, model, tokenizer, recs: list[dict], output_dir: Path, callbacks=()):
    """TRL's SFTTrainer, answer-only loss. Batch 1 (the seed's) has no padding to remove, so the plain
    collator is the padding-free one; other batch sizes pad to the longest example."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    kwargs = engine.training_kwargs(cfg, output_dir, has_eval=False)
    kwargs["learning_rate"] = float(cfg.train.learning_rate) * float(cfg.rl.lr_scale)  # the seed halved it
    args = SFTConfig(**kwargs, max_length=cfg.model.max_seq_length, completion_only_loss=True, packing=False, dataset_num_proc=None,
                     label_smoothing_factor=cfg.loss.label_smoothing)  # it is SFT: the same smoothing as stage=sft
    from sectune.stages.sft import sft_rows

    dataset = Dataset.from_list(sft_rows(tokenizer, recs))  # the text as text, as stage=sft tokenizes it
    with engine.trainable_weights_kept(model):
        return SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=list(callbacks))
