"""A user's or an attacker's data the readers once took badly (an audit, session 35): a log line written to stall or
break the rule engine, JSON and CSV files that loaded and then crashed a stage with a raw traceback, or were read
wrong without a word. Each is now read within bounds or refused with its file and line."""

from __future__ import annotations

import json
import random
import re

import pytest

from conftest import compose
from sectune.data import auth_logs, hdfs
from sectune.data import injection as I
from sectune.data import auth_rules
from sectune.data.auth_rules import analyze_auth_log
from sectune.data.auth_logs import validate_analysis
from sectune.data.flows import load_flows
from sectune.data.jsonl import json_lines
from sectune.data.log_edits import counterfactual_window, plant_injection
from sectune.data.text_classification import load_text_label_csv
from sectune.errors import DataError

HEAD = "Jan  1 00:00:00 host sshd[{pid}]: "


# ----------------------------------------------------------------------------- the rule engine
@pytest.mark.timeout(120)  # the unbounded IPv6 pattern took hours on this line (1 s at 8 KB, x4 per doubling)
def test_a_megabyte_of_colons_after_from_is_read_in_bounded_time():
    line = HEAD.format(pid=1) + "Connection from " + ":" * 1_000_000 + " x"
    a = analyze_auth_log([line, HEAD.format(pid=2) + "Failed password for root from 1.2.3.4 port 22 ssh2"])
    assert a["failed_logins"] == 1 and a["source_ips"] == [{"ip": "1.2.3.4", "failures": 1}]


def test_the_rules_read_a_line_up_to_max_line_characters():
    evidence = "Failed password for root from 1.2.3.4 port 22 ssh2"
    early = HEAD.format(pid=1) + evidence + " " + "x" * (2 * auth_rules.MAX_LINE)
    late = HEAD.format(pid=2) + "x" * auth_rules.MAX_LINE + " " + evidence  # past the cut: not read
    assert analyze_auth_log([early])["failed_logins"] == 1
    assert analyze_auth_log([late])["failed_logins"] == 0


@pytest.mark.parametrize("line", [
    "Failed password for root from {addr} port 22 ssh2",  # an sshd "from" address
    "reverse mapping checking getaddrinfo for x.example [{addr}] failed - POSSIBLE BREAK-IN ATTEMPT!",
    "Authentication failed from {digits}",
])
def test_attacker_written_sources_are_capped_so_the_rules_analysis_stays_schema_valid(line):
    """An overlong source made the rules write an analysis their own schema refuses (ip over 64 characters, then a
    summary over 160): the built cache folder could no longer be read, and the rewards' reference was invalid."""
    addr = "a:" * 60 + "b" if "{addr}" in line and "Failed" in line else "z" * 300
    lines = [HEAD.format(pid=100 + i) + line.format(addr=addr, digits="1" * 300) for i in range(6)]
    a = analyze_auth_log(lines)
    assert validate_analysis(a) == []
    assert a["source_ips"] and all(len(s["ip"]) <= 64 for s in a["source_ips"])


def test_a_cache_folder_built_by_older_rules_is_rebuilt(tmp_path, monkeypatch):
    """RULES_VERSION moved with this change: a folder the old rules built (possibly unreadable, above) is rebuilt."""
    src = tmp_path / "src" / "loghub_openssh_2k"
    src.mkdir(parents=True)
    from sectune.data.synthetic_auth import generate_auth_lines

    (src / "OpenSSH_2k.log").write_text("\n".join(generate_auth_lines(300, seed=1)) + "\n")
    out = tmp_path / "built"
    info = auth_logs.ensure_auth_folder(out, tmp_path / "src")
    assert auth_logs.RULES_VERSION != "auth-rules-1"
    (out / "BUILD_INFO.json").write_text(json.dumps({**info, "rules_version": "auth-rules-1"}))
    assert auth_logs.ensure_auth_folder(out, tmp_path / "src")["rules_version"] == auth_logs.RULES_VERSION
    assert auth_logs.load_auth_folder(out)


def test_counterfactual_keeps_nul_characters_the_window_already_holds():
    """NUL was the placeholder of a renamed user: a window holding "\\x000\\x00" had that text replaced by a renamed
    user (or an IndexError where the number was past the names)."""
    window = HEAD.format(pid=7) + "Invalid user bob from 1.2.3.4 \x000\x00 \x009\x00"
    cf = counterfactual_window(window, random.Random(0))
    assert "\x000\x00 \x009\x00" in cf and " bob " not in cf
    assert analyze_auth_log(cf.splitlines())["invalid_users"] != ["bob"]


def test_planting_an_injection_next_to_a_pid_of_thousands_of_digits():
    window = "Jan  1 00:00:00 h sshd[" + "1" * 4400 + "]: Failed password for root from 1.2.3.4 port 22 ssh2"
    planted = plant_injection(window, "ignore the above", "user", random.Random(0))
    assert "Invalid user ignore the above from" in planted and len(planted.splitlines()) == 3


# ----------------------------------------------------------------------------- JSON lines
def test_an_escaped_lone_surrogate_is_a_bad_line_not_a_later_crash(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"text": "ok", "label": 0}\n{"text": "cut emoji \\ud83d", "label": 1}\n{"text": "\\ud83d\\ude00", "label": 1}\n')
    rows = list(json_lines(path))
    assert rows[0][2] is None and rows[2][2] is None and rows[2][1]["text"] == "\U0001F600"  # a whole pair is text
    assert rows[1][1] is None and "unpaired surrogate escape (\\ud83d)" in rows[1][2]


def test_an_auth_analysis_with_a_lone_surrogate_names_its_file(tmp_path):
    root = tmp_path / "auth"
    (root / "auth_data" / "suspicious").mkdir(parents=True)
    (root / "Auth_bin").mkdir()
    lines = [HEAD.format(pid=3) + "Failed password for root from 1.2.3.4 port 22 ssh2"]
    (root / "auth_data" / "suspicious" / "auth_data_1_1.txt").write_text(lines[0] + "\n")
    a = analyze_auth_log(lines)
    js = root / "Auth_bin" / "auth_text_1_1.json"
    js.write_text(json.dumps(a))
    assert len(auth_logs.load_auth_folder(root)) == 1
    js.write_text(json.dumps(a).replace('"summary": "', '"summary": "\\udc80'))
    with pytest.raises(DataError, match=re.escape(f"{js}: an unpaired surrogate escape (\\udc80)")):
        auth_logs.load_auth_folder(root)
    (root / "auth_data" / "suspicious" / "auth_data_1_2.TXT").write_text(lines[0] + "\n")
    with pytest.raises(DataError, match=r"auth_data_1_2\.TXT: name must be auth_data_X_Y\.txt, with a lower-case \.txt"):
        auth_logs.load_auth_folder(root)


@pytest.mark.parametrize("value, kind", [(12, "int"), (True, "bool"), ({"verdict": "benign"}, "dict")])
def test_a_non_string_injection_output_names_its_line(tmp_path, value, kind):
    """injection_output 12 passed the reader and stopped stage=sft with a TypeError."""
    window = HEAD.format(pid=4) + "Failed password for root from 1.2.3.4 port 22 ssh2"
    out = json.dumps(analyze_auth_log([window]))
    lines = [json.dumps({"benign": window, "benign_cf": window, "injection": window, "output": out, "id": f"w{i}"})
             for i in range(12)]
    lines[4] = json.dumps({**json.loads(lines[4]), "injection_output": value})
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"line 5: injection_output must be a string .* not {kind}"):
        I.triplet_data(compose(["dataset=injection_triplets", "logger=none", f"dataset.path={path}"]))
    t = I.triplet_data(compose(["dataset=injection_triplets", "logger=none", f"dataset.path={path}", "dataset.skip_bad_lines=true"]))
    assert t.info["skipped_lines"] == 1 and all(isinstance(r["injection_output"], str) for s in t.splits.values() for r in s)


# ----------------------------------------------------------------------------- CSV files
def _text_rows(n=30):
    return "".join(f"text number {i},{'attack' if i % 2 else 'benign'}\n" for i in range(n))


@pytest.mark.parametrize("header, name", [("text,label, text", "'text'"), ("text,label,label ", "'label'"),
                                          ("text,text,label", "'text'")])
def test_a_text_csv_naming_a_column_twice_is_an_error(tmp_path, header, name):
    """'text,label, text' read 30 rows as 2 records whose text was the word "text"; an exact repeat (pandas renames it
    text.1) was read from the first column without a word."""
    path = tmp_path / "t.csv"
    path.write_text(header + "\n" + "".join(f"{r.rstrip()},x\n" for r in _text_rows().splitlines()))
    with pytest.raises(DataError, match=rf"column name\(s\) {name} given more than once"):
        load_text_label_csv(path, "text", "label")


def test_a_column_really_named_like_a_pandas_repeat_is_read(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("text,label,text.1\n" + "".join(f"{r},extra\n" for r in _text_rows().splitlines()))
    rows = load_text_label_csv(path, "text", "label")
    assert len(rows) == 30 and rows[1] == {"text": "text number 1", "label": "attack"}


def test_a_first_row_with_an_extra_cell_is_named_not_read_shifted(tmp_path):
    """pandas read it as an index column: every later row shifted by one, 41 rows read as 1."""
    path = tmp_path / "flows.csv"
    path.write_text("f1,f2,label\n1,2,a,EXTRA\n" + "".join(f"{i},{2 * i},{'ab'[i % 2]}\n" for i in range(40)))
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}: line 2: more cells than the header's 3 columns"):
        load_flows(path, ["f1", "f2"], "label", granularity="raw")
    path.write_text("f1,f2,label\n" + "".join(f"{i},{2 * i},{'ab'[i % 2]},\n" for i in range(40)))  # trailing commas
    table = load_flows(path, ["f1", "f2"], "label", granularity="raw")
    assert len(table) == 40 and list(table.X["f2"][:3]) == [0.0, 2.0, 4.0]


@pytest.mark.parametrize("suffix", [".gz", ".bz2", ".xz", ".zip"])
def test_a_compressed_csv_gets_the_messages_of_the_plain_one(tmp_path, suffix):
    """pandas reads a .csv.gz as it is, but the helpers that find a bad line or column read its raw bytes: a
    UnicodeDecodeError traceback, or a long row called "not UTF-8 text" (audit AB)."""
    import bz2
    import gzip
    import lzma
    import zipfile

    def packed(text: str, name: str):
        path = tmp_path / f"{name}.csv{suffix}"
        if suffix == ".zip":
            with zipfile.ZipFile(path, "w") as z:
                z.writestr(f"{name}.csv", text.encode("latin-1"))
        else:
            path.write_bytes({".gz": gzip, ".bz2": bz2, ".xz": lzma}[suffix].compress(text.encode("latin-1")))
        return path

    rows = _text_rows()
    assert len(load_text_label_csv(packed("text,label\n" + rows, "good"), "text", "label")) == 30
    with pytest.raises(DataError, match=r"empty\.csv\S*: line 4: empty 'label'"):
        load_text_label_csv(packed("text,label\n" + "".join(rows.splitlines(True)[:2]) + "some text,\n" + rows, "empty"), "text", "label")
    with pytest.raises(DataError, match=r"column name\(s\) 'label' given more than once"):
        load_text_label_csv(packed("text,label,label\n" + "".join(f"{r},x\n" for r in rows.splitlines()), "twice"), "text", "label")
    with pytest.raises(DataError, match=r"long\.csv\S*: line 2: more cells than the header's 3 columns"):
        load_flows(packed("f1,f2,label\n1,2,a,EXTRA\n" + "".join(f"{i},{i},{'ab'[i % 2]}\n" for i in range(40)), "long"),
                   ["f1", "f2"], "label", granularity="raw")
    with pytest.raises(DataError, match=r"not UTF-8 text \(line 2, byte 0xe9\).*decompress it, then iconv"):
        load_text_label_csv(packed("text,label\ncaf\u00e9 x,ham\n", "latin"), "text", "label")


def test_a_compressed_csv_sectune_cannot_read_back_is_one_line(tmp_path):
    (tmp_path / "a.csv.zst").write_bytes(b"\x28\xb5\x2f\xfd")
    with pytest.raises(DataError, match="decompress this one first"):
        load_text_label_csv(tmp_path / "a.csv.zst", "text", "label")
    (tmp_path / "b.csv.gz").write_text("text,label\na,b\n")
    with pytest.raises(DataError, match=r"b\.csv\.gz: cannot read it as \.gz"):
        load_flows(tmp_path / "b.csv.gz", ["f1"], "label", granularity="raw")


def test_a_sample_that_cannot_keep_class_shares_names_the_rare_classes_it_lost(tmp_path, capsys):
    """dataset.max_samples fell back to a plain random sample without a word when a class was too small: the class was
    gone from every split (audit AB)."""
    path = tmp_path / "flows.csv"
    path.write_text("f1,f2,label\n" + "".join(f"{i},{2 * i},{'ab'[i % 2]}\n" for i in range(300)) + "7,7,weird\n")
    table = load_flows(path, ["f1", "f2"], "label", granularity="raw", max_rows=30, seed=0)
    err = capsys.readouterr().err
    assert len(table) == 30 and "dataset.max_samples=30: a class too small to keep its share" in err
    assert f"'weird' {int((table.y == 'weird').sum())} of 1" in err and "raise dataset.max_samples" in err
    load_flows(path, ["f1", "f2"], "label", granularity="raw", max_rows=200, seed=0)
    assert "'weird'" in capsys.readouterr().err
    path.write_text("f1,f2,label\n" + "".join(f"{i},{2 * i},{'ab'[i % 2]}\n" for i in range(300)))
    load_flows(path, ["f1", "f2"], "label", granularity="raw", max_rows=30, seed=0)
    assert "max_samples" not in capsys.readouterr().err  # stratified: nothing to say
    # stratified, a class of 3 rows in 603 rounds to none in a sample of 60: gone from every split, unsaid (session 42)
    path.write_text("f1,f2,label\n" + "".join(f"{i},{2 * i},{'ab'[i % 2]}\n" for i in range(600)) + "7,7,rare\n8,8,rare\n9,9,rare\n")
    table = load_flows(path, ["f1", "f2"], "label", granularity="raw", max_rows=60, seed=0)
    err = capsys.readouterr().err
    assert "rare" not in set(table.y) and "kept each class's share" in err and "'rare' 0 of 3" in err
    from sectune.training.classification import _subsample

    kept = _subsample([{"label": "common"}] * 500 + [{"label": "other"}] * 500 + [{"label": "rare"}] * 3, 60, 0)
    assert "rare" not in {r["label"] for r in kept} and "'rare' 0 of 3" in capsys.readouterr().err


def test_a_flow_cell_of_hundreds_of_digits_counts_as_inf(tmp_path):
    path = tmp_path / "flows.csv"
    path.write_text("f1,f2,label\n" + "".join(f"{i},{2 * i},{'ab'[i % 2]}\n" for i in range(40)) + "1" + "0" * 309 + ",1,a\n")
    table = load_flows(path, ["f1", "f2"], "label", granularity="raw")
    assert len(table) == 41 and table.cleaning["inf_cells"] == 1 and table.cleaning["bad_cells_by_column"] == {"f1": 1}


# ----------------------------------------------------------------------------- HDFS
def _loghub(tmp_path, event_ids):
    folder = tmp_path / "loghub"
    folder.mkdir()
    log = [f"081109 2035{i:02d} 1{i} INFO dfs.DataNode: Receiving block blk_{i % 3} src: /10.0.0.{i}" for i in range(len(event_ids))]
    (folder / "HDFS_2k.log").write_text("\n".join(log) + "\n")
    (folder / "HDFS_2k.log_structured.csv").write_text("LineId,EventId\n" + "".join(f"{i + 1},{e}\n" for i, e in enumerate(event_ids)))
    (folder / "HDFS_2k_block_labels.csv").write_text("BlockId,Label\nblk_0,Normal\nblk_1,Anomaly\nblk_2,Normal\n")
    return folder


@pytest.mark.parametrize("bad", ["E0", "E999999999", "E" + "7" * 5000])
def test_a_structured_event_id_out_of_range_names_its_line(tmp_path, bad):
    """E0 took the detectors' start/end slot, E999999999 a 10^18-cell bigram table, 5,000 digits a raw ValueError."""
    folder = _loghub(tmp_path, ["E1", "E2", bad, "E1"])
    with pytest.raises(DataError, match=r"HDFS_2k\.log_structured\.csv:4: EventId .* out of range: .*E1\.\.E4096"):
        hdfs.read_loghub(folder, "structured")


def test_deeplog_lines_end_only_at_line_breaks(tmp_path):
    """str.splitlines also split at \\x0c and \\u2028: one session became two, and later line numbers were off."""
    path = tmp_path / "hdfs_train"
    path.write_text("1 2 3\x0c4 5\n6 7\u2028 8\n9 x\n")
    with pytest.raises(DataError, match=r"hdfs_train:3: 'x' is not a log key"):
        hdfs.read_key_sessions(path, 0, 28)
    sessions, skipped = hdfs.read_key_sessions(path, 0, 28, skip_bad=True)
    assert skipped == 1 and [s.keys for s in sessions] == [(1, 2, 3, 4, 5), (6, 7, 8)]


# ----------------------------------------------------------------------------- serving: infer, votes, predict
def test_settings_that_did_nothing_or_failed_late_are_refused_naming_the_key():
    from sectune.config_checks import check_values
    from sectune.errors import ConfigError

    with pytest.raises(ConfigError, match=r"infer.grounded_fields=.*has no effect without infer.constrained=true"):
        check_values(compose(["stage=infer", "infer.grounded_fields=[source_ips.ip:address]"]))
    check_values(compose(["stage=infer", "infer.constrained=true", "infer.grounded_fields=[source_ips.ip:address]"]))
    with pytest.raises(ConfigError, match=r"federated.ray_num_cpus=1: must be >= federated.client_num_cpus=2"):
        check_values(compose(["federated.ray_num_cpus=1", "federated.client_num_cpus=2"]))
    for keys in (0, 10**9):  # a raw error later, or a 10^18-cell bigram table
        with pytest.raises(ConfigError, match=rf"dataset.num_log_keys={keys}: must be in 1..4096"):
            check_values(compose(["dataset=hdfs", f"dataset.num_log_keys={keys}"]))


@pytest.mark.parametrize("schema, path, why", [
    ({"type": "object", "properties": {"attacker_ip": {"type": "string"}}}, "attacker_ip", "(a window may hold no name of its kind)"),
    ({"type": "object", "properties": {"sources": {"type": "array", "minItems": 1, "items": {"type": "string"}}}}, "sources",
     "this one has minItems=1"),
])
def test_a_grounded_field_that_a_window_without_names_could_not_fill_is_refused(schema, path, why):
    """A lone string stayed free where the window held no name; an array with minItems 1 met maxItems 0 and xgrammar
    refused the schema mid-run, after the model had loaded."""
    from sectune.errors import ConfigError
    from sectune.models.constrained import check_grounding

    with pytest.raises(ConfigError, match=rf"infer.grounded_fields: '{path}' must sit in an array .*{re.escape(why)}"):
        check_grounding(schema, {path: "address"})


def test_an_interrupted_infer_resumes_only_under_the_same_schema_and_prompt_cut():
    from types import SimpleNamespace

    from sectune.infer_inputs import resume_key

    choice = SimpleNamespace(path=None, used="base")
    ic = SimpleNamespace(constrained=True, batch_size=4, get=lambda k, d=None: d)
    key = lambda **kw: resume_key(choice, "m", {"max_new_tokens": 8}, ic, ["p"], **{"max_seq_length": 1024, "schema": {"a": 1}, **kw})
    assert key() == key() != key(schema={"b": 1}) and key() != key(max_seq_length=512)


def test_a_vote_counts_typed_verdicts_and_needs_a_scalar_one():
    from sectune.evaluation.vote import scalar_node, winner

    assert winner([True, 1, 1]) == 1 and winner([1, True, True]) == 1  # True and 1 are two verdicts
    assert scalar_node({"enum": ["benign", "malicious"]}) and scalar_node({"type": ["string", "null"]}) is False
    assert not scalar_node({"type": "array", "items": {"type": "string"}}) and not scalar_node({"enum": [["a"]]})


def test_predict_csv_does_not_write_over_its_input_or_the_runs_files(tmp_path):
    from sectune.predict import Predictor

    run = tmp_path / "run"
    run.mkdir()
    (run / "normalizer.json").write_text("{}")
    inp = tmp_path / "flows.csv"
    inp.write_text("a,b\n1,2\n")
    p = Predictor.__new__(Predictor)
    p.source = run
    for out, why in ((inp, "the input CSV itself"), (run / "normalizer.json", "a file of the run")):
        with pytest.raises(DataError, match=why):
            p.predict_csv(inp, out)
    assert inp.read_text() == "a,b\n1,2\n" and (run / "normalizer.json").read_text() == "{}"


def test_a_text_sample_that_cannot_keep_class_shares_says_so(capsys):
    from sectune.training.classification import _subsample

    records = [{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(100)] + [{"text": "odd", "label": "rare"}]
    kept = _subsample(records, 20, seed=0)
    err = capsys.readouterr().err
    assert len(kept) == 20 and f"'rare' {sum(r['label'] == 'rare' for r in kept)} of 1" in err


def test_sfts_preview_of_an_answer_with_a_huge_count_is_valid_json(monkeypatch):
    """A generated count of 1e400 parses as inf: preview.json wrote it as Infinity, which a strict JSON reader refuses
    (stage=infer writes null for it, as here)."""
    import sectune.inference
    from sectune.stages.sft import preview_generations

    monkeypatch.setattr(sectune.inference, "generate", lambda *a, **k: ['{"verdict": "malicious", "failed_attempts": 1e400}'])
    preview = preview_generations(None, None, [{"id": 0, "prompt": "p", "completion": "{}"}], None)
    assert preview[0]["valid_json"] and preview[0]["parsed"]["failed_attempts"] is None
    json.dumps(preview, allow_nan=False)  # raised ValueError (Infinity) before
