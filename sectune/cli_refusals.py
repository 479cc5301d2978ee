"""What the CLI refuses as a run or sweep starts, before Hydra writes anything (sectune.cli.SweepCheck calls these): a
launcher off its cluster or without -m, an interpolation to a missing key, a secret a config file or the environment sets."""

from __future__ import annotations

import os
import sys

from omegaconf import DictConfig, OmegaConf

from sectune.errors import say_error


def refuse_slurm_without_srun(config: DictConfig) -> None:
    """submitit's SLURM executor needs ``srun``; without it the sweep died in a RuntimeError traceback."""
    import shutil

    target = str(OmegaConf.select(config, "hydra.launcher._target_", default="") or "")
    if "submitit" in target and "Slurm" in target and shutil.which("srun") is None:
        say_error("hydra/launcher=slurm: no `srun` on this machine's PATH (submitit submits SLURM jobs from a "
              "node of the cluster: run the command on its login node); here, run the sweep without hydra/launcher=slurm")
        sys.exit(2)


def refuse_launcher_without_multirun(config: DictConfig) -> None:
    """Hydra applies a launcher to sweeps only: ``hydra/launcher=slurm`` without ``-m`` trained right here (on a login
    node, say) with exit 0 and no word."""
    target = str(OmegaConf.select(config, "hydra.launcher._target_", default="") or "")
    if "submitit" in target:
        kind = "slurm" if "Slurm" in target else "local"
        say_error(f"hydra/launcher={kind} applies to sweeps only; without -m this would run here, in this "
              f"process. Add -m (a sweep of one job is fine: sectune -m hydra/launcher={kind} ...)")
        sys.exit(2)


def _strings(obj, prefix: str = ""):
    """``(dotted key, value)`` of every string in a nested container."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _strings(v, f"{prefix}{k}.")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _strings(v, f"{prefix}{i}.")
    elif isinstance(obj, str):
        yield prefix.rstrip("."), obj


def refuse_unresolvable(config: DictConfig) -> None:
    """An interpolation to a key that does not exist (``dataset.max_samples=${dataset.maxsamples}``): one line naming the
    key, exit 2, before Hydra writes .hydra/. It was first resolved by the runner after that: a traceback, exit 1, and a
    finished run's saved config overwritten with the typo while its result.json still said succeeded (an audit, session 36)."""
    from omegaconf.errors import InterpolationResolutionError

    for key in config:
        if key == "hydra":
            continue
        try:
            node = config[key]
            if OmegaConf.is_config(node):
                OmegaConf.to_container(node, resolve=True)
        except InterpolationResolutionError as e:
            if "HydraConfig" in str(e):  # ${hydra:...}: resolved by Hydra itself, later
                continue
            first = str(e).strip().splitlines()[0]
            say_error(f"{getattr(e, 'full_key', None) or key}: {first}; nothing was run or written")
            sys.exit(2)


def refuse_preset_secrets(config: DictConfig) -> None:
    """A secret set by a config file (a ``--config-dir`` preset's ``hydra.job.env_set``) rather than on the command line:
    Hydra saves it in every job's ``.hydra/hydra.yaml`` and a sweep's ``multirun.yaml``. Called as a run or sweep
    starts, before Hydra writes either (the command-line check runs before Hydra itself)."""
    from sectune.tracking import secret_keys, secret_overrides

    env = OmegaConf.select(config, "hydra.job.env_set", default=None)
    env = OmegaConf.to_container(env, resolve=False) if env is not None else {}
    # as the command line's NAME=value: a secret-named variable, a token-shaped value, credentials inside one
    # (HTTPS_PROXY=http://user:pw@proxy: an audit, session 37)
    found = sorted(str(k) for k, v in env.items() if secret_overrides([f"{k}={'' if v is None else v}"]))
    if found:
        say_error(f"hydra.job.env_set sets {', '.join(found)} from a config file: Hydra would save the value in the "
              "run's .hydra/hydra.yaml (and a sweep's multirun.yaml); nothing was run or written. Put it in the environment "
              "instead (export it, `hf auth login`, `wandb login`)")
        sys.exit(2)
    # any other key a preset sets (paths.shared_data: https://alice:pw@host/share was saved in .hydra/ and result.json)
    run = OmegaConf.to_container(config, resolve=False)
    hydra_node = run.pop("hydra", None) or {}
    found = secret_keys(run)
    # every hydra.* key a preset sets, checked word by word as on the command line: a launcher's shell lines and sbatch
    # parameters (`export WANDB_API_KEY=…` in setup went into multirun.yaml, submitit's pickles and the sbatch script),
    # an Optuna study's hydra.sweeper.storage (postgresql://user:pw@host/db went into hydra.yaml and multirun.yaml: audits,
    # session 36 and 37). Hydra's own record of this run (runtime, overrides: checked on the command line) is not a preset's,
    # and --help's text is prose (sectune's names `wandb login`)
    preset_hydra = {k: v for k, v in hydra_node.items() if k not in ("runtime", "overrides", "help", "hydra_help")}
    found += [f"hydra.{k}" for k in secret_keys(preset_hydra)]
    found += [f"hydra.{k}" for k, v in _strings(preset_hydra) if secret_overrides([f"x={v}"]) and f"hydra.{k}" not in found]
    # the variables behind paths.*: SECTUNE_SHARED_DATA=https://alice:pw@host/… reached result.json and console.log unchecked
    found += [f"{name} (the environment variable paths.* read)" for name in ("SECTUNE_SHARED_DATA", "SECTUNE_CACHE")
              if secret_overrides([f"x={os.environ.get(name, '')}"])]
    if found:
        say_error(f"{', '.join(found)}: a secret set by a config file would be saved in the run's .hydra/ and "
              "result.json; nothing was run or written. Put it in the environment instead (export it, `hf auth login`, "
              "`wandb login`), or credentials in a netrc file rather than a URL")
        sys.exit(2)
