"""The SFT stage's warm-up (``sft.warmup_lines``): the stage first run on generated auth-log windows, every weight
trained, in ``<run dir>/warmup/``, for a model trained from random weights; then the SFT starts from those weights."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

from omegaconf import open_dict

from sectune import data, runner
from sectune.errors import ConfigError
from sectune.runner import RunContext, write_json_atomic
from sectune.training import checkpoints, distributed

WARMUP_DIR = "warmup"


def check_warmup_holds_no_held_out_window(cfg, folder: Path) -> None:
    """The generator is prefix-stable for a seed: on logs it generated (no real ones) with ``dataset.split_seed`` equal to
    ``sft.warmup_seed``, the warm-up held every validation and test window word for word, and the held-out table called
    them "held out of every training step" (an audit, session 42). Any such window is refused, naming both seeds."""
    from sectune.data import auth_logs

    if not data.is_generated(data.auth_logs_folder(cfg)):  # real logs (or a user's folder): no generated window to share
        return  # (the check cost ~4 s at every SFT start: a review, session 42)
    held = {r["prompt"] for k in ("validation", "test") for r in data.sft_splits(cfg)[k]}
    seen = len(held & {auth_logs.render_prompt(w.log_text) for w in auth_logs.load_auth_folder(folder)})
    if seen:
        raise ConfigError(f"sft.warmup_seed={cfg.sft.warmup_seed}: the warm-up's generated windows ({folder}) hold {seen} of the "
                          f"run's {len(held)} validation and test windows word for word (its logs are generated too, with "
                          f"dataset.split_seed={cfg.dataset.split_seed}: the same stream); choose another sft.warmup_seed")


def warmup(ctx: RunContext) -> dict | None:
    """``sft.warmup_lines`` > 0: this stage on generated windows first (:func:`sectune.data.generated_auth_folder`;
    ``sft.warmup_epochs`` epochs, every weight trained, the run's other settings), in ``<run dir>/warmup/`` with
    its own result.json.
    A finished warm-up with the same config is reused (a rerun, ``train.resume=auto``); its result, or None."""
    cfg = ctx.cfg
    n = int(cfg.sft.warmup_lines)
    if n == 0:
        # its default: set on its own, it was ignored without a word (the warm-up's own SFT, in <run dir>/warmup/, has
        # warmup_lines=0 and the user's warmup_epochs: it said so there too, about a warm-up that was running: session 45)
        if float(cfg.sft.warmup_epochs) != 1.0 and ctx.run_dir.name != WARMUP_DIR:
            print(f"sectune: warning: sft.warmup_epochs={cfg.sft.warmup_epochs} does nothing without a warm-up: set "
                  "sft.warmup_lines=N (generated log lines to warm up on) as well", file=sys.stderr)
        return None
    if n < 0 or float(cfg.sft.warmup_epochs) <= 0:
        raise ConfigError(f"sft.warmup_lines={n}, sft.warmup_epochs={cfg.sft.warmup_epochs}: both must be > 0 (warmup_lines=0: no warm-up)")
    if cfg.dataset.name != "auth_logs":
        raise ConfigError(f"sft.warmup_lines: only dataset=auth_logs has a log generator (sectune.data.synthetic_auth), not dataset={cfg.dataset.name}")
    if cfg.quantization.name != "none":
        raise ConfigError(f"sft.warmup_lines: the warm-up trains every weight (it is for a model trained from random weights); "
                          f"quantization={cfg.quantization.name} weights cannot train: use quantization=none or sft.warmup_lines=0")
    wcfg = copy.deepcopy(cfg)
    with open_dict(wcfg):
        wcfg.sft.warmup_lines = 0
        wcfg.lora.name, wcfg.lora.enabled = "none", False  # every weight; an SFT adapter then sits on the result
        wcfg.dataset.path = str(data.generated_auth_folder(cfg))
        wcfg.dataset.subwindows = 0
        wcfg.dataset.max_samples = None
        wcfg.train.epochs = float(cfg.sft.warmup_epochs)
        wcfg.generation.preview_samples = 0
        wcfg.debug.fail_at_step = None  # the fault-injection hook is the SFT's own
        wcfg.logger.name = "none"  # its step numbers would collide with the SFT's in the same W&B run; its metrics go there as warmup_*
    check_warmup_holds_no_held_out_window(cfg, Path(wcfg.dataset.path))
    wdir = ctx.run_dir / WARMUP_DIR
    digest = runner.skip_digest(wcfg, ctx.run_dir)  # without train.resume: a rerun with train.resume=auto reuses it too
    prev = runner.previous_result(wdir) or {}
    if prev.get("status") == "succeeded" and prev.get("config_digest") == digest and (wdir / "model" / "config.json").is_file():
        damage = checkpoints.damaged_safetensors(wdir / "model")
        if damage is None:
            print(f"sectune: warm-up: finished for this config; reusing {wdir / 'model'}")
            return prev
        print(f"sectune: warning: warm-up: {wdir / 'model' / damage[0]} is damaged ({damage[1]}); training the warm-up again",
              file=sys.stderr)
    cap = f", capped at train.max_steps={cfg.train.max_steps} steps" if cfg.train.max_steps and cfg.train.max_steps > 0 else ""
    print(f"sectune: warm-up: {n} generated log lines ({wcfg.dataset.path}), {cfg.sft.warmup_epochs:g} epoch(s){cap}, before the SFT")
    result = {"stage": "sft", "status": "running", "config_digest": digest, "started": runner._now()}
    main = distributed.is_main_process()
    if main:
        write_json_atomic(wdir / runner.RESULT_FILE, result)
    from sectune.stages.sft import run  # the stage itself, on the generated windows

    out = run(RunContext(cfg=wcfg, run_dir=wdir))
    out["metrics"]["windows"] = len(data.sft_splits(wcfg)["train"])
    result.update(status="succeeded", metrics=out["metrics"], artifacts=out["artifacts"], finished=runner._now())
    if main:
        write_json_atomic(wdir / runner.RESULT_FILE, result)
    return result
