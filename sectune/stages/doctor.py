"""``stage=doctor``: is this machine ready for the composed config? (seed 002's verify_setup)

Each check is ``ok``, ``warn`` or ``missing`` with a one-line fix. ``missing`` is reserved for
what the composed config REQUIRES and would make the run fail:

* the training libraries (torch, transformers, peft, trl, accelerate, datasets);
* bitsandbytes when ``quantization`` is nf4/int8 or ``train.optimizer=paged_adamw_8bit``;
* a CUDA device when ``train.device=cuda``;
* the model's weights: a local ``model.name_or_path`` folder must hold config.json and weights;
  a hub id must be in the local Hugging Face cache (checked with
  ``huggingface_hub.try_to_load_from_cache``, never the network: a compute node often has none);
* ``dataset.path`` when one is set;
* with ``model.chat_template=true``, a chat template the run would refuse (checked on the tokenizer files here).

Everything else warns: no GPU for a real model (CPU training is slow), predicted peak, times the
margin by which real GPU peaks exceeded the plan on an H200 (1.31x; fp32 1.68x; int8 1.31x), above the
free GPU memory, little free disk, W&B online without a key,
sweeps' optional plugins. The stage exits 3 when anything is missing (``doctor.strict=true``:
warnings too), else 0; ``doctor.md`` in the run dir and the console list every check.
"""

from __future__ import annotations

import importlib
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from sectune.errors import SectuneError
from sectune.runner import RunContext, write_text_atomic

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
GATED_PREFIXES = ("meta-llama/", "mistralai/")  # hub repositories that ask to accept their terms first


class EnvironmentNotReady(SectuneError):
    """Something the composed config requires is missing on this machine."""

    exit_code = 3


@dataclass
class Check:
    name: str
    status: str  # ok | warn | missing
    detail: str
    fix: str = ""


def _version(module: str) -> str | None:
    try:
        mod = importlib.import_module(module)
    except Exception:
        return None
    return str(getattr(mod, "__version__", "installed"))


def required_ranges() -> dict[str, str]:
    """sectune's own requirement ranges by distribution name (its installed metadata), e.g. ``{"trl": ">=1.16,<1.17"}``."""
    from importlib.metadata import PackageNotFoundError, requires

    from packaging.requirements import Requirement

    try:
        reqs = [Requirement(r) for r in requires("sectune") or []]
    except PackageNotFoundError:
        return {}
    return {r.name.lower(): str(r.specifier) for r in reqs if r.marker is None and str(r.specifier)}


def check_packages(cfg: DictConfig) -> list[Check]:
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion

    out, ranges = [], required_ranges()
    for mod in ("torch", "transformers", "peft", "trl", "accelerate", "datasets"):
        v = _version(mod)
        if not v:
            out.append(Check(mod, "missing", "not importable", "pip install sectune (or make setup in its repository)"))
            continue
        try:  # an older release left in place passes pip check, then fails mid-run (trl 1.13: DPO and GRPO)
            outside = mod in ranges and not SpecifierSet(ranges[mod]).contains(v.split("+")[0], prereleases=True)
        except InvalidVersion:
            outside = False
        out.append(Check(mod, "missing", f"{v}: outside the tested range {ranges[mod]}", f"pip install '{mod}{ranges[mod]}'")
                   if outside else Check(mod, "ok", v))
    need_bnb = cfg.quantization.name != "none" or cfg.train.optimizer == "paged_adamw_8bit"
    v = _version("bitsandbytes")
    if v:
        out.append(Check("bitsandbytes", "ok", v))
    else:
        why = f"quantization={cfg.quantization.name}, train.optimizer={cfg.train.optimizer}"
        out.append(Check("bitsandbytes", "missing" if need_bnb else "warn", f"not importable ({why})",
                         "pip install 'bitsandbytes>=0.50' (CPU and CUDA kernels in one wheel)"))
    return out


def check_cuda(cfg: DictConfig, predicted_peak: int | None) -> list[Check]:
    import torch

    real_model = cfg.model.name_or_path is not None
    if not torch.cuda.is_available():
        built = torch.version.cuda or "none (CPU build)"
        mac = sys.platform == "darwin"  # no CUDA build of torch exists for macOS: installing one is no fix there
        mps = mac and getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
        if cfg.train.device == "cuda":
            return [Check("cuda", "missing", f"train.device=cuda but no CUDA device; torch {torch.__version__} built for CUDA {built}",
                          "macOS has no CUDA: train.device=auto or cpu (the CPU)" if mac else
                          "install a CUDA build of torch (pip install torch --index-url https://download.pytorch.org/whl/cu124) "
                          "and check nvidia-smi; or train.device=cpu")]
        status = "warn" if real_model else "ok"
        fix = "a GPU node (hydra/launcher=slurm) for real models; CPU works but is slow" if real_model else ""
        unused = "; Apple's GPU (mps) is present and not used: sectune does not support it" if mps else ""
        return [Check("cuda", status, f"no CUDA device: training runs on CPU (torch CUDA build: {built}){unused}", fix)]
    out = [Check("cuda", "ok", f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} device(s)")]
    from sectune.stages.plan import measured_gpu_margin

    margin = measured_gpu_margin(cfg.quantization.name, cfg.train.precision)
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        name = torch.cuda.get_device_name(i)
        detail = f"{name}: {free / 2**30:.1f} of {total / 2**30:.1f} GiB free"
        # the plan under-predicted real GPU peaks by up to this margin (stage=plan's note): warn inside it too
        if predicted_peak and predicted_peak * margin > free:
            out.append(Check(f"gpu{i} memory", "warn",
                             f"{detail}; stage=plan predicts {predicted_peak / 2**30:.1f} GiB, and measured GPU peaks "
                             f"were up to {margin}x the plan ({predicted_peak * margin / 2**30:.1f} GiB)",
                             "quantization=nf4, lora.r smaller, train.gradient_checkpointing=true, "
                             "train.optimizer=paged_adamw_8bit, smaller model.max_seq_length or train.batch_size"))
        else:
            out.append(Check(f"gpu{i} memory", "ok", detail))
    return out


def weights_cached(repo_id: str, revision: str | None = None) -> tuple[bool, str]:
    """Are config.json and every weight file of a hub model in the local cache? (no network)"""
    import json

    from huggingface_hub import try_to_load_from_cache

    def cached(name: str):
        p = try_to_load_from_cache(repo_id, name, revision=revision)
        return p if isinstance(p, str) else None

    if not cached("config.json"):
        return False, "config.json not in the local Hugging Face cache"
    for name in WEIGHT_FILES:
        p = cached(name)
        if not p:
            continue
        if name.endswith(".index.json"):
            shards = sorted(set(json.loads(Path(p).read_text(encoding="utf-8")).get("weight_map", {}).values()))
            missing = [s for s in shards if not cached(s)]
            if missing:
                return False, f"{len(missing)} of {len(shards)} weight shards not cached (e.g. {missing[0]})"
            return True, f"{len(shards)} shards cached"
        return True, f"{name} cached"
    return False, "config.json cached but no weight file"


def check_model(cfg: DictConfig) -> list[Check]:
    m = cfg.model
    if m.name_or_path is None:
        return [Check("model weights", "ok", f"model={m.name}: tiny model, built locally on first use (no download)")]
    path = str(m.name_or_path)
    if Path(path).expanduser().exists():
        folder = Path(path).expanduser()
        has = (folder / "config.json").is_file() and any(any(folder.glob(f"*{ext}")) for ext in (".safetensors", ".bin"))
        return [Check("model weights", "ok" if has else "missing", f"local folder {folder}" + ("" if has else ": no config.json + weights"),
                      "" if has else "point model.name_or_path at a folder saved with save_pretrained")]
    ok, detail = weights_cached(path, m.revision)
    if ok:
        return [Check("model weights", "ok", f"{path}: {detail}")]
    fix = f"where there is network: hf download {path}"
    if path.startswith(GATED_PREFIXES):
        from huggingface_hub import get_token

        fix = (f"accept the license on huggingface.co/{path}, then `hf auth login` and `hf download {path}`"
               + ("" if get_token() else " (no HF token found here)"))
    fix += f"; or copy the weights and set model.name_or_path=/path/to/folder (cache: {_hf_cache()})"
    return [Check("model weights", "missing", f"{path}: {detail}", fix)]


def check_chat_template(cfg: DictConfig) -> list[Check]:
    """``model.chat_template=true``: the tokenizer's template frames the analyst's prompt (:mod:`sectune.chat_frame`),
    checked on the tokenizer files here (a folder, the local cache, or the tiny build), never the network: a template
    that renders no usable frame fails the run when it loads, after a job may have waited in a queue."""
    from sectune.chat_frame import wanted

    if not cfg.model.get("chat_template", False):
        return []
    if not wanted(cfg):
        return [Check("chat template", "ok", "model.chat_template=true does not apply to this run's stage/dataset (bare prompts)")]
    import os

    from sectune.chat_frame import frame_of
    from sectune.errors import ConfigError
    from sectune.models import modeling

    offline = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"  # the local cache or folder only, as the weights' check
    try:
        tok = modeling.load_tokenizer(cfg)  # a tiny model is built (no download)
    except ConfigError as e:
        return [Check("chat template", "missing", str(e), "set model.chat_template=false, or use a tokenizer whose template renders one user message")]
    except Exception as e:  # not here: the weights' check says how to get them
        return [Check("chat template", "warn", f"the tokenizer is not available offline ({type(e).__name__}): its template is checked when the run loads it")]
    finally:
        if offline is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = offline
    frame = frame_of(tok)
    if frame is None:
        return [Check("chat template", "ok", "the model was trained on the bare prompt (sectune_chat: false): prompted so")]
    n = len(tok(frame.before, add_special_tokens=False)["input_ids"]) + len(tok(frame.after, add_special_tokens=False)["input_ids"])
    return [Check("chat template", "ok", f"each prompt framed by {n} template tokens; an answer ends with {frame.end!r}")]


def _hf_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def check_disk(cfg: DictConfig) -> list[Check]:
    out = []
    for label, where in (("disk (run dirs)", Path.cwd()), ("disk (HF cache)", Path(_hf_cache()))):
        probe = where
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        free = shutil.disk_usage(probe).free
        detail = f"{free / 1e9:.1f} GB free at {where}"
        low = free < cfg.doctor.min_free_disk_gb * 1e9
        out.append(Check(label, "warn" if low else "ok", detail,
                         f"free space or move it (HF_HOME=…, hydra.run.dir=…); doctor.min_free_disk_gb={cfg.doctor.min_free_disk_gb}" if low else ""))
    return out + [check_cache(Path(str(cfg.paths.cache_dir)))]


def check_cache(root: Path) -> Check:
    """What sectune's own cache holds: the tiny models and dataset folders it built, one per setting that shapes them
    (seed, window lengths, source folder, tiny spec), never deleted by a run, so a sweep over those settings grows it
    (an audit, session 44: nothing said so, nor that they may be deleted). Folders a killed build left are counted apart.
    ``<cache>/shared_data`` (an installed sectune's default real data) is no build: neither counted nor to delete."""
    groups = [root / g for g in ("models", "datasets", "injection_text_groups") if (root / g).is_dir()]
    if not groups:
        return Check("sectune cache", "ok", f"{root}: nothing built yet (built on first use)")
    entries = [p for g in groups for p in g.iterdir()]
    partial = [p for p in entries if p.name.startswith(".") and not _maybe_building(p)]
    entries = [p for p in entries if not p.name.startswith(".") or p in partial]  # a build going on now: not counted
    # blocks, as du and a quota count them: a dataset folder is hundreds of small files
    size = sum(f.lstat().st_blocks * 512 for g in groups for f in g.rglob("*") if not f.is_symlink())
    detail = (f"{size / 1e6:.1f} MB on disk in {', '.join(str(g) for g in groups)}: {len(entries) - len(partial)} built "
              "model/dataset entries" + (f", {len(partial)} left by killed builds" if partial else "")
              + "; each is rebuilt on first use, so any of them may be deleted while no run is going")
    return Check("sectune cache", "warn" if partial else "ok", detail,
                 f"delete {', '.join(str(p) for p in partial[:3])}{' …' if len(partial) > 3 else ''} while no run is going"
                 if partial else "")


def _maybe_building(p: Path) -> bool:
    """A build's temporary folder that a run may still be writing (``.name.tmp<pid>`` of a live process, or any touched in
    the last hour): doctor run beside a cold-cache run advised deleting the folder it was building (a review, session 44)."""
    import os
    import re
    import time

    m = re.search(r"\.tmp(\d+)$", p.name)
    if m:
        try:
            os.kill(int(m.group(1)), 0)
            return True
        except (ProcessLookupError, ValueError, OverflowError):
            pass
        except PermissionError:  # another user's live process
            return True
    try:
        return time.time() - p.lstat().st_mtime < 3600
    except OSError:
        return False


def check_wandb(cfg: DictConfig) -> list[Check]:
    from sectune import tracking

    if cfg.logger.name != "wandb":
        return [Check("wandb", "ok", f"logger={cfg.logger.name}: nothing logged to W&B")]
    v = _version("wandb")
    if not v:
        return [Check("wandb", "missing", "logger=wandb but wandb is not importable", "pip install wandb, or logger=none")]
    mode = tracking.wandb_mode(cfg)
    if mode == "online" and not tracking.has_api_key():
        return [Check("wandb", "warn", f"wandb {v}, mode online but no API key", "wandb login (or WANDB_API_KEY), or logger.mode=offline")]
    if mode == "online":  # a key without the network: every run stalls ~90 s in wandb.init, then logs offline (session 36)
        import socket
        from urllib.parse import urlparse

        url = urlparse(tracking.wandb_base_url())  # the server wandb will contact, not always api.wandb.ai
        try:
            socket.create_connection((url.hostname or "api.wandb.ai", url.port or 443), timeout=3).close()
        except OSError as e:
            return [Check("wandb", "warn", f"wandb {v}, mode online (an API key is set), but {url.hostname} cannot be reached "
                          f"({type(e).__name__}): each run waits ~90 s for it, then logs offline",
                          "WANDB_MODE=offline here (sync later with `wandb sync`), or fix the network/proxy")]
    extra = "; sync later with `wandb sync <run dir>/wandb/offline-run-*`" if mode == "offline" else ""
    return [Check("wandb", "ok", f"wandb {v}, mode {mode}{extra}")]


def check_dataset(cfg: DictConfig) -> list[Check]:
    if cfg.dataset.path:
        p = Path(str(cfg.dataset.path)).expanduser()
        if not p.exists():
            return [Check("dataset", "missing", f"dataset.path={p} does not exist", "fix dataset.path, or null for the built-in data")]
        return [Check("dataset", "ok", f"dataset.path={p}")]
    from sectune.data.auth_rules import REAL_SOURCES
    from sectune.training.classification import DEFAULT_SOURCES

    name, src = cfg.dataset.name, Path(str(cfg.dataset.source_dir))
    if name == "text_label_csv":
        return [Check("dataset", "missing", "dataset=text_label_csv reads your file: dataset.path is not set",
                      "dataset.path=/path/to/file.csv (columns text,label)")]
    if name in DEFAULT_SOURCES:  # real data only: no generated stand-in
        need = src / DEFAULT_SOURCES[name]
        if need.exists():
            return [Check("dataset", "ok", f"dataset={name}: {need}")]
        return [Check("dataset", "missing", f"dataset={name}: {need} not found, and this dataset has no generated stand-in",
                      "get it as the README's Data table says, or set dataset.source_dir / paths.shared_data")]
    from sectune.paths import resolved, shared_data_dir

    if not src.exists() and resolved(src) != resolved(shared_data_dir()):  # set by hand to a folder that is not there
        return [Check("dataset", "warn", f"dataset={name}: {src} (paths.shared_data / dataset.source_dir) does not exist; "
                      "the run would use generated data", "fix the path (a typo?), or unset it for the default "
                      f"{shared_data_dir()}")]
    if name in ("auth_logs", "auth_preferences", "injection_triplets", "injection_preferences"):
        real = [rel for rel in REAL_SOURCES if (src / rel).is_file()]
        if real:
            return [Check("dataset", "ok", f"dataset={name}: built from the real logs in {src} ({', '.join(real)}) on first use")]
        return [Check("dataset", "ok", f"dataset={name}: {src} has none of {', '.join(REAL_SOURCES)}; generated logs in the same "
                                       "format are used (the run says so)")]
    if src.is_dir():
        return [Check("dataset", "ok", f"dataset={name}: read from {src}, or generated where its files are missing (the run says so)")]
    return [Check("dataset", "ok", f"dataset={name}: {src} not found; generated data is used (the run says so)")]


def check_plugins() -> list[Check]:
    out = []
    for mod, extra, what in (("hydra_plugins.hydra_submitit_launcher", "slurm", "hydra/launcher=slurm|local"),
                             ("hydra_plugins.hydra_optuna_sweeper", "optuna", "hparams_search=…")):
        ok = _version(mod) is not None
        out.append(Check(f"{what}", "ok" if ok else "warn", "installed" if ok else "plugin not installed",
                         "" if ok else f"pip install 'sectune[{extra}]' (in its repository: pip install -e '.[{extra}]')"))
    return out


def run_checks(cfg: DictConfig) -> tuple[list[Check], dict]:
    """Every check for the composed config, and the plan numbers they used (None when unplannable)."""
    predicted = None
    plan_info: dict = {}
    try:
        from sectune.stages import plan

        budget, info = plan.estimate(cfg)
        predicted = budget
        plan_info = {"predicted_peak_bytes": budget.total, "offload": info["offload"]}
    except Exception as e:  # the doctor reports; it does not fail on a plan it cannot make
        from sectune.errors import SectuneError

        from sectune.training.planner import UnplannableModel

        plan_info = {"plan_error": str(e), "plan_error_is_setting": isinstance(e, SectuneError) and not isinstance(e, UnplannableModel)}
    checks = []
    if "plan_error" in plan_info:  # a setting stage=plan refuses is one the run refuses too; anything else: no estimate
        bad_setting = plan_info.pop("plan_error_is_setting")
        checks.append(Check("memory plan", "missing" if bad_setting else "warn", f"stage=plan cannot plan this config: {plan_info['plan_error']}",
                            "fix the setting it names" if bad_setting else "GPU memory and disk are checked without an estimate"))
    off = plan_info.get("offload")
    if off:  # model.device_map + model.max_memory: the GPU holds only its side of the plan
        from sectune.training.memory import offload_text

        checks.append(Check("gpu/cpu offload", "ok" if off["fits"] else "missing", offload_text(off),
                            "" if off["fits"] else "change the setting named in the detail"))
    checks += check_packages(cfg)
    checks += check_cuda(cfg, (off["gpu_bytes"] if off else predicted.total) if predicted else None)
    checks += check_model(cfg)
    checks += check_chat_template(cfg)
    checks += check_dataset(cfg)
    checks += check_disk(cfg)
    checks += check_wandb(cfg)
    checks += check_plugins()
    return checks, plan_info


def markdown(cfg: DictConfig, checks: list[Check], plan_info: dict) -> str:
    lines = [f"# sectune doctor: {_label(cfg)} quantization={cfg.quantization.name} stage settings from the composed config", "",
             "| check | status | detail | fix |", "|---|---|---|---|"]
    for c in checks:
        status = c.status.upper() if c.status == "missing" else c.status
        lines.append(f"| {c.name} | {status} | {c.detail} | {c.fix} |")
    if "predicted_peak_bytes" in plan_info:
        lines += ["", f"stage=plan predicts {plan_info['predicted_peak_bytes'] / 2**30:.2f} GiB peak for this config"
                  + (f", {plan_info['offload']['gpu_bytes'] / 2**30:.2f} GiB of it on the GPU." if plan_info.get("offload") else ".")]
    return "\n".join(lines) + "\n"


def run(ctx: RunContext) -> dict:
    cfg = ctx.cfg
    checks, plan_info = run_checks(cfg)
    for c in checks:
        mark = {"ok": "ok     ", "warn": "warn   ", "missing": "MISSING"}[c.status]
        print(f"  [{mark}] {c.name}: {c.detail}" + (f"\n             fix: {c.fix}" if c.fix and c.status != "ok" else ""))
    text = markdown(cfg, checks, plan_info)
    write_text_atomic(ctx.path("doctor.md"), text)
    counts = {s: sum(c.status == s for c in checks) for s in ("ok", "warn", "missing")}
    metrics = {"checks_ok": counts["ok"], "checks_warn": counts["warn"], "checks_missing": counts["missing"]}
    if "predicted_peak_bytes" in plan_info:
        metrics["predicted_peak_bytes"] = plan_info["predicted_peak_bytes"]
    ctx.partial_metrics.update(metrics)  # kept in result.json when the stage fails below
    bad = [c for c in checks if c.status == "missing" or (cfg.doctor.strict and c.status == "warn")]
    if bad:
        raise EnvironmentNotReady(
            f"not ready for {_label(cfg)}: " + "; ".join(f"{c.name}: {c.detail} (fix: {c.fix})" for c in bad)
        )
    print(f"sectune doctor: ready ({counts['ok']} ok, {counts['warn']} warnings)")
    return {"metrics": metrics, "artifacts": {"doctor": "doctor.md"}}


def _label(cfg: DictConfig) -> str:
    from sectune.models.modeling import model_label

    return model_label(cfg.model)
