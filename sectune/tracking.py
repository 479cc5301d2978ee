"""The ``logger`` group: W&B (offline by default, online when the user has a key; secrets never
logged), TensorBoard, or none.

W&B: the runner opens the run (so the composed config is logged once, redacted) and Trainer's own
``WandbCallback`` reuses it for per-step metrics. TensorBoard: Trainer's ``TensorBoardCallback``
writes event files into ``<run dir>/tensorboard/``. Only rank 0 logs.
"""

from __future__ import annotations

import importlib.util
import netrc
import os
import re
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sectune.errors import ConfigError

REDACTED = "***redacted***"
#: a key (any dotted segment) naming a secret: hf_token, api_key, wandb.key, hf.token.value, hf_auth, authorization;
#: not the counts and settings that merely mention tokens (max_new_tokens, extra_tokens, tokenizer)
_SECRET_PARTS = {"token", "secret", "secrets", "password", "passwd", "pass", "passphrase", "credential", "credentials", "auth",
                 "authorization", "apikey", "apikeys", "bearer", "cookie"}
_SECRET_SEGMENT = re.compile(r"(^|[_-])api[_-]?keys?($|[_-])|(^|[_.-])key$|(token|secret|password|passwd|credential)$", re.I)
_TOKEN_SHAPES = (r"hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_\w{20,}"
                 r"|glpat-[A-Za-z0-9_-]{20,}|xox[abposr]-[A-Za-z0-9-]{10,}|AKIA[0-9A-Z]{16}|ASIA[0-9A-Z]{16}")
#: a whole value that is a token (a bare 40-hex string too: a W&B key, or an on-prem one, local-<40 hex>)
_SECRET_VALUE = re.compile(rf"^({_TOKEN_SHAPES}|(\w+-)?[0-9a-fA-F]{{40}})$")
#: a token inside a longer value (a path, a URL, a shell line), and credentials in a URL (scheme://user:pass@host)
_TOKEN_INSIDE = re.compile(rf"(?<![A-Za-z0-9])({_TOKEN_SHAPES})(?![A-Za-z0-9])")
_URL_CREDENTIALS = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/\s@:]*:[^/\s@]+@")
_SECRET_INSIDE = re.compile(f"{_TOKEN_INSIDE.pattern}|{_URL_CREDENTIALS.pattern}")
#: keys whose value is a commit hash, not a secret (model.revision pinned to a hub commit)
_HASH_KEYS = re.compile(r"(^|\.)(revision|commit|sha)$")
#: a shell word after which the next word is a secret (hf auth login --token X, wandb login X)
_SECRET_FLAG = re.compile(r"^(--?(token|password|passwd|api[_-]?key|key|secret)|login)$", re.I)
#: an interpolation that would read a secret from the environment into the config (and so into what is saved)
_SECRET_ENV = re.compile(r"\$\{\s*oc\.env\s*:\s*[^},]*(TOKEN|KEY|SECRET|PASSWORD|PASSWD|CREDENTIAL|AUTH)", re.I)


class _SecretKey:
    """``search(name)``: does a config key name a secret (any of its dotted segments)?"""

    @staticmethod
    def search(name: str) -> bool:
        for segment in str(name).split("."):
            parts = set(re.split(r"[_-]", segment.lower()))
            if parts & _SECRET_PARTS or _SECRET_SEGMENT.search(segment):
                return True
        return False


_SECRET_KEY = _SecretKey()


def secret_overrides(argv: list[str]) -> list[str]:
    """The command-line overrides that set a secret: a secret-named key (``+hf_token=…``, ``+wandb.api_key=…``)
    or a token-shaped value (``hf_…``, ``sk-…``) under any key. Returned as ``key=…``, never with the value."""
    found = []
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, _, value = arg.partition("=")
        key = key.lstrip("+~").split("@", 1)[0]
        name = key
        # list and dict values ([a,b], {K: v, …}, as hydra.job.env_set takes) and a sweep's choice(a,b)/glob(…): each item
        items = [v.strip(" '\"") for v in re.split(r"[,\[\]{}()]", value)]
        names = [name, *(i.partition(":")[0].strip(" '\"") for i in items if ":" in i)]
        values = [i.partition(":")[2].strip(" '\"") if ":" in i else i for i in items]
        # shell lines in a list (hydra.launcher.setup=[…,'export WANDB_API_KEY=…']): each word, NAME=value split
        words = [w.strip(" '\"") for i in items for w in re.split(r"[\s|;&]+", i)]
        for prev, word in zip(["", *words], words):
            n, eq, v = word.partition("=")
            names += [n] if eq and v else []
            values.append(v if eq else word)
            if _SECRET_FLAG.match(prev) and word and not word.startswith(("-", "$")):
                names.append("token")  # the value of --token/login
        whole = (lambda v: _SECRET_VALUE.match(v) and not (_HASH_KEYS.search(key) and re.fullmatch(r"[0-9a-fA-F]{40}", v)))
        if ((value.strip() and any(_SECRET_KEY.search(n) for n in names)) or any(whole(v) for v in values)
                or _SECRET_INSIDE.search(value) or _SECRET_ENV.search(value)):
            found.append(f"{arg.partition('=')[0]}=…")
    return found


def secret_keys(obj: Any, prefix: str = "") -> list[str]:
    """The dotted keys of a config container (unresolved) whose value is a secret: a secret-named key with a value, a
    token-shaped value, or credentials inside a value (a URL's user:password@). Named, never with the value."""
    if isinstance(obj, dict):
        return [k for key, v in obj.items() for k in (
            [f"{prefix}{key}"] if _SECRET_KEY.search(str(key)) and v not in (None, "", [], {}) and not isinstance(v, (dict, list, bool))
            else secret_keys(v, f"{prefix}{key}."))]
    if isinstance(obj, list):
        return [k for i, v in enumerate(obj) for k in secret_keys(v, f"{prefix}{i}.")]
    if isinstance(obj, str) and not (_HASH_KEYS.search(prefix.rstrip(".")) and re.fullmatch(r"[0-9a-fA-F]{40}", obj.strip())):
        return [prefix.rstrip(".")] if _SECRET_VALUE.match(obj.strip()) or _SECRET_INSIDE.search(obj) else []
    return []


def redact(obj: Any) -> Any:
    """A copy of a nested dict/list with secret-looking keys and values replaced."""
    if isinstance(obj, dict):
        return {k: (REDACTED if _SECRET_KEY.search(str(k)) and v not in (None, "") else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    if isinstance(obj, str) and _SECRET_VALUE.match(obj.strip()):
        return REDACTED
    if isinstance(obj, str) and _SECRET_INSIDE.search(obj):  # the secret masked, the rest (a path, a URL's host) kept
        return _URL_CREDENTIALS.sub(rf"\g<1>{REDACTED}@", _TOKEN_INSIDE.sub(REDACTED, obj))
    return obj


def wandb_base_url() -> str:
    """The server wandb will talk to: its own settings (``WANDB_BASE_URL``, ``wandb login --host``'s settings file, its
    default: ``https://api.forge.coreweave.com`` in wandb 0.31), else ``https://api.wandb.ai``."""
    try:
        import wandb

        settings = wandb.Settings()
        settings.update_from_system_settings()  # its settings file, then the environment, as wandb.init reads them
        settings.update_from_env_vars(dict(os.environ))
        return str(settings.base_url or "https://api.wandb.ai")
    except Exception:  # noqa: BLE001 - wandb missing, or settings it refuses: its own error comes at wandb.init
        return os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai"


def has_api_key() -> bool:
    """A key in the environment, or in ~/.netrc for the server wandb uses (``wandb login`` writes it there: wandb 0.31
    logs in to api.forge.coreweave.com, and a key looked for under api.wandb.ai alone left every run offline without a
    word: an audit, session 41); api.wandb.ai's key is still taken."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    from urllib.parse import urlparse

    hosts = {urlparse(wandb_base_url()).hostname, "api.wandb.ai"} - {None}
    try:
        keys = netrc.netrc()
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return any(keys.authenticators(h) is not None for h in hosts)


def wandb_mode(cfg: DictConfig) -> str:
    """Explicit config wins, then WANDB_MODE, then online-if-keyed, else offline."""
    if cfg.logger.mode:
        return str(cfg.logger.mode)
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if has_api_key() else "offline"


LOGGERS = ("wandb", "tensorboard", "none")


def report_to(cfg: DictConfig) -> list[str]:
    """Trainer's ``report_to`` for the ``logger`` option."""
    return [cfg.logger.name] if cfg.logger.name in ("wandb", "tensorboard") else []


def start(cfg: DictConfig, run_dir: Path):
    """Open a W&B run in ``run_dir/wandb``; None for ``logger=none`` and ``logger=tensorboard``
    (Trainer's callback opens its writer; this only points it at ``run_dir/tensorboard``)."""
    name = cfg.logger.name
    if name not in LOGGERS:
        raise ConfigError(f"logger={name!r}: choose one of {', '.join(LOGGERS)}")
    if name == "none":
        return None
    if name == "tensorboard":
        if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
            raise ConfigError("logger=tensorboard needs the tensorboard package: pip install 'sectune[tensorboard]', or logger=none")
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(run_dir / "tensorboard")  # read by Trainer's TensorBoardCallback
        _close_tensorboard()
        _TENSORBOARD["dir"] = str(run_dir / "tensorboard")  # log_step's numbers go there too
        return None
    import wandb

    mode = wandb_mode(cfg)
    # Trainer's WandbCallback reads these; make it log into the run we open.
    os.environ["WANDB_MODE"] = mode
    os.environ.setdefault("WANDB_LOG_MODEL", "false")
    os.environ.setdefault("WANDB_WATCH", "false")
    config = redact(OmegaConf.to_container(cfg, resolve=True))
    name, group = run_name(cfg.stage.name, run_dir)
    kwargs = dict(project=cfg.logger.project, entity=cfg.logger.entity, dir=str(run_dir), name=name, group=group,
                  job_type=str(cfg.stage.name), tags=list(cfg.logger.tags), config=config, reinit="finish_previous")
    try:
        return _opened(wandb.init(mode=mode, **kwargs), config)
    except Exception as e:  # noqa: BLE001 - online: no network, a proxy, a rejected key … the run itself need not fail
        if mode != "online":
            raise
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        print(f"sectune: warning: W&B could not start online ({type(e).__name__}: {first}); logging offline to "
              f"{run_dir / 'wandb'} instead (`wandb sync` uploads it later; logger.mode=offline or WANDB_MODE=offline "
              "skips this wait where there is no network)", file=sys.stderr)
        os.environ["WANDB_MODE"] = "offline"
        return _opened(wandb.init(mode="offline", **kwargs), config)


#: each open run's ``debug`` node, put back at its end: Trainer's WandbCallback writes TrainingArguments' own ``debug: []``
#: over it (an audit, session 39: a debug run read in W&B as the full run its config names)
_CONFIG_DEBUG: dict[int, Any] = {}


def _opened(run, config: dict):
    _CONFIG_DEBUG[id(run)] = config.get("debug")
    return run


def run_name(stage: str, run_dir: Path) -> tuple[str, str]:
    """(name, group) of a run's W&B run. A pipeline and its steps share one group, ``<parent>/<pipeline dir>``
    (``multirun/…/14-02-11/0`` for a sweep's job 0): grouped by the step dir's parent alone, every sweep's job-0 steps
    shared group ``0`` and the pipeline's own run sat in another group than its steps. A run of one stage keeps its
    dir's parent (a sweep dir: its jobs together)."""
    run_dir = Path(run_dir).resolve()
    if (run_dir / "step.json").is_file():  # a pipeline's step (pipeline_record writes it before the step runs)
        group = f"{run_dir.parent.parent.name}/{run_dir.parent.name}"
        return f"{group}/{run_dir.name}", group
    if stage == "pipeline":
        group = f"{run_dir.parent.name}/{run_dir.name}"
        return f"{group}/pipeline", group
    return f"{stage}-{run_dir.name}", run_dir.parent.name


def log(tracker, metrics: dict, step: int | None = None) -> None:
    if tracker is not None:
        tracker.log(metrics, step=step)


def log_step(metrics: dict, step: int) -> None:
    """Numbers a callback computes beside Trainer's own (GRPO's held-out reward) into the open W&B run, on Trainer's
    ``train/global_step`` axis, or with ``logger=tensorboard`` into the run's tensorboard/ folder (an event file of its
    own beside Trainer's: the curve rl.keep_best chooses on was W&B's alone, an audit, session 41); nothing where no run
    is open (``logger=none``, another rank)."""
    wandb = sys.modules.get("wandb")
    run = getattr(wandb, "run", None) if wandb is not None else None
    if run is not None:
        run.log({**metrics, "train/global_step": step})
    if _TENSORBOARD.get("dir") and os.environ.get("RANK", "0") == "0":  # logger=tensorboard: the curve went to W&B alone
        if _TENSORBOARD.get("writer") is None:
            try:  # as Trainer's TensorBoardCallback: torch's writer, else tensorboardX's
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                from tensorboardX import SummaryWriter
            _TENSORBOARD["writer"] = SummaryWriter(log_dir=_TENSORBOARD["dir"])
        for k, v in metrics.items():
            _TENSORBOARD["writer"].add_scalar(k, v, step)
        _TENSORBOARD["writer"].flush()


#: logger=tensorboard's folder for :func:`log_step` (a run's own event file beside Trainer's) and its open writer
_TENSORBOARD: dict = {}


def _close_tensorboard() -> None:
    writer = _TENSORBOARD.pop("writer", None)
    _TENSORBOARD.pop("dir", None)
    if writer is not None:
        writer.close()


def finish(tracker, result: dict) -> None:
    _close_tensorboard()
    if tracker is None:
        return
    # numbers and the short labels beside them (heldout_split: which split a held-out number was measured on)
    kept = {k: v for k, v in result.get("metrics", {}).items()
            if isinstance(v, (int, float)) or isinstance(v, str) and len(v) <= 200}
    tracker.summary.update({**{f"final/{k}": v for k, v in kept.items()}, "status": result["status"]})
    debug = _CONFIG_DEBUG.pop(id(tracker), None)
    if debug is not None:
        tracker.config.update({"debug": debug}, allow_val_change=True)
    tracker.finish(exit_code=0 if result["status"] == "succeeded" else 1)
    where = where_it_went(tracker, result.get("stage"))
    if where:
        print(where)


def where_it_went(tracker, stage: str | None) -> str | None:
    """The line saying where a finished W&B run is: WANDB_SILENT (sectune's default) keeps wandb's own closing lines off
    the console, and with them the only word of where an offline run went and how to upload it. A pipeline's steps say
    nothing: the pipeline's own run, last, names every step's folder too."""
    try:
        sync_dir = Path(str(tracker.settings.sync_dir))
        offline = str(tracker.settings.mode) in ("offline", "dryrun") or bool(getattr(tracker, "offline", False))
        url = None if offline else tracker.url
    except Exception:  # noqa: BLE001 - a wandb that names these otherwise: no line rather than a failed run
        return None
    if not offline:
        return f"sectune: W&B run at {url}" if url else None
    run_dir = sync_dir.parent.parent  # <run dir>/wandb/offline-run-…
    if (run_dir / "step.json").is_file():
        return None
    runs = str(sync_dir)
    if stage == "pipeline":
        runs = f"{run_dir / 'wandb' / 'offline-run-*'} {run_dir / '*' / 'wandb' / 'offline-run-*'}"
    return f"sectune: W&B run logged offline in {sync_dir}; upload it with: wandb sync {runs}"
