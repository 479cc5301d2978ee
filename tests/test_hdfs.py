"""dataset=hdfs and next-log-key anomaly detection (issue 16, centralised half; seed 003)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import compose, requires_real_data, sectune
from sectune.data import hdfs, hdfs_splits
from sectune.data.synthetic_hdfs import write_deeplog_files
from sectune.errors import ConfigError, DataError
from sectune.evaluation import anomaly
from sectune.paths import shared_data_dir

DEEPLOG = shared_data_dir() / hdfs.DEEPLOG_DIR
LOGHUB = shared_data_dir() / hdfs.LOGHUB_DIR


def hdfs_cfg(tmp_path: Path, *extra: str):
    return compose(["dataset=hdfs", "logger=none", f"dataset.path={tmp_path}", f"paths.cache_dir={tmp_path / 'cache'}", *extra])


def write_sessions(folder: Path, normal: list[str], anomalous: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / hdfs.NORMAL_FILE).write_text("".join(line + "\n" for line in normal))
    (folder / hdfs.ANOMALOUS_FILE).write_text("".join(line + "\n" for line in anomalous))
    return folder


# ----------------------------------------------------------------------------- data: parsing and splits
def test_split_is_seeded_recorded_and_training_sees_normal_sessions_only(tmp_path):
    write_deeplog_files(tmp_path, n_normal=400, n_anomalous=200, seed=3)
    a = hdfs.load_hdfs(hdfs_cfg(tmp_path))
    b = hdfs.load_hdfs(hdfs_cfg(tmp_path))
    c = hdfs.load_hdfs(hdfs_cfg(tmp_path, "dataset.split_seed=1"))
    ids = {s: [x.id for x in recs] for s, recs in a.splits.items()}
    assert ids == {s: [x.id for x in recs] for s, recs in b.splits.items()}  # same seed, same split
    assert ids["test"] != [x.id for x in c.splits["test"]]  # another seed, another split
    assert a.info["split_seed"] == 0 and c.info["split_seed"] == 1 and a.info["train_ids_sha256"] != c.info["train_ids_sha256"]
    assert all(s.label == hdfs.NORMAL for s in a.splits["train"])
    # test-normal (0.3 of 400) and validation (0.1) held out; the anomalous ones split 1:3 between validation and test
    assert (a.info["train_normal"], a.info["validation_normal"], a.info["test_normal"]) == (240, 40, 120)
    assert (a.info["validation_anomalous"], a.info["test_anomalous"]) == (50, 150)
    assert len({x for recs in ids.values() for x in recs}) == 600  # no session in two splits

    recs = hdfs.sft_splits(hdfs_cfg(tmp_path))
    assert len(recs["train"]) == 240 and len(recs["validation"]) == 40  # normal only, anomalous never trained on
    first = a.splits["train"][0]
    assert recs["train"][0] == {"prompt": "session:", "completion": hdfs.render_keys(first.keys), "label": "normal", "id": first.id}
    assert recs["train"][0]["completion"] == "".join(f" {k}" for k in first.keys)


def test_fresh_clone_generates_sessions_in_the_deeplog_format(tmp_path, capsys):
    cfg = compose(["dataset=hdfs", "logger=none", f"dataset.source_dir={tmp_path / 'absent'}", f"paths.cache_dir={tmp_path / 'cache'}"])
    data = hdfs.load_hdfs(cfg)
    assert data.info["generated"] and "using generated HDFS sessions in DeepLog's format" in capsys.readouterr().out
    folder = Path(data.source)
    assert (folder / hdfs.NORMAL_FILE).is_file() and (folder / hdfs.ANOMALOUS_FILE).is_file()
    normal, skipped = hdfs.read_key_sessions(folder / hdfs.NORMAL_FILE, hdfs.NORMAL, 28)  # the real files' reader, no error
    assert skipped == 0 and len(normal) == 3000
    assert min(len(s.keys) for s in data.splits["train"]) >= 10 and data.info["validation_anomalous"] > 0


@pytest.mark.parametrize("line, problem", [("5 x 22", "'x' is not a log key"), ("5 29 22", "unknown log key 29"),
                                           ("   ", "empty session line"), ("5 \u00b2 3", "'\u00b2' is not a log key")])
def test_a_bad_session_line_is_an_error_naming_file_and_line(tmp_path, line, problem):
    write_sessions(tmp_path, ["5 5 22 11 9", "22 5 5 5", line, "5 5 22"], ["5 22"])
    with pytest.raises(DataError) as e:
        hdfs.load_hdfs(hdfs_cfg(tmp_path))
    assert f"{tmp_path / hdfs.NORMAL_FILE}:3: {problem}" in str(e.value)
    # or a stated, counted skip
    normal, skipped = hdfs.read_key_sessions(tmp_path / hdfs.NORMAL_FILE, hdfs.NORMAL, 28, skip_bad=True)
    assert skipped == 1 and [s.id for s in normal] == ["hdfs_train:1", "hdfs_train:2", "hdfs_train:4"]
    # blank lines that end the file are its end, not empty sessions (a walkthrough's file ended with one)
    (tmp_path / hdfs.NORMAL_FILE).write_text("5 5 22 11 9\n22 5 5 5\n\n  \n")
    normal, skipped = hdfs.read_key_sessions(tmp_path / hdfs.NORMAL_FILE, hdfs.NORMAL, 28)
    assert skipped == 0 and [s.id for s in normal] == ["hdfs_train:1", "hdfs_train:2"]


def test_skipped_session_lines_reach_what_result_json_records(tmp_path):
    """An audit (session 37): dataset=hdfs dataset.skip_bad_lines=true printed its count but never noted it, so no
    stage's result.json had skipped_lines for HDFS (every other dataset's had)."""
    from sectune import data as D

    write_sessions(tmp_path, [f"5 5 22 11 {9 + i % 3}" for i in range(60)] + ["5 x 22"], [f"5 22 {i % 5 + 1}" for i in range(20)])
    mark = D.skipped_mark()
    hdfs.load_hdfs(hdfs_cfg(tmp_path, "dataset.skip_bad_lines=true"))
    assert D.skipped_since(mark) == 1


def test_an_empty_split_is_an_error(tmp_path):
    write_sessions(tmp_path, ["5 5 22", "22 5 5"], ["5 22"])
    with pytest.raises(DataError, match="split is empty"):
        hdfs.load_hdfs(hdfs_cfg(tmp_path))


def test_a_test_split_without_anomalies_is_an_error_not_a_run_scored_nan(tmp_path):
    """One anomalous session, all of it sent to validation: every test F1 was 0 and ROC-AUC nan, exit 0."""
    write_sessions(tmp_path, [f"5 5 22 {k}" for k in range(1, 29)] * 2, ["5 22"])
    with pytest.raises(DataError, match=r"no anomalous session in the test split \(1 anomalous sessions in all; val_fraction=0.3, "
                                        r"test_fraction=0.1\); the test F1 and ROC-AUC are undefined"):
        hdfs.load_hdfs(hdfs_cfg(tmp_path, "stage=evaluate", "dataset.val_fraction=0.3", "dataset.test_fraction=0.1"))
    # training needs normal sessions only: stage=sft takes the same data (and normal-only data) as it is
    data = hdfs.load_hdfs(hdfs_cfg(tmp_path, "stage=sft", "dataset.val_fraction=0.3", "dataset.test_fraction=0.1"))
    assert data.info["test_anomalous"] == 0 and data.info["train_anomalous"] == 0 and data.info["train_normal"] > 0
    write_sessions(tmp_path, [f"5 5 22 {k}" for k in range(1, 29)] * 2, [])
    assert hdfs.load_hdfs(hdfs_cfg(tmp_path, "stage=sft")).info["validation_anomalous"] == 0


def _loghub(folder: Path, labels: str, name: str = "x_block_labels.csv") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "x.log").write_text("081109 203615 148 INFO dfs.DataNode$PacketResponder: PacketResponder 1 for block blk_1 terminating\n"
                                  "081109 203616 149 INFO dfs.DataNode$PacketResponder: PacketResponder 1 for block blk_2 terminating\n")
    (folder / name).write_text(labels)
    return folder


def test_loghub_labels_one_block_twice_with_two_labels_names_both_lines(tmp_path):
    """The last row had won silently (every anomalous block appended again as Normal: 'no anomalous session')."""
    folder = _loghub(tmp_path, "BlockId,Label\nblk_1,Anomaly\nblk_2,Normal\nblk_1,Normal\nblk_2,Normal\n")
    with pytest.raises(DataError, match=r"x_block_labels.csv:4: block blk_1 is Normal here and Anomaly on line 2: one label per block"):
        hdfs.read_loghub(folder)


def test_a_folder_with_hdfs_v1s_anomaly_label_csv_is_a_loghub_folder_and_the_layout_setting_decides_between_two(tmp_path):
    folder = _loghub(tmp_path / "v1", "BlockId,Label\nblk_1,Anomaly\nblk_2,Normal\n", name="anomaly_label.csv")
    assert hdfs.source_folder(hdfs_cfg(folder))[:2] == (folder, "loghub")
    both = write_sessions(_loghub(tmp_path / "both", "BlockId,Label\nblk_1,Anomaly\nblk_2,Normal\n"), ["5 5 22"], ["5 22"])
    assert hdfs.source_folder(hdfs_cfg(both))[1] == "deeplog"  # the default layout
    assert hdfs.source_folder(hdfs_cfg(both, "dataset.hdfs_layout=loghub"))[1] == "loghub"  # was ignored: deeplog won


def test_loghub_malformed_line_named(tmp_path):
    (tmp_path / "x.log").write_text("081109 203615 148 INFO dfs.DataNode$PacketResponder: PacketResponder 1 for block blk_1 terminating\n"
                                    "garbage without a block\n")
    (tmp_path / "x_block_labels.csv").write_text("BlockId,Label\nblk_1,Normal\n")
    with pytest.raises(DataError, match=r"x\.log:2: not a loghub HDFS line"):
        hdfs.read_loghub(tmp_path)


def test_a_structured_csv_in_another_row_order_is_placed_by_its_line_ids_and_a_form_feed_ends_no_line(tmp_path):
    """An audit (session 36): the EventIds were paired with the log's lines by row position, so a structured CSV sorted by
    EventId gave every line another's key (exit 0); and str.splitlines cut a line at a form feed (an error then named
    the next line, and "2 rows for 3 log lines")."""
    folder = _loghub(tmp_path / "l", "BlockId,Label\nblk_1,Anomaly\nblk_2,Normal\n")
    log = (folder / "x.log").read_text().replace("PacketResponder 1 for block blk_2", "PacketResponder\x0c1 for block blk_2")
    (folder / "x.log").write_text(log)
    (folder / "x.log_structured.csv").write_text("LineId,EventId\n2,E7\n1,E3\n")  # sorted by EventId, not by line
    normal, anomalous, _, _ = hdfs.read_loghub(folder, parser="structured")
    assert {s.id: s.keys for s in normal + anomalous} == {"blk_1": (3,), "blk_2": (7,)}
    (folder / "x.log_structured.csv").write_text("LineId,EventId\n2,E7\n2,E3\n")
    with pytest.raises(DataError, match=r"x.log_structured.csv:3: LineId '2' is not a line of the log \(1..2, each once\)"):
        hdfs.read_loghub(folder, parser="structured")


@requires_real_data
@pytest.mark.skipif(not (LOGHUB / "HDFS_2k.log_structured.csv").is_file(), reason="loghub HDFS_2k not in ../shared/data")
def test_loghub_lines_to_sessions_to_keys_match_the_structured_event_ids():
    """Raw lines grouped by block id, masked, mined by drain3: the same keys as loghub's EventIds, up to renaming."""
    pytest.importorskip("drain3")
    by_event = hdfs.read_loghub(LOGHUB, parser="structured")
    by_drain = hdfs.read_loghub(LOGHUB, parser="drain3")
    assert by_event[3]["blocks"] == by_drain[3]["blocks"] == 2200 and by_event[2] == by_drain[2] == 14
    ev = {s.id: s.keys for s in by_event[0] + by_event[1]}
    dr = {s.id: s.keys for s in by_drain[0] + by_drain[1]}
    pairs = {(a, b) for block in ev for a, b in zip(ev[block], dr[block])}
    assert len(pairs) == 14 and len({a for a, _ in pairs}) == 14 and len({b for _, b in pairs}) == 14  # a bijection
    assert sum(len(s.keys) for s in by_event[1]) > 0 and len(by_event[1]) == 69  # the 69 anomalous blocks


# ----------------------------------------------------------------------------- detection: the shift, rules, baselines
PROMPT, EOS = [50], 2
CAND = [EOS, 101, 102, 103]  # END, key 1, key 2, key 3


class SuccessorLM(torch.nn.Module):
    """A hand-made 'LM': after token t it predicts succ[t] (logit 10, every other token 0)."""

    def __init__(self, succ: dict[int, int], vocab: int = 128):
        super().__init__()
        self.succ, self.vocab = succ, vocab
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        for tok, nxt in self.succ.items():
            logits[input_ids == tok, nxt] = 10.0
        return SimpleNamespace(logits=logits)


def test_the_one_position_shift_with_a_hand_made_model():
    # the model knows one normal session, 1 → 2 → 3 → end: the prompt's last token predicts key 1
    model = SuccessorLM({50: 101, 101: 102, 102: 103, 103: EOS})
    sessions = [(1, 2, 3), (1, 2), (2, 3), (1, 2, 3, 3), (1,)]
    lps = anomaly.lm_logprobs(model, sessions, PROMPT, CAND, batch_size=2)
    assert [lp.shape for lp in lps] == [(4, 4), (3, 4), (3, 4), (5, 4), (2, 4)]
    assert lps[0].argmax(axis=1).tolist() == [1, 2, 3, anomaly.END]  # row i predicts the key AFTER i keys
    # padding in a batch changes nothing: one at a time gives the same numbers
    for s, lp in zip(sessions, lps):
        np.testing.assert_allclose(anomaly.lm_logprobs(model, [s], PROMPT, CAND, batch_size=1)[0], lp, atol=1e-6)
    ranks = [anomaly.session_scores(lp, s)[0] for lp, s in zip(lps, sessions)]
    # normal; cut short (end of session where key 3 is due); wrong first key; a key after the end; cut short
    assert ranks == [1, 4, 4, 4, 4]
    assert [r > 1 for r in ranks] == [False, True, True, True, True]  # top-g with g=1
    # without scoring the end of the session, the cut-short sessions look normal
    assert [anomaly.session_scores(lp, s, score_end=False)[0] for lp, s in zip(lps, sessions)] == [1, 1, 4, 4, 1]


def test_bigram_baseline_on_hand_made_sessions():
    train = [(1, 2, 3), (1, 2, 3), (1, 3)]
    big = anomaly.BigramModel(3, end_marker=True, alpha=0.0).fit(train)
    np.testing.assert_allclose(np.exp(big.logprobs((1, 2, 3))), [[0, 1, 0, 0], [0, 0, 2 / 3, 1 / 3], [0, 0, 0, 1], [1, 0, 0, 0]])
    assert anomaly.session_scores(big.logprobs((1, 2, 3)), (1, 2, 3)) == (1, pytest.approx(-np.log(2 / 3)))
    assert anomaly.session_scores(big.logprobs((1, 3)), (1, 3)) == (2, pytest.approx(np.log(3)))
    assert anomaly.session_scores(big.logprobs((1, 2)), (1, 2))[0] == 4  # END after 2 never seen: outside every top-g < 4
    noend = anomaly.BigramModel(3, end_marker=False, alpha=0.0).fit(train)
    assert anomaly.session_scores(noend.logprobs((1, 2)), (1, 2), score_end=False)[0] == 1  # the cut-short session passes
    # DeepLog's top-g rule on the bigram: g=1 flags (1, 3), g=2 lets it through; the truncated one stays flagged
    scores = anomaly.score_all(lambda u: [big.logprobs(s) for s in u], [(1, 2, 3), (1, 3), (1, 2)])
    assert scores["max_rank"].tolist() == [1, 2, 4]
    assert ((scores["max_rank"] > 1).tolist(), (scores["max_rank"] > 2).tolist()) == ([False, True, True], [False, False, True])


def test_choose_threshold_known_values():
    thr, f1 = anomaly.choose_threshold([0.1, 0.2, 0.9, 1.0], [0, 0, 1, 1])
    assert (thr, f1) == (pytest.approx(0.55), 1.0)
    # integer scores (max ranks: top-g): alarms at >= 2 catch both anomalies with one false alarm, F1 0.8
    thr, f1 = anomaly.choose_threshold([1, 2, 2, 5], [0, 0, 1, 1])
    assert (thr, f1) == (1.5, pytest.approx(0.8))
    with pytest.raises(DataError):
        anomaly.choose_threshold([1, 2], [0, 0])


def test_g_and_threshold_are_chosen_on_validation_not_test():
    rng = np.random.default_rng(0)
    val_y = np.array([0] * 50 + [1] * 50)
    val = {"max_rank": np.where(val_y, rng.integers(3, 9, 100), rng.integers(1, 4, 100)).astype(float),
           "max_nll": np.where(val_y, rng.uniform(2, 6, 100), rng.uniform(0, 3, 100))}
    test = {"max_rank": rng.integers(1, 9, 80).astype(float), "max_nll": rng.uniform(0, 6, 80)}
    test_y = (test["max_nll"] > 3).astype(int)
    a = anomaly.detect(val, val_y, test, test_y)
    b = anomaly.detect(val, val_y, test, 1 - test_y)  # flipped test labels: the same choices, other scores
    assert (a["top_g"]["g"], a["threshold"]["threshold"], a["chosen"]) == (b["top_g"]["g"], b["threshold"]["threshold"], b["chosen"])
    assert a["top_g"]["test"]["f1"] != b["top_g"]["test"]["f1"]
    assert (a["top_g"]["g"], a["top_g"]["val_f1"]) == (anomaly.math.floor(anomaly.choose_threshold(val["max_rank"], val_y)[0]),
                                                       anomaly.choose_threshold(val["max_rank"], val_y)[1])
    # and changing validation labels does move them
    c = anomaly.detect(val, 1 - val_y, test, test_y)
    assert (c["threshold"]["threshold"], c["top_g"]["g"]) != (a["threshold"]["threshold"], a["top_g"]["g"])
    # each rule's ROC-AUC is over its own score: the top-g row showed the NLL's AUC
    from sklearn.metrics import roc_auc_score

    assert a["top_g"]["test"]["roc_auc"] == pytest.approx(roc_auc_score(test_y, test["max_rank"]))
    assert a["threshold"]["test"]["roc_auc"] == pytest.approx(roc_auc_score(test_y, test["max_nll"])) == 1.0
    assert a["top_g"]["test"]["roc_auc"] != a["threshold"]["test"]["roc_auc"]


# ----------------------------------------------------------------------------- end to end on the real sessions
def test_hdfs_detect_preset_composes_sft_then_evaluate_with_the_handoff(tmp_path):
    from sectune.stages import pipeline

    overrides = ["+experiment=hdfs_detect", "logger=none"]
    cfg = compose(overrides)
    names = pipeline.check_steps(cfg)
    assert names == ["sft", "evaluate"] and not cfg.pipeline.heldout_table
    steps = {n: pipeline.compose_step(cfg, pipeline.step_overrides_base(overrides), n, tmp_path, names) for n in names}
    assert steps["sft"].cfg.dataset.name == steps["evaluate"].cfg.dataset.name == "hdfs"
    assert steps["evaluate"].cfg.evaluate.model_dir == str(tmp_path / "sft")  # the pipeline hands the sft run on
    assert not steps["sft"].cfg.lora.enabled and steps["sft"].cfg.dataset.split_seed == steps["evaluate"].cfg.dataset.split_seed
    # data the evaluate step cannot score is found before the sft step trains (an empty hdfs_test_abnormal was found after)
    write_sessions(tmp_path / "d", [f"5 5 22 {k}" for k in range(1, 29)] * 2, [])
    bad = [*overrides, f"dataset.path={tmp_path / 'd'}"]
    cfg = compose(bad)
    steps = [pipeline.compose_step(cfg, pipeline.step_overrides_base(bad), n, tmp_path, names) for n in names]
    with pytest.raises(ConfigError, match=r"pipeline step evaluate, before any step runs: .*no anomalous session in the validation split"):
        pipeline.check_detection_data(steps)


@requires_real_data
@pytest.mark.skipif(not (DEEPLOG / hdfs.NORMAL_FILE).is_file(), reason="DeepLog HDFS sessions not in ../shared/data")
def test_hdfs_detect_pipeline_end_to_end_on_real_sessions(tmp_path):
    """+experiment=hdfs_detect, shortened: sft on normal sessions → evaluate (choices on validation) beside the baselines.
    dataset.skip_bad_lines=true, which the reader's errors suggest, was refused by an infer step the preset never runs."""
    run = sectune(["+experiment=hdfs_detect", "logger=none", "train.max_steps=40", "train.eval_steps=20", "train.save_steps=40",
                   "dataset.skip_bad_lines=true"], tmp_path / "run", timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    res = run.result
    assert res["status"] == "succeeded" and res["artifacts"] == {"sft": "sft", "evaluate": "evaluate"}
    m = res["metrics"]
    for key in ("test_f1", "test_fpr", "test_precision", "test_recall", "test_roc_auc", "baseline_test_f1", "baseline_test_fpr",
                "bigram_noend_top_g_test_f1", "model_sessions_per_s", "bigram_sessions_per_s"):
        assert key in m, key
    assert m["baseline_test_f1"] > 0.99 and m["baseline_test_fpr"] < 0.02  # the bigram + end marker, as the issue measured
    assert m["test_f1"] > 0.95 and m["test_fpr"] < 0.2  # 40 steps only: well above chance, not the target
    rule = "top_g" if m["rule_is_top_g"] else "threshold"
    assert m["val_f1"] == m[f"model_{rule}_val_f1"]  # what a sweep of detectors is ranked by (README, Sweeps)
    ev = tmp_path / "run" / "evaluate"
    sft_res = json.loads((tmp_path / "run" / "sft" / "result.json").read_text())
    assert sft_res["metrics"]["eval_loss"] < 0.5 * sft_res["metrics"]["eval_loss_start"]
    # the data's note, said by the step that reads the data (the pipeline's check before any step had said it into
    # nothing, and each note is said once per process: an audit, session 36)
    assert "of the test split's normal sessions repeat a training session" in run.stdout
    assert any("repeat a training session" in w for w in sft_res["warnings"])
    assert (ev / "evaluation" / "confusion_matrix.png").stat().st_size > 1000
    det = json.loads((ev / "evaluation" / "hdfs_detection.json").read_text())
    assert det["data"]["split_seed"] == 0 and det["data"]["train_anomalous"] == 0 and not det["data"]["generated"]
    assert det["data"]["test_normal"] == 1456 and det["data"]["test_anomalous"] == 12628
    assert "| LM (next key) |" in (ev / "evaluation" / "hdfs_report.md").read_text()
    # where this machine's paths reach no real sessions, a run trained on them is not scored on generated stand-ins (it
    # was, exit 0, under a generic banner: an audit, session 36)
    moved = sectune(["stage=evaluate", "dataset=hdfs", f"evaluate.model_dir={tmp_path / 'run' / 'sft'}", "logger=none"],
                    tmp_path / "elsewhere", env={"SECTUNE_SHARED_DATA": str(tmp_path / "no_shared")})
    assert moved.returncode == 2 and "that run trained on real HDFS sessions" in moved.stderr, moved.stderr[-2000:]


def test_hdfs_detect_on_generated_sessions_says_so_in_both_its_reports(tmp_path):
    """An audit (a fresh clone without ../shared): hdfs_report.md said the sessions were generated, the
    evaluation_report.txt beside it (the classifier-style report of the same test sessions) did not."""
    run = sectune(["+experiment=hdfs_detect", "logger=none", "train.max_steps=2", f"paths.shared_data={tmp_path / 'none'}"],
                  tmp_path / "run")
    assert run.returncode == 0, run.stderr[-2000:]
    ev = tmp_path / "run" / "evaluate" / "evaluation"
    (gen,) = json.loads((tmp_path / "run" / "evaluate" / "result.json").read_text())["generated_data"]
    assert "using generated HDFS sessions" in run.stdout  # said on the console too (lost before, session 36)
    assert (ev / "hdfs_report.md").read_text().startswith("**These sessions are generated**")
    assert f"data: GENERATED by sectune, not real ({gen['path']})" in (ev / "evaluation_report.txt").read_text()


def test_sft_on_hdfs_with_a_tokenizer_that_splits_keys_stops_before_training(tmp_path):
    """On a fresh clone the tiny tokenizer (trained on generated logs) splits some keys: SFT trained, and only
    stage=evaluate then refused the model. The same check now runs before training."""
    run = sectune(["logger=none", "dataset=hdfs", "train.max_steps=1", f"paths.shared_data={tmp_path / 'none'}"], tmp_path / "run")
    assert run.returncode == 2 and "dataset=hdfs: stage=evaluate could not score a model trained with this tokenizer" in run.stderr
    # the hint names how many keys these logs have (a user's logs may have more than the preset's 28), not "the preset sets them"
    assert "these logs have 28 keys, so model.tiny.extra_tokens must list ' 1' … ' 28'" in run.stderr
    assert not (tmp_path / "run" / "adapter").exists()


def test_evaluate_scores_other_logs_given_as_dataset_path_on_their_own_split(tmp_path, capsys):
    """The error for evaluate.data_path said to give the new file as dataset.path; that was then replaced by the trained
    run's path with a one-line note, and the old split scored again."""
    from omegaconf import OmegaConf

    from sectune.evaluation import anomaly
    from sectune.stages.infer import ModelChoice

    old, new = write_sessions(tmp_path / "old", ["5 5 22"], ["5 22"]), write_sessions(tmp_path / "new", ["5 5 22"], ["5 22"])
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(hdfs_cfg(old, "dataset.split_seed=3"), run / ".hydra" / "config.yaml")
    choice = ModelChoice("sft", None, "model")
    same = anomaly._run_config(hdfs_cfg(old), choice, run)
    assert same.dataset.path == str(old) and same.dataset.split_seed == 3 and "scoring" not in capsys.readouterr().out
    other = anomaly._run_config(hdfs_cfg(new, "dataset.split_seed=9"), choice, run)
    assert other.dataset.path == str(new) and other.dataset.split_seed == 3  # the new logs, split as the run split its own
    said = capsys.readouterr()
    assert f"scoring {new} (deeplog), not the logs this run trained on ({old}, deeplog)" in said.out and "dataset.split_seed=9 (trained: 3)" in said.out
    assert "two numberings" not in said.err  # both DeepLog keys: comparable
    # loghub logs keyed by drain3 against a model of DeepLog keys: key k is another event there
    lh = _loghub(tmp_path / "lh", "BlockId,Label\nblk_1,Normal\nblk_2,Anomaly\n")
    anomaly._run_config(hdfs_cfg(lh, "dataset.hdfs_layout=loghub", "dataset.log_parser=drain3"), choice, run)
    assert f"the run's log keys came from deeplog ({old}) and these from drain3: two numberings" in capsys.readouterr().err
    # the same logs read otherwise: said, and read as the run read them; a typo'd parser is an error, not dropped
    again = anomaly._run_config(hdfs_cfg(old, "dataset.skip_bad_lines=true"), choice, run)
    assert again.dataset.skip_bad_lines is False
    assert "read as it read them, not as dataset.skip_bad_lines=True (trained: False) says" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="dataset.log_parser='drian3': choose auto, structured or drain3"):
        anomaly._run_config(hdfs_cfg(old, "dataset.log_parser=drian3"), choice, run)
    with pytest.raises(ConfigError, match="dataset.hdfs_layout='logub': choose deeplog or loghub"):
        anomaly._run_config(hdfs_cfg(old, "dataset.hdfs_layout=logub"), choice, run)


def test_evaluate_reads_the_shipped_set_the_layout_names_and_knows_the_shipped_folder_given_as_a_path(tmp_path, capsys):
    """`dataset.hdfs_layout=loghub` at evaluate scored the DeepLog sessions the run trained on, without a word; the shipped
    folder given as dataset.path was called other logs than "the shipped sessions"."""
    from omegaconf import OmegaConf

    from sectune.stages.infer import ModelChoice

    src = tmp_path / "shared"
    deeplog = write_sessions(src / hdfs.DEEPLOG_DIR, ["5 5 22"], ["5 22"])
    (src / hdfs.LOGHUB_DIR).mkdir()

    def cfg(*extra):
        return compose(["dataset=hdfs", "logger=none", f"dataset.source_dir={src}", f"paths.cache_dir={tmp_path / 'cache'}", *extra])

    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg(), run / ".hydra" / "config.yaml")
    choice = ModelChoice("sft", None, "model")
    same = anomaly._run_config(cfg(f"dataset.path={deeplog}"), choice, run)
    assert "scoring" not in capsys.readouterr().out and same.dataset.path is None
    loghub = anomaly._run_config(cfg("dataset.hdfs_layout=loghub"), choice, run)
    assert loghub.dataset.hdfs_layout == "loghub"
    assert f"scoring {src / hdfs.LOGHUB_DIR} (loghub), not the logs this run trained on ({deeplog}, deeplog)" in capsys.readouterr().out


def test_evaluate_without_a_data_path_scores_the_logs_the_run_trained_on(tmp_path, capsys):
    """An audit (session 25): `stage=evaluate dataset=hdfs evaluate.model_dir=<run trained on dataset.path=own logs>`
    (the README's detection step alone) scored the shipped DeepLog set instead, exit 0, with only a note."""
    from omegaconf import OmegaConf

    from sectune.stages.infer import ModelChoice

    own = write_sessions(tmp_path / "own", ["5 5 22"], ["5 22"])
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(hdfs_cfg(own), run / ".hydra" / "config.yaml")
    plain = compose(["dataset=hdfs", "logger=none", f"paths.cache_dir={tmp_path / 'cache'}"])  # no dataset.path
    got = anomaly._run_config(plain, ModelChoice("sft", None, "model"), run)
    assert got.dataset.path == str(own) and "scoring" not in capsys.readouterr().out
    # a run trained on the shipped loghub set: the command's default layout (deeplog) is no request for other logs
    shipped = tmp_path / "shared"
    write_sessions(shipped / hdfs.DEEPLOG_DIR, ["5 5 22"], ["5 22"])
    _loghub(shipped / hdfs.LOGHUB_DIR, "BlockId,Label\nblk_1,Normal\nblk_2,Anomaly\n")
    on = ["dataset=hdfs", "logger=none", f"dataset.source_dir={shipped}", f"paths.cache_dir={tmp_path / 'cache'}"]
    OmegaConf.save(compose([*on, "dataset.hdfs_layout=loghub"]), run / ".hydra" / "config.yaml")
    got = anomaly._run_config(compose(on), ModelChoice("sft", None, "model"), run)
    assert got.dataset.hdfs_layout == "loghub" and "scoring" not in capsys.readouterr().out


def test_a_split_without_normal_sessions_is_an_error_naming_the_folder(tmp_path):
    """Few normal sessions: the test split had none and 'succeeded' with F1 1.0 and a false-positive rate of 0 of 0."""
    write_sessions(tmp_path, ["5 5 22", "22 5 5", "5 22 5", "5 5 5"], [f"22 22 {k}" for k in range(1, 29)] * 3)
    with pytest.raises(DataError, match=rf"{tmp_path}: no normal session in the test split \(4 normal sessions in all"):
        hdfs.load_hdfs(hdfs_cfg(tmp_path, "stage=evaluate", "dataset.val_fraction=0.5", "dataset.test_fraction=0.1"))
    assert hdfs.load_hdfs(hdfs_cfg(tmp_path, "stage=sft", "dataset.val_fraction=0.5", "dataset.test_fraction=0.1"))  # training: fine


def test_deeplogs_normal_test_file_joins_the_normal_sessions_and_a_loghub_log_may_end_in_blank_lines(tmp_path, capsys):
    """hdfs_test_normal (DeepLog's full set) was never read, without a word; a loghub log ending in a blank line failed
    at that line (the DeepLog reader took it as the end of the file)."""
    write_sessions(tmp_path / "d", [f"5 5 22 {k}" for k in range(2, 20)], [f"5 22 {k}" for k in range(1, 29)])
    before = hdfs.load_hdfs(hdfs_cfg(tmp_path / "d", "stage=evaluate")).info
    (tmp_path / "d" / hdfs.EXTRA_NORMAL_FILE).write_text("".join(f"22 5 {k}\n" for k in range(2, 26)))
    after = hdfs.load_hdfs(hdfs_cfg(tmp_path / "d", "stage=evaluate")).info
    normal = lambda i: sum(i[f"{n}_normal"] for n in ("train", "validation", "test"))  # noqa: E731
    assert normal(after) == normal(before) + 24 and "24 more normal sessions" in capsys.readouterr().out
    lh = _loghub(tmp_path / "lh", "BlockId,Label\nblk_1,Normal\nblk_2,Anomaly\n")
    with (lh / "x.log").open("a") as f:
        f.write("\n  \n")
    normal_, anomalous, _, _ = hdfs.read_loghub(lh)
    assert len(normal_) == 1 and len(anomalous) == 1


def test_a_byte_that_is_not_utf8_is_named_with_its_line_in_both_layouts(tmp_path):
    """A \\xff in a loghub log was read as U+FFFD without a word; in DeepLog sessions it was called "not a log key"."""
    d = write_sessions(tmp_path / "d", ["5 5 22", "5 22 5"], ["5 22"])
    (d / hdfs.NORMAL_FILE).write_bytes(b"5 5 22\n5 \xff 22\n")
    with pytest.raises(DataError, match=rf"{hdfs.NORMAL_FILE}:2: not UTF-8 text"):
        hdfs.read_key_sessions(d / hdfs.NORMAL_FILE, hdfs.NORMAL, 28)
    assert len(hdfs.read_key_sessions(d / hdfs.NORMAL_FILE, hdfs.NORMAL, 28, skip_bad=True)[0]) == 1
    lh = _loghub(tmp_path / "lh", "BlockId,Label\nblk_1,Normal\nblk_2,Anomaly\n")
    (lh / "x.log").write_bytes((lh / "x.log").read_bytes().replace(b"terminating\n", b"termin\xffating\n", 1))
    with pytest.raises(DataError, match=r"x.log:1: not UTF-8 text"):
        hdfs.read_loghub(lh)


def test_infer_refuses_a_log_key_model_as_evaluate_does(tmp_path):
    """stage=infer ran an HDFS next-key model as the auth-log analyst and 'succeeded' with 0 of 3 valid JSON answers."""
    from omegaconf import OmegaConf

    from sectune.runner import refuse_non_analyst as _refuse_non_analyst
    from sectune.stages.infer import ModelChoice

    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / ".hydra").mkdir()
    OmegaConf.save(hdfs_cfg(tmp_path), run / ".hydra" / "config.yaml")
    with pytest.raises(ConfigError, match=r"trained on dataset=hdfs, not an auth-log analyst .*stage=evaluate dataset=hdfs"):
        _refuse_non_analyst(ModelChoice("sft", run / "model", "model"), str(run))
    OmegaConf.save(compose(["logger=none"]), run / ".hydra" / "config.yaml")  # an analyst run: fine
    _refuse_non_analyst(ModelChoice("sft", run / "model", "model"), str(run))


def test_other_logs_keyed_by_drain3_follow_the_trained_runs_numbering(tmp_path, capsys):
    """An audit (session 25): drain3 numbers templates in order of first appearance in each log, so the same log with its
    lines in another order gave 10 of 14 templates another key, and nothing was said (both sides said log_parser=auto)."""
    from omegaconf import OmegaConf

    from sectune.stages.infer import ModelChoice

    events = ["PacketResponder 1 for block {b} terminating", "Receiving block {b} src: /10.250.19.102:54106 dest: /10.250.19.102:50010",
              "BLOCK* NameSystem.addStoredBlock: blockMap updated: 10.251.31.5:50010 is added to {b} size 67108864",
              "Deleting block {b} file /mnt/hadoop/dfs/data/current/subdir8/{b}"]
    lines = [f"081109 2036{i:02d} 148 INFO dfs.DataNode: {events[i % 4].format(b=f'blk_{i % 6}')}" for i in range(24)]
    labels = "BlockId,Label\n" + "".join(f"blk_{i},{'Anomaly' if i in (1, 4) else 'Normal'}\n" for i in range(6))
    for name, order in (("a", lines), ("b", lines[::-1])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.log").write_text("\n".join(order) + "\n")
        (tmp_path / name / "x_block_labels.csv").write_text(labels)
    key_of = lambda sessions: {s.id: s.keys for s in sessions[0] + sessions[1]}  # noqa: E731
    alone_a, alone_b = key_of(hdfs.read_loghub(tmp_path / "a")), key_of(hdfs.read_loghub(tmp_path / "b"))
    as_a = key_of(hdfs.read_loghub(tmp_path / "b", reference=tmp_path / "a"))
    assert alone_b["blk_0"] != tuple(reversed(alone_a["blk_0"]))  # each log alone: another numbering
    assert all(as_a[b] == tuple(reversed(alone_a[b])) for b in alone_a)  # numbered as in a: the same key per template
    # stage=evaluate on a run trained on a, scoring b: numbered as a, with a note (not a warning)
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(hdfs_cfg(tmp_path / "a", "dataset.hdfs_layout=loghub"), run / ".hydra" / "config.yaml")
    got = anomaly._run_config(hdfs_cfg(tmp_path / "b", "dataset.hdfs_layout=loghub"), ModelChoice("sft", None, "model"), run)
    assert got.dataset.drain3_reference == str(tmp_path / "a") and got.dataset.log_parser == "drain3"
    said = capsys.readouterr()
    assert "numbered as in the run's own log" in said.out and "two numberings" not in said.err


def test_evaluate_warns_when_sessions_are_longer_than_training_cut_them(tmp_path):
    """Sessions past model.max_seq_length were cut in training and scored whole at evaluate, without a word."""
    from sectune.data.synthetic_hdfs import write_deeplog_files

    data = write_deeplog_files(tmp_path / "hdfs", n_normal=200, n_anomalous=100, seed=2)
    run = sectune(["+experiment=hdfs_detect", "logger=none", f"dataset.path={data}", f"paths.cache_dir={tmp_path / 'cache'}",
                   "model.max_seq_length=16", "train.max_steps=2", "train.eval_steps=2", "train.save_steps=2"],
                  tmp_path / "run", timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "validation/test sessions are longer than model.max_seq_length=16 tokens, which training cut them to" in run.stdout


# An audit of hostile inputs (session 26): A session line holding a key of 5,000 digits is a DataError naming the file
# and line, not a ValueError traceback.
from sectune.data.hdfs import read_key_sessions


def test_huge_key_named(tmp_path):
    path = tmp_path / "hdfs_train"
    path.write_text("5 5 22\n5 " + "9" * 5000 + " 3\n")
    with pytest.raises(DataError, match=r"hdfs_train:2: unknown log key 9{20}…"):
        read_key_sessions(path, 0, 28)
    sessions, skipped = read_key_sessions(path, 0, 28, skip_bad=True)
    assert len(sessions) == 1 and skipped == 1


def test_leading_zeros_still_read(tmp_path):
    path = tmp_path / "hdfs_train"
    path.write_text("0005 05 22\n")
    sessions, _ = read_key_sessions(path, 0, 28)
    assert sessions[0].keys == (5, 5, 22)


def test_the_splits_notes_are_said_once_per_process_however_often_the_split_is_read(capsys):
    """A pipeline's sft and evaluate steps read the same split: its "repeat a training session" note and its "labelled
    both" warning were printed two or three times per run. Once now; another split says its own."""
    normal = [hdfs.Session(f"n{i}", (1, 2, 3) if i % 2 else (1, 2, 4), hdfs.NORMAL) for i in range(40)]
    anomalous = [hdfs.Session(f"a{i}", (1, 2, 3) if i == 0 else (9, 9, i), hdfs.ANOMALOUS) for i in range(10)]
    for _ in range(3):
        hdfs_splits.split_sessions(normal, anomalous, 0.2, 0.2, seed=7, source="once-test")
    out, err = capsys.readouterr()
    assert out.count("repeat a training session exactly") == 1 and err.count("labelled both normal and anomalous") == 1
    hdfs_splits.split_sessions(normal, anomalous, 0.2, 0.2, seed=8, source="once-test")  # another split: its own notes
    assert capsys.readouterr().out.count("repeat a training session exactly") == 1


# ----------------------------------------------------------------------------- the split a run trained on (an audit, session 42)
def _trained_run(tmp_path: Path, logs: Path, *extra: str) -> Path:
    """A run dir as stage=sft leaves it (config + splits.json), without training."""
    from omegaconf import OmegaConf

    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    cfg = hdfs_cfg(logs, *extra)
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    (run / hdfs_splits.RECORD_FILE).write_text(json.dumps(hdfs_splits.split_record(hdfs.load_hdfs(cfg, need_anomalies=False))))
    return run


def _scored(cfg, run: Path) -> tuple:
    from sectune.stages.infer import ModelChoice

    trained: dict = {}
    data = hdfs.load_hdfs(anomaly._run_config(cfg, ModelChoice("sft", None, "model"), run, trained))
    own, dropped = anomaly._trained_sessions(trained, data)
    return data, own, dropped, trained


def test_sft_records_its_split_and_evaluate_refuses_the_run_own_logs_split_changed(tmp_path):
    """An audit (session 42): DeepLog's hdfs_test_normal added to the folder after training reshuffled the split, and 667 of
    1,462 test sessions were ones the model trained on, exit 0. sft now writes splits.json; evaluate compares."""
    logs = write_deeplog_files(tmp_path / "logs", n_normal=200, n_anomalous=100, seed=2)
    run = sectune(["+experiment=hdfs_detect", "logger=none", f"dataset.path={logs}", f"paths.cache_dir={tmp_path / 'cache'}",
                   "train.max_steps=2", "train.eval_steps=2", "train.save_steps=2"], tmp_path / "run", timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    sft = tmp_path / "run" / "sft"
    rec = json.loads((sft / hdfs_splits.RECORD_FILE).read_text())
    data = hdfs.load_hdfs(hdfs_cfg(logs))
    assert rec["train_ids"] == [s.id for s in data.splits["train"]] and rec["test_ids_sha256"] == data.info["test_ids_sha256"]
    assert json.loads((sft / "result.json").read_text())["artifacts"]["splits"] == hdfs_splits.RECORD_FILE
    det = json.loads((tmp_path / "run" / "evaluate" / "evaluation" / "hdfs_detection.json").read_text())
    assert det["dropped_trained_sessions"] == {} and det["baselines_trained_on"] == str(logs)
    assert "has no splits.json" not in run.stderr and "split is not the one" not in run.stderr  # found, and the same
    # a larger copy of its logs, scored as other logs: the sessions it trained on dropped and counted, the bigram rows
    # learnt from the run's own train split (said in the report)
    big = write_deeplog_files(tmp_path / "big", n_normal=200, n_anomalous=100, seed=4)
    for f in (hdfs.NORMAL_FILE, hdfs.ANOMALOUS_FILE):
        (big / f).write_text((logs / f).read_text() + (big / f).read_text())
    other = sectune(["stage=evaluate", "dataset=hdfs", f"evaluate.model_dir={sft}", "logger=none", f"dataset.path={big}",
                     f"paths.cache_dir={tmp_path / 'cache'}"], tmp_path / "other", timeout=300)
    assert other.returncode == 0, other.stderr[-2000:]
    det = json.loads((tmp_path / "other" / "evaluation" / "hdfs_detection.json").read_text())
    assert det["baselines_trained_on"] == str(logs) and sum(det["dropped_trained_sessions"].values()) > 10
    assert not set(det["test_ids"]) & set(rec["train_ids"])  # a copy: the same id is the same session
    report = (tmp_path / "other" / "evaluation" / "hdfs_report.md").read_text()
    assert report.startswith(f"Other logs than the run's: {big}. The bigram rows learnt from {logs}'s train split, the sessions")
    # more normal sessions in the folder: the split rebuilt from it is another one, refused
    (logs / hdfs.EXTRA_NORMAL_FILE).write_text((logs / hdfs.NORMAL_FILE).read_text())
    again = sectune(["stage=evaluate", "dataset=hdfs", f"evaluate.model_dir={sft}", "logger=none",
                     f"paths.cache_dir={tmp_path / 'cache'}"], tmp_path / "again", timeout=300)
    assert again.returncode == 2, again.stderr[-2000:]
    assert f"{logs}: its train/validation/test split is not the one the run in {sft} trained on" in again.stderr


def test_other_logs_lose_the_sessions_the_run_trained_on_and_the_baselines_learn_from_the_runs_own(tmp_path, capsys):
    """An audit (session 42): scored on a larger copy of its logs, 228 of 691 test blocks were training ones, unsaid; and
    the bigram beside the model learnt from the scored logs' train split (an in-domain baseline beside a transferred model)."""
    old = write_deeplog_files(tmp_path / "old", n_normal=200, n_anomalous=100, seed=2)
    new = tmp_path / "new"
    new.mkdir()
    extra = write_deeplog_files(tmp_path / "extra", n_normal=200, n_anomalous=100, seed=5)
    for f in (hdfs.NORMAL_FILE, hdfs.ANOMALOUS_FILE):  # the old logs' lines first (same ids), then more
        (new / f).write_text((old / f).read_text() + (extra / f).read_text())
    run = _trained_run(tmp_path, old)
    data, own, dropped, trained = _scored(hdfs_cfg(new), run)
    assert trained["other"] and own.source == str(old)  # the baselines' train split: the run's own
    trained_on = {(s.id, s.keys) for s in own.splits["train"]}
    assert dropped["validation"] + dropped["test"] > 10
    assert not any((s.id, s.keys) in trained_on for n in ("validation", "test") for s in data.splits[n])
    assert f"test sessions of {new} are ones the run in {run} trained on: dropped" in capsys.readouterr().err
    # unrelated logs whose ids are the same lines of the same file names: DeepLog ids alone are no match
    _, _, unrelated, _ = _scored(hdfs_cfg(extra), run)
    assert sum(unrelated.values()) < dropped["validation"] + dropped["test"]
    # its own logs changed under it: refused, naming the folder; a run from before the record: scored, with a warning
    (old / hdfs.NORMAL_FILE).write_text((old / hdfs.NORMAL_FILE).read_text() + "5 5 22\n")
    with pytest.raises(DataError, match=rf"{old}: its train/validation/test split is not the one the run in {run} trained on"):
        _scored(hdfs_cfg(old), run)
    (run / hdfs_splits.RECORD_FILE).unlink()
    _scored(hdfs_cfg(old), run)
    assert f"{run} has no splits.json (a run from before session 42)" in capsys.readouterr().err


def test_a_run_trained_on_generated_sessions_scores_real_ones_as_other_logs(tmp_path, capsys):
    """An audit (session 42): trained where no real sessions were (generated ones), then scored where source_dir reaches
    real ones: taken for the run's own logs, no note, the bigram fit on the real train split beside it."""
    shared = tmp_path / "shared"
    on = ["dataset=hdfs", "logger=none", f"dataset.source_dir={shared}", f"paths.cache_dir={tmp_path / 'cache'}"]
    from omegaconf import OmegaConf

    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(compose(on), run / ".hydra" / "config.yaml")
    gen, _, generated = hdfs.source_folder(compose(on))  # what that run trained on: generated, no shared folder
    assert generated
    (run / "result.json").write_text(json.dumps({"status": "succeeded", "generated_data": [{"dataset": "hdfs", "path": str(gen)}]}))
    real = write_deeplog_files(shared / hdfs.DEEPLOG_DIR, n_normal=200, n_anomalous=100, seed=9)
    capsys.readouterr()
    from sectune.stages.infer import ModelChoice

    anomaly._run_config(compose(on), ModelChoice("sft", None, "model"), run)
    assert f"scoring {real} (deeplog), not the logs this run trained on ({gen}, deeplog)" in capsys.readouterr().out
    data, own, _, trained = _scored(compose(on), run)
    assert trained["other"] and data.source == str(real) and own.source == str(gen)  # the bigram learns from the generated


def test_a_key_the_run_never_saw_is_not_met_with_advice_for_training(tmp_path):
    """An audit (session 42): at evaluate, keys past the trained model's advised model.tiny.extra_tokens, which the trained
    run's tokenizer cannot take any more. Keys past the run's vocabulary are now scored (never given to the tokenizer); a
    key of its own that its tokenizer splits (a run from before sft checked it) is met with retraining, not extra_tokens."""
    class Splits:  # one token per key up to 3, two tokens past it
        eos_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [t for k in text.split() for t in ([int(k)] if int(k) <= 3 else [int(k) // 10, 90 + int(k) % 10])]}

    with pytest.raises(ConfigError) as e:
        anomaly.key_token_ids(Splits(), 5, "1", anomaly.RETRAIN_HINT)
    assert "the trained run's tokenizer cannot change at evaluate: train the run again" in str(e.value)
    assert "extra_tokens" not in str(e.value)


# ----------------------------------------------------------------------------- keys the run never saw (DeepLog's rule)
def test_a_key_past_the_runs_vocabulary_gets_the_worst_rank_in_the_model_and_every_baseline():
    """Keys past the run's key vocabulary were refused at evaluate (left open by session 42's audit). DeepLog: a key never
    seen in training is anomalous there: rank vocabulary + 2 (a miss of top-g at every g, g = all 4 candidates included)
    and −log p = ∞ for the model and both bigrams, never given to a predictor (which has no candidate for it); the
    sessions without one are scored as before."""
    model = SuccessorLM({50: 101, 101: 102, 102: 103, 103: EOS})  # candidates END, 1, 2, 3: the run's vocabulary is 3
    given: list = []

    def lm(uniq):
        given.extend(uniq)
        return anomaly.lm_logprobs(model, uniq, PROMPT, CAND)

    train = [(1, 2, 3), (1, 2, 3), (1, 3)]
    big = anomaly.BigramModel(3, end_marker=True, alpha=0.01).fit(train)
    noend = anomaly.BigramModel(3, end_marker=False, alpha=0.01).fit(train)
    clean, unseen = [(1, 2, 3), (1, 2), (2, 3)], [(1, 4, 3), (1, 2, 3, 7), (9,)]
    for name, predict, end in (("model", lm, True), ("bigram", lambda u: [big.logprobs(s) for s in u], True),
                               ("bigram_noend", lambda u: [noend.logprobs(s) for s in u], False)):
        got = anomaly.score_all(predict, clean + unseen, end, known=3)
        assert got["max_rank"][3:].tolist() == [5, 5, 5] and np.isinf(got["max_nll"][3:]).all(), name
        before = anomaly.score_all(predict, clean, end)  # no vocabulary given: every key a candidate, as before
        assert got["max_rank"][:3].tolist() == before["max_rank"].tolist(), name
        np.testing.assert_array_equal(got["max_nll"][:3], before["max_nll"])
        assert got["max_rank"][:3].max() <= 4  # a seen key ranks 4 at worst: the unseen one is worse than any
        assert (got["max_rank"][3:] > 4).all()  # outside the top-g even at g = 4, every candidate
        val_y, test_y = np.array([0, 1, 0, 1, 1, 1]), np.array([0, 0, 0, 1, 0, 1])
        det = anomaly.detect(got, val_y, got, test_y)  # normal-labelled ones too: the key decides, not the label
        assert det["top_g"]["pred"][3:].tolist() == [1, 1, 1] and det["threshold"]["pred"][3:].tolist() == [1, 1, 1], name
        assert np.isfinite(det["threshold"]["threshold"]) and np.isfinite(det["threshold"]["test"]["roc_auc"]), name
    assert not set(unseen) & set(given) and set(clean) <= set(given)


def test_a_threshold_below_an_unseen_keys_infinite_nll_is_finite_and_flags_it():
    """The midpoint between a finite −log p and an unseen key's ∞ is ∞, which flags nothing; and sklearn refuses ∞ in a
    ROC-AUC. The cut sits 1 above the finite score under it; the AUC reads ∞ as above every finite score."""
    thr, f1 = anomaly.choose_threshold([0.1, 0.2, np.inf, np.inf], [0, 0, 1, 1])
    assert (thr, f1) == (pytest.approx(1.2), 1.0)
    thr, f1 = anomaly.choose_threshold([0.1, 3.0, 0.2, np.inf], [0, 1, 0, 1])  # the finite anomaly caught too: the midpoint
    assert (thr, f1) == (pytest.approx(1.6), 1.0)
    m = anomaly.binary_metrics([0, 0, 1, 1], [0, 0, 1, 1], [0.1, 5.0, 2.0, np.inf])
    assert m["roc_auc"] == pytest.approx(0.75)  # ∞ above all; 5.0 (normal) above 2.0 (anomalous)


def test_keys_the_run_never_saw_are_counted_by_where_they_are():
    """hdfs_detection.json's ``unseen_keys``: sessions and positions past the run's vocabulary (scored by DeepLog's rule)
    and in it but in no training session (ranked as any key), per split."""
    S = hdfs.Session
    val = [S("v1", (1, 2), 0), S("v2", (1, 5, 5), 1), S("v3", (4, 2), 0)]
    test = [S("t1", (6, 1, 4), 0), S("t2", (1, 2, 3), 1), S("t3", (2, 7), 1)]
    got = anomaly.unseen_keys({"validation": val, "test": test}, vocab=4, trained={1, 2, 3})
    past, untrained = got["past_vocabulary"], got["not_in_training"]
    assert got["key_vocabulary"] == 4 and "worst rank" in past["rule"]
    assert past["validation"] == {"sessions": 1, "anomalous_sessions": 1, "positions": 2, "keys": [5]}
    assert past["test"] == {"sessions": 2, "anomalous_sessions": 1, "positions": 2, "keys": [6, 7]}
    assert untrained["validation"] == {"sessions": 1, "anomalous_sessions": 0, "positions": 1, "keys": [4]}
    assert untrained["test"] == {"sessions": 1, "anomalous_sessions": 0, "positions": 1, "keys": [4]}
    note = anomaly.unseen_keys_note(got, "/logs")
    assert "1 validation sessions (1 anomalous, 2 positions) and 2 test sessions (1 anomalous, 2 positions) of /logs hold keys " \
           "past the run's key vocabulary (1..4: keys 5, 6, 7)" in note and "rank 6" in note and "no training session holds (4)" in note
    assert "no training session" not in anomaly.unseen_keys_note(got, "/logs", past_only=True)
    assert anomaly.unseen_keys_note(anomaly.unseen_keys({"test": test[1:2]}, 4, {1, 2, 3}), "/logs") == ""


def test_a_drain3_template_new_in_other_logs_is_past_the_runs_vocabulary_and_the_old_ones_keep_their_keys(tmp_path):
    """Keys are the run's at train and evaluate: other logs keyed by drain3 are numbered as in the run's log, so its
    templates keep their keys, and a template new there gets a key past the run's vocabulary, which evaluate scores
    against (trained["num_keys"]: the model's candidates, the bigrams' table), not the scored logs' larger count."""
    events = ["PacketResponder 1 for block {b} terminating", "Receiving block {b} src: /10.250.19.102:54106 dest: /10.250.19.102:50010",
              "Deleting block {b} file /mnt/hadoop/dfs/data/current/subdir8/{b}"]
    new_event = "Verification succeeded for {b}"
    labels = "BlockId,Label\n" + "".join(f"blk_{i},{'Anomaly' if i % 5 == 0 else 'Normal'}\n" for i in range(40))
    lines = [f"081109 2036{i % 60:02d} 148 INFO dfs.DataNode: {events[i % 3].format(b=f'blk_{i % 40}')}" for i in range(120)]
    extra = [f"081109 2037{i:02d} 148 INFO dfs.DataBlockScanner: {new_event.format(b=f'blk_{i}')}" for i in range(0, 40, 4)]
    for name, log in (("a", lines), ("b", lines + extra)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.log").write_text("\n".join(log) + "\n")
        (tmp_path / name / "x_block_labels.csv").write_text(labels)
    run = _trained_run(tmp_path, tmp_path / "a", "dataset.hdfs_layout=loghub", "dataset.log_parser=drain3")
    data, own, _, trained = _scored(hdfs_cfg(tmp_path / "b", "dataset.hdfs_layout=loghub", "dataset.log_parser=drain3"), run)
    assert (own.num_keys, data.num_keys, trained["num_keys"]) == (3, 4, 3)
    own_keys = {s.id: s.keys for part in own.splits.values() for s in part}
    for s in (s for part in data.splits.values() for s in part):  # the run's templates keep their keys; the new one is 4
        assert tuple(k for k in s.keys if k != 4) == own_keys[s.id] and (4 in s.keys) == (int(s.id[4:]) % 4 == 0)
    got = anomaly.unseen_keys(data.splits, trained["num_keys"], {k for s in own.splits["train"] for k in s.keys})
    assert {n: got["past_vocabulary"][n]["sessions"] for n in data.splits} == \
        {n: sum(4 in s.keys for s in part) for n, part in data.splits.items()}


def test_other_logs_with_templates_the_run_never_saw_are_scored_and_flagged_by_every_system(tmp_path):
    """Scored on other DeepLog logs holding keys 29 and 30 (the run's are 1..28): the reader refused key 29 whatever
    dataset.num_log_keys said (the run's 28 was kept); the model's tokenizer refused it too. Now scored: each session with
    one is flagged by the model and every baseline, counted in hdfs_detection.json and said in the report."""
    logs = write_deeplog_files(tmp_path / "logs", n_normal=200, n_anomalous=100, seed=2)
    run = sectune(["+experiment=hdfs_detect", "logger=none", f"dataset.path={logs}", f"paths.cache_dir={tmp_path / 'cache'}",
                   "train.max_steps=2", "train.eval_steps=2", "train.save_steps=2"], tmp_path / "run", timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    other = write_deeplog_files(tmp_path / "other", n_normal=200, n_anomalous=100, seed=4)
    for f, key in ((hdfs.NORMAL_FILE, 29), (hdfs.ANOMALOUS_FILE, 30)):  # every 7th session gets a template the run never saw
        lines = (other / f).read_text().splitlines()
        (other / f).write_text("".join(f"{line} {key}\n" if i % 7 == 0 else f"{line}\n" for i, line in enumerate(lines)))
    ev = sectune(["stage=evaluate", "dataset=hdfs", f"evaluate.model_dir={tmp_path / 'run' / 'sft'}", "logger=none",
                  f"dataset.path={other}", "dataset.num_log_keys=30", f"paths.cache_dir={tmp_path / 'cache'}"],
                 tmp_path / "ev", timeout=300)
    assert ev.returncode == 0, ev.stderr[-3000:]
    out = tmp_path / "ev" / "evaluation"
    det = json.loads((out / "hdfs_detection.json").read_text())
    by_id = {s.id: s for part in hdfs.load_hdfs(hdfs_cfg(other, "dataset.num_log_keys=30")).splits.values() for s in part}
    test = [by_id[i] for i in det["test_ids"]]
    hit = [i for i, s in enumerate(test) if max(s.keys) > 28]
    past = det["unseen_keys"]["past_vocabulary"]
    assert det["unseen_keys"]["key_vocabulary"] == 28 and past["test"]["keys"] == [29, 30]
    assert past["test"]["sessions"] == len(hit) and past["test"]["positions"] == len(hit)  # one such key per session
    assert sum(test[i].label == hdfs.NORMAL for i in hit) > 0 and past["test"]["anomalous_sessions"] < len(hit)
    rows = json.loads((out / "detailed_results.json").read_text())
    assert {rows["rows"][i]["pred"] for i in hit} == {"anomalous"}  # the model, under its chosen rule
    for name, preds in rows["baseline_predictions"].items():  # bigram (chosen rule), bigram_topg, bigram_noend
        assert {preds[i] for i in hit} == {"anomalous"}, name
    report = (out / "hdfs_report.md").read_text()
    assert f"test sessions ({past['test']['anomalous_sessions']} anomalous, {len(hit)} positions) of {other} hold keys past " \
           "the run's key vocabulary (1..28: keys 29, 30)" in report
    assert "dataset.num_log_keys=30 (trained: 28)" not in ev.stdout  # read with this command's 30, not "using the trained"


def test_evaluate_max_samples_is_refused_with_hdfs():
    """An audit (session 42): evaluate.max_samples=20 scored all sessions, without a word."""
    from sectune.config_checks import check_values

    with pytest.raises(ConfigError, match=r"evaluate.max_samples=20: dataset=hdfs scores every validation/test session"):
        check_values(compose(["dataset=hdfs", "stage=evaluate", "evaluate.max_samples=20"]))
    check_values(compose(["dataset=hdfs", "stage=evaluate"]))


def test_loghub_sessions_are_the_logs_blocks_a_label_for_another_block_is_dropped_and_an_unlabelled_block_refused(tmp_path):
    """read_loghub keys a session by its block id: every block the log names (a line naming two feeds both), labelled from
    the label file, whose rows for blocks the log never names (HDFS_v1's anomaly_label.csv: 575,061 blocks beside a
    2k-line sample) are dropped; a block of the log without a label is refused, naming the file and the block."""
    folder = _loghub(tmp_path / "ok", "BlockId,Label\nblk_1,Anomaly\nblk_2,Normal\nblk_3,Anomaly\nblk_9,Normal\n")
    with (folder / "x.log").open("a") as f:
        f.write("081109 203617 150 INFO dfs.FSNamesystem: BLOCK* NameSystem.delete: blk_1 blk_2 is added to invalidSet\n")
    normal, anomalous, _, info = hdfs.read_loghub(folder, parser="drain3")
    assert [s.id for s in normal] == ["blk_2"] and [s.id for s in anomalous] == ["blk_1"] and info["blocks"] == 2
    assert len(normal[0].keys) == len(anomalous[0].keys) == 2 and normal[0].keys[1] == anomalous[0].keys[1]
    folder = _loghub(tmp_path / "unlabelled", "BlockId,Label\nblk_1,Anomaly\nblk_3,Normal\n")
    with pytest.raises(DataError, match=r"x_block_labels.csv: no label for block blk_2 of x.log \(1 blocks unlabelled\)$"):
        hdfs.read_loghub(folder, parser="drain3")


def test_other_loghub_logs_lose_the_blocks_the_run_trained_on_by_block_id_even_as_longer_sessions(tmp_path, capsys):
    """Other loghub logs (a larger log of the same cluster) hold the blocks the run trained on, some with more lines (other
    keys): a block id names one block anywhere, so each trained block is dropped from their validation and test splits by
    its id alone (DeepLog ids, lines of a file, need the same keys too: tested above)."""
    from sectune.stages.infer import ModelChoice

    events = ["PacketResponder 1 for block {b} terminating", "Receiving block {b} src: /10.250.19.102:54106 dest: /10.250.19.102:50010",
              "Deleting block {b} file /mnt/hadoop/dfs/data/current/subdir8/{b}"]

    def log(n, start=0):
        return [f"081109 2036{i % 60:02d} 148 INFO dfs.DataNode: {events[i % 3].format(b=f'blk_{start + i % n}')}" for i in range(3 * n)]

    labels = lambda n: "BlockId,Label\n" + "".join(f"blk_{i},{'Anomaly' if i % 5 == 0 else 'Normal'}\n" for i in range(n))  # noqa: E731
    more = [f"081109 2037{i:02d} 148 INFO dfs.DataBlockScanner: Verification succeeded for blk_{i}" for i in range(0, 40, 2)]
    for name, lines, n in (("a", log(40), 40), ("b", log(40) + more + log(40, 40), 80)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.log").write_text("\n".join(lines) + "\n")
        (tmp_path / name / "x_block_labels.csv").write_text(labels(n))
    run = _trained_run(tmp_path, tmp_path / "a", "dataset.hdfs_layout=loghub", "dataset.log_parser=drain3")
    scored = hdfs_cfg(tmp_path / "b", "dataset.hdfs_layout=loghub", "dataset.log_parser=drain3")
    data, own, dropped, _ = _scored(scored, run)
    trained = {s.id: s.keys for s in own.splits["train"]}
    before = hdfs.load_hdfs(anomaly._run_config(scored, ModelChoice("sft", None, "model"), run, {}))
    held = [s for n in ("validation", "test") for s in before.splits[n] if s.id in trained]
    assert any(s.keys != trained[s.id] for s in held) and any(s.keys == trained[s.id] for s in held)  # longer ones and equal ones
    assert dropped["validation"] + dropped["test"] == len(held)
    assert not any(s.id in trained for n in ("validation", "test") for s in data.splits[n])
    assert f"{dropped['validation']} validation and {dropped['test']} test sessions of {tmp_path / 'b'}" in capsys.readouterr().err
