"""``stage=plan``: the predicted training-memory budget of the composed config, no weights loaded.

The numbers come from ``sectune.training.planner.estimate_memory``; this stage only maps the config onto
its arguments:

* arch: ``model.arch`` (every real preset carries its config.json numbers), else the
  ``config.json`` of the tiny model (built locally) or of a cached/local model, via
  ``planner.measure_arch``. Nothing else is read: a 70 GB model plans on a laptop.
* weights in ``model.dtype`` (``auto`` counted as bf16); activations in the autocast dtype of
  ``train.precision`` (bf16/fp16 → 2 bytes; fp32 → the weights' dtype). The planner takes one
  dtype, so it is asked twice and the two budgets are combined.
* ``upcast_non_quantized=True`` whenever quantized: modeling.load_model runs peft's
  ``prepare_model_for_kbit_training``, which casts every non-quantized parameter (embeddings,
  lm_head, norms) to fp32.
* device: ``plan.device``, else where the run would train (``train.device``; auto = cuda when
  visible). Plan a GPU run from a CPU box with ``plan.device=cuda``.

Writes ``plan.md`` (the table) and puts ``predicted_peak_bytes`` and each component in metrics.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from sectune.errors import ConfigError
from sectune.runner import RunContext
from sectune.training import planner
from sectune.training.memory import offload_split, offload_text, trains_score_head

COMPONENTS = ("weights", "adapters", "optimizer_state", "gradients", "activations", "runtime_overhead")


#: model.arch's sizes: whole numbers > 0 (0, a negative or a missing one gave a budget for an impossible model, or a traceback)
ARCH_SIZES = ("hidden_size", "num_layers", "num_heads", "intermediate_size", "vocab_size")


def check_arch(arch: dict, where: str) -> dict:
    bad = [f"{k}={arch.get(k)!r}" for k in ARCH_SIZES
           if isinstance(arch.get(k), bool) or not isinstance(arch.get(k), int) or arch[k] <= 0]
    bad += [f"{k}={arch[k]!r}" for k in ("num_kv_heads", "head_dim") if arch.get(k) is not None
            and (isinstance(arch[k], bool) or not isinstance(arch[k], int) or arch[k] <= 0)]
    if bad:
        raise ConfigError(f"{where}: {', '.join(bad)}: each of {', '.join(ARCH_SIZES)} (and num_kv_heads, head_dim when set) "
                          "must be a whole number > 0")
    return arch


def model_arch(model_cfg: DictConfig, cfg: DictConfig) -> tuple[dict, str]:
    """The arch dict for a model node and where it came from."""
    if model_cfg.arch:
        return check_arch(dict(OmegaConf.to_container(model_cfg.arch, resolve=True)), "model.arch"), "model.arch"
    from transformers import AutoConfig

    if model_cfg.name_or_path is None and model_cfg.tiny is not None:
        from sectune.models.tiny import ensure_tiny_model

        spec = OmegaConf.to_container(model_cfg.tiny, resolve=True)
        path = str(ensure_tiny_model(model_cfg.name, model_cfg.family, spec, Path(cfg.paths.shared_data), Path(cfg.paths.cache_dir)))
        return planner.measure_arch(AutoConfig.from_pretrained(path)), f"{path}/config.json"
    path = str(model_cfg.name_or_path)
    try:
        hf = AutoConfig.from_pretrained(path, local_files_only=True, revision=model_cfg.revision,
                                        trust_remote_code=model_cfg.get("trust_remote_code") is True)
    except OSError:
        raise ConfigError(
            f"model={model_cfg.name}: model.arch is null and {path}'s config.json is not available locally; "
            "set model.arch (hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size, vocab_size, family) in a "
            "model preset of your own (--config-dir my_conf, my_conf/model/<name>.yaml, as conf/model/llama2_7b.yaml does; "
            "Hydra cannot set it from the command line while it is null)"
        ) from None
    return planner.measure_arch(hf), f"{path} config.json"


def plan_device(cfg: DictConfig) -> str:
    want = cfg.plan.device or cfg.train.device
    if want == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    if want not in ("cpu", "cuda"):
        raise ConfigError(f"plan.device={want!r}: choose cpu or cuda (or null for train.device)")
    return want


def lora_targets(cfg: DictConfig, arch: dict | None = None):
    """``lora.target_modules`` as the planner takes them; with ``arch``, a list that names no linear of that model is
    an error (peft refuses it when the run starts; the plan gave 0 trainable parameters and the base model's budget)."""
    targets = list(cfg.lora.target_modules)
    if targets == ["all-linear"]:
        return "all_linear"
    if arch is not None and arch.get("family") == "gpt2":
        from sectune.models.modeling import GPT2_NAMES

        # the lora presets name Llama's projections; modeling.apply_lora trains them as GPT-2's (c_attn, c_proj, c_fc),
        # so the plan maps them the same way instead of refusing a run that trains
        have = {n.split(".")[-1] for n, *_ in planner.linear_shapes(arch)}
        missing = [t for t in targets if t not in have]
        if missing and all(t in GPT2_NAMES for t in missing):
            targets = list(dict.fromkeys(GPT2_NAMES.get(t, t) for t in targets))
    if arch is not None and not planner.lora_modules(arch, targets):
        names = sorted({n.split(".")[-1] for n, *_ in planner.linear_shapes(arch)})
        raise ConfigError(f"lora.target_modules={targets}: no linear layer of this model is named so; its linears: {', '.join(names)}")
    return targets


#: What bench/gpu_memory.py measured on one H200 (README, "Measured figures"): the largest
#: measured/predicted peak per kind of run. Said in every CUDA plan; stage=doctor warns inside it.
GPU_MARGIN = {"bf16": 1.31, "fp32": 1.68, "int8": 1.31}
GPU_CHECK = (
    "checked on one H200 (bench/gpu_memory.py, 2026-11-24 and 2026-12-04): weights, adapters and optimizer state were "
    f"within 1% of the measurement, but the peak footprint was 1.10-{GPU_MARGIN['bf16']}x this total with bf16 autocast "
    f"or nf4 ({GPU_MARGIN['fp32']}x in fp32; activations 1.05-1.29x, CUDA context ~0.9 GB, caching-allocator slack 1-2.3 GB); "
    "keep that margin, or run bench/gpu_memory.py on your GPU. Seed 000's pipeline on one H100 (bench/gpu_stages.py, "
    "2026-12-05): its SFT step 1.15x, reward step 1.20x, GRPO step 1.35x the memory check's plan (sampling included, and "
    "the reward model's second copy of the base it then loaded; it now shares the policy's, ~1.5x expected without it)"
)
GPU_CHECK_INT8 = f"; with int8 it was {GPU_MARGIN['int8']}x"


def measured_gpu_margin(quantization: str, precision: str = "bf16") -> float:
    """The largest measured/predicted ratio seen on the H200 for this kind of run (see GPU_CHECK)."""
    if quantization == "int8":
        return GPU_MARGIN["int8"]
    return GPU_MARGIN["fp32"] if precision == "fp32" else GPU_MARGIN["bf16"]


def batch_shape(cfg: DictConfig, model_cfg: DictConfig | None = None) -> tuple[int, int]:
    """(batch size, sequence length) the activations are counted for: ``plan.batch_size`` / ``plan.seq_len`` when
    set, else ``train.batch_size`` / ``model.max_seq_length``; a value below 1 is an error naming its key."""
    m = model_cfg if model_cfg is not None else cfg.model
    p = cfg.plan
    batch = ("plan.batch_size", p.batch_size, " (or null: train.batch_size)") if p.batch_size is not None else \
        ("train.batch_size", cfg.train.batch_size, "")
    seq = ("plan.seq_len", p.seq_len, " (or null: model.max_seq_length)") if p.seq_len is not None else \
        ("model.max_seq_length", m.max_seq_length, "")
    for key, value, unset in (batch, seq):
        if value is None or int(value) < 1:
            raise ConfigError(f"{key}={value}: must be >= 1{unset}")
    return int(batch[1]), int(seq[1])


def template_budget_gb(cfg: DictConfig) -> float | None:
    """``memory_template.budget_gb`` (GiB) of a ``+memory_template=…`` run, None without one; <= 0 is an error."""
    mt = cfg.get("memory_template")
    if mt is None or mt.budget_gb is None:
        return None
    if not float(mt.budget_gb) > 0:
        raise ConfigError(f"memory_template.budget_gb={mt.budget_gb}: must be > 0 (GiB of the device the template is sized for)")
    return float(mt.budget_gb)


def estimate(cfg: DictConfig, model_cfg: DictConfig | None = None, logit_tokens: int | None = None) -> tuple[planner.Budget, dict]:
    """The Budget for ``cfg`` (optionally with another model node) and the settings used; ``logit_tokens``: the
    positions the LM head runs on (None: every one; planner.estimate_memory)."""
    m = model_cfg if model_cfg is not None else cfg.model
    batch_size, seq_len = batch_shape(cfg, m)
    arch, arch_source = model_arch(m, cfg)
    weight_dtype = "bf16" if m.dtype == "auto" else str(m.dtype)
    if weight_dtype not in planner.DTYPE_BYTES:
        raise ConfigError(f"model.dtype={m.dtype!r}: choose fp32, bf16, fp16 or auto")
    precision = cfg.train.precision
    act_dtype = precision if precision in ("bf16", "fp16") else weight_dtype
    q = cfg.quantization.name
    if q not in planner.QUANTIZATIONS:
        raise ConfigError(f"quantization={q!r}: the planner knows {', '.join(planner.QUANTIZATIONS)}")
    if q != "none" and not cfg.lora.enabled:
        raise ConfigError(f"quantization={q} needs LoRA (lora=r4_attention|r16_all_linear): quantized weights cannot be trained")
    if cfg.train.optimizer not in planner.OPTIMIZERS:
        raise ConfigError(f"train.optimizer={cfg.train.optimizer!r}: choose one of {', '.join(planner.OPTIMIZERS)}")
    settings = dict(
        quantization=q,
        lora_r=int(cfg.lora.r) if cfg.lora.enabled else None,
        lora_targets=lora_targets(cfg, arch) if cfg.lora.enabled else "attention",
        optimizer=cfg.train.optimizer,
        seq_len=seq_len,
        batch_size=batch_size,
        gradient_checkpointing=bool(cfg.train.gradient_checkpointing),
        selective_checkpointing=bool(cfg.train.selective_checkpointing),
        device=plan_device(cfg),
        lora_dropout=float(cfg.lora.dropout),
        lora_dora=bool(cfg.lora.enabled and cfg.lora.get("use_dora", False)),
        upcast_non_quantized=q != "none",
        logit_tokens=logit_tokens,
        score_head=trains_score_head(cfg),  # the reward model: a score head, no LM head
        # causal_contrastive's three forwards keep their layer inputs together, but each graph is recomputed on its own
        # in the backward unless contrastive.forward=batched runs them as one
        recompute_share=(1 / 3 if cfg.loss.name == "causal_contrastive" and str(cfg.contrastive.forward) != "batched" else 1.0),
    )
    try:
        w = planner.estimate_memory(arch, dtype=weight_dtype, **settings)
        a = w if act_dtype == weight_dtype else planner.estimate_memory(arch, dtype=act_dtype, **settings)
    except ValueError as e:
        raise ConfigError(f"stage=plan: {e}") from None
    if settings["device"] == "cuda":
        runtime = planner.CUDA_CONTEXT + planner.ALLOCATOR_SLACK * (a.activations + w.gradients)
    else:
        runtime = planner.CPU_RUNTIME
    comps = dict(weights=w.weights, adapters=w.adapters, optimizer_state=w.optimizer_state, gradients=w.gradients,
                 activations=a.activations, runtime_overhead=int(runtime))
    notes = list(w.notes)
    if a is not w:
        notes = [n for n in notes if not n.startswith("activations for")] + [
            n for n in a.notes if n.startswith("activations for")
        ]
        notes.append(f"weights/optimizer in {weight_dtype}, activations in {act_dtype} (train.precision={precision} autocast)")
    if q != "none":
        notes.append("non-quantized params counted in fp32: prepare_model_for_kbit_training upcasts them")
    if settings["device"] == "cuda":
        notes.append(GPU_CHECK + (GPU_CHECK_INT8 if q == "int8" else ""))
    budget = planner.Budget(**comps, total=sum(comps.values()), device=settings["device"], params=w.params,
                            trainable_params=w.trainable_params, notes=notes)
    info = dict(settings, model=m.name, arch_source=arch_source, weight_dtype=weight_dtype, activation_dtype=act_dtype)
    info["offload"] = None  # model.device_map + a GPU cap in model.max_memory: the GPU and CPU sides (sectune.training.memory)
    if m.device_map is not None and m.max_memory and settings["device"] == "cuda":
        # accelerate places the weights as loaded: peft's fp32 upcast of the non-quantized ones comes after, where they sit
        as_loaded = w.weights if q == "none" else planner.estimate_memory(
            arch, dtype=weight_dtype, **dict(settings, upcast_non_quantized=False)).weights
        info["offload"] = offload_split(m, q, budget, as_loaded, planner.largest_block_bytes(arch, q, weight_dtype))
    return budget, info


def markdown(budget: planner.Budget, info: dict) -> str:
    lora = f"LoRA r={info['lora_r']} on {info['lora_targets']}" if info["lora_r"] else "full fine-tune"
    head = [
        f"# Memory plan: {info['model']}",
        "",
        f"{info['quantization']} · {lora} · {info['optimizer']} · batch {info['batch_size']} x seq {info['seq_len']}"
        f" · gradient checkpointing {'on' if info['gradient_checkpointing'] else 'selective' if info.get('selective_checkpointing') else 'off'}"
        f" · {info['device']}"
        f" · arch from {info['arch_source']}",
        "",
        f"Predicted peak: **{budget.total / planner.GiB:.2f} GiB** ({budget.total / 1e9:.2f} GB).",
        "",
    ]
    off = info.get("offload")
    if off:
        head[-1:] = ["", offload_markdown(off), "", ""]
    return "\n".join(head) + budget.to_markdown() + "\n"


def offload_markdown(off: dict) -> str:
    """The GPU / CPU split of a ``model.device_map`` + ``model.max_memory`` plan, under the whole-model peak."""
    text = (f"That is the whole model on one device. With model.device_map and {off['gpu_key']}, the GPU {'would hold' if off['refused'] else 'holds'} "
            f"**{off['gpu_bytes'] / planner.GiB:.2f} GiB** ({off['gpu_bytes'] / 1e9:.2f} GB: the table with "
            f"{off['gpu_weights'] / 1e9:.2f} GB of its weights): {offload_text(off)}.")
    if off["offloaded"] and not off["refused"]:
        text += (f" The offloaded layers run slower: they stay in CPU RAM and accelerate copies each one onto the GPU for "
                 f"every forward and backward pass (up to {off['largest_block'] / 1e9:.2f} GB at a time, the cap keeps room for it).")
    return text


def all_models_table(cfg: DictConfig) -> str:
    """One row per conf/model preset under the composed quantization/LoRA/train settings."""
    import yaml

    from sectune.config import ModelConfig
    from sectune.paths import PROJECT_ROOT

    lines = ["| model | total GiB | weights | adapters | optimizer | gradients | activations | runtime |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for path in sorted((PROJECT_ROOT / "conf" / "model").glob("*.yaml")):
        node = OmegaConf.merge(OmegaConf.structured(ModelConfig), yaml.safe_load(path.read_text(encoding="utf-8")) or {})
        try:
            b, _ = estimate(cfg, node)  # plan.seq_len, else this preset's max_seq_length
        except ConfigError as e:
            lines.append(f"| {path.stem} | error: {e} |||||||")
            continue
        cells = " | ".join(f"{getattr(b, c) / planner.GiB:.2f}" for c in COMPONENTS)
        lines.append(f"| {path.stem} | **{b.total / planner.GiB:.2f}** | {cells} |")
    return "\n".join(lines) + "\n"


def memory_template_check(cfg: DictConfig, budget: planner.Budget, peak: int | None = None) -> tuple[dict, str] | None:
    """With a seed-002 memory template (``+memory_template=…``): the predicted peak (``peak``: the GPU side of an
    offloaded plan) against its budget (GiB)."""
    budget_gb = template_budget_gb(cfg)
    if budget_gb is None:
        return None
    peak = budget.total if peak is None else peak
    limit = budget_gb * planner.GiB
    fits = peak <= limit
    verdict = "fits" if fits else f"does NOT fit (over by {(peak - limit) / planner.GiB:.2f} GiB)"
    line = (f"Memory template {cfg.memory_template.name}: budget {budget_gb:g} GiB; predicted peak {peak / planner.GiB:.2f} GiB "
            f"on {budget.device}: {verdict}.")
    return {"memory_template_budget_bytes": int(limit), "fits_memory_template": int(fits)}, line


#: sequences one training example keeps activations for at once, by loss: chosen + rejected (the reward stage's own
#: memory check, sectune.training.memory.memory_check, counts its 2 the same way; TRL's DPO concatenates the pair)
SEQUENCES_PER_EXAMPLE = {"bradley_terry": (2, "chosen + rejected"), "dpo": (2, "chosen + rejected"),
                         # the three forwards' activations live until the step's backward (an audit, session 36, measured
                         # 2.0-2.3x an SFT step's saved tensors on the tiny model; planned as one sequence, seed 002's
                         # high_quality template "fit"); the LM head runs on the benign answer only (memory.logit_positions)
                         "causal_contrastive": (3, "benign + counterfactual + injected, kept until the backward")}


def run(ctx: RunContext) -> dict:
    from sectune.runner import write_json_atomic

    cfg = ctx.cfg
    template_budget_gb(cfg)  # before estimate, which checks the batch shape (batch_shape) before any model config is read
    k, why = SEQUENCES_PER_EXAMPLE.get(str(cfg.loss.name), (1, ""))
    per_example = ""
    if k > 1 and cfg.plan.batch_size is None and cfg.train.batch_size is not None and int(cfg.train.batch_size) >= 1:
        cfg = OmegaConf.merge(cfg, {"plan": {"batch_size": k * int(cfg.train.batch_size)}})
        per_example = (f"loss={cfg.loss.name}: each example keeps {k} sequences ({why}), so the activations are planned "
                       f"for train.batch_size × {k} = {cfg.plan.batch_size} sequences (plan.batch_size=N sets it).\n")
    from sectune.training.memory import logit_positions

    positions = logit_positions(cfg, batch_shape(cfg, cfg.model)[0])  # the reward/RL stages' own checks plan the same
    budget, info = estimate(cfg, logit_tokens=positions)
    text = markdown(budget, info)
    # a pipeline preset (sft → reward → rl) composed with stage=plan plans the train.* batch, not GRPO's G-fold one
    G = int(cfg.rl.num_generations)
    text += "\n" + per_example
    text += (f"This plans one training batch of train.batch_size × the sequence length (SFT, classify; "
             f"reward and DPO, loss=bradley_terry|dpo: its 2 sequences per example, counted above). "
             f"GRPO's step (stage=rl loss=grpo, a pipeline's rl step) holds train.batch_size × rl.num_generations (G={G}) "
             f"sequences: plan it with plan.batch_size=<its batch × G>.\n")
    print(text)
    metrics = {"predicted_peak_bytes": budget.total, "params": budget.params, "trainable_params": budget.trainable_params}
    metrics.update({f"predicted_{c}_bytes": getattr(budget, c) for c in COMPONENTS})
    off = info["offload"]
    if off:
        metrics.update(predicted_gpu_peak_bytes=off["gpu_bytes"], predicted_offloaded_bytes=off["offloaded"])
    artifacts = {"plan": "plan.md", "plan_json": "plan.json"}
    template = memory_template_check(cfg, budget, off["gpu_bytes"] if off else None)
    if template:
        metrics.update(template[0])
        print(template[1])
        text += "\n" + template[1] + "\n"
    if cfg.plan.all_models:
        table = all_models_table(cfg)
        print(table)
        text += "\n## Every model preset with these settings\n\n" + table
    tmp = ctx.path(".plan.md.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(ctx.path("plan.md"))
    write_json_atomic(ctx.path("plan.json"), {"settings": info, "budget": {c: getattr(budget, c) for c in (*COMPONENTS, "total")},
                                              "notes": budget.notes})
    print(f"sectune: plan written to {ctx.path('plan.md')} (the table) and plan.json (the budget, as numbers)")
    return {"metrics": metrics, "artifacts": artifacts}
