"""Config checks of two kinds that :func:`sectune.config_checks.check_values` runs: values passed through to a library
that would reject them late or with a traceback (schedulers, attention, W&B's mode), and settings a run would ignore
without a word (each refused, naming the key). Re-exported by :mod:`sectune.config_checks`."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from omegaconf import OmegaConf


#: transformers' SchedulerType values (tests/test_config.py checks the list against the installed transformers: importing
#: it here would cost every command ~3 s)
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt",
                 "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay", "greedy")
ATTENTION = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
WANDB_MODES = ("online", "offline", "disabled", "shared")


def check_passed_through(cfg, need) -> None:
    """Values sectune hands to transformers, scikit-learn, W&B or Ray as they are, which rejected them with a traceback (and
    the library's name for the setting, not sectune's key), some only after training had finished (an audit, session 32)."""
    import re

    t, m = cfg.train, cfg.model
    need(t.lr_scheduler in LR_SCHEDULERS, "train.lr_scheduler", t.lr_scheduler, f"choose one of {', '.join(LR_SCHEDULERS)}")
    need(t.empty_cache_steps is None or t.empty_cache_steps >= 1, "train.empty_cache_steps", t.empty_cache_steps, "must be >= 1 (null = never)")
    att = m.attn_implementation  # a hub kernel ("kernels-community/…") or a paged variant ("paged|sdpa") is the library's to judge
    need(att is None or att in ATTENTION or "/" in str(att) or "|" in str(att), "model.attn_implementation", att,
         f"choose one of {', '.join(ATTENTION)} (or null: transformers' default)")
    dm = m.device_map
    need(dm is None or isinstance(dm, Mapping) or isinstance(dm, (str, int)) and bool(re.fullmatch(
        r"auto|balanced|balanced_low_0|sequential|cpu|disk|meta|mps|(cuda|xpu|npu|hpu)(:\d+)?|\d+", str(dm))), "model.device_map", dm,
         "choose auto, balanced, balanced_low_0, sequential, cpu, cuda, cuda:N (a device) or a mapping of module names to devices")
    tiny = m.get("tiny")
    if tiny and not m.name_or_path:  # the tiny model sectune builds: its shape, checked before the build
        heads, kv = tiny.num_heads, tiny.num_kv_heads
        need(heads >= 1 and tiny.hidden_size % heads == 0, "model.tiny.num_heads", heads, f"must divide model.tiny.hidden_size={tiny.hidden_size}")
        need(m.family != "llama" or (kv >= 1 and heads % kv == 0), "model.tiny.num_kv_heads", kv, f"must divide model.tiny.num_heads={heads}")
        # 0 or -1 failed in the build with a traceback (ZeroDivisionError, a negative tensor dimension), or built a model of no
        # layer, or with max_position_embeddings=-1 trained as a succeeded run (an audit, session 45)
        for key in ("hidden_size", "num_layers", "intermediate_size", "max_position_embeddings"):
            need(tiny[key] >= 1, f"model.tiny.{key}", tiny[key], "must be >= 1")
        need(0 < tiny.init_std <= 1, "model.tiny.init_std", tiny.init_std, "must be in (0, 1] (the std of the random initial weights)")
    mode = cfg.logger.mode
    need(mode in (None, "") or mode in WANDB_MODES, "logger.mode", mode, f"choose one of {', '.join(WANDB_MODES)} (or null: online "
         "when a W&B key is configured, else offline)")
    need(not mode or cfg.logger.name == "wandb", "logger.mode", mode, f"is W&B's; logger={cfg.logger.name} does not read it")
    env_mode = os.environ.get("WANDB_MODE")  # read where logger.mode is null: a typo ('Offline') was wandb's pydantic traceback
    need(cfg.logger.name != "wandb" or mode or not env_mode or env_mode in (*WANDB_MODES, "dryrun", "run"), "WANDB_MODE (the environment)",
         env_mode, f"choose one of {', '.join(WANDB_MODES)}, or unset it (logger.mode= on the command line wins over it)")
    ev = cfg.evaluate
    need(ev.rf_estimators >= 1, "evaluate.rf_estimators", ev.rf_estimators, "must be >= 1 (trees of the random-forest baseline)")
    need(ev.max_samples is None or ev.max_samples >= 1, "evaluate.max_samples", ev.max_samples, "must be >= 1 (null = all)")
    need(cfg.dataset.render_precision >= 0, "dataset.render_precision", cfg.dataset.render_precision,
         "must be >= 0 (decimal places of a flow's numbers in its text)")
    f = cfg.federated
    need(f.ray_num_cpus is None or f.ray_num_cpus >= 1, "federated.ray_num_cpus", f.ray_num_cpus, "must be >= 1 (null = one client at a time)")
    need(f.ray_num_cpus is None or f.ray_num_cpus >= f.client_num_cpus, "federated.ray_num_cpus", f.ray_num_cpus,
         f"must be >= federated.client_num_cpus={f.client_num_cpus} (Ray could place no client: 'ActorPool is empty')")
    need(0 <= f.lr_min_ratio <= 1, "federated.lr_min_ratio", f.lr_min_ratio, "must be in [0, 1] (the last round's share of train.learning_rate)")
    need(f.eval_every >= 1, "federated.eval_every", f.eval_every, "must be >= 1 (the server evaluates every N rounds)")
    hm = cfg.pipeline.heldout_max_windows
    need(hm is None or hm >= 1, "pipeline.heldout_max_windows", hm, "must be >= 1 (null = every test window)")
    hb = cfg.pipeline.heldout_batch_size  # 0 or -1: a traceback from the held-out table, once every step had trained (session 45)
    need(hb is None or hb >= 1, "pipeline.heldout_batch_size", hb, "must be >= 1 (null = infer.batch_size)")
    lim = cfg.reward.memory_limit_gb
    need(lim is None or lim > 0, "reward.memory_limit_gb", lim, "must be > 0 (GB; null = the device's free memory now)")
    need(cfg.doctor.min_free_disk_gb >= 0, "doctor.min_free_disk_gb", cfg.doctor.min_free_disk_gb, "must be >= 0")


#: stages whose loss has no label smoothing, and why (a value set there changed nothing, without a word)
SMOOTHING_IGNORED = {"reward": "a Bradley-Terry loss on pair scores", "rl": "GRPO's clipped objective",
                     "contrastive": "its task term is plain cross-entropy", "federated": "clients train the plain LM loss"}


#: why a DoRA adapter is refused on an 8-bit base on the CPU (:func:`dora_breaks_int8`)
DORA_INT8_CPU = ("with quantization=int8 on the CPU: PEFT's DoRA dequantizes each 8-bit weight at every forward and, on the "
                 "CPU, puts it back without its scales (bitsandbytes' SCB), so the next forward fails (AttributeError: "
                 "'NoneType' object has no attribute 'unsqueeze'); use quantization=nf4 or none, or lora.use_dora=false")


def dora_breaks_int8(cfg) -> bool:
    """A run on bitsandbytes' 8-bit weights on the CPU (``train.device=cpu``, or ``auto`` without CUDA): where a DoRA
    layer's forward leaves its base layer unusable (peft 0.21 with bitsandbytes 0.50: the second forward of a tiny int8
    model failed; an audit, session 46). Not seen on a GPU, where PEFT moves nothing."""
    if cfg.quantization.name != "int8" or cfg.train.device == "cuda":
        return False
    if cfg.train.device == "auto":
        import torch  # only here: most commands never get this far

        return not torch.cuda.is_available()
    return True


def check_settings_in_effect(cfg, need) -> None:
    """Settings a user could give that the run would then ignore without a word: each refused, naming the key."""
    from sectune.config import LoraConfig

    q, m, lo = cfg.quantization, cfg.model, cfg.lora
    need(q.name != "none" or not (q.load_in_4bit or q.load_in_8bit), "quantization.load_in_4bit" if q.load_in_4bit else
         "quantization.load_in_8bit", True, "does nothing with quantization=none (the model loads unquantized): choose "
         "quantization=nf4 or quantization=int8")
    need(m.get("chat_system") is None or m.get("chat_template", False), "model.chat_system", "<text>",
         "is a system message inside the chat template: set model.chat_template=true too, or leave it out")
    for key in ("max_memory", "offload_folder"):
        need(not m[key] or m.device_map is not None, f"model.{key}", m[key],
             "is used only with model.device_map (e.g. model.device_map=auto): set it too, or leave this out")
    if not lo.enabled:  # a LoRA setting changed while LoRA is off: the full model trains (a lora preset without enabled: true)
        default = LoraConfig()
        changed = [k for k in ("r", "alpha", "dropout", "target_modules", "use_rslora", "use_dora") if lo[k] != getattr(default, k)]
        need(not changed, f"lora.{changed[0] if changed else 'r'}", lo[changed[0]] if changed else None,
             "has no effect: LoRA is off (lora.enabled=false: lora=none, or a lora preset without enabled: true), so every "
             "weight trains; set lora.enabled=true or choose lora=r4_attention / r16_all_linear")
    # their rows (preference pairs, triplets) carry no input_ids Trainer's length grouping reads: a ValueError traceback
    # after loading (an audit, session 41)
    need(not (cfg.train.get("group_by_length") and cfg.stage.name in ("reward", "contrastive")), "train.group_by_length", True,
         f"stage={cfg.stage.name} batches pairs or triplets, which Trainer cannot group by length: leave it null")
    need(q.name == "none" or lo.enabled or cfg.stage.name not in TRAINING_STAGES, "lora", "none",
         f"with quantization={q.name}: quantized weights cannot be trained, so a quantized model trains LoRA adapters only "
         "(lora=r4_attention / r16_all_linear), or use quantization=none")
    need(not (lo.enabled and lo.use_dora and dora_breaks_int8(cfg)), "lora.use_dora", True, DORA_INT8_CPU)
    # fp16 mixed precision keeps fp32 weights: fp16 weights trained in full failed the GradScaler at step 1 on a GPU
    # ("Attempting to unscale FP16 gradients"; on CPU fp16 becomes bf16, so nothing here saw it; an audit, session 42)
    need(lo.enabled or cfg.model.dtype != "fp16" or cfg.train.precision != "fp16" or cfg.stage.name not in TRAINING_STAGES,
         "model.dtype", "fp16", "with train.precision=fp16 and lora=none every weight trains, and fp16 mixed precision needs "
         "them in fp32 (its gradient scaler refuses fp16 gradients): use model.dtype=fp32, or a LoRA adapter (lora=r16_all_linear)")
    need(not cfg.debug.enabled or cfg.stage.name in ("contrastive", "pipeline"), "debug.enabled", True,
         f"only stage=contrastive has a debug mode (stage={cfg.stage.name} would ignore it)")
    need(not cfg.evaluate.data_path or cfg.dataset.name not in ("hdfs", "injection_triplets"), "evaluate.data_path",
         cfg.evaluate.data_path, f"scores a classify run on a new labelled file; with dataset={cfg.dataset.name} give the new "
         "file as dataset.path (scored on its own validation/test split)")
    need(cfg.evaluate.max_samples is None or cfg.dataset.name != "hdfs", "evaluate.max_samples", cfg.evaluate.max_samples,
         "dataset=hdfs scores every validation/test session and reads no evaluate.max_samples (it was ignored without a word: "
         "an audit, session 42); leave it null, or train on fewer sessions (dataset.max_samples)")
    # (in a pipeline each step is checked with its own stage and dataset: the evaluate step's, the infer step's)
    need(not cfg.evaluate.vote_with or cfg.stage.name != "evaluate" or cfg.dataset.name == "injection_triplets",
         "evaluate.vote_with", list(cfg.evaluate.vote_with or ()), "a vote of analysts is scored by stage=evaluate "
         f"dataset=injection_triplets (not dataset={cfg.dataset.name})")
    need(not cfg.infer.vote_with or cfg.stage.name != "infer" or cfg.infer.model_dir, "infer.vote_with", list(cfg.infer.vote_with or ()),
         "needs infer.model_dir, the first voter (a tie goes to it)")
    need(cfg.stage.name != "federated" or cfg.train.resume in (None, "", "no"), "train.resume", cfg.train.resume,
         "stage=federated does not resume (a rerun starts from round 0: its rounds keep no Trainer checkpoints)")
    t, stage = cfg.train, cfg.stage.name  # (session 40: a transformers traceback after loading; silently no warm-up/noise)
    by_metric = ("reduce_lr_on_plateau", "greedy")  # each steps on Trainer's evaluation (greedy was left out: session 42)
    need(t.lr_scheduler not in by_metric or stage != "rl", "train.lr_scheduler", t.lr_scheduler,
         "changes the rate on Trainer's validation loss, which stage=rl never computes (GRPO scores its held-out windows "
         "itself, rl.eval_steps): choose a schedule by steps (linear, cosine, constant, ...)")
    need(t.lr_scheduler not in by_metric or stage not in ("sft", "dpo", "reward", "contrastive")
         or (t.eval_steps and cfg.dataset.val_fraction > 0), "train.lr_scheduler", t.lr_scheduler,
         "changes the rate when the validation loss stalls: set train.eval_steps=N with a validation split (dataset.val_fraction > 0)")
    need(not t.warmup_ratio or t.lr_scheduler not in ("constant", *by_metric), "train.warmup_ratio", t.warmup_ratio,
         f"has no effect with train.lr_scheduler={t.lr_scheduler}: use constant_with_warmup, or leave the warm-up out")
    need(t.neftune_noise_alpha is None or stage != "sft" or t.packing == "none", "train.neftune_noise_alpha", t.neftune_noise_alpha,
         f"with train.packing={t.packing}: NEFTune divides by the row's length, which packing makes a whole batch (noise "
         "~sqrt(batch) weaker than documented); set train.packing=none")
    if cfg.stage.name == "rl":  # loss settings the chosen objective does not read (an audit, session 25: taken silently)
        from sectune.config import LossConfig

        unread = ("beta", "clip_epsilon", "key_weight") if cfg.loss.name == "simplified_ppo" else ("key_weight",)
        changed = [k for k in unread if cfg.loss[k] != getattr(LossConfig(), k)]
        need(not changed, f"loss.{changed[0] if changed else ''}", cfg.loss[changed[0]] if changed else None,
             f"is not read by loss={cfg.loss.name} (" + ("seed 000's recipe: supervised fine-tuning with the plain loss"
             if cfg.loss.name == "simplified_ppo" else "key_weight weights SFT's answer tokens; GRPO's loss is the clipped "
             "objective") + "): leave it out")
    if cfg.stage.name == "rl" and cfg.loss.name == "simplified_ppo":  # supervised fine-tuning: no sampling, no reward
        from sectune.config_stages import RLConfig

        given, default = OmegaConf.to_container(cfg.rl, resolve=True), OmegaConf.to_container(OmegaConf.structured(RLConfig))
        changed = [k for k in GRPO_ONLY if given[k] != default[k]]
        need(not changed, f"rl.{changed[0] if changed else ''}", cfg.rl[changed[0]] if changed else None,
             "is a GRPO setting; loss=simplified_ppo (seed 000's recipe: supervised fine-tuning on the best windows) samples "
             "nothing and scores no reward, so it would be ignored: use loss=grpo, or leave it out")
    r = cfg.train.resume  # a typo (autoo) or a missing folder was found only after the model had loaded
    need(r in (None, "", "null", "none", "auto", "no") or Path(str(r)).expanduser().is_dir(), "train.resume", r,
         "is neither auto, null nor an existing checkpoint folder (checkpoint-N under a run's checkpoints/)")


#: the stages that train the model they load
TRAINING_STAGES = ("sft", "reward", "dpo", "rl", "contrastive", "classify", "federated")


#: rl.* keys only loss=grpo reads
GRPO_ONLY = ("num_generations", "temperature", "top_p", "max_completion_length", "heldout_windows", "eval_steps", "keep_best",
             "keep_best_se", "num_iterations", "loss_type", "scale_rewards", "rewards", "normalize_reward_model", "reward_model",
             "reference", "shared_prompt")



def say_start_notices(cfg) -> None:
    """What a run says once, before its stage, about settings it takes as given (the runner, on the main process; kept in
    result.json's warnings): model.trust_remote_code on (whoever set it, preset or override), a tiny preset's settings on
    another model (:func:`foreign_model_warning`), model.chat_template left aside (:func:`sectune.chat_frame.not_applied`)."""
    import sys

    from sectune.chat_frame import not_applied

    if OmegaConf.select(cfg, "model.trust_remote_code", default=False) is True:
        print(f"sectune: warning: model.trust_remote_code=true: loading {cfg.model.name_or_path or cfg.model.name} runs "
              "the Python code its folder or hub repository ships", file=sys.stderr)
    if foreign := foreign_model_warning(cfg):
        print(f"sectune: warning: {foreign}", file=sys.stderr)
    if aside := not_applied(cfg):
        print(f"sectune: note: {aside}")


def foreign_model_warning(cfg) -> str | None:
    """A warning where ``model.name_or_path`` names another model than a tiny preset's own (a hub id, or a folder of other
    dimensions) and training would use that preset's settings: ``sectune model.name_or_path=Qwen/Qwen2.5-0.5B`` fine-tuned
    it at the tiny model's learning rate, 1e-2 (a random model learns only at a high rate; real presets use ~2e-4), in
    fp32, without a word (helper E's gap report, session 45). A tiny run's own weights (the same dimensions) are not."""
    import json

    m = cfg.model
    if m.tiny is None or not m.name_or_path or cfg.stage.name not in TRAINING_STAGES or cfg.train.learning_rate != m.learning_rate:
        return None
    try:
        theirs = json.loads((Path(str(m.name_or_path)).expanduser() / "config.json").read_text(encoding="utf-8"))
        dims = (theirs.get("hidden_size", theirs.get("n_embd")), theirs.get("num_hidden_layers", theirs.get("n_layer")))
    except (OSError, ValueError, AttributeError):
        dims = None  # a hub id (or an unreadable folder): not the tiny model
    if dims == (m.tiny.hidden_size, m.tiny.num_layers):
        return None
    from sectune.paths import CONF_DIR

    own = [f.stem for f in sorted((CONF_DIR / "model").glob("*.yaml"))
           if OmegaConf.load(f).get("name_or_path") == str(m.name_or_path)]  # a preset of that very model
    pick = (f"model={own[0]} is its preset" if own else
            "pick a preset for it (sectune --help lists them: model=smollm_135m, qwen25_1_5b_instruct, ...)")
    return (f"model.name_or_path={m.name_or_path} is not model={m.name}'s tiny model, and trains with that preset's settings: "
            f"learning rate {m.learning_rate:g} (a random tiny model's; real presets use ~2e-4), model.dtype={m.dtype}, "
            f"model.max_seq_length={m.max_seq_length}; {pick}, or set train.learning_rate")
