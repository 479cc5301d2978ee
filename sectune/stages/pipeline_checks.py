"""What a pipeline checks about its steps before the first one runs, and says while composing them (sectune.stages.pipeline
runs them): an HDFS detection step's data, the models the steps hand policies between, a step's own values that replace
the command line's."""

from __future__ import annotations

import contextlib
import io
import sys

from sectune.errors import ConfigError, SectuneError


def _say_replaced(name: str, base: list[str], groups: list[str], values: dict) -> None:
    """A step's own value (pipeline.overrides.<step>, a preset's) beats the command line's for that step: said, since
    `+experiment=auth_grpo_tiny train.max_steps=1` still ran the reward/rl/dpo steps for 20/24/15 steps (session 36)."""
    flat: dict = {}

    def walk(prefix: str, v) -> None:
        if isinstance(v, dict):
            for k, x in v.items():
                walk(f"{prefix}.{k}" if prefix else str(k), x)
        else:
            flat[prefix] = v

    walk("", values)
    flat.update(g.split("=", 1) for g in groups)
    given = dict(o.lstrip("+~").split("=", 1) for o in base if "=" in o)
    replaced = [k for k in flat if k in given and str(flat[k]) != given[k]]
    if replaced:
        print(f"sectune: note: pipeline step {name}: " + ", ".join(f"{k}={flat[k]} (pipeline.overrides.{name}) replaces the "
              f"command line's {k}={given[k]}" for k in replaced) + f"; pipeline.overrides.{name}.<key>=... sets a step's own value")


def check_detection_data(steps: list) -> None:
    """An HDFS step that detects (evaluate, federated) needs anomalous sessions in its validation and test splits:
    read them before the first step trains (an empty hdfs_test_abnormal was found after the SFT step had trained)."""
    for step in steps:
        if step.cfg.dataset.name == "hdfs" and str(step.cfg.stage.name) in ("evaluate", "federated"):
            import sectune.data as D
            from sectune.data import hdfs, hdfs_splits

            # its notes are the step's to print and record: each is said once per process, so what this read says is
            # forgotten again (an audit, session 36: the steps never said "using generated HDFS sessions", and the note
            # that test sessions repeat training ones was in no result.json's warnings)
            generated, said = list(D._GENERATED), set(hdfs_splits._SAID)
            try:
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    hdfs.load_hdfs(step.cfg)
            except SectuneError as e:
                raise ConfigError(f"pipeline step {step.name}, before any step runs: {e}") from None
            finally:
                D._GENERATED[:] = generated
                hdfs_splits._SAID.clear()
                hdfs_splits._SAID.update(said)


def check_handoff_models(steps: list) -> None:
    """A step that starts from an earlier step's policy loads it onto its own model= (a per-step
    ``pipeline.overrides.sft.model=…`` was found when the dpo step could not load the adapter, after SFT had trained);
    another quantization is said (the infer step loads the one the policy trained under)."""
    from sectune.stages.pipeline import TAKES

    by_name = {s.name: s for s in steps}
    for step in steps:
        for giver, (key, _) in TAKES.get(step.name, {}).items():
            if giver not in by_name or key == "rl.reward_model":  # a reward model scores text: its own model is fine
                continue
            a, b = by_name[giver].cfg, step.cfg
            if (a.model.name, a.model.name_or_path) != (b.model.name, b.model.name_or_path):
                raise ConfigError(f"pipeline step {step.name}, before any step runs: it starts from the {giver} step's policy "
                                  f"({key}), which trains model={a.model.name} ({a.model.name_or_path or 'its preset path'}) while "
                                  f"this step loads model={b.model.name} ({b.model.name_or_path or 'its preset path'}): give "
                                  "model= to the whole pipeline, or the same pipeline.overrides.<step>.model to both")
            if step.name != "infer" and a.quantization.name != b.quantization.name:
                print(f"sectune: warning: pipeline step {step.name} loads the {giver} step's policy with quantization="
                      f"{b.quantization.name}; it trained under quantization={a.quantization.name}", file=sys.stderr)
