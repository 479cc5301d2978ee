"""A run dir's record read by what comes after it: its ``result.json`` (:func:`previous_result`), the run a stage starts
from (``*.init_from``: :func:`init_source`, only a succeeded policy run), and the numbers written into records
(:func:`finite_json`: JSON has no NaN), the data it read (:func:`data_sources`). ``runner`` re-exports these names."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from sectune.errors import ConfigError
from sectune.run_guard import PREVIOUS_RESULT_FILE

RESULT_FILE = "result.json"

#: the config keys that name data a run reads
DATA_KEYS = ("paths.shared_data", "dataset.path", "dataset.source_dir", "evaluate.data_path", "infer.input_file")


def data_sources(cfg) -> dict[str, str]:
    """The data paths a run reads, resolved to absolute paths, for its ``result.json`` (``data``). The saved
    ``.hydra/config.yaml`` keeps ``${sectune_shared_data:}`` and paths relative to the folder the command ran from, so
    on its own it cannot say which files a number was computed on once the run dir is copied or the folder changes."""
    from omegaconf import OmegaConf

    out = {}
    for key in DATA_KEYS:
        try:
            value = OmegaConf.select(cfg, key, default=None)
        except Exception:  # noqa: BLE001 - an interpolation that cannot resolve here: the run itself says so
            continue
        if isinstance(value, str) and value:
            out[key] = str(Path(value).expanduser().resolve())
    return out


#: the libraries a run's numbers depend on, recorded with their versions in ``result.json`` (``environment``)
PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "scikit-learn", "flwr")


def environment(device: str = "auto") -> dict:
    """What ran a run, for its ``result.json``: sectune's version and, from a checkout, its git commit (``+dirty`` with
    uncommitted changes), Python and the libraries' versions, and the device (``device``: the run's ``train.device``;
    the GPU's name where it ran on CUDA, else the CPU's model; none where it stopped before loading torch).
    Beside a number, this says which code and which machine produced it; nothing about the user or host."""
    import platform
    import sys
    from importlib import metadata

    import sectune

    env: dict[str, Any] = {"sectune": sectune.__version__, "python": platform.python_version()}
    commit = _git_commit()
    if commit:
        env["sectune_commit"] = commit
    env["packages"] = {}
    for name in PACKAGES:
        try:
            env["packages"][name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    torch = sys.modules.get("torch")
    if torch is None:  # a run refused before any model or tensor: it ran on no device
        env["device"] = None
    elif device != "cpu" and torch.cuda.is_available():
        env["device"] = f"cuda: {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    else:
        env["device"] = f"cpu: {cpu_model()}"
    return env


def _git_commit() -> str | None:
    """HEAD of the checkout sectune runs from (None when installed, or git is missing)."""
    import subprocess

    from sectune.paths import INSTALLED, PROJECT_ROOT

    if INSTALLED or not (Path(PROJECT_ROOT) / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(PROJECT_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(PROJECT_ROOT), "status", "--porcelain", "--untracked-files=no", "--", "sectune", "conf"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip()[:12] + ("+dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")


def cpu_model() -> str:
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":  # no /proc there; platform.processor() says only "arm" on Apple Silicon
        import subprocess

        try:
            name = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            name = ""
        if name:
            return name
    return platform.processor() or platform.machine()


def finite_json(obj: Any) -> Any:
    """``obj`` with every non-finite number (a metric's NaN, an answer's count of 1e400) as null and tensors/numpy
    scalars as numbers: ``NaN``/``Infinity`` are not JSON to a strict reader."""
    if hasattr(obj, "item") and not isinstance(obj, (dict, list, str)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def previous_result(run_dir: Path, name: str = RESULT_FILE) -> dict | None:
    """The run's result.json (or ``name``: result.failed.json), or None when there is none or it is not a JSON
    object (damaged, or not sectune's)."""
    path = run_dir / name
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return result if isinstance(result, dict) else None


#: stages whose saved weights are not a language-model policy to start another stage from
NOT_A_POLICY = {"classify": "a classifier", "reward": "a reward model"}
#: the stages that train one: any other stage's artifacts name weights it only used (an infer run's artifacts.model is
#: the base it answered with, and RL started from it as "the SFT weights": an audit, session 36)
POLICY_STAGES = ("sft", "dpo", "rl", "contrastive")


def check_policy_run(res, key: str, result: Path) -> dict:
    """A run's result.json read for its weights: an object whose ``artifacts`` is one, of a stage that trains a policy
    (a classify run's adapter was taken as an SFT adapter, and GRPO/DPO/contrastive started from it); its artifacts."""
    if not isinstance(res, dict) or not isinstance(res.get("artifacts") or {}, dict):
        raise ConfigError(f"{key}: {result} is not a sectune result (an object with 'artifacts')")
    if res.get("stage") not in POLICY_STAGES:
        what = NOT_A_POLICY.get(res.get("stage"), "its weights are not ones it trained")
        raise ConfigError(f"{key}: {result.parent} is a stage={res.get('stage')} run ({what}), not a policy "
                          "to start from: give an SFT (or DPO, RL, contrastive) run dir")
    refuse_unfinished(res, key, result)
    return res.get("artifacts") or {}


def read_policy_run(result: Path, key: str) -> tuple[dict, dict]:
    """(the result, its artifacts) of a run's result.json read for its weights (:func:`check_policy_run`)."""
    try:
        res = json.loads(result.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{key}: {result} is not readable JSON ({e})") from None
    return res, check_policy_run(res, key, result)


def refuse_unfinished(res: dict, key: str, result: Path) -> None:
    """A run to start from must have succeeded: a failed one's weights may be NaN ("nothing downstream uses this
    run"; DPO started from one and reported NaN margins as a success), a running or killed one's half replaced."""
    status = res.get("status")
    if status == "succeeded":
        return
    why = f": {str(res['error']).strip().splitlines()[0]}" if str(res.get("error") or "").strip() else ""
    hint = (f" ({PREVIOUS_RESULT_FILE} there holds the succeeded run an interrupted rerun was replacing: rerun that command "
            "to finish it)") if status == "running" and (result.parent / PREVIOUS_RESULT_FILE).is_file() else ""
    raise ConfigError(f"{key}: {result} says status {status!r}{why}; start from a run that succeeded{hint}")


def run_owning(folder: Path) -> Path | None:
    """The result.json of the sectune run a weights folder sits in (``<run>/adapter``, ``<run>/checkpoints/checkpoint-N``,
    a pipeline step's), or None for a folder of its own (a hub download, a merged model)."""
    for parent in list(Path(folder).resolve().parents)[:3]:
        if (parent / "result.json").is_file():
            return parent / "result.json"
    return None


def init_source(init_from: str, name: str = "rl.init_from") -> tuple[str, Path]:
    """``rl.init_from`` (or the key ``name``: reward.init_from, contrastive.init_from): an SFT run dir (its result.json names ``artifacts.adapter`` or
    ``artifacts.model``), an adapter folder (adapter_config.json) or a full-weights folder (config.json) → (kind, folder)."""
    p, key = Path(init_from).expanduser(), f"{name}={init_from}"
    if not p.exists():
        what = "its model/ folder (full weights)" if name == "reward.init_from" else "its adapter/ or model/ folder"
        raise ConfigError(f"{key}: {p} does not exist (give an SFT run dir with result.json, or {what})")
    from sectune.training.checkpoints import require_weights

    if (p / "adapter_config.json").is_file() or (p / "config.json").is_file():
        owner = run_owning(p)
        if owner is not None:  # <failed run>/adapter: the rule for its run dir holds for the folder too (session 36)
            read_policy_run(owner, key)
        if (p / "adapter_config.json").is_file():
            return "adapter", require_weights(p, "adapter", key)
        return "model", require_weights(p, "model", key)
    result = p / "result.json"
    if not result.is_file():
        raise ConfigError(f"{key}: {p} has neither result.json (an SFT run dir) nor adapter_config.json / config.json")
    res, artifacts = read_policy_run(result, key)
    for kind, marker in (("adapter", "adapter_config.json"), ("model", "config.json")):
        if artifacts.get(kind):
            folder = p / artifacts[kind]
            if not (folder / marker).is_file():
                raise ConfigError(f"{key}: {folder} (artifacts.{kind} of {result}) has no {marker}")
            return kind, require_weights(folder, kind, key)
    raise ConfigError(f"{key}: {result} lists no adapter or model (stage={res.get('stage')}, status={res.get('status')}, "
                      f"artifacts: {', '.join(sorted(artifacts)) or 'none'})")


def _chosen_run_config(choice):
    """The saved ``.hydra/config.yaml`` of the run whose model ``choice`` picked (a model_chain.ModelChoice), or None."""
    from omegaconf import OmegaConf

    saved = choice.path.parent / ".hydra" / "config.yaml" if choice.path is not None else None
    if saved is None or not saved.is_file():
        return None
    try:
        return OmegaConf.load(saved)
    except Exception:  # noqa: BLE001 - an unreadable record: this command's settings stand
        return None


def refuse_non_analyst(choice, model_dir, key: str = "infer.model_dir") -> None:
    """A log-key model (dataset=hdfs) or a classifier writes no JSON analyses: refuse it, as stage=evaluate does."""
    from omegaconf import OmegaConf

    from sectune.evaluation.injection_eval import NOT_ANALYSTS

    if (run := _chosen_run_config(choice)) is None:
        return
    trained = OmegaConf.select(run, "dataset.name", default=None)
    if trained in NOT_ANALYSTS:
        hint = " (score it with stage=evaluate dataset=hdfs evaluate.model_dir=<it>)" if trained == "hdfs" else ""
        raise ConfigError(f"{key}={model_dir}: {choice.path.parent} trained on dataset={trained}, not an auth-log "
                          f"analyst that writes JSON analyses{hint}")


def warn_other_quantization(cfg, folder: Path, key: str, merged: bool = False) -> None:
    """One line where the adapter in ``folder`` trained on a base quantized otherwise than this command loads it (an nf4
    SFT adapter as dpo/rl/contrastive's ``init_from`` on an unquantized base: its logits moved by 2.4 on the tiny model, a
    starting policy no run evaluated, without a word; an audit, session 41). ``merged``: it is folded into those weights."""
    from omegaconf import OmegaConf

    from sectune.config_effects import DORA_INT8_CPU, dora_breaks_int8

    if not merged and dora_breaks_int8(cfg) and _adapter_setting(folder, "use_dora"):  # (merged: into unquantized weights)
        raise ConfigError(f"{key}: the adapter in {folder} is a DoRA adapter (lora.use_dora=true in its adapter_config.json): "
                          f"refused {DORA_INT8_CPU.split('; use')[0]}; load it with quantization=nf4 or none")
    owner = run_owning(folder)
    try:
        run = OmegaConf.load(owner.parent / ".hydra" / "config.yaml") if owner is not None else None
    except Exception:  # noqa: BLE001 - no readable record: nothing to compare
        return
    theirs = run.get("quantization") if run is not None else None
    if theirs is None or OmegaConf.to_container(theirs) == OmegaConf.to_container(cfg.quantization):
        return
    print(f"sectune: warning: {key}: the adapter in {folder} trained on a quantization={theirs.get('name')} base; this command "
          f"loads quantization={cfg.quantization.name}{' and merges it into those weights' if merged else ''}, so training "
          f"starts from a policy that run never evaluated (its answers move); set quantization={theirs.get('name')} to start "
          "from the one it trained", file=sys.stderr)


def _adapter_setting(folder: Path, key: str):
    """``key`` of the adapter_config.json in ``folder`` (None where there is none or it does not read)."""
    try:
        return json.loads((Path(folder) / "adapter_config.json").read_text(encoding="utf-8")).get(key)
    except (OSError, ValueError, AttributeError):
        return None


def trained_quantization(cfg, choice):
    """``cfg`` with the quantization node the chosen run trained under (its saved .hydra/config.yaml): an nf4/int8
    adapter on an unquantized base (or the reverse) answers differently from the policy that run trained and evaluated."""
    from omegaconf import OmegaConf

    run = _chosen_run_config(choice)
    theirs = run.get("quantization") if run is not None else None
    if theirs is None or OmegaConf.to_container(theirs) == OmegaConf.to_container(cfg.quantization):
        return cfg
    try:
        merged = OmegaConf.merge(cfg.quantization, theirs)
    except Exception as e:  # noqa: BLE001 - a record from another sectune (keys this one lacks): said, this command's kept
        print(f"sectune: warning: {choice.path.parent}: its quantization settings do not read here ({type(e).__name__}); "
              f"loading with this command's quantization={cfg.quantization.name}")
        return cfg
    print(f"sectune: infer: quantization={theirs.get('name')} as the {choice.used} run trained (this command: "
          f"quantization={cfg.quantization.name})")
    cfg = cfg.copy()
    cfg.quantization = merged
    return cfg
