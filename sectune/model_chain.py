"""Which model answers (seed 000's fallback chain, used by ``stage=infer`` and ``stage=evaluate``): in a run or pipeline dir,
the first usable of RL → DPO → SFT (a pipeline's validation-chosen policy first), else the base model. A step is usable
when its result.json says succeeded and the artifact it names is complete and undamaged (an adapter's config and
safetensors, or full weights), and a sweep job that reused another run still points at that run."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from sectune.errors import ConfigError, first_line
from sectune.runner import RESULT_FILE, trained_quantization
from sectune.training import checkpoints

#: the steps whose models can answer, in order of preference (the newest stage of a pipeline first)
CHAIN = ("rl", "dpo", "sft")


@dataclass
class ModelChoice:
    #: rl | dpo | sft | base
    used: str
    #: the adapter or full-model folder; None for the base model
    path: Path | None = None
    #: adapter | model | base
    kind: str = "base"
    #: "<step>: why it was not used", for each preferred step passed over
    skipped: list[str] = field(default_factory=list)

    def describe(self, model_ref: str) -> str:
        if self.kind == "base":
            return f"the base model ({model_ref})"
        return f"the {self.used} {'adapter' if self.kind == 'adapter' else 'model'} at {self.path}"


def choose_model(model_dir, base_fallback: bool = True, key: str = "infer.model_dir", table: bool = True) -> ModelChoice:
    """The first usable of RL → DPO → SFT in ``model_dir`` (a run or pipeline dir; ``table``: the policy a pipeline's
    held-out table chose on validation first), else the base. ``key``: the setting ``model_dir`` came from, as errors
    name it."""
    if model_dir is None:  # nothing trained was named: the configured base model, untrained for this task
        if not base_fallback:
            raise ConfigError(f"{key} is not set and infer.base_fallback=false: only the base model could answer; give "
                              f"{key}=<an sft, dpo or rl run dir or a pipeline dir>")
        return ModelChoice("base")
    root = Path(str(model_dir)).expanduser()
    if not root.is_dir():
        raise ConfigError(f"{key}={model_dir}: " + ("a file, not a run directory" if root.exists() else "no such directory"))
    result = read_result(root)
    stage = (result or {}).get("stage")
    if stage in CHAIN:
        candidates = [(stage, root)]
    elif stage == "pipeline" or (result is None and any((root / s / RESULT_FILE).is_file() for s in CHAIN)):
        candidates = [(s, root / s) for s in (pipeline_order(root, key.split('.')[0]) if table else CHAIN)]
    elif result is None:
        raise ConfigError(f"{key}={model_dir}: no {RESULT_FILE} there; point it at an sft, dpo or rl run dir or a pipeline dir")
    elif stage == "export":  # its model/ is for a server; scored here, it would need its source's split and decoding
        source = _export_source(root)
        raise ConfigError(f"{key}={model_dir}: a stage=export run (its model/ is for serving, with transformers or vLLM); "
                          f"give {key}={source or 'the run it was exported from'}, whose adapter it holds merged")
    else:
        raise ConfigError(f"{key}={model_dir}: a stage={stage} run holds no model to answer with; point it at an sft, dpo or rl run dir or a pipeline dir")
    skipped = []
    for step, step_dir in candidates:
        why, path, kind = usable(step, step_dir)
        if why is None:
            return ModelChoice(step, path, kind, skipped)
        skipped.append(f"{step}: {why}")
    if not base_fallback:
        # infer's setting alone: export and infer.vote_with never fall back to the base, whatever it says
        raise ConfigError(f"{key}={model_dir}: no usable model ({'; '.join(skipped)})"
                          + (" and infer.base_fallback=false" if key == "infer.model_dir" else ""))
    return ModelChoice("base", skipped=skipped)


def _export_source(root: Path) -> str | None:
    try:
        return str(json.loads((root / "model" / "sectune_export.json").read_text(encoding="utf-8"))["source"]["model_dir"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def pipeline_order(root: Path, who: str = "infer") -> list[str]:
    """RL → DPO → SFT, but the policy the pipeline's held-out table chose on its validation windows first: the newest
    step answered even where the table had chosen another (its ``best_policy``, never chosen on test)."""
    try:
        table = json.loads((root / "heldout.json").read_text(encoding="utf-8"))
        best = next(r["step"] for r in table["rows"] if r["name"] == table["best_policy"])
    except (OSError, ValueError, KeyError, TypeError, StopIteration):
        return list(CHAIN)
    if best not in CHAIN:
        return list(CHAIN)
    print(f"sectune: {who}: {root}'s held-out table chose its {best} policy on the validation windows: it answers first")
    return [best, *(s for s in CHAIN if s != best)]


def read_result(run_dir: Path) -> dict | None:
    path = run_dir / RESULT_FILE
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(result, dict):
        raise ConfigError(f"{path}: not a sectune result (a JSON {type(result).__name__}, not an object)")
    return result


def usable(step: str, run_dir: Path) -> tuple[str | None, Path | None, str]:
    """(why not, or None; the model folder; adapter | model) for one step's run dir."""
    if not run_dir.is_dir():
        return f"no {run_dir.name}/ step", None, ""
    result = read_result(run_dir)
    if result is None:
        return f"no {RESULT_FILE}", None, ""
    if result.get("stage") != step:
        return f"{RESULT_FILE} says stage={result.get('stage')!r}", None, ""
    if result.get("status") != "succeeded":
        error = f": {result['error']}" if result.get("error") else ""
        return f"the run did not succeed (status {result.get('status')!r}{error})", None, ""
    if result.get("reused_from"):  # a sweep job that reused another run (sweep.skip_done): that run must still be it
        source = read_result(Path(str(result["reused_from"])))
        if not source or source.get("status") != "succeeded" or source.get("config_digest") != result.get("config_digest"):
            return f"it reused {result['reused_from']}, which now holds another run (or none)", None, ""
    artifacts = result.get("artifacts") or {}
    if not isinstance(artifacts, dict):
        return f"{RESULT_FILE}'s artifacts is not an object", None, ""
    if artifacts.get("adapter"):
        rel = artifacts["adapter"]
        folder = run_dir / rel
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            if not (folder / name).is_file():
                return f"{rel}/{name} missing", None, ""
        if (damage := checkpoints.damaged_safetensors(folder)) is not None:
            return f"{rel}/{damage[0]} is damaged ({damage[1]})", None, ""
        try:
            if not isinstance(json.loads((folder / "adapter_config.json").read_text(encoding="utf-8")), dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:  # was a JSONDecodeError traceback naming no file
            return f"{rel}/adapter_config.json is damaged ({type(e).__name__}: {e})", None, ""
        if isinstance(base := artifacts.get("base_model"), str) and base:  # the weights the adapter sits on (an SFT's)
            if not (run_dir / base / "config.json").is_file():
                return f"its base model {base}/config.json is missing", None, ""
            if (damage := checkpoints.damaged_safetensors(run_dir / base)) is not None:
                return f"its base model {base}/{damage[0]} is damaged ({damage[1]})", None, ""
        return None, folder, "adapter"
    if artifacts.get("model"):
        rel = artifacts["model"]
        folder = run_dir / rel
        if not (folder / "config.json").is_file():
            return f"{rel}/config.json missing", None, ""
        if not any(folder.glob("*.safetensors")):
            return f"{rel}/*.safetensors missing", None, ""
        if (damage := checkpoints.damaged_safetensors(folder)) is not None:
            return f"{rel}/{damage[0]} is damaged ({damage[1]})", None, ""
        return None, folder, "model"
    return f"{RESULT_FILE} names no adapter or model artifact", None, ""


def load_model(cfg, choice: ModelChoice, as_trained: bool = True):
    """(model on the run's device in eval mode, tokenizer, the adapter/model folder or base path). An adapter goes on the
    weights its run recorded (``artifacts.base_model``), else on the local folder it was trained on (its
    ``base_model_name_or_path``): the command's own model=, with another shape, lost the adapter's deeper layers.
    ``as_trained``: quantized as the chosen run trained (else as ``cfg`` says: stage=export's unquantized merge)."""
    from sectune.models import modeling

    if as_trained:
        cfg = trained_quantization(cfg, choice)
    # an adapter's base: its run's artifacts.base_model, else the local folder it names (modeling.adapter_base says so)
    base = modeling.adapter_base(choice.path, cfg) if choice.kind == "adapter" else modeling.model_path(cfg)
    if choice.kind == "model":
        model = modeling.load_model(cfg, path=str(choice.path))
        ref = str(choice.path)
    else:
        model = modeling.load_model(cfg, path=base)
        ref = base
        if choice.kind == "adapter":
            from peft import PeftModel

            trained_on = json.loads((choice.path / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
            if trained_on and not _same_model(trained_on, base):
                print(f"sectune: warning: the {choice.used} adapter was trained on {trained_on}; loading it on "
                      f"{modeling.model_label(cfg.model)} ({base})")
            try:
                model = PeftModel.from_pretrained(model, str(choice.path))
            except Exception as e:  # noqa: BLE001 - any load failure is the same user error: this adapter, this model
                first = first_line(e)
                raise ConfigError(f"cannot load the {choice.used} adapter in {choice.path} onto {modeling.model_label(cfg.model)} "
                                  f"({type(e).__name__}: {first})") from None
            ref = str(choice.path)
    tokenizer = modeling.tokenizer_for(cfg, choice.path, base)
    model = modeling.to_run_device(model, cfg)
    model.eval()
    return model, tokenizer, ref


def _same_model(a: str, b: str) -> bool:
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return a == b


def run_generation(cfg, choice: ModelChoice, who: str = "infer"):
    """``generation.*`` as the chosen model's own run decoded (its saved config), but for a key this command sets: the
    README's plain infer command decoded a pipeline's analyst with repetition_penalty 1.2 where the pipeline scored it
    with 1.0, and 18 of 100 verdicts changed."""
    from omegaconf import OmegaConf

    saved = choice.path.parent / ".hydra" / "config.yaml" if choice.path is not None else None
    if saved is None or not saved.is_file():
        return cfg.generation
    try:
        theirs = OmegaConf.load(saved).get("generation") or {}
    except Exception as e:  # noqa: BLE001 - an unreadable saved config: this command's settings, said
        print(f"sectune: warning: infer: {saved} cannot be read ({type(e).__name__}), so the {choice.used} run's decoding "
              "settings are not known: decoding with this command's generation.*")
        return cfg.generation
    from sectune.stages.pipeline import command_line_overrides

    given = {o.split("=", 1)[0].lstrip("+~") for o in command_line_overrides(required=False)}
    taken = {k: v for k, v in theirs.items() if k in cfg.generation and k != "preview_samples" and f"generation.{k}" not in given
             and v != cfg.generation[k]}
    if not taken:
        return cfg.generation
    print(f"sectune: {who}: decoding as the {choice.used} run did ({', '.join(f'generation.{k}={v}' for k, v in taken.items())}; "
          "set them on the command line to decode otherwise)")
    return OmegaConf.merge(cfg.generation, taken)
