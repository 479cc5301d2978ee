"""A damaged classify run dir (evaluate.model_dir=, Predictor.from_run) is a one-line error naming the file.

One tiny classify run (2 steps, 48 texts) is made once; each test corrupts a copy of it.
"""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import cli
from sectune.errors import ConfigError
from sectune.paths import PROJECT_ROOT
from sectune.predict import Predictor, read_classify_run

FAST = ["logger=none", "train.precision=fp32", "evaluate.rf_estimators=10"]


def sectune(*args):
    return cli(list(args), cwd=PROJECT_ROOT, timeout=600, env={"WANDB_MODE": "disabled"})


@pytest.fixture(scope="module")
def classify_run(tmp_path_factory):
    import numpy as np

    root = tmp_path_factory.mktemp("predict_bad_input")
    rng = np.random.default_rng(0)
    words, bad = ["flow", "login", "port", "user", "session", "packet"], ["ignore", "override", "bypass"]
    rows = []
    for i in range(48):
        attack = i % 3 == 0
        w = list(rng.choice(words, 5)) + ([str(rng.choice(bad))] if attack else [])
        rows.append(f"{' '.join(w)},{'attack' if attack else 'benign'}\n")
    csv = root / "t.csv"
    csv.write_text("text,label\n" + "".join(rows))
    run_dir = root / "run"
    p = sectune("stage=classify", "dataset=text_label_csv", f"dataset.path={csv}", "train.max_steps=2",
                "train.batch_size=8", "train.eval_steps=2", "model.max_seq_length=32", *FAST, f"hydra.run.dir={run_dir}")
    assert p.returncode == 0, p.stderr[-3000:]
    for name in ("result.json", "classifier.json", "labels.json", "adapter/adapter_model.safetensors"):
        assert (run_dir / name).is_file(), name
    return run_dir


@pytest.fixture
def run_copy(classify_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(classify_run, dst, ignore=shutil.ignore_patterns("checkpoints", "evaluation", "plots"))
    return dst


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_the_undamaged_copy_loads(run_copy, capfd):
    assert json.loads((run_copy / "classifier.json").read_text())["head"] == "seq_cls"
    assert Predictor.from_run(run_copy).labels == ["attack", "benign"]
    # the base's new score head is the adapter's a moment later: no "newly initialized" report for a trained classifier
    err = capfd.readouterr().err
    assert "LOAD REPORT" not in err and "newly initialized" not in err


def test_the_new_head_filter_keeps_every_other_load_report():
    import logging

    from sectune.console import NewHeadReport

    def report(*rows):
        msg = "LlamaForSequenceClassification LOAD REPORT from: x\nKey | Status\n" + "\n".join(rows)
        msg += "\n\nNotes:\n- UNEXPECTED:\tcan be ignored\n- MISSING:\tthose params were newly initialized"
        return logging.LogRecord("transformers.modeling_utils", logging.WARNING, __file__, 1, msg, None, None)

    keep = NewHeadReport().filter
    assert not keep(report("lm_head.weight | UNEXPECTED", "score.weight   | MISSING"))
    assert keep(report("lm_head.weight | UNEXPECTED", "score.weight   | MISSING", "model.layers.0.mlp.up_proj.weight | MISSING"))
    assert keep(report("score.weight | MISMATCH | Reinit due to size mismatch"))
    assert keep(logging.LogRecord("transformers.modeling_utils", logging.WARNING, __file__, 1, "something else", None, None))


# ---------------------------------------------------------------- F10: classifier.json / labels.json


@pytest.mark.parametrize("name", ["classifier.json", "labels.json"])
def test_truncated_run_json_names_the_file(run_copy, name):
    _truncate(run_copy / name)
    with pytest.raises(ConfigError) as e:
        Predictor.from_run(run_copy)
    msg = str(e.value)
    assert str(run_copy / name) in msg and "not valid JSON" in msg and "damaged" in msg, msg


@pytest.mark.parametrize("name, content, says", [
    ("classifier.json", "[]", "a JSON object"),
    ("classifier.json", '"x"', "a JSON object"),
    ("classifier.json", "{}", "'artifact'"),
    ("labels.json", "[]", "a JSON object"),
    ("labels.json", "{}", "'labels'"),
    ("labels.json", '{"labels": "attack"}', "'labels'"),
    ("labels.json", '{"labels": []}', "'labels'"),
])
def test_run_json_of_the_wrong_shape_names_the_file_and_key(run_copy, name, content, says):
    (run_copy / name).write_text(content)
    with pytest.raises(ConfigError) as e:
        Predictor.from_run(run_copy)
    msg = str(e.value)
    assert str(run_copy / name) in msg and says in msg, msg


def test_a_missing_classifier_json_names_the_file(run_copy):
    (run_copy / "classifier.json").unlink()
    with pytest.raises(ConfigError, match="classifier.json") as e:
        Predictor.from_run(run_copy)
    assert str(run_copy / "classifier.json") in str(e.value)


# ---------------------------------------------------------------- F11: result.json not an object


@pytest.mark.parametrize("content", ["[]", "null", "3"])
def test_result_json_that_is_not_an_object_names_the_file(run_copy, content):
    (run_copy / "result.json").write_text(content)
    with pytest.raises(ConfigError) as e:
        read_classify_run(run_copy)
    msg = str(e.value)
    assert str(run_copy / "result.json") in msg and "a JSON object" in msg, msg


# ---------------------------------------------------------------- F12: damaged adapter weights


@pytest.mark.parametrize("keep", [0.5, 0.001])  # cut inside the tensors / inside the header
def test_truncated_adapter_weights_name_the_file(run_copy, keep):
    weights = run_copy / "adapter" / "adapter_model.safetensors"
    _truncate(weights, keep)
    with pytest.raises(ConfigError) as e:
        Predictor.from_run(run_copy)
    msg = str(e.value)
    assert str(weights) in msg and "damaged" in msg, msg


def test_unloadable_adapter_names_the_folder(run_copy):
    """Damage the cheap header check cannot see (the adapter's config) is still named, not a traceback."""
    (run_copy / "adapter" / "adapter_config.json").write_text("{")
    with pytest.raises(ConfigError) as e:
        Predictor.from_run(run_copy)
    assert str(run_copy / "adapter") in str(e.value), str(e.value)


# ---------------------------------------------------------------- the CLI: one line, exit 2


@pytest.mark.parametrize("damage, named", [
    (lambda d: _truncate(d / "classifier.json"), "classifier.json"),
    (lambda d: (d / "result.json").write_text("[]"), "result.json"),
    (lambda d: _truncate(d / "adapter" / "adapter_model.safetensors"), "adapter/adapter_model.safetensors"),
], ids=["classifier_json", "result_json", "adapter_weights"])
def test_evaluate_on_a_damaged_run_exits_2_naming_the_file(run_copy, tmp_path, damage, named):
    damage(run_copy)
    p = sectune("stage=evaluate", f"evaluate.model_dir={run_copy}", *FAST, f"hydra.run.dir={tmp_path / 'ev'}")
    assert p.returncode == 2, p.stderr[-3000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    errors = [line for line in p.stderr.splitlines() if line.startswith("sectune: error:")]
    assert len(errors) == 1 and str(run_copy.resolve() / named) in errors[0], p.stderr[-3000:]
    res = json.loads((tmp_path / "ev" / "result.json").read_text())
    assert res["status"] == "failed" and named in res["error"]


def test_an_interrupted_predict_csv_keeps_its_scored_chunks_and_the_same_call_goes_on_from_them(run_copy, tmp_path, monkeypatch, capsys):
    """Scoring a large flow file takes hours on a CPU; Ctrl-C kept nothing. Now the chunks scored so far are saved beside
    the output (numpy arrays, no pickle) and the same call scores only the rest, giving the uninterrupted file."""
    from sectune import predict

    monkeypatch.setattr(predict, "CHUNK", 4)
    pr = Predictor.from_run(run_copy)
    src, out = tmp_path / "in.csv", tmp_path / "out.csv"
    src.write_text("text\n" + "".join(f"user login {i} {'bypass' if i % 3 else 'port'}\n" for i in range(10)))
    whole = pr.predict_csv(src, tmp_path / "whole.csv")
    real, calls = Predictor.score, []

    def scoring(stop_at=None):
        def score(self, prompts):
            calls.append(len(prompts))
            if len(calls) == stop_at:
                raise KeyboardInterrupt
            return real(self, prompts)
        calls.clear()
        monkeypatch.setattr(Predictor, "score", score)

    scoring(stop_at=2)
    with pytest.raises(KeyboardInterrupt):
        pr.predict_csv(src, out)
    partial = tmp_path / ".out.csv.partial.npz"
    assert partial.is_file() and not out.exists() and "the 4 of 10 rows scored so far" in capsys.readouterr().err
    scoring()
    again = pr.predict_csv(src, out)
    assert calls == [4, 2] and "resuming: 4 of 10 rows" in capsys.readouterr().err  # rows 0-3 not scored again
    assert again.equals(whole) and not partial.exists()
    # another input does not take the saved rows: scored from the start
    scoring(stop_at=2)
    with pytest.raises(KeyboardInterrupt):
        pr.predict_csv(src, out)
    src.write_text("text\n" + "".join(f"other {i}\n" for i in range(10)))
    scoring()
    pr.predict_csv(src, out)
    assert calls == [4, 4, 2] and "not reused" in capsys.readouterr().err and not partial.exists()
