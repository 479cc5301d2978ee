"""Each bad input: one clear line naming the file/key, a non-zero exit, nothing complete left."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import FAST, sectune
from sectune.data import auth_logs

ARGS = [*FAST, "train.max_steps=2"]


@pytest.fixture(scope="module")
def good_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("auth") / "auth"
    auth_logs.build_auth_folder(out, tmp_path_factory.mktemp("nosrc"), seed=3)  # generated logs: fast, no real data
    return out


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _assert_failed_cleanly(run, *needles):
    assert run.returncode == 2, (run.returncode, run.stderr[-2000:])
    last = [ln for ln in run.stderr.strip().splitlines() if ln.startswith("sectune: error:")]
    assert len(last) == 1, run.stderr[-2000:]
    for needle in needles:
        assert needle in last[0], last[0]
    res = run.result
    assert res["status"] == "failed" and res["error"]
    assert not (run.run_dir / "adapter").exists() and not (run.run_dir / "model").exists()


def test_txt_without_json(good_folder, tmp_path):
    folder = _copy(good_folder, tmp_path / "d")
    victim = sorted((folder / "Auth_bin").glob("*.json"))[0]
    victim.unlink()
    run = sectune([*ARGS, f"dataset.path={folder}"], tmp_path / "run")
    _assert_failed_cleanly(run, victim.name)


def test_json_that_does_not_parse(good_folder, tmp_path):
    folder = _copy(good_folder, tmp_path / "d")
    victim = sorted((folder / "Auth_bin").glob("*.json"))[1]
    victim.write_text('{"verdict": "benign",\n  "failed_logins": oops}\n')
    run = sectune([*ARGS, f"dataset.path={folder}"], tmp_path / "run")
    _assert_failed_cleanly(run, victim.name, "line 2")


def test_json_failing_the_schema(good_folder, tmp_path):
    folder = _copy(good_folder, tmp_path / "d")
    victim = sorted((folder / "Auth_bin").glob("*.json"))[2]
    obj = json.loads(victim.read_text())
    obj["verdict"] = "catastrophic"
    victim.write_text(json.dumps(obj))
    run = sectune([*ARGS, f"dataset.path={folder}"], tmp_path / "run")
    _assert_failed_cleanly(run, victim.name, "verdict")


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    run = sectune([*ARGS, f"dataset.path={tmp_path / 'empty'}"], tmp_path / "run")
    _assert_failed_cleanly(run, str(tmp_path / "empty"))


def test_missing_lora_target_lists_the_modules_the_model_has(good_folder, tmp_path):
    run = sectune([*ARGS, f"dataset.path={good_folder}", "lora.target_modules=[c_attn]"], tmp_path / "run")
    _assert_failed_cleanly(run, "c_attn", "q_proj", "gate_proj")


def test_real_preset_without_weights_says_how_to_provide_them(good_folder, tmp_path):
    run = sectune([*ARGS, f"dataset.path={good_folder}", "model=smollm_135m"], tmp_path / "run", env={"HF_HUB_OFFLINE": "1"})
    _assert_failed_cleanly(run, "HuggingFaceTB/SmolLM-135M", "model.name_or_path=")


def test_existing_result_is_not_corrupted_by_a_failing_rerun(good_folder, tmp_path):
    run_dir = tmp_path / "run"
    ok = sectune([*ARGS, f"dataset.path={good_folder}"], run_dir)
    assert ok.returncode == 0, ok.stderr[-2000:]
    adapter = (run_dir / "adapter" / "adapter_model.safetensors").read_bytes()
    earlier = ok.result
    bad = sectune([*ARGS, f"dataset.path={tmp_path / 'nope'}"], run_dir)
    assert bad.returncode == 2
    # the earlier adapter is untouched, so result.json is the earlier run's again; the attempt's is result.failed.json
    assert (run_dir / "adapter" / "adapter_model.safetensors").read_bytes() == adapter
    assert bad.result == earlier and earlier["status"] == "succeeded"
    assert json.loads((run_dir / "result.failed.json").read_text())["status"] == "failed"


def test_max_seq_length_shorter_than_every_prompt_says_which_setting(good_folder, tmp_path):
    run = sectune([*ARGS, f"dataset.path={good_folder}", "dataset.max_samples=12", "model.max_seq_length=4"], tmp_path / "run")
    _assert_failed_cleanly(run, "model.max_seq_length=4", "dropped", "raise model.max_seq_length")
    assert "num_samples" not in run.stderr and "Traceback" not in run.stderr
