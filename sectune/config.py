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
    PipelineConfig, ReportConfig, SweepConfig, PlanConfig, DoctorConfig, ExportConfig,
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
    #: the weights' init std (``initializer_range``); wider than the usual 0.02 on purpose (sectune/models/tiny.py)
    init_std: float = 0.1
    #: strings the tokenizer keeps whole (added after BPE training), e.g. an answer schema's keys
    extra_tokens: List[str] = field(default_factory=list)
    #: a ChatML chat template and its <|im_start|>/<|im_end|> tokens (an instruct model's shape, built locally)
    chat_template: bool = False


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
    #: per-device memory caps, {0: 7GiB, cpu: 30GiB} (GPU indices as numbers, from a preset or the command line)
    max_memory: Optional[Dict[Any, str]] = field(default_factory=dict)  # {} = no caps (null too)
    offload_folder: Optional[str] = None
    tiny: Optional[TinySpec] = None
    #: train, score and generate inside the tokenizer's chat template (one user message: the prompt), as an instruct
    #: model was tuned; a model sectune trained keeps the choice it was trained with (sectune/chat_frame.py)
    chat_template: bool = False
    #: a system message before the prompt, inside the chat template (with model.chat_template=true); recorded in the frame
    chat_system: Optional[str] = None
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
    #: rank-stabilised LoRA (Kalajdzievski 2023; PEFT's use_rslora): the update scaled by alpha/sqrt(r), not alpha/r, so a
    #: higher rank does not shrink it
    use_rslora: bool = False
    #: weight-decomposed LoRA (DoRA, Liu et al. 2024; PEFT's use_dora): each targeted weight's magnitude (a vector per
    #: output feature, saved with the adapter) trained apart from its direction (the LoRA update)
    use_dora: bool = False


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
    #: auth-log windows (auth_logs, auth_preferences, injection_*): window (at random, stratified), time (each log's
    #: earliest windows train, its latest test) or source (windows sharing an IP/host kept in one split):
    #: sectune/data/window_splits.py
    split_by: str = "window"
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
    granularity: str = "family"  # fine | family | binary | raw (the file's own labels)
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
    # injection texts go to one split per group: "similar" groups edited variants of one text (a shared run of >= 20
    # characters covering 60% of the shorter, or a difflib ratio >= 0.75) and texts containing one another;
    # "containment" only the latter (sectune before session 25: 5 of deepset's 23 test texts had a variant in train)
    injection_text_groups: str = "similar"
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
    # a loghub log (file, or its folder) whose drain3 clusters are numbered first, so that another log's keys follow its
    # numbering (drain3 numbers templates in order of first appearance in each log); stage=evaluate sets it to the
    # trained run's log when it scores other logs
    drain3_reference: Optional[str] = None


@dataclass
class StageConfig:
    name: str = MISSING

#: train.packing's choices (sectune.training.engine.packing_mode applies them)
PACKING = ("padding_free", "bfd", "none")


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
    device: str = "auto"  # auto | cpu | cuda (auto: cuda when visible, else cpu; on a Mac the CPU)
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
    #: ... on this rank only (None: every rank), as a CUDA OOM on one GPU of a torchrun launch would
    fail_on_rank: Optional[int] = None
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
    export: ExportConfig = field(default_factory=ExportConfig)


#: the resolvers a run's saved config may call: sectune's own (paths on this machine), Hydra's time stamp
SAFE_RESOLVERS = {"sectune_shared_data", "sectune_cache", "now"}


def model_label(m) -> str:
    """How messages name the configured model (``m``: ``cfg.model``): its preset (``model=smollm_135m``), or
    ``model.name_or_path=…`` where that points at another model than the preset's (a user's own model on the
    ``tiny_llama`` preset was called ``model=tiny_llama`` in every message)."""
    from sectune.paths import CONF_DIR

    try:
        own = OmegaConf.load(CONF_DIR / "model" / f"{m.name}.yaml").get("name_or_path")
    except Exception:  # noqa: BLE001 - a preset of the user's own config dir: its name says what it is
        own = m.name_or_path
    if m.name_or_path and str(m.name_or_path) != str(own):
        return f"model.name_or_path={m.name_or_path}"
    return f"model={m.name}"


def model_title(m) -> str:
    """The configured model's name on the console and in plot titles: the preset's, or the ``model.name_or_path`` a user
    set in its place."""
    label = model_label(m)
    return m.name if label.startswith("model=") else str(m.name_or_path)


def load_run_config(cfg_path: Path) -> DictConfig:
    """A run's saved ``.hydra/config.yaml``, with a relative ``dataset.path`` / ``dataset.source_dir`` (and a relative
    ``model.name_or_path`` folder) made absolute
    against the folder that run was started from (``hydra.runtime.cwd`` in the ``hydra.yaml`` beside it, or beside its
    pipeline's): a run trained with ``dataset.path=flows.csv`` is then evaluated from any folder."""
    import yaml

    from sectune.errors import DataError

    import re

    register()  # the saved config interpolates sectune's resolvers
    try:
        text = Path(cfg_path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{cfg_path}: cannot read the run's config ({type(e).__name__}: {e})") from None
    # a run dir may come from elsewhere: its config may name sectune's own resolvers, never oc.env (it would read this
    # machine's environment, tokens included, into paths that errors and result.json then show) or any other
    foreign = sorted(set(re.findall(r"\$\{\s*([\w.]+)\s*:", text)) - SAFE_RESOLVERS)
    if foreign:
        raise DataError(f"{cfg_path}: calls the resolver(s) {', '.join(foreign)}; a run's saved config holds values, and one "
                        "from elsewhere is not trusted to read this machine's environment (remove the interpolation)")
    try:
        cfg = OmegaConf.load(cfg_path)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise DataError(f"{cfg_path}: not a readable config ({type(e).__name__}: {str(e).splitlines()[0]}); the run's own "
                        f"record of its settings is damaged (a copy of a succeeded run's is in .hydra/succeeded/)") from None
    if not isinstance(cfg, DictConfig):
        raise DataError(f"{cfg_path}: not a config (a YAML mapping); the run's record of its settings is damaged")
    trust = OmegaConf.select(cfg, "model.trust_remote_code", default=None, throw_on_resolution_failure=False)
    if isinstance(OmegaConf.select(cfg, "model", default=None, throw_on_resolution_failure=False), DictConfig):
        # code in a model folder runs only when a preset of this sectune says so, never because a run dir's record does:
        # off whatever the record holds (1, 'true', even 'false' passed a check for True and reached from_pretrained as
        # bool(value): an audit, session 37)
        if trust not in (False, None):
            print(f"sectune: warning: {cfg_path} says model.trust_remote_code={trust!r}; evaluating it loads the model with "
                  "it off (a run dir is not a preset)")
        cfg.model.trust_remote_code = False
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
        # a relative model folder too (a run's model/ given to model.name_or_path=), where one is there: a hub id stays
        # as it is (evaluate and Predictor from another folder said "no such folder": an audit, session 36)
        value = OmegaConf.select(cfg, "model.name_or_path", throw_on_resolution_failure=False)
        if (isinstance(value, str) and value and not Path(value).expanduser().is_absolute() and not Path(value).exists()
                and (Path(cwd) / value).is_dir()):
            cfg.model.name_or_path = str(Path(cwd) / value)
    return cfg


def register() -> None:
    """Register the schema and its resolvers; idempotent (tests compose many times)."""
    from omegaconf import OmegaConf

    from sectune import paths

    if not OmegaConf.has_resolver("sectune_shared_data"):
        OmegaConf.register_new_resolver("sectune_shared_data", lambda: str(paths.shared_data_dir()))
        OmegaConf.register_new_resolver("sectune_cache", lambda: str(paths.cache_dir()))
    if not OmegaConf.has_resolver("sectune_run_dir"):
        OmegaConf.register_new_resolver("sectune_run_dir", paths.fresh_run_dir, use_cache=True)
    cs = ConfigStore.instance()
    cs.store(name="sectune_schema", node=SectuneConfig)


def device_choices(value) -> str:
    """What ``train.device=value`` should have been, for its error: ``mps`` (Apple's GPU) is named and refused, not a typo."""
    if str(value).split(":")[0].strip().lower() == "mps":
        # accelerate and Trainer pick mps when use_cpu is off; sectune's placement, precision, memory accounting, planner
        # and quantization know cuda and cpu only, and nothing of it ran on mps
        return ("choose auto, cpu or cuda: Apple's GPU (mps) is not supported (sectune never ran on it); on a Mac "
                "train.device=auto or cpu trains on the CPU")
    return "choose auto, cpu or cuda"
