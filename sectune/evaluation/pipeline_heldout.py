"""The analyst pipeline's held-out half (``stage=pipeline``): the test windows no training step may see,
written for the infer step, and the results table over every trained policy at the end (the scoring
itself is :mod:`sectune.evaluation.analyst_eval`). Steps are read through their duck-typed ``name``/``dir``/``cfg``."""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf, open_dict

from sectune import runner
from sectune.errors import ConfigError
from sectune.runner import config_digest
from sectune.sweeps import read_json_object

if TYPE_CHECKING:
    from sectune.stages.pipeline import Step

#: steps that train on auth windows: none of them may see a held-out test window
TRAINING_STEPS = ("sft", "reward", "dpo", "rl")
RL_NAMES = {"grpo": "GRPO", "simplified_ppo": "simplified PPO"}
#: where the pipeline writes the held-out windows for its infer step (relative to the run dir)
WINDOWS_DIR = Path("heldout") / "windows"


# ----------------------------------------------------------------------------- held-out windows
def check_held_out(steps: list[Step], eval_cfg: DictConfig, max_windows: int | None) -> tuple[list, list[dict]]:
    """The table's test windows and the generated stand-ins they were cut from (none for real logs); an error when a
    training step's data would include one of them."""
    from sectune import data
    from sectune.evaluation import analyst_eval

    splits_cache: dict[tuple, dict] = {}

    def splits(c: DictConfig) -> dict:
        d = c.dataset
        key = (d.path, d.source_dir, d.max_samples, d.val_fraction, d.test_fraction, d.split_seed, d.min_lines, d.max_lines, d.split_by)
        if key not in splits_cache:
            as_windows = copy.deepcopy(c)
            with open_dict(as_windows):
                as_windows.dataset.name = "auth_logs"
            splits_cache[key] = data.sft_splits(as_windows)
        return splits_cache[key]

    mark = data.generated_mark()
    windows = analyst_eval.load_windows(eval_cfg)["test"]
    generated = data.generated_since(mark)
    if not windows:
        raise ConfigError("pipeline: no held-out test windows (dataset.test_fraction=0); the table and the infer step need them")
    test = {w.id for w in windows}
    for s in steps:
        d = s.cfg.dataset
        if s.name not in TRAINING_STEPS or d.name not in ("auth_logs", "auth_preferences") or str(d.path or "").endswith(".jsonl"):
            continue
        sp = splits(s.cfg)
        seen = {r["id"] for r in sp["train"] + sp["validation"]} & test
        if seen:
            keys = ("max_samples", "val_fraction", "test_fraction", "split_seed", "split_by", "min_lines", "max_lines", "path")
            diff = [f"dataset.{k}={d[k]} (table: {eval_cfg.dataset[k]})" for k in keys if d[k] != eval_cfg.dataset[k]]
            raise ConfigError(f"pipeline step {s.name} would train on {len(seen)} of the {len(test)} held-out test windows"
                              + (f": its {', '.join(diff)}" if diff else "")
                              + "; give every step the same dataset split settings")
    return analyst_eval.pick_windows(windows, max_windows), generated


def reads_windows(step: Step, run_dir: Path) -> bool:
    """Whether this is the infer step reading the held-out windows the pipeline writes."""
    return step.name == "infer" and str(step.cfg.infer.input_file) == str(run_dir / WINDOWS_DIR)


def write_windows(folder: Path, windows: list, generated: list[dict] = ()) -> None:
    """The held-out windows as log files (``<window id>.log``) for the infer step, and the generated stand-ins they were
    cut from (:data:`sectune.data.GENERATED_NOTE`, which the infer step records); written aside, then renamed."""
    from sectune.data import write_generated_note

    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_generated_note(tmp, list(generated))
    for w in windows:
        (tmp / f"{w.id}.log").write_text(w.log_text if w.log_text.endswith("\n") else w.log_text + "\n", encoding="utf-8")
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)


# ----------------------------------------------------------------------------- the table
def policy_rows(steps: list[Step], eval_cfg: DictConfig) -> list[tuple[str, str, DictConfig, str, Path | None]]:
    """(row name, step, step cfg, kind, path) for the base model and each trained policy, in step order."""
    rows = [(f"base (untrained {eval_cfg.model.name})", "base", eval_cfg, "base", None)]
    names = [s.name for s in steps]
    for s in steps:
        if s.name not in ("sft", "rl", "dpo"):
            continue
        arts = (runner.previous_result(s.dir) or {}).get("artifacts") or {}
        kind = "adapter" if arts.get("adapter") else "model" if arts.get("model") else None
        if kind is None:
            continue
        # a step that did not start from the SFT weights (rl.init_from=null with rl.allow_fresh_adapter: a fresh adapter on
        # the base model) is no continuation of SFT: it was labelled SFT+GRPO and compared with SFT (an audit, session 42)
        fresh = ((runner.previous_result(s.dir) or {}).get("metrics") or {}).get("fresh_adapter")
        prefix = "SFT+" if s.name != "sft" and "sft" in names[: names.index(s.name)] and not fresh else ""
        label = {"sft": "SFT", "dpo": "DPO", "rl": RL_NAMES.get(str(s.cfg.loss.name), f"RL ({s.cfg.loss.name})")}[s.name]
        rows.append((prefix + label, s.name, s.cfg, kind, s.dir / arts[kind]))
    return rows


def table_batch_size(cfg: DictConfig, eval_cfg: DictConfig) -> int:
    b = cfg.pipeline.heldout_batch_size
    return int(b if b is not None else eval_cfg.infer.batch_size)


def infer_answers(steps: list[Step], run_dir: Path, windows: list, batch_size: int) -> dict[str, tuple[list[str], float | None]]:
    """The infer step's answers, when they are the table's greedy pass for its policy: same windows,
    unconstrained, no schema in the prompt, greedy, same batch size (so its analyses/s compares)."""
    step = next((s for s in steps if s.name == "infer"), None)
    if step is None or not reads_windows(step, run_dir):
        return {}
    ic, gen = step.cfg.infer, step.cfg.generation
    if ic.constrained or ic.full_schema or gen.do_sample or int(ic.batch_size) != batch_size or ic.vote_with:
        return {}  # (a vote's answers are no one policy's)
    if any(s.cfg.quantization.get("load_in_4bit") for s in steps if s.name in ("sft", "rl", "dpo")):
        # infer answers a 4-bit policy through bitsandbytes' inference layout on an AVX512-BF16 CPU, the table (and the
        # validation pass that chose the best policy) through the training layout: one row would be the other's numbers
        return {}  # (an audit, session 42: 6 of 8 answers agreed)
    res = runner.previous_result(step.dir) or {}
    # infer decodes as the policy's run did: a policy trained with generation.do_sample=true was sampled there, and the
    # table put those answers in its greedy row (an audit, session 42); a run from before the key: not known, not reused
    if (res.get("metrics") or {}).get("sampled", 1):
        return {}
    out_rel = (res.get("artifacts") or {}).get("output")
    try:
        records = json.loads((step.dir / out_rel).read_text(encoding="utf-8")) if out_rel else None
    except (OSError, ValueError):
        return {}
    if not records:
        return {}
    by_input = {r.get("input"): r for r in records}
    used = {r.get("model_used") for r in records}
    # one analysis per window file (a window cut further by infer.window_lines is not the table's pass)
    if len(used) != 1 or len(by_input) != len(records) or not all(f"{w.id}.log" in by_input for w in windows):
        return {}
    texts = [by_input[f"{w.id}.log"].get("generated") or "" for w in windows]
    return {used.pop(): (texts, (res.get("metrics") or {}).get("generation_s"))}


def heldout_table(cfg: DictConfig, eval_cfg: DictConfig, steps: list[Step], run_dir: Path, reuse_ok: bool) -> dict:
    """The table, or the one already in ``heldout.json`` when nothing it depends on changed."""
    from sectune.evaluation import analyst_eval

    policies = policy_rows(steps, eval_cfg)
    key_src = {
        "eval": config_digest(eval_cfg, run_dir),
        "policies": [(n, st, str(p), (runner.previous_result(p.parent) or {}).get("finished") if p else None) for n, st, _, _, p in policies],
        "max_windows": cfg.pipeline.heldout_max_windows,
        "batch_size": table_batch_size(cfg, eval_cfg),
        "constrained": cfg.pipeline.heldout_constrained,
        "protocol": analyst_eval.TABLE_PROTOCOL,  # a table built under an older protocol is built again
    }
    key = config_digest(OmegaConf.create(json.loads(json.dumps(key_src, default=str))), run_dir)  # a moved pipeline: the same key
    cached = read_json_object(run_dir / "heldout.json")
    if reuse_ok and cached and cached.get("key") == key:
        # the report is rendered from the reused table (a report.md edited or left by another table is not what it says);
        # a table from before "split" was recorded: the split of this eval config, whose digest its key holds
        cached.setdefault("split", analyst_eval.split_info(eval_cfg))
        markdown = analyst_eval.render_markdown(cached)
        report = run_dir / "report.md"
        if not report.is_file() or report.read_text(encoding="utf-8") != markdown:
            runner.write_text_atomic(report, markdown)
        print(f"sectune: held-out table: nothing it depends on changed; reused {run_dir / 'heldout.json'}")
        print(markdown)
        return cached
    windows = analyst_eval.pick_windows(analyst_eval.load_windows(eval_cfg)["test"], cfg.pipeline.heldout_max_windows)
    table = analyst_eval.build_table(
        eval_cfg, policies, run_dir,
        max_windows=cfg.pipeline.heldout_max_windows,
        batch_size=table_batch_size(cfg, eval_cfg),
        constrained=bool(cfg.pipeline.heldout_constrained),
        reuse=infer_answers(steps, run_dir, windows, table_batch_size(cfg, eval_cfg)),
        extra={"key": key},
    )
    print()
    print(table["markdown"])
    return table
