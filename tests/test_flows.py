"""Flow loading, cleaning, splitting, normalising and rendering (sectune.data.flows)."""

import csv
import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest

from sectune.data.flows import (CIC_IOT_46_FEATURES, CIC_IOT_MERGED_39_FEATURES, FINE_TO_FAMILY,
                                FlowNormalizer, load_flows, prepare_flow_splits, render_flow,
                                split_flows, to_granularity, write_splits_json)
from sectune.data.synthetic_flows import generate_cic_iot_46
from sectune.data.text_classification import load_prompt_injections, load_text_label_csv
from sectune.errors import ConfigError, DataError
from sectune.evaluation.baselines import majority_baseline, random_forest_baseline
from sectune.paths import shared_data_dir

MERGED = shared_data_dir() / "ciciot2023_merged39_family_sample" / "CICIoT2023_sample.csv"
INJECTIONS = shared_data_dir() / "deepset_prompt_injections"


def needs(path):
    if not path.exists():
        pytest.skip(f"real data not present: {path} (shared_data_dir() absent on a fresh clone)")
    return path


def small_csv(path, n_per_class=20, labels=("BenignTraffic", "DDoS-ICMP_Flood", "Mirai-udpplain"),
              seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for k, lab in enumerate(labels):
        for i in range(n_per_class):
            rows.append({"rid": len(rows), "a": float(rng.normal(10 * k, 1)),
                         "b": float(rng.integers(0, 5)), "const": 3.0, "label": lab})
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


# ---------------------------------------------------------------- schemas and labels

def test_presets_shape_and_label_map():
    assert len(CIC_IOT_46_FEATURES) == 46 == len(set(CIC_IOT_46_FEATURES))
    assert len(CIC_IOT_MERGED_39_FEATURES) == 39 == len(set(CIC_IOT_MERGED_39_FEATURES))
    assert len(FINE_TO_FAMILY) == 34
    assert set(FINE_TO_FAMILY.values()) == {"DDoS", "DoS", "Mirai", "Recon", "Spoofing", "Web",
                                            "BruteForce", "Benign"}


def test_merged_preset_matches_real_header():
    with needs(MERGED).open() as fh:
        header = next(csv.reader(fh))
    assert header[:-2] == CIC_IOT_MERGED_39_FEATURES
    assert header[-2:] == ["label_multiclass", "label_binary"]


def test_granularity_mapping():
    fine = ["DDoS-ICMP_Flood", "Mirai-udpplain", "BenignTraffic", "XSS"]
    assert to_granularity(fine, "fine") == fine
    assert to_granularity(fine, "family") == ["DDoS", "Mirai", "Benign", "Web"]
    assert to_granularity(fine, "binary") == ["attack", "attack", "benign", "attack"]
    fam = ["Benign", "WebAttack", "Uploading"]
    assert to_granularity(fam, "family") == fam
    assert to_granularity(fam, "binary") == ["benign", "attack", "attack"]
    with pytest.raises(DataError, match="fine"):
        to_granularity(fam, "fine")
    with pytest.raises(DataError, match="NotALabel"):
        to_granularity(["NotALabel", "Benign"], "family")
    with pytest.raises(ConfigError):
        to_granularity(fine, "coarse")


def test_another_datasets_own_labels_are_kept_with_granularity_raw(tmp_path):
    """A CIC-IDS2017-style CSV (BENIGN/DDoS/PortScan) was refused: only CIC-IoT-2023 names passed."""
    own = ["BENIGN", "DDoS", "PortScan", "BENIGN"]
    with pytest.raises(DataError, match="dataset.granularity=raw keeps a file's own labels"):
        to_granularity(own, "family")
    assert to_granularity(own, "raw") == own
    p = tmp_path / "ids2017.csv"
    p.write_text("a,b,Label\n" + "".join(f"{i},{i % 7},{('BENIGN', 'DDoS', 'PortScan')[i % 3]}\n" for i in range(60)))
    prep = prepare_flow_splits(p, ["a", "b"], "Label", "raw", val_fraction=0.2, test_fraction=0.2, seed=1)
    assert prep.labels == ["BENIGN", "DDoS", "PortScan"] and sum(map(len, prep.records.values())) == 60


# ---------------------------------------------------------------- loading and cleaning

def test_missing_columns_named_all(tmp_path):
    p = small_csv(tmp_path / "f.csv")
    with pytest.raises(DataError) as err:
        load_flows(p, ["a", "Rate", "Tot sum"], "label_multiclass", "family")
    msg = str(err.value)
    assert str(p) in msg and "'Rate'" in msg and "'Tot sum'" in msg and "'label_multiclass'" in msg
    assert "'a'" not in msg


def test_missing_file_and_empty_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_flows(tmp_path / "nope.csv", ["a"], "label")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match="empty.csv"):
        load_flows(tmp_path / "empty.csv", ["a"], "label")


def dirty_csv(tmp_path):
    p = small_csv(tmp_path / "dirty.csv")
    df = pd.read_csv(p).astype({"a": object})
    df.loc[0, "a"] = "abc"       # non-numeric
    df.loc[1, "a"] = None        # NaN
    df.loc[2, "b"] = np.inf      # +inf
    df.loc[25, "b"] = -np.inf    # -inf
    df.to_csv(p, index=False)
    return p


def test_impute_policy_counts_and_uses_train_median(tmp_path):
    p = dirty_csv(tmp_path)
    t = load_flows(p, ["a", "b"], "label", "family", nan_policy="impute")
    c = t.cleaning
    assert (c["non_numeric_cells"], c["nan_cells"], c["inf_cells"]) == (1, 1, 2)
    assert c["bad_cells_by_column"] == {"a": 2, "b": 2} and c["rows_dropped"] == 0
    assert len(t) == 60 and int(t.X.isna().sum().sum()) == 4  # left for train-median imputation
    prep = prepare_flow_splits(p, ["a", "b"], "label", "family", val_fraction=0.2,
                               test_fraction=0.2, seed=1)
    assert prep.cleaning["cells_imputed"] == 4
    assert all(not t.X.isna().any().any() for t in prep.tables.values())
    train_raw = split_flows(t, 0.2, 0.2, 1)["train"].X
    assert prep.normalizer.medians["a"] == pytest.approx(float(train_raw["a"].median()))
    for recs in prep.records.values():
        for r in recs:
            assert all(math.isfinite(v) for v in r["features"].values())
            assert "nan" not in r["text"] and "inf" not in r["text"]


def test_a_feature_column_with_no_number_in_any_row_is_an_error_naming_it(tmp_path):
    """A text or mis-mapped column ('fast' in every row) was imputed to one value and trained on without a word."""
    p = small_csv(tmp_path / "text_col.csv")
    df = pd.read_csv(p).astype({"b": object})
    df["b"] = "fast"
    df.to_csv(p, index=False)
    with pytest.raises(DataError, match=r"text_col.csv: feature column 'b' holds no finite number in any of its 60 rows "
                                        r"\(first value: 'fast'\): a text or mis-mapped column\? \(dataset.features\)"):
        load_flows(p, ["a", "b"], "label", "family", nan_policy="impute")


def test_drop_policy_counts(tmp_path):
    t = load_flows(dirty_csv(tmp_path), ["a", "b"], "label", "family", nan_policy="drop")
    assert t.cleaning["rows_dropped"] == 4 and len(t) == 56
    assert not t.X.isna().any().any()
    with pytest.raises(ConfigError):
        load_flows(dirty_csv(tmp_path), ["a"], "label", nan_policy="zero")


def test_max_rows_keeps_every_class(tmp_path):
    t = load_flows(small_csv(tmp_path / "f.csv"), ["a"], "label", "fine", max_rows=30, seed=3)
    assert len(t) == 30 and t.y.value_counts().to_dict() == {
        "BenignTraffic": 10, "DDoS-ICMP_Flood": 10, "Mirai-udpplain": 10}


# ---------------------------------------------------------------- splitting

def test_stratified_split_proportions_and_determinism(tmp_path):
    p = small_csv(tmp_path / "f.csv", n_per_class=40)
    t = load_flows(p, ["rid", "a"], "label", "fine")
    s1, s2 = split_flows(t, 0.25, 0.25, seed=7), split_flows(t, 0.25, 0.25, seed=7)
    assert {k: len(v) for k, v in s1.items()} == {"train": 60, "validation": 30, "test": 30}
    for name, part in s1.items():
        assert set(part.y.value_counts()) == {len(part) // 3}  # equal share of every class
        assert part.X["rid"].tolist() == s2[name].X["rid"].tolist()
    ids = [set(v.X["rid"]) for v in s1.values()]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert set(split_flows(t, 0.25, 0.25, seed=8)["test"].X["rid"]) != ids[2]
    # the test set does not depend on the validation fraction
    assert set(split_flows(t, 0.1, 0.25, seed=7)["test"].X["rid"]) == ids[2]
    assert len(split_flows(t, 0.25, 0.0, seed=7)["test"]) == 0


def test_split_too_small_class_is_data_error(tmp_path):
    p = small_csv(tmp_path / "f.csv", n_per_class=1)
    with pytest.raises(DataError, match="stratified"):
        split_flows(load_flows(p, ["a"], "label", "fine"), 0.3, 0.3, 0)


# ---------------------------------------------------------------- normalising

@pytest.mark.parametrize("method", ["robust_log", "quantile"])
def test_normalizer_uses_train_statistics_only(tmp_path, method):
    """Poison only the TEST rows (extreme value + NaN): stats and train prompts must not move."""
    p = small_csv(tmp_path / "clean.csv", n_per_class=30)
    kw = dict(val_fraction=0.2, test_fraction=0.2, seed=5, method=method)
    # which CSV rows end up in test depends only on labels and seed: find them via the id column
    ids = load_flows(p, ["rid"], "label", "fine")
    test_ids = set(split_flows(ids, kw["val_fraction"], kw["test_fraction"], kw["seed"])["test"].X["rid"])
    df = pd.read_csv(p)
    poisoned = df.copy()
    poisoned.loc[poisoned["rid"].isin(test_ids), "a"] = 1e12
    poisoned.loc[poisoned["rid"] == min(test_ids), "b"] = np.nan
    poisoned.to_csv(tmp_path / "poisoned.csv", index=False)

    clean = prepare_flow_splits(p, ["a", "b", "const"], "label", "fine", **kw)
    dirty = prepare_flow_splits(tmp_path / "poisoned.csv", ["a", "b", "const"], "label", "fine", **kw)
    assert clean.normalizer.to_dict() == dirty.normalizer.to_dict()
    assert clean.records["train"] == dirty.records["train"]
    assert clean.records["validation"] == dirty.records["validation"]
    assert clean.records["test"] != dirty.records["test"]
    # the stats are exactly those of the train rows
    train_a = clean.tables["train"].X["a"]
    if method == "robust_log":
        slog = np.sign(train_a) * np.log1p(np.abs(train_a))
        assert clean.normalizer.center["a"] == pytest.approx(float(slog.median()))
    else:
        assert clean.normalizer.edges["a"][-1] == pytest.approx(float(np.quantile(train_a, 0.9)))


@pytest.mark.parametrize("method", ["robust_log", "standard", "quantile"])
def test_normalizer_zero_variance_and_roundtrip(method):
    X = pd.DataFrame({"a": [1.0, 2.0, 3.0, 1e6], "const": [3.0] * 4, "flag": [0, 0, 0, 1.0]})
    norm = FlowNormalizer(method).fit(X)
    Z = norm.transform(X)
    assert np.isfinite(Z.to_numpy()).all() and (Z["const"] == 0).all()
    assert Z.loc[3, "flag"] != 0  # a rare non-zero value stays visible
    again = FlowNormalizer.from_dict(json.loads(json.dumps(norm.to_dict())))
    pd.testing.assert_frame_equal(again.transform(X), Z)
    with pytest.raises(DataError, match="const"):
        norm.transform(X.drop(columns="const"))


def test_standard_normalizer_refuses_values_that_overflow_its_moments_and_robust_log_keeps_them():
    """An audit (session 36): values past ~1e154 overflow the variance; the column's centre was NaN, every value rendered
    as "0" and normalizer.json held NaN, with no word."""
    X = pd.DataFrame({"Rate": [1.0, 2.0, 1e300, -1e300], "b": [1.0, 2.0, 3.0, 4.0]})
    with pytest.raises(DataError, match=r"dataset.normalizer=standard: column 'Rate' \(max \|value\| 1e\+300\) overflows .*robust_log"):
        FlowNormalizer("standard").fit(X)
    assert np.isfinite(FlowNormalizer("robust_log").fit(X).transform(X).to_numpy()).all()


def test_an_integer_label_column_with_an_empty_cell_keeps_integer_label_names(tmp_path):
    """An audit (session 36): one empty label cell made pandas read the column as floats, and every label "0.0"/"1.0",
    which a run trained on the clean file then refused in a new file of the same labels."""
    p = tmp_path / "f.csv"
    p.write_text("a,b,y\n" + "".join(f"{i},{i % 7},{'' if i == 5 else i % 2}\n" for i in range(40)))
    prep = prepare_flow_splits(p, ["a", "b"], "y", "raw", val_fraction=0.2, test_fraction=0.2, seed=1)
    assert prep.labels == ["0", "1"] and sum(map(len, prep.records.values())) == 39


def test_quantile_normalizer_bins_by_train_deciles():
    train = pd.DataFrame({"a": np.arange(1, 101, dtype=float), "flag": [0.0] * 90 + [1.0] * 10})
    norm = FlowNormalizer("quantile").fit(train)
    # deciles of 1..100 (numpy's linear interpolation): 10.9, 20.8, …, 90.1; the flag (90 zeros,
    # 10 ones) has one edge above its minimum, its 0.9 quantile = 0.1
    assert norm.edges["a"] == pytest.approx([10.9 + 9.9 * i for i in range(9)])
    assert norm.edges["flag"] == [pytest.approx(0.1)]
    other = pd.DataFrame({"a": [1.0, 10.0, 11.0, 55.5, 100.0, 1e9, -5.0], "flag": [0, 1, 0, 0, 1, 0, 0.0]})
    Z = norm.transform(other)
    # by hand: 1 and 10 are below the first edge (bin 0), 11 above it (bin 1); 55.5 is past five
    # edges (bin 5); 100 and anything above the top edge: bin 9; below the train minimum: bin 0
    assert Z["a"].tolist() == [0, 0, 1, 5, 9, 9, 0]
    assert Z["flag"].tolist() == [0, 1, 0, 0, 1, 0, 0]
    # set in fewer than a tenth of the rows, a flag or a count kept no edge and rendered 0 for every flow (SSH, which
    # marks BruteForce, in the CIC sample; an audit, session 42): above the minimum is a bin of its own
    rare = pd.DataFrame({"ssh": [0.0] * 95 + [0.8, 0.9, 2.0, 3.0, 0.8], "a": np.arange(1, 101, dtype=float)})
    norm = FlowNormalizer("quantile").fit(rare)
    assert norm.edges["ssh"] == [0.8]
    assert norm.transform(pd.DataFrame({"ssh": [0.0, 0.8, 3.0], "a": [1.0, 2.0, 3.0]}))["ssh"].tolist() == [0, 1, 1]
    assert norm.edges["a"] == pytest.approx([10.9 + 9.9 * i for i in range(9)])  # a minimum held by one row: as before


# ---------------------------------------------------------------- prompts and files

def test_render_flow_compact():
    text = render_flow({"Rate": 1234.5678, "Tot sum": -0.0000001, "x": 0.5}, ["Rate", "Tot sum", "x"],
                       "Flow:\n{features}\nLabel:")
    assert text == "Flow:\nRate=1.23e+03; Tot sum=-1e-07; x=0.5\nLabel:"
    assert "Rate=0" in render_flow({"Rate": -0.0}, ["Rate"], "{features}")
    with pytest.raises(ConfigError):
        render_flow({"a": 1}, ["a"], "no placeholder")


def test_render_flow_values_only_and_a_format_without_value_is_an_error():
    row = {"Rate": 7.0, "Tot sum": 0.0, "x": 3.0}
    assert render_flow(row, ["x", "Rate", "Tot sum"], "F:\n{features}\nL:", sep=" ", fmt="{value}") == "F:\n3 7 0\nL:"
    assert render_flow(row, ["Rate"], "{features}", fmt="{name}: {value}") == "Rate: 7"
    with pytest.raises(ConfigError, match="dataset.feature_format"):
        render_flow(row, ["Rate"], "{features}", fmt="{name}")


def test_quantile_bins_are_configurable_and_saved():
    train = pd.DataFrame({"a": np.arange(1, 101, dtype=float)})
    norm = FlowNormalizer("quantile", bins=4).fit(train)
    assert norm.edges["a"] == pytest.approx([25.75, 50.5, 75.25])  # quartiles of 1..100
    assert norm.transform(pd.DataFrame({"a": [1.0, 30.0, 60.0, 99.0]}))["a"].tolist() == [0, 1, 2, 3]
    state = norm.to_dict()
    assert FlowNormalizer.from_dict(state).bins == 4
    del state["bins"]  # a normalizer saved before the key existed was a decile one
    assert FlowNormalizer.from_dict(state).bins == 10
    with pytest.raises(ConfigError, match="quantile_bins"):
        FlowNormalizer("quantile", bins=1)


def test_write_splits_json_and_synthetic_46(tmp_path):
    p = generate_cic_iot_46(34 * 12, seed=0, path=tmp_path / "syn.csv")
    assert list(pd.read_csv(p, nrows=1).columns) == CIC_IOT_46_FEATURES + ["label"]
    prep = prepare_flow_splits(p, CIC_IOT_46_FEATURES, "label", "fine", val_fraction=0.25,
                               test_fraction=0.25, seed=0)
    assert len(prep.labels) == 34
    paths = write_splits_json(tmp_path / "out", prep.records)
    assert sorted(paths) == ["test", "train", "validation"]
    test = json.loads((tmp_path / "out" / "test.json").read_text())
    assert len(test) == len(prep.records["test"]) and set(test[0]) == {"text", "label", "features"}
    assert set(test[0]["features"]) == set(CIC_IOT_46_FEATURES)
    assert test[0]["text"].startswith("Classify this IoT network flow.\nflow_duration=")
    assert len(test[0]["text"]) < 1000  # compact enough for a 512-token context
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_real_merged_sample_rf_beats_majority():
    prep = prepare_flow_splits(needs(MERGED), CIC_IOT_MERGED_39_FEATURES, "label_multiclass",
                               "family", val_fraction=0.1, test_fraction=0.2, seed=0)
    assert len(prep.labels) == 10 and prep.cleaning["rows_kept"] == 19252
    with pytest.raises(DataError, match="fine"):
        load_flows(MERGED, CIC_IOT_MERGED_39_FEATURES, "label_multiclass", "fine")
    tr, te = prep.tables["train"], prep.tables["test"]
    from sklearn.metrics import f1_score
    rf = random_forest_baseline(tr.X, tr.y, te.X, seed=0)
    maj = majority_baseline(tr.y, te.y)
    rf_f1 = f1_score(te.y, rf.predictions, average="macro")
    maj_f1 = f1_score(te.y, maj.predictions, average="macro")
    assert rf_f1 > 0.5 and maj_f1 < 0.05 and rf_f1 - maj_f1 > 0.4
    assert rf.rows_per_s > 0 and rf.wall_s > 0


# ---------------------------------------------------------------- text data

def test_text_label_csv(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text('text,label\n"flow_duration:1 proto:TCP",benign\nabc,ddos\n')
    assert load_text_label_csv(p) == [{"text": "flow_duration:1 proto:TCP", "label": "benign"},
                                      {"text": "abc", "label": "ddos"}]
    p.write_text("body,label\nx,y\n")
    with pytest.raises(DataError, match="'text'"):
        load_text_label_csv(p)
    p.write_text("")
    with pytest.raises(DataError, match="empty"):
        load_text_label_csv(p)
    p.write_text("text,label\nx,\n")
    with pytest.raises(DataError, match="line 2"):
        load_text_label_csv(p)


def test_prompt_injections_counts_and_bad_line(tmp_path):
    data = load_prompt_injections(needs(INJECTIONS))
    assert (len(data["train"]), len(data["test"])) == (546, 116)
    assert sum(r["label"] == "injection" for r in data["train"]) == 203
    assert sum(r["label"] == "benign" for r in data["test"]) == 56
    for split in ("train", "test"):
        shutil.copy(INJECTIONS / f"{split}.jsonl", tmp_path / f"{split}.jsonl")
    lines = (tmp_path / "test.jsonl").read_text(encoding="utf-8").splitlines()
    lines[6] = '{"text": "broken", "label": '
    (tmp_path / "test.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"test\.jsonl: line 7: invalid JSON"):
        load_prompt_injections(tmp_path)


@pytest.mark.slow  # ~20 s: a classify run and two evaluate runs (make test stays under 10 minutes; make test-all runs it)
@pytest.mark.skipif(not (shared_data_dir() / "ciciot2023_merged39_family_sample").is_dir(), reason="needs the real CIC sample (../shared/data)")
def test_evaluate_scores_a_classify_run_with_its_own_saved_bins(tmp_path, monkeypatch):
    """Session 42 changed how quantile bins are placed; evaluate refitted them, so every CIC run trained before read other
    prompts than its saved splits and was refused as "the data changed" (a review of that change). Evaluate now takes
    the run's normalizer.json."""
    from conftest import compose, sectune

    from sectune import runner
    from sectune.data import flows

    fit = flows.FlowNormalizer.fit

    def rule_1(self, X):  # the bins as sectune placed them before session 42
        fit(self, X)
        if self.method == "quantile":
            Z, qs = self._pre(self.impute(X)), np.linspace(0, 1, self.bins + 1)[1:-1]
            self.edges = {c: sorted({float(e) for e in np.quantile(Z[c], qs) if e > Z[c].min()}) for c in self.features}
        return self

    monkeypatch.setattr(flows.FlowNormalizer, "fit", rule_1)
    args = ["stage=classify", "dataset=cic_iot_2023_merged", "dataset.max_samples=300", "train.max_steps=1", "logger=none",
            "evaluate.rf_estimators=5", f"paths.cache_dir={tmp_path / 'cache'}"]
    from omegaconf import OmegaConf

    cfg = compose(args)
    (tmp_path / "old" / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, tmp_path / "old" / ".hydra" / "config.yaml")  # (Hydra writes it for a command's run)
    code, _ = runner.run(cfg, tmp_path / "old")
    assert code == 0
    assert not json.loads((tmp_path / "old" / "normalizer.json").read_text())["edges"]["SSH"]  # rule 1: no bin for SSH
    monkeypatch.undo()
    ev = sectune(["stage=evaluate", f"evaluate.model_dir={tmp_path / 'old'}", "logger=none", "evaluate.rf_estimators=5"], tmp_path / "ev")
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert ev.result["metrics"]["test_macro_f1"] == pytest.approx(json.loads((tmp_path / "old" / "result.json").read_text())["metrics"]["test_macro_f1"])
    (tmp_path / "old" / "normalizer.json").write_text('{"method": "quantile"')  # damaged: one line naming the file
    bad = sectune(["stage=evaluate", f"evaluate.model_dir={tmp_path / 'old'}", "logger=none"], tmp_path / "ev2")
    assert bad.returncode == 2 and f"{tmp_path / 'old' / 'normalizer.json'}: not valid JSON" in bad.stderr and "Traceback" not in bad.stderr
