"""Which model answers (seed 000's fallback chain, used by ``stage=infer`` and ``stage=evaluate``): in a run or pipeline dir,
the first usable of RL → DPO → SFT (a pipeline's validation-chosen policy first), else the base model. A step is usable
when its result.json says succeeded and the artifact it names is complete and undamaged (an adapter's config and
safetensors, or full weights), and a sweep job that reused another run still points at that run."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from sectune.errors import ConfigError
from sectune.runner import RESULT_FILE
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
        candidates = [(s, root / s) for s in (pipeline_order(root) if table else CHAIN)]
    elif result is None:
        raise ConfigError(f"{key}={model_dir}: no {RESULT_FILE} there; point it at an sft, dpo or rl run dir or a pipeline dir")
    else:
        raise ConfigError(f"{key}={model_dir}: a stage={stage} run holds no model to answer with; point it at an sft, dpo or rl run dir or a pipeline dir")
    skipped = []
    for step, step_dir in candidates:
        why, path, kind = usable(step, step_dir)
        if why is None:
            return ModelChoice(step, path, kind, skipped)
        skipped.append(f"{step}: {why}")
    if not base_fallback:
        raise ConfigError(f"{key}={model_dir}: no usable model ({'; '.join(skipped)}) and infer.base_fallback=false")
    return ModelChoice("base", skipped=skipped)


def pipeline_order(root: Path) -> list[str]:
    """RL → DPO → SFT, but the policy the pipeline's held-out table chose on its validation windows first: the newest
    step answered even where the table had chosen another (its ``best_policy``, never chosen on test)."""
    try:
        table = json.loads((root / "heldout.json").read_text(encoding="utf-8"))
        best = next(r["step"] for r in table["rows"] if r["name"] == table["best_policy"])
    except (OSError, ValueError, KeyError, TypeError, StopIteration):
        return list(CHAIN)
    if best not in CHAIN:
        return list(CHAIN)
    print(f"sectune: infer: {root}'s held-out table chose its {best} policy on the validation windows: it answers first")
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
