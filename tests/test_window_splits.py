"""dataset.split_by (window | time | source): the auth-log windows split at random (the default), in time blocks per
log, or grouped by shared source; every stage of a run reads the same split, and a resume under another is refused."""

import json

import pytest
from omegaconf import OmegaConf

from conftest import compose, requires_real_data
from sectune.errors import ConfigError


def _generated(tmp_path, *extra):
    """A config reading the generated logs (a source_dir without real ones), its cache under tmp_path."""
    empty = tmp_path / "no_real_logs"
    empty.mkdir(exist_ok=True)
    return compose(["stage=sft", "dataset=auth_logs", f"dataset.source_dir={empty}", f"paths.cache_dir={tmp_path / 'cache'}", *extra])


def _real(*extra):
    return compose(["stage=sft", "dataset=auth_logs", *extra])


def _check_properties(cfg_of):
    """The three splits on one config family: window as before, time with no test window before a training window of
    its log, source with no test window sharing a source with a training window."""
    from sectune import data
    from sectune.data import auth_logs, split_windows
    from sectune.data.window_splits import window_logs, window_sources

    samples = auth_logs.load_auth_folder(data.auth_logs_folder(cfg_of("window")))
    text = {s.id: s.log_text for s in samples}
    ids = lambda sp: {k: {r["id"] for r in v} for k, v in sp.items()}  # noqa: E731

    window = ids(data.sft_splits(cfg_of("window")))
    d = cfg_of("window").dataset  # the default is the random, stratified split every figure so far was computed on
    assert window == split_windows([(s.id, s.label) for s in samples], d.val_fraction, d.test_fraction, d.split_seed)
    assert ids(data.sft_splits(cfg_of(None))) == window

    time = ids(data.sft_splits(cfg_of("time")))
    logs = window_logs(list(text))
    assert time != window and all(time[s] for s in time)
    last_train = {}
    for i in time["train"]:
        log, y = logs[i]
        last_train[log] = max(last_train.get(log, 0), y)
    for i in time["test"] | time["validation"]:
        assert logs[i][1] > last_train[logs[i][0]], i
    for i in time["test"]:  # validation precedes test within a log
        assert all(logs[j][1] < logs[i][1] for j in time["validation"] if logs[j][0] == logs[i][0])

    source = ids(data.sft_splits(cfg_of("source")))
    assert source["test"] and source["train"]
    seen = set().union(*(window_sources(text[i]) for i in source["train"]))
    assert not seen & set().union(*(window_sources(text[i]) for i in source["test"] | source["validation"]))
    # the random split shares sources between test and train (the audit's finding), so the property is not vacuous
    seen_w = set().union(*(window_sources(text[i]) for i in window["train"]))
    assert any(window_sources(text[i]) & seen_w for i in window["test"])
    return window, time, source


def test_split_by_on_generated_logs(tmp_path):
    _check_properties(lambda how: _generated(tmp_path, *([f"dataset.split_by={how}"] if how else [])))


@requires_real_data
def test_split_by_on_the_real_logs(tmp_path, capsys):
    window, time, source = _check_properties(lambda how: _real(f"paths.cache_dir={tmp_path}", *([f"dataset.split_by={how}"] if how else [])))
    assert len(window["test"]) == 43 and len(time["test"]) == 43
    # split_seed 0: OpenSSH_2k's windows are one group (its attackers recur), Linux_2k's mostly one: only 36 small-group
    # windows can be held out, shared between validation and test (test first took them all, validation got none); said
    out = capsys.readouterr()
    assert (len(source["validation"]), len(source["test"])) == (19, 17)
    assert "dataset.split_by=source" in out.out and "test holds 17 of 289 windows" in out.err


def test_source_split_refuses_when_one_source_joins_every_window_and_warns_when_small():
    from sectune.data.window_splits import split_auth_windows

    d = OmegaConf.create({"val_fraction": 0.15, "test_fraction": 0.15, "split_seed": 0, "split_by": "source"})
    one = [(f"{k}_{k * 10 + 1}", "malicious", f"Failed password for root from 10.0.0.{k % 2} port 22\n"
            f"Failed password for root from 10.0.0.{(k + 1) % 2} port 22") for k in range(1, 21)]
    with pytest.raises(ConfigError, match=r"^dataset.split_by=source: no test window.*dataset.test_fraction=0.15"):
        split_auth_windows(one, d)
    with pytest.raises(ConfigError, match=r"^dataset.split_by='bogus': choose one of window, time, source"):
        split_auth_windows(one, OmegaConf.merge(d, {"split_by": "bogus"}))
    # two windows of their own beside one big group: they are held out, each split told it is short
    two = one + [("30_301", "suspicious", "Failed password for x from 10.9.9.9 port 22"), ("31_311", "benign", "session opened")]
    where = split_auth_windows(two, d)
    assert where["train"] == {i for i, _, _ in one} and where["test"] | where["validation"] == {"30_301", "31_311"}


def test_time_split_keeps_each_log_in_order():
    from sectune.data.window_splits import split_auth_windows

    d = OmegaConf.create({"val_fraction": 0.2, "test_fraction": 0.2, "split_seed": 3, "split_by": "time"})
    a = [(f"{k}_{k * 10}", ("malicious", "suspicious")[k % 2], "x") for k in range(1, 11)]  # log one: lines 10..100
    b = [(f"{k}_{(k - 10) * 5}", ("benign", "suspicious")[k % 2], "y") for k in range(11, 21)]  # log two starts again
    where = split_auth_windows(a + b, d)
    assert where["test"] == {"9_90", "10_100", "19_45", "20_50"} and where["validation"] == {"7_70", "8_80", "17_35", "18_40"}


def test_split_by_is_checked_and_refused_where_no_auth_windows_are_split():
    from sectune.config_checks import check_values as check_config

    with pytest.raises(ConfigError, match=r"^dataset.split_by=blocks: choose one of window, time, source"):
        check_config(compose(["stage=sft", "dataset=auth_logs", "dataset.split_by=blocks"]))
    with pytest.raises(ConfigError, match=r"^dataset.split_by=time: splits auth-log windows"):
        check_config(compose(["stage=sft", "dataset=hdfs", "dataset.split_by=time"]))
    check_config(compose(["stage=sft", "dataset=auth_logs", "dataset.split_by=source"]))


def test_every_stage_of_a_run_reads_the_same_split(tmp_path):
    """Preference pairs (reward, DPO), the injection triplets and the held-out table's windows follow dataset.split_by as
    SFT does (each was split by window whatever the key said)."""
    from sectune import data
    from sectune.data.injection import build_auth_triplets
    from sectune.evaluation import analyst_eval

    for how in ("time", "source"):
        sft = data.sft_splits(_generated(tmp_path, f"dataset.split_by={how}"))
        want = {k: {r["id"] for r in v} for k, v in sft.items()}
        pairs = data.preference_pairs(_generated(tmp_path, "stage=reward", "dataset=auth_preferences", f"dataset.split_by={how}"))
        assert {k: {p["window_id"] for p in v} for k, v in pairs.items()} == want
        records, _ = build_auth_triplets(_generated(tmp_path, "dataset=injection_triplets", f"dataset.split_by={how}"))
        got = {k: {r["window_id"] for r in records if r["split"] == k} for k in want}
        assert got == want, how
        windows = analyst_eval.load_windows(_generated(tmp_path, f"dataset.split_by={how}"))
        assert {k: {w.id for w in v} for k, v in windows.items()} == want


def test_pairs_file_without_splits_is_refused_under_time(tmp_path):
    line = {"prompt": "p", "chosen": "a", "rejected": "b"}
    f = tmp_path / "pairs.jsonl"
    f.write_text(json.dumps(line) + "\n")
    with pytest.raises(ConfigError, match=r"^dataset.split_by=time: .*pairs.jsonl is a pairs file"):
        from sectune import data

        data.preference_pairs(compose(["stage=reward", "dataset=auth_preferences", f"dataset.path={f}", "dataset.split_by=time"]))


def test_resume_under_another_split_by_is_refused_and_an_older_record_resumes_at_window(tmp_path):
    from sectune.training import checkpoints

    ckpt_dir = tmp_path / "checkpoints"
    assert checkpoints.resolve_resume(compose(["logger=none", "dataset=auth_logs"]), ckpt_dir) is None
    record_file = ckpt_dir / checkpoints.RESUME_RECORD
    record = json.loads(record_file.read_text())
    assert record["dataset.split_by"] == "window"
    with pytest.raises(ConfigError, match=r"dataset.split_by: 'window' there, 'source' now"):
        checkpoints._check_same_training(compose(["logger=none", "dataset=auth_logs", "dataset.split_by=source"]),
                                         ckpt_dir / "checkpoint-2", "x")
    del record["dataset.split_by"]  # a record from before the key: its run split by window
    record_file.write_text(json.dumps(record))
    checkpoints._check_same_training(compose(["logger=none", "dataset=auth_logs"]), ckpt_dir / "checkpoint-2", "x")
    with pytest.raises(ConfigError, match=r"dataset.split_by: None there, 'time' now"):
        checkpoints._check_same_training(compose(["logger=none", "dataset=auth_logs", "dataset.split_by=time"]),
                                         ckpt_dir / "checkpoint-2", "x")


def test_config_digest_unchanged_at_window_and_changed_otherwise():
    from sectune.run_digest import config_digest

    base = compose(["stage=sft", "dataset=auth_logs"])
    older = OmegaConf.to_container(base)
    del older["dataset"]["split_by"]  # a config from before the key: the same run as split_by=window
    assert config_digest(OmegaConf.create(older)) == config_digest(base)
    assert config_digest(compose(["stage=sft", "dataset=auth_logs", "dataset.split_by=time"])) != config_digest(base)


def test_pipeline_held_out_check_names_split_by(tmp_path):
    """A pipeline whose SFT step splits by window while the table splits by time trains on held-out windows: refused,
    the key named."""
    from types import SimpleNamespace

    from sectune.evaluation.pipeline_heldout import check_held_out

    table = _generated(tmp_path, "dataset.split_by=time")
    step = SimpleNamespace(name="sft", cfg=_generated(tmp_path))
    with pytest.raises(ConfigError, match=r"pipeline step sft would train on .*dataset.split_by=window \(table: time\)"):
        check_held_out([step], table, None)
    check_held_out([SimpleNamespace(name="sft", cfg=_generated(tmp_path, "dataset.split_by=time"))], table, None)


def test_evaluate_split_check_reads_a_run_from_before_the_key_as_window(tmp_path, capsys):
    from sectune.evaluation.injection_eval import check_trained_on

    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    saved = OmegaConf.to_container(compose(["stage=sft", "dataset=auth_logs"]))
    del saved["dataset"]["split_by"]
    (run / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(saved))
    choice = type("C", (), {"path": None})()
    check_trained_on(compose(["stage=evaluate", "dataset=injection_triplets"]), choice, run)
    assert "other dataset settings" not in capsys.readouterr().out
    check_trained_on(compose(["stage=evaluate", "dataset=injection_triplets", "dataset.split_by=source"]), choice, run)
    assert "split_by=window" in capsys.readouterr().out


def test_a_host_name_sshd_gives_under_usedns_is_a_source():
    """sshd with UseDNS names the host, not its address (``from host.example.com port 22``): the rule engine reads it as
    the source, the split's patterns did not, so two windows of one attacking host could fall on both sides of the split."""
    from sectune.data.window_splits import window_sources

    a = "Dec 10 06:55:46 LabSZ sshd[24200]: Failed password for root from scanner.example.com port 38926 ssh2"
    b = "Dec 10 07:55:46 LabSZ sshd[24300]: Invalid user admin from scanner.example.com port 40000"
    assert "scanner.example.com" in window_sources(a) and "scanner.example.com" in window_sources(b)
    assert window_sources("Dec 10 06:55:46 LabSZ sshd[1]: Accepted password for bob from 10.1.2.3 port 2 ssh2") == {"10.1.2.3"}


def test_report_names_a_split_other_than_window():
    """report.md read the same under every split: a time- or source-split table (other test windows, other numbers)
    could not be told from the default's (a pipeline run, session 43). The table records its split; the header names it."""
    from sectune.evaluation.analyst_eval import split_info
    from sectune.evaluation.analyst_report import render_markdown

    assert split_info(compose(["stage=infer", "dataset=auth_logs", "dataset.split_by=time", "dataset.split_seed=3"])) == {"by": "time", "seed": 3}
    assert split_info(compose(["stage=infer", "dataset=auth_logs"]))["by"] == "window"
    row = {"name": "SFT", "kind": "policy", "json_valid_rate": 1, "schema_valid_rate": 1, "verdict_accuracy": 0.5,
           "verdict_macro_f1": 0.5, "field_f1": 0.5, "analyses_per_s": 1.0}

    def md(**split):
        return render_markdown({"rows": [row], "best_policy": None, "windows": [{"source": "OpenSSH", "verdict": "benign"}],
                                "by_source": {"SFT": {}}, **split})

    for by in ("time", "source"):
        head = md(split={"by": by, "seed": 2}).split("| system |")[0]
        assert head.startswith(f"# Held-out analyst table (dataset.split_by={by})\n")
        assert f"dataset.split_by={by}, dataset.split_seed=2" in head
    # the default split (and a table recorded before the key) reads as before
    assert md(split={"by": "window", "seed": 0}) == md()
    assert md().startswith("# Held-out analyst table\n\n1 test windows") and "split_by" not in md()


def test_evaluate_splits_as_the_evaluated_run_unless_the_command_says(tmp_path, monkeypatch, capsys):
    """stage=evaluate on a time-split pipeline, without dataset.split_by: it scored the window split's test windows (37
    of 43 the analyst's training and validation windows) behind a warning (a pipeline run, session 43)."""
    from sectune.evaluation import injection_eval
    from sectune.stages import pipeline

    def run_dir(name, **dataset):
        run = tmp_path / name
        (run / ".hydra").mkdir(parents=True)
        saved = OmegaConf.to_container(compose(["stage=sft", "dataset=auth_logs"]))
        saved["dataset"].update(dataset)
        if not dataset:
            del saved["dataset"]["split_by"]  # a run from before the key: split by window
        (run / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(saved))
        return run

    choice = type("C", (), {"path": None})()
    cfg = compose(["stage=evaluate", "dataset=injection_triplets"])
    injection_eval.take_split(cfg, choice, run_dir("time", split_by="time", split_seed=2))
    assert (cfg.dataset.split_by, cfg.dataset.split_seed) == ("time", 2)
    assert "dataset.split_seed=2, dataset.split_by=time" in capsys.readouterr().out
    injection_eval.take_split(cfg, choice, run_dir("older"))
    assert (cfg.dataset.split_by, cfg.dataset.split_seed) == ("window", 0)
    monkeypatch.setattr(pipeline, "command_line_overrides", lambda required=True: ["dataset.split_by=source"])
    cfg = compose(["stage=evaluate", "dataset=injection_triplets", "dataset.split_by=source"])
    injection_eval.take_split(cfg, choice, tmp_path / "time")  # the command's own value wins (check_trained_on warns)
    assert (cfg.dataset.split_by, cfg.dataset.split_seed) == ("source", 2)


def test_simplified_ppo_with_max_samples_refuses_a_split_by_time_or_source():
    """simplified_ppo picks the max_samples best windows from every window's split and drops the n-window split's held-out
    ones by id: under time or source a window sharing a held-out window's source (or after it in its log) still trained."""
    from sectune.errors import ConfigError
    from sectune.stages.rl import simplified_ppo_windows

    for how in ("time", "source"):
        cfg = compose(["stage=rl", "loss=simplified_ppo", "dataset.max_samples=40", f"dataset.split_by={how}"])
        with pytest.raises(ConfigError, match=f"dataset.split_by={how}"):
            simplified_ppo_windows(cfg)


def test_the_forms_of_one_address_are_one_source_for_the_split():
    """Session 44: a window naming ::ffff:1.2.3.4 (or fe80::1%eth0, or 2001:0db8:0:0::1) and one naming 1.2.3.4 (fe80::1,
    2001:db8::1) were two sources, so one attacker's windows could sit on both sides of dataset.split_by=source."""
    from sectune.data.window_splits import source_groups, window_sources

    line = "Dec 10 06:55:46 LabSZ sshd[{}]: Failed password for root from {} port 22 ssh2"
    pam = "Dec 10 06:55:46 LabSZ sshd[{}]: pam_unix(sshd:auth): authentication failure; logname= uid=0 rhost={} user=x"
    mapping = "Dec 10 06:55:46 LabSZ sshd[{}]: reverse mapping checking getaddrinfo for h.example [{}] failed - POSSIBLE BREAK-IN ATTEMPT!"
    for forms in (["::ffff:1.2.3.4", "1.2.3.4"], ["fe80::1%eth0", "fe80::1"], ["2001:0db8:0:0::1", "2001:db8::1"]):
        for fmt in (line, pam, mapping):
            assert window_sources(fmt.format(1, forms[0])) == window_sources(fmt.format(2, forms[1])) == {forms[1]}, (fmt, forms)
        texts = {"1_1": line.format(1, forms[0]), "2_5": pam.format(2, forms[1]), "3_9": line.format(3, "9.9.9.9")}
        g = source_groups(texts)
        assert g["1_1"] == g["2_5"] != g["3_9"], forms


def test_time_split_refuses_window_names_without_a_line_order():
    """Session 44: a user's folder numbered auth_data_<k>_0.txt (Y not a first line number) read as 40 logs of one window
    each under dataset.split_by=time, and the refusal said "raise dataset.test_fraction or add windows", neither of which
    helps. It now names the key and the file names, and what Y must be."""
    from sectune.data.window_splits import split_auth_windows

    d = OmegaConf.create({"val_fraction": 0.15, "test_fraction": 0.15, "split_seed": 0, "split_by": "time"})
    items = [(f"{k}_0", ("benign", "suspicious", "malicious")[k % 3], "x") for k in range(1, 41)]
    with pytest.raises(ConfigError, match=r"^dataset.split_by=time: the 40 windows' names give no time order.*"
                                          r"\(auth_data_1_0.txt, then auth_data_2_0.txt\).*dataset.split_by=window or source"):
        split_auth_windows(items, d)
    # one log among them whose Y rises is a time order: split as before (its windows held out, the rest train)
    items[:10] = [(f"{k}_{k * 10}", lab, text) for k, (_, lab, text) in enumerate(items[:10], 1)]
    where = split_auth_windows(items, d)
    assert where["test"] == {"9_90", "10_100"} and where["validation"] == {"7_70", "8_80"}
