"""Each stage's own settings node (``classify``, ``evaluate``, ``infer``, ``sft``, ``reward``, ``dpo``, ``rl``,
``contrastive``, ``federated``, ``pipeline``, ``report``, ``sweep``, ``plan``, ``doctor``, ``export``) and the memory
templates: the structured-config schemas :class:`sectune.config.SectuneConfig` composes. The nodes every
run shares (model, lora, dataset, train, …) are in :mod:`sectune.config`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

#: classify.pooling's choices (checked before anything loads; sectune.training.classification.set_pooling applies them)
POOLINGS = ("last", "mean")


@dataclass
class ClassifyConfig:
    head: str = "seq_cls"  # seq_cls | generative
    #: ``seq_cls`` head: the class logits of the ``mean`` over all real tokens
    #: (:func:`sectune.training.classification.set_pooling`) or of the ``last`` real token (transformers'
    #: default for decoder models). Mean measured better on both real tasks here (CIC families
    #: 0.93-0.95x RF vs 0.90-0.92x; injections 0.909 vs 0.879 mean F1 over 5 seeds).
    pooling: str = "mean"
    #: binary tasks: pick the decision threshold on the validation split (never test)
    tune_threshold: bool = True
    #: end the classify run with the test-split evaluation (evaluation/ folder)
    evaluate_test: bool = True
    #: score the validation split at every evaluation (each epoch, or every ``train.eval_steps``) and
    #: keep the weights with the best validation macro-F1 (Trainer's ``load_best_model_at_end``);
    #: false keeps the last weights. Never looks at test.
    select_best: bool = True
    #: 1 trains one model on the train split. k >= 2 trains a k-fold cross-fitted ensemble: member i
    #: learns on the other k-1 stratified folds of the train split and selects its weights on fold i;
    #: the binary decision threshold is chosen on the out-of-fold predictions of every train row
    #: (``cv_macro_f1``), and validation/test are scored by the members' mean probabilities.
    #: k times the training and scoring cost.
    folds: int = 1
    #: BPE-dropout (subword regularization): in every epoch, every applicable BPE merge of every
    #: train row is skipped with this probability, so the model sees the text cut into varied smaller
    #: pieces, as obfuscated input cuts it (0.1 in the paper; 0 = off). Seeded from ``train.seed``
    #: (:mod:`sectune.models.subword`); validation, test and the Predictor tokenize deterministically.
    #: Needs a fast BPE tokenizer (GPT-2, Llama 3, the tiny models).
    subword_dropout: float = 0.0


@dataclass
class EvaluateConfig:
    model_dir: Optional[str] = None
    split: str = "test"
    #: a classify run: a NEW labelled file (the run's format and columns: flow CSV / text,label CSV) scored whole
    #: instead of a split, beside the baselines fitted on the run's own train split (split is then ignored)
    data_path: Optional[str] = None
    batch_size: int = 32
    #: trees in the RandomForest baseline (flows)
    rf_estimators: int = 200
    #: dataset=injection_triplets: score only the first N triplets of the split (null = all)
    max_samples: Optional[int] = None
    #: dataset=hdfs (sectune/evaluation/anomaly.py): add-alpha smoothing of the bigram baseline's next-key probabilities (> 0)
    bigram_alpha: float = 0.01
    #: dataset=injection_triplets: more analyst runs (sft, dpo, rl, contrastive or pipeline dirs) that answer beside
    #: model_dir, two or more; the verdict most of them give is scored, a tie going to the earliest (model_dir first), with
    #: each member's own metrics beside it (sectune/evaluation/vote.py). [] = model_dir alone
    vote_with: List[str] = field(default_factory=list)


@dataclass
class InferConfig:
    #: a run dir (rl, dpo or sft) or a pipeline dir; the newest of RL -> DPO -> SFT adapter found
    #: there answers, else the base model. null = the base model.
    model_dir: Optional[str] = None
    #: when model_dir is a sectune run/pipeline dir whose models are all unusable (failed, files
    #: missing): true = the base model answers, with a warning naming what was skipped; false = error
    base_fallback: bool = True
    #: one log file, or a folder of them (one analysis per file, or per window of a longer file: window_lines)
    input_file: Optional[str] = None
    #: a file of more lines than this is cut into consecutive windows of at most this many lines, one analysis
    #: each (the analyst learnt from windows of dataset.min_lines..max_lines lines; a whole auth.log fits neither its
    #: training nor its context). null = dataset.max_lines; 0 = one analysis per file, however long
    window_lines: Optional[int] = None
    #: the JSON list written; null = <run dir>/analyses.json
    output_file: Optional[str] = None
    #: schema-constrained decoding: every output parses and validates by construction
    constrained: bool = False
    #: put the whole JSON schema in the prompt (seed 000's --full_schema)
    full_schema: bool = False
    #: more analyst runs (sft, dpo or rl run dirs, or pipeline dirs) that answer every window beside model_dir, two or
    #: more, one model in memory at a time: the verdict most of them give is kept, a tie going to the earliest (model_dir
    #: first), with the whole answer of the earliest voter that gave it (sectune/evaluation/vote.py). [] = model_dir alone
    vote_with: List[str] = field(default_factory=list)
    batch_size: int = 4
    #: the schema outputs are checked (and constrained) against; null = sectune/data/auth_schema.json
    schema: Optional[str] = None
    #: with constrained decoding, string fields that can only name what the window holds, as path:kind (a dotted path;
    #: kind address = IPs and host names, user = the word after "user", "user=" or "for"), so an analysis never reports an
    #: address or user its log does not mention; for the auth schema: [source_ips.ip:address,invalid_users:user,
    #: targeted_users:user]. Off by default: it costs the tiny analyst verdicts (README, "Grounded names")
    grounded_fields: List[str] = field(default_factory=list)


@dataclass
class SftConfig:
    #: a warm-up before the SFT on the configured data (``dataset=auth_logs`` only): this many generated auth-log
    #: lines (:mod:`sectune.data.synthetic_auth`: fresh IPs, users and pids in every session) cut into windows the
    #: rules annotate, trained on for ``warmup_epochs`` in ``<run dir>/warmup/``; the SFT then starts from those
    #: weights. Meant to teach a model trained from random weights to copy names out of the window and count
    #: them; it raised the tiny analyst's validation verdict macro-F1, but the analyst still does not copy a name it
    #: has not seen (experiments/auth_grpo, rounds six and eleven). 0 = off
    warmup_lines: int = 0
    warmup_epochs: float = 1.0
    #: the generator's seed (the generated windows are the same for every ``train.seed``)
    warmup_seed: int = 7
    #: the warm-up's account names mostly made up per episode (some multi-word), its break-in warnings' host names
    #: new, and ``Bad protocol version`` client strings of free text, instead of a few fixed lists: the model must
    #: copy the names it reads, and meets text in the fields an attacker controls (experiments/auth_grpo, round ten)
    warmup_fresh_names: bool = False


@dataclass
class RewardConfig:
    #: the weights the reward model starts from: null = ``model.name_or_path`` (seed 000); an SFT run dir with full
    #: weights (``artifacts.model``; InstructGPT starts its reward model from the SFT model); in a pipeline, ``sft`` =
    #: that pipeline's sft step
    init_from: Optional[str] = None
    #: when the memory check (stage=plan's estimate) says the run does not fit the device:
    #: error (stop with the estimate and what to change) | heuristic (write the heuristic reward model)
    fallback: str = "error"
    #: write the heuristic reward model without checking memory (tests, CPU-only boxes)
    force_fallback: bool = False
    #: the free memory the check compares against; null = the device's free memory now
    memory_limit_gb: Optional[float] = None


@dataclass
class DpoConfig:
    #: an SFT run dir (or its adapter/ folder) whose adapter the policy starts from; null = a fresh adapter
    init_from: Optional[str] = None
    #: the reference policy π_ref, never a second copy of the base weights: base = the same model with the
    #: adapter disabled; init = a frozen copy of the starting adapter (π_ref = π_SFT, as in the DPO paper;
    #: every implicit reward, hence preference_accuracy_start, is then 0 before training)
    reference: str = "base"
    #: weight of an NLL term on the chosen answer added to the DPO loss (RPO, Pang et al. 2024; TRL's
    #: loss_type "sft"): keeps the chosen answer likely, so the format is not traded for the margin; 0 = plain DPO
    sft_weight: float = 0.0
    #: TRL's DPO loss (its loss_type): null = the paper's sigmoid loss, or robust DPO where loss.label_smoothing > 0;
    #: hinge (SLiC), ipo, exo_pair, nca_pair, robust, bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, apo_down,
    #: discopop, sigmoid_norm: TRL computes it (its DPOConfig documents each)
    loss_type: Optional[str] = None


@dataclass
class RLConfig:
    """``stage=rl``: ``loss=grpo`` (group-relative policy optimisation, TRL's GRPOTrainer) or
    ``loss=simplified_ppo`` (seed 000's recipe: supervised fine-tuning on the best examples)."""

    #: where the policy starts: an SFT run dir (its result.json names ``artifacts.adapter`` or
    #: ``artifacts.model``) or that folder. An adapter is loaded trainable; full weights (an SFT run
    #: with lora=none) become the base under a fresh LoRA adapter, so the policy still starts as π_SFT
    init_from: Optional[str] = None
    #: init_from unset or unloadable: false = stop with an error naming the path; true = a fresh adapter
    #: on the base model, a warning, and ``metrics.fresh_adapter=1`` (seed 000 fell back silently)
    allow_fresh_adapter: bool = False
    #: grpo's KL reference, never a second copy of the base weights: base = the same model with the
    #: adapter disabled (π_base; π_SFT when init_from holds full weights); init = a frozen copy of the
    #: starting adapter (π_ref = π_SFT, as in DeepSeekMath; TRL's own default for a loaded adapter)
    reference: str = "base"
    #: G, completions sampled per prompt (the group the advantages are normalised over);
    #: ``train.batch_size`` counts prompts, so a micro-batch holds batch_size × G completions
    num_generations: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_completion_length: int = 160
    #: validation windows whose greedy analyses are scored before and after training
    #: (``metrics.reward_heldout_start/end``); 0 = skip
    heldout_windows: int = 32
    #: also score them every this many steps (0 = only before and after training)
    eval_steps: int = 0
    #: end with the adapter of the evaluation (step 0 = the starting policy included) whose held-out reward
    #: was highest, as Trainer's load_best_model_at_end does (``metrics.best_step``); false = the last step's
    keep_best: bool = True
    #: a later evaluation replaces the kept one only when its held-out reward is higher by more than this many
    #: standard errors of the per-window paired differences (the one-standard-error idea of model selection:
    #: stay with the earlier, simpler policy unless the gain is larger than the noise); 0 = any higher reward
    keep_best_se: float = 1.0
    #: μ, policy updates per generated batch (μ = 1: the ratio is 1 and nothing is clipped)
    num_iterations: int = 1
    #: the learning rate is ``train.learning_rate × lr_scale``: seed 000 halved it for RL
    lr_scale: float = 0.5
    #: token aggregation of the loss: dapo = mean over every completion token of the batch (TRL's
    #: default, no length bias) | grpo = per-completion mean, then mean over completions (the paper)
    loss_type: str = "dapo"
    #: what a completion's advantage (reward − its group's mean) is divided by: group = the std of its group's
    #: rewards (the GRPO paper; a group whose rewards barely differ gets advantages of ±1 all the same) | batch = the
    #: std of the whole batch's rewards (a group's spread counts) | none = nothing (Dr. GRPO)
    scale_rewards: str = "group"
    #: weighted rewards (sectune.data.auth_rewards): json_valid, schema_valid, verdict, fields, and
    #: reward_model (a stage=reward run, ``rl.reward_model``); the total is the weighted sum
    rewards: Dict[str, float] = field(
        default_factory=lambda: {"json_valid": 0.1, "schema_valid": 0.2, "verdict": 0.35, "fields": 0.35, "reward_model": 0.0}
    )
    #: the reward model's term is sigmoid((score - mean) / std), mean and std its scores of the reward stage's
    #: validation pairs (in (0, 1), as the rule rewards are); false = the raw Bradley-Terry score, whose scale
    #: is arbitrary (a trained reward model's spread in a group was 1-4x the verdict reward's in the tiny analyst's GRPO)
    normalize_reward_model: bool = True
    #: a stage=reward run dir (trained or heuristic); needed only when ``rewards.reward_model`` > 0
    reward_model: Optional[str] = None
    #: sample the G completions of a prompt from one prefill of the prompt (its KV cache shared), and
    #: score them in one row (prompt once, then each completion attending to it): the same numbers as
    #: TRL's padded batches for less work (bench/grpo_throughput.py); false = TRL's own paths
    shared_prompt: bool = True


def _open_dict() -> Any:
    """An empty mapping that accepts new nested keys even under Hydra's struct mode, so
    ``pipeline.overrides.rl.train.max_steps=5`` works on the command line without a ``+``;
    the pipeline validates every key against the step's own schema before anything runs."""
    from omegaconf import OmegaConf

    return OmegaConf.create({}, flags={"struct": False})


@dataclass
class EarlyStoppingConfig:
    """Stop when ``metric`` (any eval metric, without ``eval_``) has not improved by more than ``min_delta`` for
    ``patience`` evaluations (Trainer's EarlyStoppingCallback); the best checkpoint is kept by the same metric."""

    metric: str = "causal_stability"
    mode: str = "max"  # max | min
    #: 0 = never stop early (the best checkpoint is still tracked)
    patience: int = 5
    min_delta: float = 0.001


@dataclass
class ContrastiveConfig:
    """``stage=contrastive`` (seed 002): causal-contrastive training on injection triplets."""

    #: where the model starts: an SFT run dir (its result.json names ``artifacts.adapter`` or ``artifacts.model``)
    #: or that folder; null = the base model (under a fresh adapter with LoRA)
    init_from: Optional[str] = None
    #: the representation: the hidden state after this decoder layer (1..L), -1 = the last (final-normed)
    layer: int = -1
    #: mean over the prompt tokens | last prompt token
    pooling: str = "mean"
    #: separate = three forwards (cf and injection stop after ``layer``; injection from its shared prefix on, see
    #: share_prefix) | batched = one forward of the three inputs. bench/contrastive_throughput.py (2-core EPYC,
    #: SmolLM-135M shape, 1 thread), two runs (2026-12-02): separate 1.41x / 1.43x seed 002's three full forwards
    #: (1.16x / 1.22x without share_prefix), batched 1.01x / 1.06x, separate with less peak RSS (0.85x the seed's,
    #: batched 1.1x). Separate with a middle ``layer``: 1.65-2.0x
    forward: str = "separate"
    #: separate forward: the injected prompt's forward starts after the token prefix it shares with the benign prompt
    #: (about half of it on the real windows), attending to the benign forward's KV cache there: exact, less work;
    #: off in training under activation checkpointing (train.gradient_checkpointing or train.selective_checkpointing:
    #: transformers keeps no KV cache there) and for the batched forward
    share_prefix: bool = True
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    #: load the best checkpoint's weights at the end (what the saved adapter holds); false = the last weights
    load_best_at_end: bool = True
    #: answer the held-out injected windows (and the same windows clean) with stage=infer's generation before and
    #: after training: attack_success_rate(_start), targeted_attack_success_rate(_start), clean_verdict_accuracy(_start)
    #: (sectune.evaluation.injection_eval); evaluate.max_samples limits the windows (the same first N stage=evaluate scores)
    attack_eval: bool = True


@dataclass
class FederatedConfig:
    """``stage=federated`` (seed 003): FedAvg of LoRA adapters on Flower (sectune.training.federated)."""

    #: simulation (Flower's simulation runtime on Ray, this machine) | deployment (a SuperLink and one SuperNode
    #: per client; set by sectune.training.flower_app, which ``flwr run`` starts: experiments/hdfs_federated/README.md)
    runtime: str = "simulation"
    num_clients: int = 10
    #: fraction of the clients FedAvg samples per round (int(num_clients * client_frac), at least 1)
    client_frac: float = 0.1
    rounds: int = 10
    #: optimizer steps each sampled client trains per round (Trainer max_steps)
    local_steps: int = 10
    #: the clients' batch size; null = train.batch_size
    batch_size: Optional[int] = None
    #: iid | shards (sorted by each session's dominant key, contiguous pieces) | dirichlet (over the dominant key)
    partition: str = "iid"
    dirichlet_alpha: float = 0.5
    partition_seed: int = 0
    #: the clients' lr over rounds, from train.learning_rate: constant | linear | cosine (down to lr_min_ratio ×)
    lr_schedule: str = "constant"
    lr_min_ratio: float = 0.1
    #: the server's global evaluation (validation loss + detection F1) every N rounds (and round 0 and the last)
    eval_every: int = 1
    #: score detection (g / threshold on validation, then test) in the global evaluation; false = loss only
    detection: bool = True
    #: Flower's DifferentialPrivacyClientSideFixedClipping + fixedclipping_mod: clip each client's update to
    #: dp_clipping_norm, Gaussian noise (std dp_noise_multiplier × dp_clipping_norm / clients per round) on the mean
    dp: bool = False
    dp_noise_multiplier: float = 0.1
    dp_clipping_norm: float = 1.0
    #: Ray resources: CPUs per client (torch threads too) and for the whole simulation (clients in parallel =
    #: ray_num_cpus // client_num_cpus; null = one client at a time)
    client_num_cpus: int = 1
    client_num_gpus: float = 0.0
    ray_num_cpus: Optional[int] = None
    #: clients' Trainer output dirs; null = <run dir>/clients
    client_dir: Optional[str] = None
    #: Flower's and Ray's own logs in full
    verbose: bool = False


@dataclass
class MemoryTemplateConfig:
    """Seed 002's memory templates (``+memory_template=minimal|balanced|high_quality``): settings sized for a GPU
    of ``budget_gb`` GiB; ``stage=plan`` checks the composed run against it."""

    name: Optional[str] = None
    budget_gb: Optional[float] = None


@dataclass
class PipelineConfig:
    """``stage=pipeline``: stages run in order in one command, each in ``<run dir>/<step>/``."""

    #: the stages to run, in order; each reads the earlier ones' result.json (rl: sft + reward,
    #: dpo: sft, infer: the pipeline dir). The make-run analyst adds dpo: [sft, reward, rl, dpo, infer]
    steps: List[str] = field(default_factory=lambda: ["sft", "reward", "rl", "infer"])
    #: each step's ``loss`` option (conf/loss/), e.g. ``pipeline.loss.rl=simplified_ppo``
    loss: Dict[str, str] = field(
        default_factory=lambda: {"sft": "causal_lm", "reward": "bradley_terry", "dpo": "dpo", "rl": "grpo"}
    )
    #: each step's ``dataset`` option (conf/dataset/); every step must hold out the same test windows
    dataset: Dict[str, str] = field(
        default_factory=lambda: {"sft": "auth_logs", "reward": "auth_preferences", "dpo": "auth_preferences",
                                 "rl": "auth_logs", "infer": "auth_logs"}
    )
    #: per-step config changes, ``{step: {key: value}}`` (``pipeline.overrides.rl.train.max_steps=20``);
    #: a string for a config group picks its option (``pipeline.overrides.rl.model=smollm_135m``)
    overrides: Dict[str, Any] = field(default_factory=_open_dict)
    #: end with the held-out table (report.md + heldout.json) on the test windows
    heldout_table: bool = True
    #: score only the first N test windows (null = all): quick looks and tests
    heldout_max_windows: Optional[int] = None
    #: generation batch size of the table's policies; null = ``infer.batch_size`` (the infer step's, so
    #: its answers are the table's for that policy and every analyses/s figure is comparable)
    heldout_batch_size: Optional[int] = None
    #: add a schema-constrained row for the best policy (sectune.models.constrained; needs xgrammar)
    heldout_constrained: bool = True


@dataclass
class ReportConfig:
    #: the sweep dir (``multirun/DATE/TIME``) to tabulate with ``stage=report``
    dir: Optional[str] = None
    sort_by: Optional[str] = None
    #: null = losses ascending, other metrics descending
    ascending: Optional[bool] = None


@dataclass
class SweepConfig:
    #: skip a job whose config digest already succeeded: in this job dir, or anywhere the
    #: index under ``index_dir`` points to (a rerun lands in a NEW multirun/DATE/TIME dir)
    skip_done: bool = False
    #: one ``<digest>.json`` per succeeded sweep job, pointing at its run dir
    index_dir: str = "multirun/.index"
    #: the metric the run returns to a sweeper (Optuna); null = eval_loss, val_loss, then
    #: predicted_peak_bytes, whichever the stage reports
    objective: Optional[str] = None
    #: minimize | maximize; the Optuna preset passes it to hydra.sweeper.direction
    direction: str = "minimize"


@dataclass
class PlanConfig:
    #: null = the device the run would train on (train.device); cuda | cpu to plan for another
    device: Optional[str] = None
    #: null = train.batch_size / model.max_seq_length
    batch_size: Optional[int] = None
    seq_len: Optional[int] = None
    #: also tabulate every conf/model preset under the composed settings (plan_all_models.md)
    all_models: bool = False


@dataclass
class ExportConfig:
    #: a run dir (sft, dpo or rl) or a pipeline dir: the model stage=infer would answer with there is exported
    model_dir: Optional[str] = None
    #: the exported weights' dtype (fp32 | bf16 | fp16); null = the dtype the run trained in (its saved model.dtype)
    dtype: Optional[str] = None
    #: the most the exported model's logits may stray on the check prompt, from the adapter's and from the merged model's;
    #: null = 1e-4 (fp32), 1e-2 (fp16) or 3e-2 (bf16) times the largest logit (at least 1)
    max_logit_diff: Optional[float] = None


@dataclass
class DoctorConfig:
    #: warn below this much free disk in the working dir (GB, 1e9 bytes)
    min_free_disk_gb: float = 20.0
    #: treat warnings as failures (exit non-zero) too
    strict: bool = False
