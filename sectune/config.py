"""The run object: structured-config schemas for every config group.

Each group folder under ``conf/`` is merged into one of these dataclasses, so an unknown key or a
wrong type in a YAML file or a command-line override fails at compose time and names the key
(``Key 'rr' not in 'LoraConfig'``). The key names below are sectune's public contract
(see README): users' scripts and sweeps depend on them. Add freely; rename never.
Each stage's own node (``rl``, ``pipeline``, ``federated``, …) is in :mod:`sectune.config_stages`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from sectune.config_stages import (  # each stage's own settings node
    ClassifyConfig, EvaluateConfig, InferConfig, RewardConfig, DpoConfig, SftConfig,
    RLConfig, ContrastiveConfig, FederatedConfig, MemoryTemplateConfig,
    PipelineConfig, ReportConfig, SweepConfig, PlanConfig, DoctorConfig,
)


@dataclass
class TinySpec:
    """A small random model built locally (no download), saved, then loaded like a hub model."""

    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 256
    vocab_size: int = 2048
    max_position_embeddings: int = 1024
    seed: int = 0
    #: the weights' init std (``initializer_range``); wider than the usual 0.02 on purpose (tiny.py)
    init_std: float = 0.1
    #: strings the tokenizer keeps whole (added after BPE training), e.g. an answer schema's keys
    extra_tokens: List[str] = field(default_factory=list)


@dataclass
class ModelConfig:
    name: str = MISSING
    #: hub id or local folder; ``null`` builds the ``tiny`` spec locally into the cache.
    name_or_path: Optional[str] = None
    family: str = "llama"  # llama | gpt2: which config class a tiny build uses
    #: dtype the weights are loaded in: auto | fp32 | bf16 | fp16
    dtype: str = "fp32"
    max_seq_length: int = 512
    attn_implementation: Optional[str] = "sdpa"
    trust_remote_code: bool = False
    revision: Optional[str] = None
    #: seeds 000/002 mixed GPU/CPU placement: "auto", "cpu", or {module: device}
    device_map: Any = None
    max_memory: Optional[Dict[str, str]] = None
    offload_folder: Optional[str] = None
    tiny: Optional[TinySpec] = None
    #: architecture numbers so ``stage=plan`` works without the weights
    arch: Optional[Dict[str, Any]] = None
    #: the preset's usual learning rate; ``train.learning_rate`` defaults to it
    learning_rate: float = 2e-4


@dataclass
class QuantizationConfig:
    name: str = "none"  # none | nf4 | int8
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    bnb_4bit_quant_type: str = "nf4"  # nf4 | fp4
    bnb_4bit_use_double_quant: bool = True
    bnb_4bit_compute_dtype: str = "bf16"  # bf16 | fp16 | fp32 (or bfloat16 | float16 | float32)


@dataclass
class LoraConfig:
    name: str = "none"
    enabled: bool = False  # false = full fine-tune
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: List[str] = field(default_factory=list)
    bias: str = "none"
    #: extra modules trained in full and saved with the adapter (e.g. a classification head)
    modules_to_save: Optional[List[str]] = None


@dataclass
class LossConfig:
    name: str = "causal_lm"
    label_smoothing: float = 0.0
    # causal_lm: the loss on the first tokens of these answer keys' values times key_weight (1 = off)
    key_weight: float = 1.0
    weighted_keys: List[str] = field(default_factory=list)
    # bradley_terry: -logsigmoid(r_chosen - r_rejected - margin)
    margin: float = 0.0
    # dpo (β of the implicit reward) / grpo (KL weight) / simplified_ppo
    beta: float = 0.04
    clip_epsilon: float = 0.2
    # causal_contrastive (seed 002): λc (lambda_consistency, on L_causal), λs (lambda_separation, on
    # L_spurious), λt and the temperature τ (conf/loss/causal_contrastive.yaml: τ = 0.07)
    lambda_consistency: float = 1.0
    lambda_separation: float = 1.0
    lambda_task: float = 1.0
    temperature: float = 0.1
    # cross_entropy (classify): "balanced", null, or explicit {label: weight}
    class_weights: Any = None


@dataclass
class DatasetConfig:
    name: str = MISSING
    #: file or folder with the data; null = the default built from ``source_dir``
    path: Optional[str] = None
    #: where the real public data lives (the builder reads it; absent → generated data)
    source_dir: str = "${paths.shared_data}"
    max_samples: Optional[int] = None
    val_fraction: float = 0.1
    test_fraction: float = 0.0
    split_seed: int = 0
    # auth_logs builder
    min_lines: int = 6
    max_lines: int = 20
    #: extra SFT windows cut from each training window's lines, re-annotated by the rules (0 = off)
    subwindows: int = 0
    #: extra SFT windows per training window (and per sub-window): the window with its users, IPs, hosts, ports, pids
    #: and timestamps renamed one-to-one (dataset=injection_triplets' counterfactual), re-annotated by the rules (0 = off)
    counterfactuals: int = 0
    # tabular flows
    features: List[str] = field(default_factory=list)
    label_column: str = "label"
    granularity: str = "family"  # fine | family | binary
    nan_policy: str = "impute"  # impute | drop
    prompt_template: str = ""
    # text classification
    text_column: str = "text"
    #: how the classify/evaluate stages read ``path``: flows | text_csv | injections
    #: ("" = the dataset has no classification form)
    format: str = ""
    #: flows: feature scaling fitted on train (robust_log | standard) and rendered digits
    normalizer: str = "robust_log"
    render_precision: int = 3
    #: flows, normalizer=quantile: how many train-quantile bins (10 = deciles 0..9, 100 = percentiles)
    quantile_bins: int = 10
    #: flows: how one feature is written ({name}, {value}) and what joins them into ``{features}``;
    #: "{value}" with " " gives a compact prompt of values in ``features`` order
    feature_format: str = "{name}={value}"
    feature_sep: str = "; "
    #: flows with ``path: null`` and no real file: rows of generated 46-column data
    synthetic_rows: int = 6800
    # auth_preferences: rejected analyses per window (one corruption each), and which corruption
    # kinds with what weights ({kind: weight}; empty = every kind, equally weighted)
    pairs_per_window: int = 2
    corruptions: Dict[str, float] = field(default_factory=dict)
    # user JSONL files (injection_triplets): true = skip malformed lines and count them, false = an
    # error naming the file and line
    skip_bad_lines: bool = False
    # injection_triplets / injection_preferences: the attacker-controlled log fields an instruction is
    # planted in (user | ssh_client | host), the share of log-specific templated injections (the rest
    # are deepset/prompt-injections' injection rows no longer than injection_max_chars), triplets per window
    injection_fields: List[str] = field(default_factory=lambda: ["user", "ssh_client", "host"])
    template_fraction: float = 0.5
    injection_max_chars: int = 160
    injections_per_window: int = 1
    # injections per *training* window (null: injections_per_window): each a fresh text, field and position on
    # the same window, so training sees more planted lines while validation and test keep their own triplets
    train_injections_per_window: Optional[int] = None
    # injection_triplets with stage=sft: also train each injected window → its own correct analysis
    # (``injection_output``), StruQ's adversarial SFT (Chen et al. 2024); false = the benign pairs only
    include_injected: bool = True
    # ... and each triplet's counterfactual (benign_cf) → its own analysis: clean rows as many as injected ones
    include_counterfactual: bool = False
    # hdfs (sectune/data/hdfs.py): which layout ``path: null`` reads from ``source_dir`` (deeplog = DeepLog's
    # key sessions, loghub = raw lines + block labels), how loghub lines get their keys (auto: the
    # structured CSV's EventId when present, else drain3; structured; drain3), and the deeplog key range 1..N
    hdfs_layout: str = "deeplog"
    log_parser: str = "auto"
    num_log_keys: int = 28


@dataclass
class StageConfig:
    name: str = MISSING


@dataclass
class TrainConfig:
    max_steps: int = -1
    epochs: float = 1.0
    batch_size: int = 8
    eval_batch_size: Optional[int] = None
    grad_accum: int = 1
    learning_rate: float = "${model.learning_rate}"  # type: ignore[assignment]
    optimizer: str = "adamw"  # adamw | adafactor | paged_adamw_8bit
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    lr_scheduler: str = "linear"
    max_grad_norm: float = 1.0
    #: NEFTune (Jain et al. 2023): uniform noise of scale alpha/sqrt(L*d) on the input embeddings while
    #: training (transformers' ``neftune_noise_alpha``); null = off
    neftune_noise_alpha: Optional[float] = None
    precision: str = "bf16"  # fp32 | bf16 | fp16
    #: full activation checkpointing (each layer's forward re-run in backward); takes precedence over
    #: ``selective_checkpointing``
    gradient_checkpointing: bool = False
    #: keep matmul and attention outputs for backward and recompute only the elementwise ops (norms,
    #: RoPE, activations, casts) between them: torch's selective activation checkpointing. About half
    #: the saved activations of no checkpointing for a few % of step time (bench/sft_throughput.py);
    #: false keeps every activation (fastest, most memory)
    selective_checkpointing: bool = True
    #: how a batch of SFT examples is laid out (never any cross-example attention):
    #: padding_free — ``batch_size`` examples flattened into one row, zero padding, memory ∝ real tokens;
    #: bfd — rows of ``model.max_seq_length`` packed best-fit-decreasing (TRL), ``batch_size`` rows;
    #: none — ``batch_size`` examples padded to the longest, with an attention mask
    packing: str = "padding_free"
    #: batch examples/rows of similar length together; null = only where it saves padding (bfd, none)
    group_by_length: Optional[bool] = None
    eval_steps: Optional[int] = None
    save_steps: Optional[int] = None
    save_total_limit: Optional[int] = 2
    logging_steps: int = 1
    resume: Optional[str] = None  # null | auto | a checkpoint dir
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda
    #: seeds' periodic memory clearing (torch.*.empty_cache every N steps)
    empty_cache_steps: Optional[int] = None
    num_workers: int = 0


@dataclass
class LoggerConfig:
    name: str = "wandb"  # wandb | tensorboard | none
    project: str = "sectune"
    entity: Optional[str] = None
    #: null = online when an API key is configured, else offline; or offline | online | disabled
    mode: Optional[str] = None
    tags: List[str] = field(default_factory=list)


@dataclass
class GenerationConfig:
    max_new_tokens: int = 160
    temperature: float = 0.2
    top_p: float = 0.9
    repetition_penalty: float = 1.2
    do_sample: bool = False
    #: how many validation prompts the end-of-training preview generates for
    preview_samples: int = 2


@dataclass
class PathsConfig:
    shared_data: str = "${sectune_shared_data:}"
    cache_dir: str = "${sectune_cache:}"


@dataclass
class DebugConfig:
    #: raise inside training after this global step (tests interruption + resume)
    fail_at_step: Optional[int] = None
    #: a quick check run (stage=contrastive): ``max_steps`` steps on ``max_samples`` examples with torch's
    #: autograd anomaly detection on. Spelled ``debug.enabled=true``: Hydra reads ``debug=true`` as a bool,
    #: which cannot replace this node
    enabled: bool = False
    max_steps: int = 4
    max_samples: int = 16


@dataclass
class SectuneConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    sft: SftConfig = field(default_factory=SftConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    dpo: DpoConfig = field(default_factory=DpoConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    federated: FederatedConfig = field(default_factory=FederatedConfig)
    memory_template: MemoryTemplateConfig = field(default_factory=MemoryTemplateConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    doctor: DoctorConfig = field(default_factory=DoctorConfig)


def load_run_config(cfg_path: Path) -> DictConfig:
    """A run's saved ``.hydra/config.yaml``, with a relative ``dataset.path`` / ``dataset.source_dir`` made absolute
    against the folder that run was started from (``hydra.runtime.cwd`` in the ``hydra.yaml`` beside it, or beside its
    pipeline's): a run trained with ``dataset.path=flows.csv`` is then evaluated from any folder."""
    register()  # the saved config interpolates sectune's resolvers
    cfg = OmegaConf.load(cfg_path)
    run_dir = Path(cfg_path).parent.parent
    cwd = None
    for hydra_yaml in (run_dir / ".hydra" / "hydra.yaml", run_dir.parent / ".hydra" / "hydra.yaml"):
        if hydra_yaml.is_file():
            try:
                cwd = OmegaConf.select(OmegaConf.load(hydra_yaml), "hydra.runtime.cwd")
            except Exception:  # noqa: BLE001 - an unreadable record: paths stay as saved
                cwd = None
            break
    if cwd:
        for key in ("path", "source_dir"):
            value = OmegaConf.select(cfg, f"dataset.{key}", throw_on_resolution_failure=False)
            if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
                cfg.dataset[key] = str(Path(cwd) / value)
    return cfg


def register() -> None:
    """Register the schema and its resolvers; idempotent (tests compose many times)."""
    from omegaconf import OmegaConf

    from sectune import paths

    if not OmegaConf.has_resolver("sectune_shared_data"):
        OmegaConf.register_new_resolver("sectune_shared_data", lambda: str(paths.shared_data_dir()))
        OmegaConf.register_new_resolver("sectune_cache", lambda: str(paths.cache_dir()))
    cs = ConfigStore.instance()
    cs.store(name="sectune_schema", node=SectuneConfig)


def check_keys(cfg) -> None:
    """Every key is one the schema has. Hydra's ``+key=value`` appends a key past the schema (and Hydra suggests it
    for a typo'd key), so ``+train.learning_rat=1e-3`` ran to the end with the setting ignored."""
    from omegaconf.errors import ConfigKeyError

    from sectune.errors import ConfigError

    try:
        # as plain data: merged as it is, Hydra's config carries the schema's node types, and the appended key along
        OmegaConf.merge(OmegaConf.structured(SectuneConfig), OmegaConf.create(OmegaConf.to_container(cfg, resolve=False)))
    except ConfigKeyError as e:
        key = getattr(e, "full_key", None) or "?"
        raise ConfigError(f"{key}: not a sectune setting ({str(e).splitlines()[0]}); check its spelling "
                          "(`sectune --cfg job` prints every key)") from None


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
    alpha = cfg.evaluate.bigram_alpha
    need(math.isfinite(alpha) and alpha > 0, "evaluate.bigram_alpha", alpha,
         "must be > 0 (add-alpha smoothing: at 0 a key pair never seen in training has probability 0 and its session scores NaN)")
    need(cfg.infer.window_lines is None or cfg.infer.window_lines >= 0, "infer.window_lines", cfg.infer.window_lines,
         "must be >= 0 (0: one analysis per file; null: dataset.max_lines)")
    t = cfg.train
    need(t.max_steps > 0 or t.epochs > 0, "train.epochs", t.epochs, "must be > 0 when train.max_steps=-1 (0 would save an untrained model)")
    need(0 <= t.warmup_ratio <= 1, "train.warmup_ratio", t.warmup_ratio, "must be in [0, 1] (a fraction of the steps)")
    need(t.max_grad_norm >= 0, "train.max_grad_norm", t.max_grad_norm, "must be >= 0 (0 = no clipping)")
    need(t.save_steps is None or t.save_steps >= 0, "train.save_steps", t.save_steps, "must be >= 0 (0 or null = no checkpoints)")
    check_split_seed(cfg.dataset.split_seed)
    need(0 <= cfg.loss.label_smoothing < 1, "loss.label_smoothing", cfg.loss.label_smoothing, "must be in [0, 1)")
    if cfg.lora.enabled:
        need(cfg.lora.r >= 1, "lora.r", cfg.lora.r, "must be >= 1")
        need(cfg.lora.alpha > 0, "lora.alpha", cfg.lora.alpha, "must be > 0")
        need(0 <= cfg.lora.dropout < 1, "lora.dropout", cfg.lora.dropout, "must be in [0, 1)")
        need(cfg.lora.bias in ("none", "all", "lora_only"), "lora.bias", cfg.lora.bias, "choose none, all or lora_only")
    g = cfg.generation
    need(g.max_new_tokens >= 1, "generation.max_new_tokens", g.max_new_tokens, "must be >= 1")
    need(g.temperature > 0 or not g.do_sample, "generation.temperature", g.temperature, "must be > 0 when generation.do_sample=true")
    need(0 < g.top_p <= 1, "generation.top_p", g.top_p, "must be in (0, 1]")
    need(g.repetition_penalty > 0, "generation.repetition_penalty", g.repetition_penalty, "must be > 0 (1.0 = no penalty)")
    check_quantization(cfg)
    check_sweep(cfg)
    loss = cfg.loss
    if loss.name == "dpo":  # β = 0 makes the loss log 2 for every pair: no gradient; β < 0 prefers the rejected answer
        need(math.isfinite(loss.beta) and loss.beta > 0, "loss.beta", loss.beta, "must be a number > 0 (the DPO β)")
    if cfg.stage.name == "dpo":
        dpo_sft_weight(cfg)
    if cfg.stage.name == "rl":
        rl = cfg.rl
        need(rl.lr_scale > 0, "rl.lr_scale", rl.lr_scale, "must be > 0 (the learning rate is train.learning_rate × rl.lr_scale)")
        if loss.name == "grpo":  # rl.num_generations and rl.keep_best_se: sectune.stages.rl.run_grpo
            need(rl.temperature > 0, "rl.temperature", rl.temperature, "must be > 0 (GRPO samples its completions)")
            need(0 < rl.top_p <= 1, "rl.top_p", rl.top_p, "must be in (0, 1]")
            need(rl.max_completion_length >= 1, "rl.max_completion_length", rl.max_completion_length, "must be >= 1")
            need(rl.num_iterations >= 1, "rl.num_iterations", rl.num_iterations, "must be >= 1 (policy updates per generated batch; 0 trains nothing)")
            need(rl.eval_steps >= 0, "rl.eval_steps", rl.eval_steps, "must be >= 0 (0 = score the held-out windows only before and after training)")
            need(rl.heldout_windows >= 0, "rl.heldout_windows", rl.heldout_windows, "must be >= 0 (0 = skip)")
            need(loss.beta >= 0, "loss.beta", loss.beta, "must be >= 0 (the KL weight; 0 = no KL term)")
            need(loss.clip_epsilon > 0, "loss.clip_epsilon", loss.clip_epsilon, "must be > 0 (the policy ratio is clipped to [1-ε, 1+ε])")
    if cfg.stage.name == "federated":  # before Ray starts: a bad resource request crashed the simulation, which then hung
        import torch

        from sectune.federated import LR_SCHEDULES

        f = cfg.federated
        need(f.batch_size is None or f.batch_size >= 1, "federated.batch_size", f.batch_size, "must be >= 1 (null: train.batch_size)")
        need(f.lr_schedule in LR_SCHEDULES, "federated.lr_schedule", f.lr_schedule, f"choose one of {', '.join(LR_SCHEDULES)}")
        need(f.client_num_cpus >= 1, "federated.client_num_cpus", f.client_num_cpus, "must be >= 1 (Ray CPUs, and torch threads, per client)")
        need(f.client_num_gpus >= 0, "federated.client_num_gpus", f.client_num_gpus, "must be >= 0")
        need(f.client_num_gpus == 0 or torch.cuda.is_available(), "federated.client_num_gpus", f.client_num_gpus,
             "asks Ray for GPUs, and this machine has none (0: clients on the CPU)")


#: ``quantization.bnb_4bit_compute_dtype`` names → torch dtype names
COMPUTE_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}


def check_quantization(cfg) -> None:
    """The bitsandbytes settings :func:`sectune.modeling.quantization_config` passes on, named by key before a model loads."""
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


def check_sweep(cfg) -> None:
    """``sweep.direction``, which the Optuna preset hands to its study (sectune.cli.SweepCheck checks it before a sweep starts)."""
    from sectune.errors import ConfigError

    if cfg.sweep.direction not in ("minimize", "maximize"):
        raise ConfigError(f"sweep.direction={cfg.sweep.direction}: choose minimize or maximize")


def dpo_sft_weight(cfg) -> float:
    """``dpo.sft_weight`` as a float, checked (finite, >= 0): by check_values before the models load and by
    build_dpo_trainer for callers that skip it."""
    import math

    from sectune.errors import ConfigError

    w = float(cfg.dpo.sft_weight)
    if not (math.isfinite(w) and w >= 0):
        raise ConfigError(f"dpo.sft_weight={cfg.dpo.sft_weight}: a finite weight >= 0 (0 = plain DPO)")
    return w
