"""``stage=pipeline``: several stages in one command, each in its own sub-dir, chained through result.json.

    sectune stage=pipeline                                    # sft → reward → rl → infer (+ held-out table)
    sectune stage=pipeline 'pipeline.steps=[sft,dpo,infer]'
    sectune stage=pipeline pipeline.overrides.rl.train.max_steps=20 pipeline.loss.rl=simplified_ppo
    sectune +experiment=auth_grpo                             # seed 000 (DeepSeek-R1-Distill-Llama-8B, nf4)

Read top to bottom: every step's config is composed and checked before the first step runs (a typo
in a per-step override fails at once, naming the key) → the held-out windows are checked against
every training step's data → the steps run in order, in-process (``runner.run(step_cfg,
<run dir>/<step>)``, each writing its own result.json) → the held-out table
(:mod:`sectune.evaluation.analyst_eval`) → this run's result.json: ``artifacts.<step>`` = the step's sub-dir,
``metrics`` = the last step's metrics plus the table's.

How a step's config is made
---------------------------
1. Hydra's compose API, with this run's own command-line overrides (``+experiment=…`` included)
   followed by ``stage=<step> loss=<pipeline.loss.<step>> dataset=<pipeline.dataset.<step>>`` and any
   config-group option a per-step override picks (``pipeline.overrides.rl.model=smollm_135m``). That
   is exactly the config ``sectune <same args> stage=<step> loss=… dataset=…`` would get: the same
   defaults lists, presets, interpolations and schema validation, and a value the user set inside a
   swapped group (``dataset.max_samples=48``) lands in every step's dataset node. (Merging
   conf/<group>/<option>.yaml files onto the pipeline's config by hand would have to re-implement
   the defaults lists of experiment presets, and would drop those values when a node is swapped.)
2. The ``pipeline`` node is reset to its defaults: a step is not a pipeline, and its config digest
   must not change when another step's overrides do.
3. What earlier steps hand on, as paths to their run dirs (each reads the other's result.json):
   ``rl.init_from=<run dir>/sft``, ``rl.reward_model=<run dir>/reward``, ``dpo.init_from=<run dir>/sft``,
   ``infer.model_dir=<run dir>/<the newest of rl → dpo → sft among the steps>`` and, unless set,
   ``infer.input_file=<run dir>/heldout/windows`` (the held-out windows, one file each).
4. ``pipeline.overrides.<step>`` merged onto it under the schema: an unknown key or a wrong type is
   an error naming ``pipeline.overrides.<step>.<key>``.

Skipping and failure
--------------------
Before a step runs, ``<step>/step.json`` records its config digest with ``train.resume`` and
``debug`` left out (how to run, not what), so a rerun with ``train.resume=auto`` or without a
``debug.fail_at_step`` is still the same step. A rerun of the same command skips a step whose
result.json says succeeded for that digest and that started after every earlier step of the pipeline
finished, up to the first step that has to run; every later step then runs too (its inputs are new).
(An attempt that retrained sft and was stopped in dpo put dpo's earlier result back: it had trained on
the sft before, and the next rerun skipped it.) Paths under the pipeline's dir enter the digest relative
to it, so a moved or copied pipeline dir skips its finished steps as well. A failing step stops
the pipeline: the earlier steps' dirs stay as they are, this run's result.json says failed and
names the step, and the exit code is the step's. ``train.resume=auto`` inside a step resumes it from ``<step>/checkpoints/``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from sectune import runner
from sectune.config import PipelineConfig
from sectune.config_checks import check_values
from sectune.errors import ConfigError, SectuneError
from sectune.model_chain import CHAIN
from sectune.evaluation.pipeline_heldout import WINDOWS_DIR, check_held_out, heldout_table, reads_windows, write_windows
from sectune.pipeline_record import already_done, record_step
from sectune.stages.pipeline_checks import _say_replaced, check_detection_data, check_handoff_models  # noqa: F401 (re-exported)
from sectune.runner import RunContext, skip_digest
from sectune.training import distributed

#: config groups a per-step override may pick an option of (``pipeline.overrides.<step>.<group>=<option>``)
GROUPS = ("model", "quantization", "lora", "loss", "dataset", "logger")
#: the artifact a later step needs from an earlier one
NEEDS = {"sft": ("adapter", "model"), "reward": ("reward_model",)}
#: rl's weight for a pipeline's own reward model when the config leaves it at 0 (+experiment=auth_grpo's)
REWARD_MODEL_WEIGHT = 0.1
#: step → {earlier step: (the key it is handed, what that is)}: :func:`handoffs` hands them on. A step listed
#: before one it takes from is an error (``[infer, sft]``): that step would hand it nothing, or an earlier pipeline
#: run's stale dir. infer reads the pipeline's dir, not one step's (model_chain.CHAIN picks the newest policy)
TAKES = {
    "rl": {"sft": ("rl.init_from", "its starting adapter"), "reward": ("rl.reward_model", "its reward model")},
    "dpo": {"sft": ("dpo.init_from", "its starting adapter")},
    "evaluate": {"sft": ("evaluate.model_dir", "the model it evaluates, when unset")},
    "infer": {s: ("infer.model_dir", "the policy that answers: the newest of rl → dpo → sft among this pipeline's steps")
              for s in ("rl", "dpo", "sft")},
}


class StepFailed(SectuneError):
    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code or 1


@dataclass
class Step:
    name: str
    dir: Path
    cfg: DictConfig
    #: what composed it (Hydra overrides) and what was merged after (handoffs, per-step values)
    composed_with: list[str]
    merged: dict = field(default_factory=dict)

    @property
    def skip_digest(self) -> str:
        return skip_digest(self.cfg, self.dir.parent)


def run(ctx: RunContext) -> dict:
    return run_pipeline(ctx, command_line_overrides())


def command_line_overrides(required: bool = True) -> list[str]:
    """This run's task overrides as Hydra parsed them from the command line (none when not launched by Hydra and not
    ``required``: a test calling a stage)."""
    from hydra.core.hydra_config import HydraConfig

    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:  # not launched by Hydra
        if not required:
            return []
        raise ConfigError("stage=pipeline composes each step from the command line: run it as `sectune stage=pipeline …` "
                          "(or call sectune.stages.pipeline.run_pipeline(ctx, overrides))") from None


def run_pipeline(ctx: RunContext, overrides: list[str]) -> dict:
    """The steps, then the held-out table. The pipeline's own W&B run opens at the end, whatever the end, so the runner
    marks it as the pipeline ended: opened first and closed before step 1 (each step opens its own), it stayed
    "finished", exit 0, when a step then failed or was interrupted (an audit, session 39)."""
    try:
        return _run_pipeline(ctx, overrides)
    finally:
        _open_tracker(ctx)


def _run_pipeline(ctx: RunContext, overrides: list[str]) -> dict:
    cfg, run_dir = ctx.cfg, ctx.run_dir.resolve()
    names = check_steps(cfg)
    base = step_overrides_base(overrides)

    # 1. every step's config, before anything runs
    steps = [compose_step(cfg, base, name, run_dir, names) for name in names]
    table_on = bool(cfg.pipeline.heldout_table) and any(n in ("sft", "rl", "dpo", "infer") for n in names)
    by_name = {s.name: s for s in steps}
    # the held-out table's config (the infer step's): composed only when the table is made (+experiment=hdfs_detect has
    # none, and its dataset.skip_bad_lines was refused by an infer step that never runs)
    eval_cfg = by_name["infer"].cfg if "infer" in by_name else compose_step(cfg, base, "infer", run_dir, names).cfg if table_on else None
    test_windows, windows_generated = None, []
    if table_on or "infer" in by_name:
        test_windows, windows_generated = check_held_out(steps, eval_cfg, cfg.pipeline.heldout_max_windows)
    check_detection_data(steps)
    check_handoff_models(steps)
    print(f"sectune: pipeline: {' → '.join(names)} in {run_dir}")

    # 2. the steps (under torchrun every rank runs each step; rank 0 writes the pipeline's files)
    main = distributed.is_main_process()
    ran: list[str] = []
    skipped: list[str] = []
    for i, step in enumerate(steps, 1):
        head = f"sectune: pipeline: step {i}/{len(steps)} {step.name}"
        if not ran and (prev := already_done(step, steps[: i - 1])) is not None:
            print(f"{head}: skipped (succeeded on {prev.get('finished', '?')} with this config, digest {step.skip_digest}; {step.dir})")
            skipped.append(step.name)
            continue
        if ran and str(step.cfg.train.resume) == "auto":
            # its checkpoints were trained from what the earlier steps gave before they ran again (an audit, session 42)
            print(f"{head}: train.resume=auto: {', '.join(ran)} trained in this run, so this step's checkpoints (from the "
                  "earlier inputs) are not resumed: it trains afresh")
            with open_dict(step.cfg):
                step.cfg.train.resume = None
        check_inputs(step, by_name)
        if main and reads_windows(step, run_dir):
            write_windows(run_dir / WINDOWS_DIR, test_windows, windows_generated)
        print(f"{head} → {step.dir}")
        if main:
            record_step(step)
        code = run_step(step)
        result = runner.previous_result(step.dir) or {}
        if code != 0 or result.get("status") != "succeeded":
            done = names[: i - 1]
            if result.get("status") == "succeeded":  # the earlier run's, put back (runner.run): the attempt's own record
                result = runner.previous_result(step.dir, runner.FAILED_ATTEMPT_FILE) or {}
            raise StepFailed(
                f"pipeline step {step.name!r} failed (exit {code}): {result.get('error', 'no result.json')}; "
                + (f"the completed steps ({', '.join(done)}) are kept; " if done else "")
                + f"rerun the same command to continue from {step.name} ({step.dir})" + _resume_note(step),
                code,
            )
        ran.append(step.name)

    # 3. the held-out table, then this run's result
    last = runner.previous_result(steps[-1].dir) or {}
    metrics = dict(last.get("metrics") or {})
    artifacts = {s.name: s.name for s in steps}
    if table_on and main:
        table = heldout_table(cfg, eval_cfg, steps, run_dir, reuse_ok=not ran)
        metrics.update(table["metrics"])
        artifacts.update(heldout_report="report.md", heldout_table="heldout.json", heldout_generations="heldout_generations.json")
    metrics.update(steps_run=len(ran), steps_skipped=len(skipped))
    print(f"sectune: pipeline: done · ran {', '.join(ran) or 'nothing'}" + (f" · skipped {', '.join(skipped)}" if skipped else "")
          + (f" · held-out table in {run_dir / 'report.md'}" if "heldout_report" in artifacts else ""))
    return {"metrics": metrics, "artifacts": artifacts}


# ----------------------------------------------------------------------------- composing
def _resume_note(step: Step) -> str:
    """A failed step that saved checkpoints: how to continue it rather than train it afresh (which sets them aside)."""
    from sectune.training.checkpoints import complete_checkpoints

    if step.cfg.train.resume == "auto" or not (found := complete_checkpoints(step.dir / "checkpoints")):
        return ""
    return (f"; add train.resume=auto to continue its training from {found[0].name} (without it the step trains afresh "
            "and sets its checkpoints aside in checkpoints/earlier/)")


def check_steps(cfg: DictConfig) -> list[str]:
    names = [str(s) for s in cfg.pipeline.steps]
    if not names:
        raise ConfigError("pipeline.steps is empty; e.g. pipeline.steps=[sft,reward,rl,infer]")
    for n in names:
        if n == "pipeline":
            raise ConfigError("pipeline.steps: a pipeline cannot hold a pipeline step")
        if n not in runner.STAGES:
            raise ConfigError(f"pipeline.steps: {n!r} is not a stage; choose from {', '.join(s for s in runner.STAGES if s != 'pipeline')}")
    from sectune.config_checks import SINGLE_PROCESS_STAGES, single_process_refusal
    from sectune.training import distributed

    for n in names:  # refused before the steps ahead of it train, not when the pipeline reaches it
        if n in SINGLE_PROCESS_STAGES and distributed.world_size() > 1:
            raise ConfigError(single_process_refusal(n, distributed.world_size(), f"pipeline.steps: {n}: "))
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"pipeline.steps: {', '.join(dup)} listed twice (each step runs in a sub-dir named after it)")
    for i, n in enumerate(names):
        for later in names[i + 1:]:
            key, what = TAKES.get(n, {}).get(later, (None, None))
            if key and not (n == "evaluate" and cfg.evaluate.model_dir is not None):  # handoffs' own condition
                raise ConfigError(f"pipeline.steps=[{', '.join(names)}]: {n} takes {what} ({key}) from the {later} step, "
                                  f"which runs after it; list {later} before {n}")
    for key in ("overrides", "loss", "dataset"):
        for n in cfg.pipeline[key] or {}:
            if n not in runner.STAGES or n == "pipeline":
                raise ConfigError(f"pipeline.{key}.{n}: {n!r} is not a stage; choose from {', '.join(s for s in runner.STAGES if s != 'pipeline')}")
    for n in cfg.pipeline.overrides or {}:
        if n not in names:
            print(f"sectune: pipeline: note: pipeline.overrides.{n} is set but {n} is not in pipeline.steps; ignored")
    return names


def step_overrides_base(overrides: list[str]) -> list[str]:
    """The run's overrides without the ones a step replaces: the stage/loss/dataset group choices
    and the pipeline node itself (values inside a group, e.g. ``dataset.max_samples=48``, stay)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keep = []
    for ov in OverridesParser.create().parse_overrides(list(overrides)):
        key = ov.key_or_group
        if key in ("loss", "dataset"):  # it was dropped without a word: each step takes its own
            raise ConfigError(f"{ov.input_line}: stage=pipeline gives each step its own {key} (pipeline.{key}.<step>, e.g. "
                              f"pipeline.{key}.{'rl' if key == 'loss' else 'sft'}={ov.value()}); a {key}= for the whole pipeline "
                              "would be ignored")
        if key == "stage" or key == "pipeline" or key.startswith("pipeline."):
            continue
        keep.append(ov.input_line)
    return keep


def compose(overrides: list[str]) -> DictConfig:
    """Hydra's compose API on sectune's conf/ (inside the running app, or initialised here)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from sectune import config
    from sectune.paths import PROJECT_ROOT

    config.register()
    if GlobalHydra.instance().is_initialized():
        try:
            from hydra.core.hydra_config import HydraConfig

            name = HydraConfig.get().job.config_name or "config"
        except ValueError:
            name = "config"
        return hydra_compose(config_name=name, overrides=overrides)
    with initialize_config_dir(str(PROJECT_ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def compose_step(cfg: DictConfig, base: list[str], name: str, run_dir: Path, names: list[str]) -> Step:
    pc = cfg.pipeline
    per_step = OmegaConf.to_container(pc.overrides[name], resolve=True) if name in (pc.overrides or {}) else {}
    if per_step is None:
        per_step = {}
    if not isinstance(per_step, dict):
        raise ConfigError(f"pipeline.overrides.{name}: must be a mapping of config keys (e.g. pipeline.overrides.{name}.train.max_steps=20)")
    groups, values = [], {}
    for key, value in per_step.items():
        if key == "stage":
            raise ConfigError(f"pipeline.overrides.{name}.stage: a step's stage is its name ({name}); change pipeline.steps instead")
        if key in GROUPS and isinstance(value, str):
            groups.append(f"{key}={value}")
        else:
            values[key] = value
    choices = [f"stage={name}"]
    if name in (pc.loss or {}):
        choices.append(f"loss={pc.loss[name]}")
    if name in (pc.dataset or {}):
        choices.append(f"dataset={pc.dataset[name]}")
    composed_with = [*base, *choices, *groups]
    try:
        step_cfg = compose(composed_with)
    except Exception as e:  # Hydra's composition errors (an unknown option, a bad value) name the key
        raise ConfigError(f"pipeline step {name}: cannot compose its config from {' '.join(choices + groups)}: {_one_line(e)}") from None
    with open_dict(step_cfg):
        step_cfg.pipeline = OmegaConf.structured(PipelineConfig)
    _say_replaced(name, base, groups, values)
    merged = handoffs(name, names, run_dir, step_cfg)
    for what, patch in (("handoff", merged), ("override", values)):
        if not patch:
            continue
        try:
            step_cfg = OmegaConf.merge(step_cfg, patch)
        except Exception as e:  # omegaconf's ConfigKeyError / ValidationError carry the full key
            key = getattr(e, "full_key", None) or "?"
            if what == "override":
                raise ConfigError(f"pipeline.overrides.{name}.{key}: {_reason(e)}") from None
            raise ConfigError(f"pipeline step {name}: this sectune's schema has no {key} to hand the earlier steps' "
                              f"run dirs to ({_reason(e)})") from None
    if name == "reward" and step_cfg.reward.get("init_from") == "sft":  # this pipeline's sft step (reward.init_from)
        if "sft" not in names[: names.index(name)]:
            raise ConfigError("pipeline step reward: reward.init_from=sft names this pipeline's sft step, but pipeline.steps "
                              f"runs none before reward ({', '.join(names)})")
        step_cfg.reward.init_from = str(run_dir / "sft")
    if (name == "rl" and step_cfg.loss.name == "grpo" and "reward" in names[: names.index(name)]
            and not float(step_cfg.rl.rewards.get("reward_model", 0) or 0)):
        # the reward step's model would be trained and never used (rl's default weight for it is 0)
        values = {**values, "rl": {**values.get("rl", {}), "rewards": {**(values.get("rl", {}).get("rewards") or {}),
                                                                       "reward_model": REWARD_MODEL_WEIGHT}}}
        with open_dict(step_cfg):
            step_cfg.rl.rewards.reward_model = REWARD_MODEL_WEIGHT
        print(f"sectune: pipeline: rl weighs the reward step's model {REWARD_MODEL_WEIGHT} (rl.rewards.reward_model was 0, "
              "which would leave it unused; drop reward from pipeline.steps to train rl on the rule rewards alone)")
    if step_cfg.stage.name != name:
        raise ConfigError(f"pipeline step {name}: its config says stage.name={step_cfg.stage.name}")
    try:  # each step's values, before the first step runs (the runner checks a step's again only when it starts)
        check_values(step_cfg)
    except ConfigError as e:
        raise ConfigError(f"pipeline step {name}: {e}") from None
    return Step(name, run_dir / name, step_cfg, composed_with, OmegaConf.to_container(OmegaConf.merge(merged, values)))


def handoffs(name: str, names: list[str], run_dir: Path, step_cfg: DictConfig) -> dict:
    """What the earlier steps hand this one, as run-dir paths (each is read through its result.json)."""
    before = names[: names.index(name)] if name in names else list(names)
    out: dict[str, dict[str, Any]] = {}
    if name in ("rl", "dpo", "evaluate"):
        for step, (key, _) in TAKES[name].items():
            if key == "rl.reward_model" and step_cfg.loss.name != "grpo":
                continue  # simplified_ppo scores no reward
            if step in before and not (key == "evaluate.model_dir" and step_cfg.evaluate.model_dir is not None):
                group, field = key.split(".")
                out.setdefault(group, {})[field] = str(run_dir / step)
    elif name == "infer":
        # the newest policy this pipeline trains (rl → dpo → sft), not the newest step dir under it: a dpo/ left by an
        # earlier run with other steps answered a [sft, infer] pipeline
        own = [s for s in CHAIN if s in before]
        out["infer"] = {"model_dir": str(run_dir / own[0]) if own else str(run_dir)}
        if step_cfg.infer.input_file is None:
            out["infer"]["input_file"] = str(run_dir / WINDOWS_DIR)
    return out


def _reason(e: Exception) -> str:
    msg = str(e).strip().splitlines()
    return msg[0] if msg else type(e).__name__


def _one_line(e: Exception) -> str:
    return "; ".join(line.strip() for line in str(e).strip().splitlines() if line.strip()) or type(e).__name__


# ----------------------------------------------------------------------------- running
def check_inputs(step: Step, by_name: dict[str, Step]) -> None:
    """The artifacts this step is handed exist (each read through its step's result.json)."""
    for need in {"rl": ("sft", "reward"), "dpo": ("sft",)}.get(step.name, ()):
        if need not in by_name:
            continue
        res = runner.previous_result(by_name[need].dir) or {}
        arts = res.get("artifacts") or {}
        if res.get("status") != "succeeded" or not any(arts.get(a) for a in NEEDS[need]):
            raise ConfigError(f"pipeline step {step.name}: {need}/result.json names no {' or '.join(NEEDS[need])} to start from")


def run_step(step: Step) -> int:
    from sectune.training import engine

    engine.reset_peaks()  # each step's peak RSS and peak GPU memory are its own (a step's were the pipeline's so far)
    with open_dict(step.cfg):  # in a sweep the trial is the pipeline (its result scores it), not each of its steps
        step.cfg.sweep.objective = None
    try:
        code, _ = runner.run(step.cfg, step.dir)
    finally:
        from sectune.models import modeling

        modeling.release_memory()
    if code == 0:  # rank 0 writes the step's result.json after its last collective; the others read it next. A rank whose
        distributed.barrier()  # step failed does not wait: the others may be inside a collective it left (torchrun ends them)
    return code


def _open_tracker(ctx: RunContext) -> None:
    """This run's own W&B run (the steps each had theirs, in its group), so the runner logs the summary and the outcome
    into it: rank 0's alone, as the runner opens it (every rank opened one, and the others' were never finished)."""
    if ctx.cfg.logger.name == "none" or not distributed.is_main_process():
        return
    from sectune import tracking

    try:
        ctx.tracker = tracking.start(ctx.cfg, ctx.run_dir.resolve())
    except Exception as e:  # noqa: BLE001 - W&B is a convenience: never fail a finished pipeline over it
        print(f"sectune: pipeline: could not open its W&B run ({type(e).__name__}: {e})")
