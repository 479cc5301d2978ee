"""What a run prints beside sectune's own lines: libraries' notes a sectune user cannot act on stay off the console
(each dropped by its message, in one place), and where a W&B run went is said (an audit, session 44)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

from conftest import PROJECT_ROOT, compose


class _Run:
    """The parts of a wandb Run that tracking.finish touches."""

    def __init__(self, sync_dir: Path, mode: str, url: str | None = None):
        self.settings = SimpleNamespace(sync_dir=str(sync_dir), mode=mode)
        self.url, self.summary, self.config, self.finished = url, {}, SimpleNamespace(update=lambda *a, **k: None), None

    def finish(self, exit_code=0):
        self.finished = exit_code


def test_an_offline_wandb_run_says_where_it_went_and_how_to_upload_it(tmp_path, capsys):
    from sectune import tracking

    sync = tmp_path / "run" / "wandb" / "offline-run-20261207_120000-abc"
    tracking.finish(_Run(sync, "offline"), {"stage": "sft", "status": "succeeded", "metrics": {}})
    out = capsys.readouterr().out.strip().splitlines()
    # WANDB_SILENT keeps wandb's own "You can sync this run ..." off the console: this was a default run's only word of W&B
    assert out[-1] == f"sectune: W&B run logged offline in {sync}; upload it with: wandb sync {sync}", out


def test_a_pipeline_names_its_steps_wandb_runs_once(tmp_path, capsys):
    from sectune import tracking

    step = tmp_path / "pipe" / "sft"
    step.mkdir(parents=True)
    (step / "step.json").write_text("{}")
    tracking.finish(_Run(step / "wandb" / "offline-run-1", "offline"), {"stage": "sft", "status": "succeeded", "metrics": {}})
    assert "W&B" not in capsys.readouterr().out  # a step says nothing: the pipeline's line, last, covers it
    tracking.finish(_Run(tmp_path / "pipe" / "wandb" / "offline-run-2", "offline"), {"stage": "pipeline", "status": "failed", "metrics": {}})
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.endswith(f"wandb sync {tmp_path / 'pipe' / 'wandb' / 'offline-run-*'} {tmp_path / 'pipe' / '*' / 'wandb' / 'offline-run-*'}"), line
    tracking.finish(_Run(tmp_path / "x" / "wandb" / "run-3", "online", url="https://wandb.ai/me/sectune/runs/3"),
                    {"stage": "sft", "status": "succeeded", "metrics": {}})
    assert capsys.readouterr().out.strip() == "sectune: W&B run at https://wandb.ai/me/sectune/runs/3"


def test_library_notes_a_user_cannot_act_on_stay_off_the_console():
    """transformers prints "[INFO] Running in WANDB offline mode" at import under WANDB_MODE=offline (logger=none runs
    included, where no W&B run exists), and TRL's generation helpers call the checkpointing aliases transformers 5
    deprecates (two FutureWarnings in every DPO run). Other FutureWarnings still show: nothing is ignored wholesale."""
    script = textwrap.dedent("""
        import os, warnings
        import sectune
        from transformers.integrations import WandbCallback  # what Trainer imports (the module is lazy)
        from transformers import LlamaConfig, LlamaForCausalLM
        m = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
        m.gradient_checkpointing_enable()
        m.gradient_checkpointing_disable()
        warnings.warn("`some_other_call` is deprecated", FutureWarning)
        print("WANDB_MODE", os.environ.get("WANDB_MODE"))
    """)
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(PROJECT_ROOT)}
    env.pop("PYTHONWARNINGS", None)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=PROJECT_ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Running in WANDB offline mode" not in proc.stdout + proc.stderr
    assert "gradient_checkpointing_enable" not in proc.stderr and "gradient_checkpointing_disable" not in proc.stderr, proc.stderr
    assert "`some_other_call` is deprecated" in proc.stderr, proc.stderr
    assert "WANDB_MODE offline" in proc.stdout  # hidden from that one import only: Trainer's callback reads it later


def test_a_new_score_head_is_not_reported_as_untrained_but_a_classifier_missing_one_is(tmp_path):
    import logging

    from safetensors.torch import load_file, save_file

    from sectune.models import modeling

    # the records that logger passes on (its filters first), not stderr: transformers' handler writes to the stream that
    # was stderr when an earlier test of the same worker first logged (a capture since closed)
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger("transformers.modeling_utils")
    logger.addHandler(handler)
    try:
        cfg = compose(["logger=none", "stage=reward"])
        model = modeling.load_model(cfg, task="seq_cls", num_labels=1)  # stage=reward's and stage=classify's load
        assert not any("LOAD REPORT" in m or "newly initialized" in m for m in seen), seen
        # a saved sequence classifier without its head is news: still reported
        model.save_pretrained(tmp_path)
        weights = next(tmp_path.glob("*.safetensors"))
        save_file({k: v for k, v in load_file(weights).items() if not k.startswith("score.")}, weights, metadata={"format": "pt"})
        modeling.load_model(cfg, task="seq_cls", num_labels=1, path=str(tmp_path))
        assert any("LOAD REPORT" in m and "score.weight" in m for m in seen), seen
    finally:
        logger.removeHandler(handler)


def test_evaluate_on_a_run_that_failed_says_why_it_failed(tmp_path):
    """stage=evaluate on a failed classify run said "status='failed'" and nothing of why: the run's own error is named."""
    import json

    import pytest

    from sectune.errors import ConfigError
    from sectune.predict import read_classify_run

    (tmp_path / "result.json").write_text(json.dumps({"stage": "classify", "status": "failed", "error":
                                                      "/data/flows.csv: cannot split stratified (2 rows of 'Recon')\nmore"}))
    with pytest.raises(ConfigError) as e:
        read_classify_run(tmp_path)
    assert str(e.value) == (f"{tmp_path}: not a succeeded classify run (stage='classify', status='failed': "
                            "/data/flows.csv: cannot split stratified (2 rows of 'Recon'))")
