"""What the schema's types let through but no run can use: keys the schema lacks (``check_keys``) and values no
run can use (``check_values``, the bitsandbytes settings, the sweep direction, DPO's SFT weight), each named by its
key before any data or model loads (what each stage's loss reads: :mod:`sectune.loss_settings`). The schema itself is
:mod:`sectune.config`."""

from __future__ import annotations

import functools

from omegaconf import OmegaConf

from sectune.config import SectuneConfig, device_choices
from sectune.loss_settings import dpo_loss_types
from sectune.sweeps import check_sweep  # noqa: F401 (re-exported: check_values calls it)
from sectune.config_effects import SMOOTHING_IGNORED, check_passed_through, check_settings_in_effect


@functools.lru_cache(maxsize=1)
def _schema():
    """The schema as a config, built once per process (OmegaConf.merge copies its first argument, so it stays as built):
    a sweep's pre-check runs check_keys for each of its jobs, and building it took most of each check."""
    return OmegaConf.structured(SectuneConfig)


def check_keys(cfg) -> None:
    """Every key is one the schema has. Hydra's ``+key=value`` appends a key past the schema (and Hydra suggests it
    for a typo'd key), so ``+train.learning_rat=1e-3`` ran to the end with the setting ignored."""
    from omegaconf.errors import ConfigKeyError

    from sectune.errors import ConfigError

    try:
        # as plain data: merged as it is, Hydra's config carries the schema's node types, and the appended key along
        OmegaConf.merge(_schema(), OmegaConf.create(OmegaConf.to_container(cfg, resolve=False)))
    except ConfigKeyError as e:
        key = getattr(e, "full_key", None) or "?"
        raise ConfigError(f"{key}: not a sectune setting ({str(e).splitlines()[0]}); check its spelling "
                          "(`sectune --cfg job` prints every key)") from None


def check_printed_keys(argv: list[str]) -> None:
    """``sectune --cfg job +lora.rr=3`` printed the appended key as if it were a setting and exited 0: Hydra prints without
    running the task, so :func:`check_keys` never saw it. After the print, the same overrides are composed and checked
    (a config of one's own, ``-cp``/``-cn``/``-cd``, is left to the run)."""
    import sys

    from hydra import compose, initialize_config_dir

    from sectune.errors import SectuneError
    from sectune.paths import CONF_DIR

    if any(a in ("--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd", "-m", "--multirun") for a in argv):
        return
    overrides = [a for i, a in enumerate(argv) if not a.startswith("-") and (i == 0 or argv[i - 1] not in ("--cfg", "-c", "--package", "-p"))]
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=[o for o in overrides if not o.lstrip("+~").startswith(("hydra.", "hydra/"))])
        check_keys(cfg)
    except SectuneError as e:
        print(f"sectune: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except Exception:  # noqa: BLE001 - Hydra has said what is wrong with the composition itself
        return


#: stages that are not correct under torchrun / accelerate yet, and why (found by a walkthrough): refused, not run wrong
SINGLE_PROCESS_STAGES: dict[str, str] = {
    # every rank ran the whole Flower simulation (its own Ray cluster and clients) into the same run dir
    "federated": "Flower runs its clients and rounds itself (its simulation spreads them over this machine's CPUs and GPUs: "
                 "federated.client_num_gpus; a real deployment runs `flwr run` with the Flower app), so every rank ran the "
                 "whole simulation again",
}


def single_process_refusal(stage: str, processes: int, where: str = "") -> str:
    """The error for a stage of :data:`SINGLE_PROCESS_STAGES` under several processes (``where``: a pipeline's step)."""
    return (f"{where}stage={stage} under {processes} processes: {SINGLE_PROCESS_STAGES[stage]}; run it as one process (sft, "
            "reward, dpo, rl, classify, contrastive and pipelines of those run under torchrun / accelerate)")


def check_values(cfg) -> None:
    """Values the schema's types let through but no run can use, named by key, before any data or model
    loads: a negative or zero learning rate (0 would "train" and change nothing), batch sizes below 1,
    generation settings transformers rejects only mid-run, the bitsandbytes settings, ``sweep.direction``, and the
    stage's own numbers (DPO's β, GRPO's sampling and update settings) that crash it mid-run or change nothing."""
    import math

    from sectune.data import check_split_seed
    from sectune.errors import ConfigError

    def need(ok: bool, key: str, value, what: str) -> None:
        if not ok:
            raise ConfigError(f"{key}={value}: {what}")

    lr = cfg.train.learning_rate
    need(isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0, "train.learning_rate", lr, "must be a number > 0")
    for key in ("batch_size", "grad_accum"):
        need(cfg.train[key] >= 1, f"train.{key}", cfg.train[key], "must be >= 1")
    if cfg.train.eval_batch_size is not None:
        need(cfg.train.eval_batch_size >= 1, "train.eval_batch_size", cfg.train.eval_batch_size, "must be >= 1 (or null: train.batch_size)")
    need(cfg.infer.batch_size >= 1, "infer.batch_size", cfg.infer.batch_size, "must be >= 1")
    need(cfg.evaluate.batch_size is None or cfg.evaluate.batch_size >= 1, "evaluate.batch_size", cfg.evaluate.batch_size, "must be >= 1")
    alpha = cfg.evaluate.bigram_alpha
    need(math.isfinite(alpha) and alpha > 0, "evaluate.bigram_alpha", alpha,
         "must be > 0 (add-alpha smoothing: at 0 a key pair never seen in training has probability 0 and its session scores NaN)")
    if cfg.stage.name == "export":  # before the run's model loads twice
        need(cfg.export.dtype in (None, "fp32", "bf16", "fp16"), "export.dtype", cfg.export.dtype, "choose fp32, bf16 or fp16 (null: the dtype the run trained in)")
        diff = cfg.export.max_logit_diff
        need(diff is None or (math.isfinite(diff) and diff >= 0), "export.max_logit_diff", diff, "must be a number >= 0 (null: by dtype)")
    need(cfg.infer.window_lines is None or cfg.infer.window_lines >= 0, "infer.window_lines", cfg.infer.window_lines,
         "must be >= 0 (0: one analysis per file; null: dataset.max_lines)")
    t = cfg.train
    need(t.max_steps > 0 or t.max_steps == -1, "train.max_steps", t.max_steps,
         "must be > 0, or -1 for train.epochs (0 would save an untrained model as a finished run)")
    need(t.max_steps > 0 or t.epochs > 0, "train.epochs", t.epochs, "must be > 0 when train.max_steps=-1 (0 would save an untrained model)")
    need(math.isfinite(t.epochs), "train.epochs", t.epochs, "must be a finite number (session 36: inf reached transformers)")
    need(0 <= t.warmup_ratio < 1, "train.warmup_ratio", t.warmup_ratio,
         "must be in [0, 1) (a fraction of the steps; transformers reads 1 and above as a number of steps)")
    need(t.max_grad_norm >= 0, "train.max_grad_norm", t.max_grad_norm, "must be >= 0 (0 = no clipping)")
    need(t.save_steps is None or t.save_steps >= 0, "train.save_steps", t.save_steps, "must be >= 0 (0 or null = no checkpoints)")
    # values that crashed with a traceback after the data and model had loaded, or were taken without a word (an audit,
    # session 25: model.max_seq_length=-1 finished as a succeeded run)
    need(t.eval_steps is None or t.eval_steps >= 0, "train.eval_steps", t.eval_steps, "must be >= 0 (0 or null = no evaluation between steps)")
    need(t.save_total_limit is None or t.save_total_limit >= 1, "train.save_total_limit", t.save_total_limit, "must be >= 1 (null = keep all)")
    need(t.logging_steps >= 1, "train.logging_steps", t.logging_steps, "must be >= 1")
    need(0 <= t.seed < 2**32, "train.seed", t.seed, f"must be in 0..{2**32 - 1} (it seeds numpy and torch)")
    need(t.num_workers >= 0, "train.num_workers", t.num_workers, "must be >= 0 (0 = load in the main process)")
    need(math.isfinite(t.weight_decay) and t.weight_decay >= 0, "train.weight_decay", t.weight_decay, "must be a finite number >= 0")
    need(t.neftune_noise_alpha is None or (math.isfinite(t.neftune_noise_alpha) and t.neftune_noise_alpha > 0),
         "train.neftune_noise_alpha", t.neftune_noise_alpha, "must be > 0 (null = off)")
    need(cfg.model.max_seq_length >= 1, "model.max_seq_length", cfg.model.max_seq_length, "must be >= 1 (tokens per example)")
    check_passed_through(cfg, need)
    d = cfg.dataset
    need(d.max_samples is None or d.max_samples >= 1, "dataset.max_samples", d.max_samples, "must be >= 1 (null = all)")
    for key in ("val_fraction", "test_fraction"):
        need(math.isfinite(d[key]) and 0 <= d[key] < 1, f"dataset.{key}", d[key], "must be in [0, 1)")
    need(d.val_fraction + d.test_fraction < 1, "dataset.val_fraction", d.val_fraction,
         f"+ dataset.test_fraction={d.test_fraction} must be < 1 (the rest trains)")
    if d.name == "hdfs":  # num_log_keys=0 or -3 failed later with a raw error, 10^9 tried a 10^18-cell bigram table
        from sectune.data.hdfs import MAX_LOG_KEYS

        need(1 <= d.num_log_keys <= MAX_LOG_KEYS, "dataset.num_log_keys", d.num_log_keys,
             f"must be in 1..{MAX_LOG_KEYS} (the DeepLog files' keys are 1..num_log_keys)")
    # the SFT warm-up's: sft.warmup_epochs=nan reached transformers (a ValueError traceback after the warm-up's data and model
    # had loaded: an audit, session 45)
    need(cfg.sft.warmup_lines >= 0, "sft.warmup_lines", cfg.sft.warmup_lines, "must be >= 0 (generated log lines; 0 = no warm-up)")
    we = cfg.sft.warmup_epochs
    need(not cfg.sft.warmup_lines or (math.isfinite(we) and we > 0), "sft.warmup_epochs", we, "must be a finite number > 0")
    if cfg.debug.enabled:  # 0 or -1 ran an unbounded epoch, and max_samples=-1 every triplet but one: no quick check
        for key in ("max_steps", "max_samples"):
            need(cfg.debug[key] >= 1, f"debug.{key}", cfg.debug[key], "must be >= 1 (debug.enabled=true is a quick check run)")
    kw = cfg.loss.key_weight
    need(math.isfinite(kw) and kw > 0, "loss.key_weight", kw, "must be a finite number > 0 (1 = off)")
    # names the stages check only after the data and the model have loaded (and W&B has started a run); from modules
    # that import no torch (sectune.training.engine and sectune.training.classification cost ~3.5 s at every start)
    from sectune.config import PACKING
    from sectune.config_stages import POOLINGS
    from sectune.training.planner import OPTIMIZERS

    need(t.optimizer in OPTIMIZERS, "train.optimizer", t.optimizer, f"choose one of {', '.join(OPTIMIZERS)}")
    need(t.precision in ("fp32", "bf16", "fp16"), "train.precision", t.precision, "choose fp32, bf16 or fp16")
    need(str(t.packing) in PACKING, "train.packing", t.packing, f"choose one of {', '.join(PACKING)}")
    need(str(t.device) in ("auto", "cpu", "cuda"), "train.device", t.device, device_choices(t.device))
    need(cfg.classify.pooling in POOLINGS, "classify.pooling", cfg.classify.pooling, f"choose one of {', '.join(POOLINGS)}")
    need(0.0 <= cfg.classify.subword_dropout < 1.0, "classify.subword_dropout", cfg.classify.subword_dropout,
         "a probability in [0, 1) (0 turns it off; 0.1 is the paper's value)")
    pairs = {"dpo": ("auth_preferences", "injection_preferences"), "reward": ("auth_preferences",)}.get(cfg.stage.name)
    need(pairs is None or cfg.dataset.name in pairs, "dataset", cfg.dataset.name,
         f"stage={cfg.stage.name} trains on preference pairs: use dataset={' or dataset='.join(pairs or ())}")
    check_split_seed(cfg.dataset.split_seed)
    from sectune.data.window_splits import SPLIT_BY

    windows = ("auth_logs", "auth_preferences", "injection_triplets", "injection_preferences")  # cut from auth logs
    need(str(d.split_by) in SPLIT_BY, "dataset.split_by", d.split_by, f"choose one of {', '.join(SPLIT_BY)}")
    need(d.split_by == "window" or d.name in windows, "dataset.split_by", d.split_by,
         f"splits auth-log windows (dataset={', dataset='.join(windows)}); dataset={d.name} has its own split")
    skips = ("hdfs", "injection_triplets", "injection_preferences")  # the readers that can skip and count a bad line
    need(not cfg.dataset.skip_bad_lines or cfg.dataset.name in skips, "dataset.skip_bad_lines", cfg.dataset.skip_bad_lines,
         f"dataset={cfg.dataset.name} stops at its first bad line, naming it (skipping is for dataset={', '.join(skips)})")
    need(0 <= cfg.loss.label_smoothing < 1, "loss.label_smoothing", cfg.loss.label_smoothing, "must be in [0, 1)")
    smoothing_off = SMOOTHING_IGNORED.get(cfg.stage.name) if cfg.stage.name != "rl" or cfg.loss.name == "grpo" else None
    need(not cfg.loss.label_smoothing or not smoothing_off, "loss.label_smoothing", cfg.loss.label_smoothing,
         f"stage={cfg.stage.name} does not use it ({smoothing_off}); it applies to sft, dpo, classify and simplified_ppo")
    need(cfg.stage.name != "dpo" or cfg.loss.label_smoothing < 0.5, "loss.label_smoothing", cfg.loss.label_smoothing,
         "must be < 0.5 for stage=dpo (robust DPO: the probability that a preference label is flipped)")
    check_settings_in_effect(cfg, need)
    if cfg.lora.enabled:
        need(cfg.lora.r >= 1, "lora.r", cfg.lora.r, "must be >= 1")
        need(cfg.lora.target_modules is None or isinstance(cfg.lora.target_modules, str) or len(cfg.lora.target_modules) >= 1,
             "lora.target_modules", cfg.lora.target_modules, "names no module: give at least one (or a preset: lora=r4_attention)")
        need(cfg.lora.alpha > 0, "lora.alpha", cfg.lora.alpha, "must be > 0")
        need(0 <= cfg.lora.dropout < 1, "lora.dropout", cfg.lora.dropout, "must be in [0, 1)")
        need(cfg.lora.bias in ("none", "all", "lora_only"), "lora.bias", cfg.lora.bias, "choose none, all or lora_only")
    g = cfg.generation
    need(g.max_new_tokens >= 1, "generation.max_new_tokens", g.max_new_tokens, "must be >= 1")
    need(g.temperature > 0 or not g.do_sample, "generation.temperature", g.temperature, "must be > 0 when generation.do_sample=true")
    need(0 < g.top_p <= 1, "generation.top_p", g.top_p, "must be in (0, 1]")
    need(g.repetition_penalty > 0, "generation.repetition_penalty", g.repetition_penalty, "must be > 0 (1.0 = no penalty)")
    # -1 previewed every validation window but one (a slice [:-1]), without a word (an audit, session 45)
    need(g.preview_samples >= 0, "generation.preview_samples", g.preview_samples, "must be >= 0 (0 = no preview)")
    from sectune.config import GenerationConfig

    for key in ("temperature", "top_p"):  # greedy decoding reads neither: a changed value did nothing
        need(g.do_sample or g[key] == getattr(GenerationConfig, key), f"generation.{key}", g[key],
             "has no effect while generation.do_sample=false (decoding is greedy); add generation.do_sample=true to sample")
    if cfg.infer.get("grounded_fields"):  # a bad one was found only when a constrained decode began (or never)
        from sectune.data import auth_logs
        from sectune.models.constrained import check_grounding, grounded_fields

        check_grounding(auth_logs._validator(cfg.infer.schema).schema, grounded_fields(cfg))
        # stage=infer and evaluate ground only constrained decodes (the pipeline's table grounds its constrained row)
        need(cfg.infer.constrained or cfg.stage.name not in ("infer", "evaluate"), "infer.grounded_fields",
             list(cfg.infer.grounded_fields), "has no effect without infer.constrained=true (names are grounded by "
             "constrained decoding); add it")
    check_quantization(cfg)
    check_sweep(cfg)
    loss = cfg.loss
    if loss.name == "dpo":  # β = 0 makes the loss log 2 for every pair: no gradient; β < 0 prefers the rejected answer
        need(math.isfinite(loss.beta) and loss.beta > 0, "loss.beta", loss.beta, "must be a number > 0 (the DPO β)")
    from sectune.training import distributed

    rank = cfg.debug.fail_on_rank
    if rank is not None:  # the fault injection's rank: without a step to fail at, or past the ranks there are, it does nothing
        need(cfg.debug.fail_at_step is not None, "debug.fail_on_rank", rank, "needs debug.fail_at_step (the step that rank fails after)")
        need(0 <= rank < distributed.world_size(), "debug.fail_on_rank", rank,
             f"must be a rank of this launch (0 to {distributed.world_size() - 1})")
    if distributed.world_size() > 1 and cfg.stage.name in SINGLE_PROCESS_STAGES:
        raise ConfigError(single_process_refusal(cfg.stage.name, distributed.world_size()))
    dm = cfg.model.device_map
    if distributed.world_size() > 1 and dm is not None and not (isinstance(dm, str) and dm.split(":")[0] in ("cuda", "cpu")):
        # each process would spread its own copy over every GPU (accelerate refuses that only after all of them loaded it),
        # or, where it fits one, put it on GPU 0 in every rank (an audit, session 42)
        raise ConfigError(f"model.device_map={dm}: under {distributed.world_size()} processes (torchrun/accelerate) each "
                          "process holds its own copy on its own GPU; set model.device_map=null (a preset's max_memory "
                          "then does nothing), or run one process to spread one copy over the GPUs")
    if cfg.stage.name == "dpo":  # another loss group left DPO at that loss's β (causal_lm's 0.04), unchecked
        need(loss.name == "dpo", "loss", loss.name, "stage=dpo trains with loss=dpo (its β and label smoothing): add loss=dpo")
        dpo_loss_types(cfg)  # dpo.sft_weight, dpo.loss_type and the label smoothing it reads, before the models load
    # sft and classify trained their own objective under any loss group, without a word (an audit, session 36)
    need(cfg.stage.name != "sft" or loss.name == "causal_lm", "loss", loss.name, "stage=sft trains the causal-LM loss "
         "(loss=causal_lm, the default); simplified_ppo is stage=rl's, causal_contrastive stage=contrastive's, dpo stage=dpo's")
    targets = cfg.lora.target_modules if cfg.lora.enabled and not isinstance(cfg.lora.target_modules, str) else ()
    # TRL's SFTTrainer refuses a LoRA LM head (its fused loss reads lm_head.weight) after the data and the model loaded,
    # a traceback naming no key (an audit, session 44); a trained copy of the head is what it can train
    need(cfg.stage.name != "sft" or "lm_head" not in list(targets or ()), "lora.target_modules", list(targets or ()),
         "stage=sft cannot train LoRA on lm_head (TRL computes the loss from lm_head.weight and would never train the "
         "adapter): drop lm_head, or train the head whole with lora.modules_to_save=[lm_head]")
    need(cfg.stage.name != "classify" or loss.name in ("cross_entropy", "causal_lm"), "loss", loss.name,
         "stage=classify trains a cross-entropy classifier: loss=cross_entropy (its class_weights), or leave loss at its default")
    if cfg.stage.name == "reward":  # it trains Bradley-Terry under any group and reads only loss.margin: another stage's group did nothing
        need(loss.name in ("bradley_terry", "causal_lm"), "loss", loss.name,
             "stage=reward trains a Bradley-Terry reward model: use loss=bradley_terry (its margin) or leave loss at its default")
        # nan or inf made every loss nan: refused after training as "a learning rate too high" (an audit, session 45)
        need(math.isfinite(loss.margin), "loss.margin", loss.margin, "must be a finite number (-logsigmoid(r_chosen - r_rejected - margin))")
        check_block_mask_attention(cfg, "stage=reward")
    if cfg.stage.name == "rl":
        rl = cfg.rl
        need(math.isfinite(rl.lr_scale) and rl.lr_scale > 0, "rl.lr_scale", rl.lr_scale,
             "must be a finite number > 0 (the learning rate is train.learning_rate × rl.lr_scale)")
        if loss.name == "grpo":  # rl.num_generations and rl.keep_best_se: sectune.stages.rl.run_grpo
            need(rl.temperature > 0, "rl.temperature", rl.temperature, "must be > 0 (GRPO samples its completions)")
            need(0 < rl.top_p <= 1, "rl.top_p", rl.top_p, "must be in (0, 1]")
            need(rl.max_completion_length >= 1, "rl.max_completion_length", rl.max_completion_length, "must be >= 1")
            need(rl.num_iterations >= 1, "rl.num_iterations", rl.num_iterations, "must be >= 1 (policy updates per generated batch; 0 trains nothing)")
            need(rl.eval_steps >= 0, "rl.eval_steps", rl.eval_steps, "must be >= 0 (0 = score the held-out windows only before and after training)")
            need(rl.heldout_windows >= 0, "rl.heldout_windows", rl.heldout_windows, "must be >= 0 (0 = skip)")
            need(math.isfinite(loss.beta) and loss.beta >= 0, "loss.beta", loss.beta, "must be a finite number >= 0 (the KL weight; 0 = no KL term)")
            need(loss.clip_epsilon > 0, "loss.clip_epsilon", loss.clip_epsilon, "must be > 0 (the policy ratio is clipped to [1-ε, 1+ε])")
            need(rl.num_generations >= 2, "rl.num_generations", rl.num_generations, "GRPO needs at least 2 completions per prompt to compare them")
            check_rl_rewards(cfg)
    keeps_best = cfg.stage.name == "contrastive" or cfg.stage.name == "classify" and cfg.classify.select_best
    if keeps_best and t.eval_steps and t.save_steps:  # was refused after the data and the model loaded (classify: replaced)
        need(t.save_steps % t.eval_steps == 0, "train.save_steps", t.save_steps,
             f"must be a multiple of train.eval_steps={t.eval_steps}: stage={cfg.stage.name} keeps the best checkpoint by an evaluation")
    if cfg.stage.name == "federated":  # before Ray starts: a bad resource request crashed the simulation, which then hung
        import torch

        from sectune.training.federated import LR_SCHEDULES

        f = cfg.federated
        need(f.batch_size is None or f.batch_size >= 1, "federated.batch_size", f.batch_size, "must be >= 1 (null: train.batch_size)")
        need(f.lr_schedule in LR_SCHEDULES, "federated.lr_schedule", f.lr_schedule, f"choose one of {', '.join(LR_SCHEDULES)}")
        need(f.client_num_cpus >= 1, "federated.client_num_cpus", f.client_num_cpus, "must be >= 1 (Ray CPUs, and torch threads, per client)")
        if f.dp:  # Flower's DP wrapper raised them mid-run, a traceback and exit 1
            # inf: a nan averaged adapter, refused after round 1 as weights that diverged (an audit, session 45)
            need(math.isfinite(f.dp_noise_multiplier) and f.dp_noise_multiplier >= 0, "federated.dp_noise_multiplier", f.dp_noise_multiplier,
                 "must be a finite number >= 0 (0: clipping without noise)")
            need(math.isfinite(f.dp_clipping_norm) and f.dp_clipping_norm > 0, "federated.dp_clipping_norm", f.dp_clipping_norm,
                 "must be a finite number > 0 (the L2 norm each client's update is clipped to)")
        need(f.client_num_gpus >= 0, "federated.client_num_gpus", f.client_num_gpus, "must be >= 0")
        need(f.client_num_gpus == 0 or torch.cuda.is_available(), "federated.client_num_gpus", f.client_num_gpus,
             "asks Ray for GPUs, and this machine has none (0: clients on the CPU)")
        # Ray hides every GPU from an actor that asks for none (CUDA_VISIBLE_DEVICES=""): each client then failed on
        # "train.device=cuda but no CUDA device is visible", and the run stopped at round 1
        need(f.runtime != "simulation" or f.client_num_gpus > 0 or cfg.train.device != "cuda", "federated.client_num_gpus",
             f.client_num_gpus, "with train.device=cuda the simulated clients need a share of the GPU from Ray (e.g. 0.2; "
             "0 hides it from them), or train.device=cpu")


def check_rl_rewards(cfg) -> None:
    """``rl.rewards`` (GRPO): known names, finite weights >= 0 (each reward is in [0, 1]: a negative weight rewards a wrong
    answer), one above 0, and a reward model to score with when it is weighted. Found inside run_grpo, after the memory
    check (and in a pipeline after the steps before rl had trained)."""
    from sectune.data.auth_rewards import check_reward_weights
    from sectune.errors import ConfigError

    given = OmegaConf.to_container(cfg.rl.rewards, resolve=True) if cfg.rl.rewards is not None else {}
    try:
        weights = check_reward_weights(given)
    except ValueError as e:
        raise ConfigError(f"rl.rewards: {e}") from None
    negative = [f"{k}={v:g}" for k, v in weights.items() if v < 0]
    if negative:
        raise ConfigError(f"rl.rewards.{negative[0]}: a weight must be >= 0 (every reward is in [0, 1]; 0 logs it unweighted)")
    if not any(weights.values()):
        raise ConfigError("rl.rewards: every weight is 0; weight at least one reward")
    if weights.get("reward_model") and not cfg.rl.reward_model:
        raise ConfigError(f"rl.rewards.reward_model={weights['reward_model']:g} weighs a reward model, but rl.reward_model is not set "
                          "(give a stage=reward run dir; in a pipeline, put reward before rl in pipeline.steps) or weigh it 0")
    if weights.get("reward_model"):
        check_block_mask_attention(cfg, "rl.rewards.reward_model (GRPO scoring with the reward model)")


#: the attention implementations that read a 4D mask as given (transformers' flash-attention kernels take a padding
#: mask only; GRPO's shared-prompt scoring falls back to TRL's rows under them, grpo_trainer.MASKABLE_ATTENTION)
BLOCK_MASK_ATTENTION = (None, "sdpa", "eager")


def check_block_mask_attention(cfg, who: str) -> None:
    """The reward model scores a window's completions in one row (the prompt once, each completion attending to it and
    itself: a 4D block mask, sectune.models.reward_model.SharedPromptCollator); under flash attention that mask is not
    read as given (helper E's gap report, session 45: GRPO's own scoring already falls back)."""
    from sectune.errors import ConfigError

    att = cfg.model.attn_implementation
    if att not in BLOCK_MASK_ATTENTION:
        raise ConfigError(f"model.attn_implementation={att}: {who} scores a window's completions in one row under a block "
                          "mask (each completion sees the prompt and itself) that only sdpa and eager attention read as "
                          "given; set model.attn_implementation=sdpa (or null) for this step")


#: ``quantization.bnb_4bit_compute_dtype`` names → torch dtype names
COMPUTE_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}


def check_quantization(cfg) -> None:
    """The bitsandbytes settings :func:`sectune.models.modeling.quantization_config` passes on, named by key before a model loads."""
    from sectune.errors import ConfigError

    q = cfg.quantization
    if q.name == "none" or not q.load_in_4bit:
        return
    if q.load_in_8bit:
        raise ConfigError("quantization.load_in_8bit=true: cannot be true with quantization.load_in_4bit=true; choose one")
    if q.bnb_4bit_quant_type not in ("nf4", "fp4"):
        raise ConfigError(f"quantization.bnb_4bit_quant_type={q.bnb_4bit_quant_type}: choose nf4 or fp4")
    if q.bnb_4bit_compute_dtype not in COMPUTE_DTYPES:
        raise ConfigError(f"quantization.bnb_4bit_compute_dtype={q.bnb_4bit_compute_dtype}: choose one of {', '.join(COMPUTE_DTYPES)}")
