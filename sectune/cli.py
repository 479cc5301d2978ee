"""``sectune`` / ``python -m sectune``: the Hydra app. A thin entry: compose, validate, run."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

# Quiet, offline-friendly defaults before any heavy import; a user's own settings win.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("WANDB_SILENT", "true")

import hydra  # noqa: E402
from hydra.experimental.callback import Callback  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from sectune import config  # noqa: E402
from sectune.training import distributed  # noqa: E402
from sectune.cli_errors import (  # noqa: E402
    _extra_hint, _hydra_report, config_file_error, override_error, refuse_node_deletions, refuse_secrets, usage_error, yaml_error)
from sectune import paths  # noqa: E402
from sectune.console import lenient_console  # noqa: E402
from sectune.errors import say_error  # noqa: E402
from sectune.paths import CONF_DIR  # noqa: E402
from sectune.cli_refusals import (refuse_launcher_without_multirun, refuse_preset_secrets, refuse_slurm_without_srun,  # noqa: E402
                                  refuse_unresolvable)

config.register()


class BitsandbytesKernelsNote(logging.Filter):
    """bitsandbytes warns at import, on CPUs with AVX512-bf16, that it could not fetch a faster CPU 4-bit matmul
    from the hub (sectune refuses hub kernels: sectune/__init__.py), in every run, quantized or not.
    Dropped; a run with 4-bit layers gets one line saying what it means instead."""

    LOGGER = "bitsandbytes.backends.cpu.ops"

    def __init__(self):
        super().__init__()
        self.four_bit = False

    def filter(self, record: logging.LogRecord) -> bool:
        if "kernels" not in record.getMessage():
            return True
        if self.four_bit:
            print("sectune: note: 4-bit layers on CPU use bitsandbytes' built-in matmul (the faster one it asks for is "
                  "a kernel fetched from the hub: off, like every hub kernel, unless USE_HUB_KERNELS=1)", file=sys.stderr)
        return False


BNB_NOTE = BitsandbytesKernelsNote()
logging.getLogger(BitsandbytesKernelsNote.LOGGER).addFilter(BNB_NOTE)


class SweepCheck(Callback):
    """``sweep.direction`` checked as a multirun starts (conf/config.yaml's hydra.callbacks): the Optuna preset makes
    its study from it before any job, whose check_values would come too late. Hydra turns a callback's exception
    into a warning, so this one says the error and exits itself."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        from sectune.sweeps import check_sweep
        from sectune.errors import SectuneError

        global _NEW_SWEEP_DIR, _OLD_MULTIRUN, _SWEEP_CONFIG
        _SWEEP_CONFIG = config
        sweep_dir = Path(str(OmegaConf.select(config, "hydra.sweep.dir", default="") or ""))
        # made by this command (or claimed by it as its default dir: paths.fresh_run_dir): removed if no job starts
        claimed = {Path(d).resolve() for d in paths.claimed_dirs()}
        _NEW_SWEEP_DIR = None if sweep_dir.exists() and sweep_dir.resolve() not in claimed else sweep_dir
        old = sweep_dir / "multirun.yaml"  # an earlier sweep's record of its jobs (sectune-report reads it): put back
        _OLD_MULTIRUN = (old, old.read_bytes()) if old.is_file() else None
        refuse_preset_secrets(config)
        refuse_slurm_without_srun(config)
        refuse_unresolvable(config)
        tasks = OmegaConf.select(config, "hydra.launcher.tasks_per_node", default=None)
        if tasks is not None and "submitit" in str(OmegaConf.select(config, "hydra.launcher._target_", default="")) and int(tasks) != 1:
            # each task ran the whole job in the same dir: one trained, the others stopped on its lock (session 36)
            say_error(f"hydra.launcher.tasks_per_node={tasks}: one task per job (DDP inside a SLURM job is not "
                  "wired: each task would run the whole job); give each job one GPU, or run torchrun yourself in an "
                  "sbatch script")
            sys.exit(2)
        try:
            check_sweep(config)
            check_sweep_jobs(config)
        except SectuneError as e:
            say_error(f"{e}")
            sys.exit(e.exit_code)
        if distributed.is_main_process() and not _lock_sweep_dir(sweep_dir):  # last: a refused sweep makes no dir
            _NEW_SWEEP_DIR = None
            sys.exit(2)

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        refuse_preset_secrets(config)
        refuse_launcher_without_multirun(config)
        refuse_unresolvable(config)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        """Jobs a launcher ran in other processes (submitit, SLURM) never reach this process's list of failed jobs:
        read their result.json files in the sweep dir instead."""
        _read_sweep_jobs(config)


def _read_sweep_jobs(config: DictConfig) -> None:
    """:meth:`on_multirun_end`'s reading of the sweep dir's result.json files, also where submitit gave up waiting for a
    job that wrote no result (killed, out of memory): its 40-line UncompletedJobError was the sweep's only word."""
    if _SWEEP_JOBS:  # the basic launcher ran them here (or they were read already)
        return
    sweep_dir = Path(str(OmegaConf.select(config, "hydra.sweep.dir", default="") or ""))
    # a grid job that never wrote result.json (its dir held by another command, killed before it started) counts as
    # failed: only dirs holding one were read, so such a sweep exited 0 (an audit, session 36)
    n = _grid_job_count(config)
    for i in range(n or 0):
        if not (sweep_dir / str(i) / "result.json").is_file():
            _SWEEP_JOBS.append((str(sweep_dir / str(i)), 1))
    for job in sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith(".")) if sweep_dir.is_dir() else []:
        res = job / "result.json"
        if not res.is_file():
            continue  # not a job dir (.submitit, an optuna file's folder)
        try:
            status = json.loads(res.read_text(encoding="utf-8")).get("status")
        except (OSError, ValueError, AttributeError):
            status = None
        _SWEEP_JOBS.append((str(job), 0 if status == "succeeded" else 1))


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _app(cfg: DictConfig):
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from sectune import runner

    # Composition is done: Hydra reports whatever follows (sweep jobs, launchers) its own way again.
    if _full_error_is_ours:
        os.environ.pop("HYDRA_FULL_ERROR", None)
    BNB_NOTE.four_bit = bool(cfg.quantization.load_in_4bit)
    code, objective = runner.run(cfg)
    # In a sweep a failed job is a failed row, not the end of the sweep; a single run exits
    # with the runner's code so shells and schedulers see the failure.
    if HydraConfig.get().mode == RunMode.RUN and code != 0:
        sys.exit(code)
    if code != 0 and distributed.world_size() > 1:
        # A job that failed on this rank may have failed here alone (a CUDA OOM on one GPU): the other ranks can be inside a
        # collective it left, which the next job's would meet. Going on hung both ranks (ddp_timeout, 30 min); exiting lets
        # torchrun end the others.
        print(f"sectune: error: sweep job {HydraConfig.get().runtime.output_dir} failed on rank {distributed.rank()}; under "
              f"{distributed.world_size()} processes the sweep stops at its first failed job (the other ranks may be waiting "
              "for this one inside the job; torchrun ends them). sweep.skip_done=true reruns only what did not finish",
              file=sys.stderr)
        sys.exit(code)
    _SWEEP_JOBS.append((HydraConfig.get().runtime.output_dir, code))  # jobs run in this process (the basic launcher)
    if _full_error_is_ours:  # what the sweeper raises after its jobs (Optuna when no trial completed: "No trials are
        os.environ["HYDRA_FULL_ERROR"] = "1"  # completed yet") reaches main() as the sweep's one line, not a traceback
    return objective


#: (job dir, exit code) of the sweep jobs this process ran (or, for a launcher's other processes, read from their
#: result.json at the sweep's end): a sweep with failed jobs exits non-zero at its end
_SWEEP_JOBS: list[tuple[str, int]] = []
_SWEEP_REPORTED = False
#: the sweep dir this command created (None: none, or it was there before), and the multirun.yaml it found there
_NEW_SWEEP_DIR: Path | None = None
_SWEEP_CONFIG: DictConfig | None = None  # the sweep's config, for what its jobs left behind
_OLD_MULTIRUN: tuple[Path, bytes] | None = None


#: the open lock file of the sweep this process runs (released when it exits)
_SWEEP_LOCK = None


def _lock_sweep_dir(sweep_dir: Path) -> bool:
    """An exclusive lock on ``<sweep dir>/.sweep.lock`` for this sweep: two sweeps started in the same second share the
    default dir (``multirun/DATE/TIME``), refused each other's jobs, and one replaced the other's finished job as if it
    were "a sweep rerun in place" (audit AA). The second is refused before any job; False once the error is printed."""
    from sectune.files import take_lock

    global _SWEEP_LOCK
    try:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        fh = take_lock(sweep_dir / ".sweep.lock")
    except OSError as e:
        _run_dir_error(e)
    if isinstance(fh, str):
        print(f"sectune: error: {sweep_dir} is in use by another sweep ({fh}); wait for it, or give this sweep another "
              "hydra.sweep.dir (two sweeps started in the same second get the same default dir)", file=sys.stderr)
        return False
    _SWEEP_LOCK = fh
    return True


def _drop_empty_sweep_dir() -> None:
    """A sweep whose first job's overrides did not compose (a typo: ``lora.rr=4,8``) left a dir holding only its
    multirun.yaml; one this command made is removed again, and an earlier sweep's multirun.yaml it replaced is put back."""
    if _OLD_MULTIRUN is not None and not _SWEEP_JOBS:
        _OLD_MULTIRUN[0].write_bytes(_OLD_MULTIRUN[1])
    d = _NEW_SWEEP_DIR
    if d is not None and d.is_dir() and {p.name for p in d.iterdir()} <= {"multirun.yaml", ".sweep.lock"}:
        (d / "multirun.yaml").unlink(missing_ok=True)
        (d / ".sweep.lock").unlink(missing_ok=True)
        d.rmdir()


#: main() set HYDRA_FULL_ERROR (the user did not), so composition errors reach it as exceptions
_full_error_is_ours = False



def _run_dir_error(e: OSError, log_file: bool = False) -> None:
    """``log_file``: Hydra could not open its cli.log, in a run dir that may exist (read-only: it is not "created")."""
    where = f"{e.filename}: " if e.filename else ""
    exists = log_file and bool(e.filename) and Path(e.filename).parent.is_dir()
    what = "cannot write in the run dir" if exists else "cannot create the run dir there"
    say_error(f"{where}{e.strerror or e}: {what} (hydra.run.dir, or hydra.sweep.dir for -m)")
    sys.exit(2)


def _logging_os_error(e: BaseException) -> OSError | None:
    """The OSError behind logging's "Unable to configure handler 'file'" (Hydra's cli.log in a read-only run dir)."""
    if not (isinstance(e, ValueError) and "Unable to configure handler" in str(e)):
        return None
    seen = e.__cause__ or e.__context__
    for _ in range(5):
        if seen is None or isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None

def multirun_flag_first(argv: list[str]) -> list[str]:
    """``-m``/``--multirun`` moved before every other argument. Hydra's argparse reads its overrides as one positional
    list, so ``sectune +experiment=x -m train.seed=1,2,3`` stopped with "unrecognized arguments: train.seed=1,2,3": an
    override before the flag and one after it are two lists. The flag takes no value, so its place changes nothing else."""
    flags = ("-m", "--multirun")
    return [a for a in argv if a in flags] + [a for a in argv if a not in flags]


def main() -> None:
    from sectune.config_checks import check_printed_keys

    global _full_error_is_ours
    lenient_console()
    if sys.argv[1:] == ["--version"]:  # Hydra's own flag printed only Hydra's version
        from importlib.metadata import PackageNotFoundError, version

        import hydra

        try:
            mine = version("sectune")
        except PackageNotFoundError:
            mine = "(not installed)"
        print(f"sectune {mine} (Hydra {hydra.__version__})")
        return
    sys.argv[1:] = multirun_flag_first(sys.argv[1:])
    refuse_secrets(sys.argv[1:])
    refuse_node_deletions(sys.argv[1:])
    distributed.share_run_dir_across_ranks()
    if "HYDRA_FULL_ERROR" in os.environ:  # the user wants Hydra's full traces
        _app()
        _exit_if_sweep_jobs_failed()
        return
    os.environ["HYDRA_FULL_ERROR"], _full_error_is_ours = "1", True
    try:
        _app()
        if "--cfg" in sys.argv or "-c" in sys.argv:
            check_printed_keys(sys.argv[1:])
        _exit_if_sweep_jobs_failed()
    except SystemExit as e:  # Hydra's own report of a sweeper that gave up (Optuna: "No trials are completed yet")
        if e.code not in (0, None):
            _exit_if_sweep_jobs_failed()
        raise
    except KeyboardInterrupt as e:  # runner.run re-raises it inside a sweep: Ctrl-C / SIGTERM stop the sweep, not one job
        where = OmegaConf.select(_SWEEP_CONFIG, "hydra.sweep.dir", default=None) if _SWEEP_CONFIG is not None else None
        # in its own dir: the same command made a new multirun/DATE/TIME and trained every job again (an audit, session 41)
        print("sectune: interrupted: the sweep's remaining jobs were not started (the same sweep with "
              f"{f'hydra.sweep.dir={where} ' if where else ''}sweep.skip_done=true train.resume=auto reruns only what did "
              "not finish, from its checkpoints)", file=sys.stderr)
        sys.exit(128 + e.signum if hasattr(e, "signum") else 130)
    except BrokenPipeError:  # `sectune --help | head`: the reader left; nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    except OSError as e:  # Hydra could not make the run's output dir (a stage's own OSErrors end in runner.run)
        from hydra.errors import MissingConfigException

        if isinstance(e, MissingConfigException):  # an OSError to Hydra: a mistyped option (dataset=…, +experiment=…)
            _drop_empty_sweep_dir()  # in a sweep (-m "lora=r4_attention,r4_atention"): an earlier sweep's multirun.yaml back
            say_error(f"{str(e).split('Config search path:')[0].strip()}{_extra_hint(str(e))}")
            sys.exit(2)
        _run_dir_error(e)
    except Exception as e:
        if (cause := _logging_os_error(e)) is not None:  # Hydra's log file in a run dir it cannot write
            _run_dir_error(cause, log_file=True)
        if _SWEEP_CONFIG is not None and _submitit_error(e, "UncompletedJobError") is not None:  # a job ended without its result
            _read_sweep_jobs(_SWEEP_CONFIG)
        _exit_if_sweep_jobs_failed()  # a sweeper that gave up because its trials failed (Optuna: "No trials are completed")
        line = (submit_error(e) or config_file_error(e, sys.argv[1:]) or yaml_error(e) or override_error(e)
                or usage_error(e))
        _drop_empty_sweep_dir()
        if line is None:
            _hydra_report(e)
            sys.exit(1)
        say_error(f"{line}{_extra_hint(line)}")
        sys.exit(2)
    finally:
        if _full_error_is_ours:
            os.environ.pop("HYDRA_FULL_ERROR", None)


def submit_error(e: BaseException) -> str | None:
    """sbatch's refusal of a sweep (a partition, account, QOS or size the cluster does not take), said in one line: it
    was a 45-line traceback of submitit's FailedJobError (an audit, session 36)."""
    if (e := _submitit_error(e, "FailedJobError")) is not None:
        said = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        return (f"the cluster refused the sweep's jobs: {said} (check hydra.launcher.partition / account / qos / mem_gb / "
                "timeout_min / gpus_per_node against what the cluster offers: sinfo, sacctmgr show qos)")
    return None


def _submitit_error(e: BaseException | None, name: str) -> BaseException | None:
    """submitit's exception ``name`` in ``e``'s chain (its cause or context), or None."""
    while e is not None:
        if type(e).__name__ == name and type(e).__module__.startswith("submitit"):
            return e
        e = e.__cause__ or e.__context__
    return None


def _exit_if_sweep_jobs_failed() -> None:
    global _SWEEP_REPORTED
    failed = [d for d, code in _SWEEP_JOBS if code != 0]
    if failed and not _SWEEP_REPORTED:  # each is a row of the sweep's report; shells, CI and SLURM still see the sweep fail
        _SWEEP_REPORTED = True
        print(f"sectune: {len(failed)} of {len(_SWEEP_JOBS)} sweep jobs failed: {', '.join(failed)} "
              "(each one's error is in its result.json, or above)", file=sys.stderr)
        sys.exit(1)


def _grid_job_count(config: DictConfig) -> int | None:
    """How many jobs a basic (grid) sweep launches, or None for another sweeper."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if "BasicSweeper" not in str(OmegaConf.select(config, "hydra.sweeper._target_", default="") or ""):
        return None
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    task = [str(o) for o in OmegaConf.select(config, "hydra.overrides.task", default=None) or []]
    try:
        return sum(len(b) for b in BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(task), None))
    except Exception:  # noqa: BLE001 - what the sweeper itself could not parse never launched
        return None


def check_sweep_jobs(config: DictConfig) -> None:
    """Every job of a basic (grid) sweep composed and its values checked before the first one runs: a value only
    check_values refuses (``train.learning_rate=1e-3,-1``) let job 0 train to its end before job 1 failed (an audit,
    session 25). An Optuna study's trials are drawn as it runs, so its search space is checked at its edges instead:
    each parameter at every choice, or at both ends of its interval or range, the others at their first value
    (``lora.r: choice(4, 8, -1)`` failed one trial in three, each after the trials before it had trained)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    sweeper = str(OmegaConf.select(config, "hydra.sweeper._target_", default="") or "")
    task = [str(o) for o in OmegaConf.select(config, "hydra.overrides.task", default=None) or []]
    if "BasicSweeper" in sweeper:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

        jobs = [job for batch in BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(task), None) for job in batch]
        what = "sweep job"
    elif "optuna" in sweeper.lower():
        params = OmegaConf.select(config, "hydra.sweeper.params", default=None) or {}
        try:
            jobs = _search_space_edges([f"{k}={v}" for k, v in params.items()] + task)
        except Exception:  # noqa: BLE001 - a space Hydra's parser cannot read: the sweeper says so itself
            return
        what = "Optuna search-space edge"
    else:
        return
    if len(jobs) < 2:
        return
    _check_jobs(jobs, what)


def _search_space_edges(overrides: list[str]) -> list[list[str]]:
    """Override lists that put each swept parameter at each of its choices, or at both ends of its interval or range,
    with every other parameter at its first value."""
    from collections import deque

    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import IntervalSweep, RangeSweep

    fixed: list[str] = []
    space: list[tuple[str, list[str]]] = []
    latest = {o.input_line.split("=", 1)[0].lstrip("+~"): o for o in OverridesParser.create().parse_overrides(overrides)}
    for o in latest.values():  # the command line's setting of a key replaces the preset's (as the sweeper does)
        key = o.input_line.split("=", 1)[0]
        if not o.is_sweep_override():
            fixed.append(o.input_line)
        elif isinstance(o.value(), IntervalSweep):
            space.append((key, [str(o.value().start), str(o.value().end)]))
        elif isinstance(o.value(), RangeSweep):  # its first and last value, without listing the ones between
            values = o.sweep_string_iterator()
            space.append((key, [next(values), *deque(values, maxlen=1)]))
        else:  # choice(...)
            space.append((key, list(o.sweep_string_iterator())))
    first = [f"{k}={vals[0]}" for k, vals in space]
    jobs = [fixed + first]
    for i, (key, values) in enumerate(space):
        jobs += [fixed + first[:i] + [f"{key}={v}"] + first[i + 1:] for v in values[1:]]
    return jobs


def _check_jobs(jobs: list[list[str]], what: str) -> None:
    from hydra import compose

    from sectune.config_checks import check_keys, check_values
    from sectune.errors import ConfigError

    for n, job in enumerate(jobs):
        mine = [o for o in job if not o.lstrip("+~").startswith("hydra.")]
        try:
            cfg = compose(config_name="config", overrides=mine)
            check_keys(cfg)
            check_values(cfg)
        except ConfigError as e:
            raise ConfigError(f"{what} {n} ({' '.join(mine)}): {e}; no job was started") from None
        except Exception:  # noqa: BLE001 - what composing this way cannot judge, the job itself reports when it starts
            return


if __name__ == "__main__":
    main()
