"""The command line's refusals and Hydra's errors as one line each (for :mod:`sectune.cli`): a secret or a deleted
node refused before anything is written, an override, config-file or usage error named by key or file, the extra
that provides a missing plugin."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from sectune.errors import say_error
from sectune.paths import CONF_DIR


#: Hydra config groups an optional extra provides, and the extra
_EXTRA_GROUPS = {"hydra/sweeper/optuna": "optuna", "hydra/launcher/submitit": "slurm"}


def _extra_hint(message: str) -> str:
    """For "Could not find 'hydra/sweeper/optuna'": the sectune extra whose plugin provides it."""
    for group, extra in _EXTRA_GROUPS.items():
        if group in message:
            return (f" (that plugin comes with sectune's {extra!r} extra: pip install 'sectune[{extra}]'; in sectune's "
                    f"repository: pip install -c constraints.txt -e '.[{extra}]')")
    return ""


def refuse_secrets(argv: list[str]) -> None:
    """Exit 2 before anything is written when an override carries a secret: Hydra saves every override in
    the run's ``.hydra/`` (and a sweep's ``multirun.yaml`` and submitit's job files), and W&B records the
    command line, so a token given there would be on disk and, online, uploaded."""
    from sectune.tracking import secret_overrides

    found = secret_overrides(argv)
    if found:
        say_error(f"{', '.join(found)}: a secret on the command line would be saved in the run's .hydra/ "
              "files (and a sweep's multirun.yaml) and recorded by W&B; nothing was run or written. Put it in the "
              "environment instead: HF_TOKEN (or `hf auth login`) for the hub, WANDB_API_KEY (or `wandb login`) for W&B")
        sys.exit(2)


def config_file_error(e: BaseException, argv: list[str]) -> str | None:
    """One line for an error inside a config file (a user's ``--config-dir`` or conf/): the file,
    then what is wrong and the key. None for anything else (a command-line override, a bug)."""
    from hydra.errors import ConfigCompositionException

    msg = str(e)
    if not isinstance(e, ConfigCompositionException) or not msg.startswith("In '"):
        return None
    where, _, detail = msg[len("In '"):].partition("': ")
    if where == "config":  # the primary config's defaults: the option came from the command line
        return None
    # Hydra searches conf/ first, then the --config-dir folders: the first file found is the one used
    search = [CONF_DIR, *(Path(d) for d in _config_dirs(argv))]
    files = [d / f"{where}.yaml" for d in search if (d / f"{where}.yaml").is_file()]
    return f"{files[0] if files else where}: {_one_line(detail)}"


def yaml_error(e: BaseException) -> str | None:
    """One line for a config file that is not valid YAML (a user's ``--config-dir`` preset): the file, line and column, and
    what the parser expected. It reached the user as yaml's traceback, exit 1 (an audit, session 32)."""
    import yaml

    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, yaml.MarkedYAMLError) and e.problem_mark is not None:
            mark = e.problem_mark
            what = "; ".join(str(x) for x in (e.context, e.problem) if x)
            return f"{mark.name}: line {mark.line + 1}, column {mark.column + 1}: not valid YAML ({what})"
        e = e.__cause__ or e.__context__
    return None


def override_error(e: BaseException) -> str | None:
    """One line for a command-line override Hydra cannot apply (a typo'd key, a wrong type), naming the key; without
    Hydra's "To append to your config use +key=value", which would add the typo beside the setting it meant."""
    from hydra.errors import ConfigCompositionException, OverrideParseException

    if not isinstance(e, (ConfigCompositionException, OverrideParseException)):
        return None
    detail = "\n".join(ln for ln in str(e).splitlines() if not ln.strip().startswith("To append to your config use"))
    cause = e.__cause__
    if cause is not None and str(cause) and str(cause).splitlines()[0] not in detail:
        detail += "\n" + str(cause)
    line = _one_line(detail)
    # a mapping whose keys are the user's (model.max_memory's devices, ...): Hydra adds keys to it only with ++,
    # which for any other key would add a typo beside the setting it meant, so the hint is for these alone
    for mapping in OPEN_MAPPINGS:
        if f"(key {mapping}." in line or f"override '{mapping}'" in line:
            line += (f"; {mapping} is a mapping of your own keys: add them with ++ "
                     f"(++{mapping}={{...}} or ++{mapping}.<key>=<value>)")
            break
    return line


#: config mappings whose keys the user chooses (sectune/config.py's Dict-typed fields)
OPEN_MAPPINGS = ("model.max_memory", "model.arch", "dataset.corruptions")


def _one_line(detail: str) -> str:
    """Hydra's and OmegaConf's multi-line message as one line: the message, a list of options
    comma-separated, the key at the end."""
    lines = [ln.strip() for ln in detail.split("Config search path:")[0].splitlines() if ln.strip()]
    if lines and lines[0].endswith("raised while composing config:"):
        lines = lines[1:]  # "ConfigKeyError raised while composing config:" says nothing more
    key = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("full_key:")), None)
    lines = [ln for ln in lines if not ln.startswith(("full_key:", "reference_type=", "object_type="))]
    text, listing = "", False
    for ln in lines:  # after a line ending in ":" (e.g. "Available options in 'dataset':") a list follows
        if not text:
            text = ln
        elif listing and not text.endswith(":"):
            text += ", " + ln
        else:
            text += " " + ln
        listing = listing or ln.endswith(":")
    return text + (f" (key {key})" if key else "")


def _config_dirs(argv: list[str]) -> list[str]:
    """The ``--config-dir``/``-cd`` folders on the command line (Hydra searches them after conf/)."""
    out = []
    for i, arg in enumerate(argv):
        if arg in ("--config-dir", "-cd") and i + 1 < len(argv):
            out.append(os.path.abspath(argv[i + 1]))
        elif arg.startswith("--config-dir="):
            out.append(os.path.abspath(arg.split("=", 1)[1]))
    return out


def refuse_node_deletions(argv: list[str]) -> None:
    """``~train`` / ``~stage``: a node every run has, deleted. It failed with a traceback after Hydra had written the
    broken config over a succeeded run's ``.hydra/`` (an audit, session 25); refused before anything is written."""
    from dataclasses import fields

    from sectune.config import SectuneConfig

    nodes = {f.name for f in fields(SectuneConfig)}
    for arg in argv:
        key = arg[1:].split("=", 1)[0] if arg.startswith("~") else None
        if key in nodes:
            say_error(f"{arg}: {key!r} is a node every run has and cannot be deleted; set its keys instead "
                  f"(sectune --cfg job shows them)")
            sys.exit(2)


def usage_error(e: BaseException) -> str | None:
    """One line for a command line Hydra cannot run as given: a --config-dir that is not there, two modes at once
    (``-m ... --cfg job``), which it reported as a bare line with exit 1 or as a ValueError traceback."""
    from hydra.errors import SearchPathException

    if isinstance(e, SearchPathException):
        return f"{e} (--config-dir / -cd)"
    if isinstance(e, ValueError) and str(e).startswith("Config group override must be"):  # model=null: a traceback
        return (f"{e}: a config group takes one of its options (sectune --help lists them); null only for an optional "
                "group (hparams_search)")
    if isinstance(e, ValueError) and str(e).startswith("Only one of --run, --multirun, --cfg"):
        return f"{e}: to see one job's config, drop -m and give each swept key one value (sectune --cfg job <overrides>)"
    return None


def _hydra_report(e: BaseException) -> None:
    """What Hydra itself prints for an error (its run_and_report), for the errors left to it."""
    import traceback

    from hydra.errors import CompactHydraException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(e, CompactHydraException):
        print(str(e), file=sys.stderr)
        if isinstance(e.__cause__, OmegaConfBaseException):
            print(str(e.__cause__), file=sys.stderr)
    else:
        traceback.print_exception(e)
