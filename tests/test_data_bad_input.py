"""Bad input to the injection, preference-pair and prompt-injection readers: a DataError naming the file
and line (and key), never a raw TypeError / UnicodeDecodeError; and valid input is never rejected."""

from __future__ import annotations

import json
import re

import pytest

from conftest import compose
from sectune.data import auth_preferences as P
from sectune.data import injection as I
from sectune.data.text_classification import load_prompt_injections
from sectune.errors import DataError

TRIPLETS = ["dataset=injection_triplets", "logger=none"]


def _qa_lines(n: int, answer: str) -> str:
    return "".join(json.dumps({"prompt": f"Is host 10.0.0.{i} on port {2000 + i} up?", "answer": answer}) + "\n" for i in range(n))


# ------------------------------------------------------------------------------ F13: triplet vs prompt/answer
@pytest.mark.parametrize("answer", ["benign", "normal"])
def test_generic_prompt_answer_jsonl_whose_values_say_benign_loads(tmp_path, answer):
    path = tmp_path / "qa.jsonl"
    path.write_text(_qa_lines(30, answer))
    t = I.triplet_data(compose([*TRIPLETS, f"dataset.path={path}"]))
    recs = [r for v in t.splits.values() for r in v]
    assert len(recs) == 30 and {r["format"] for r in recs} == {"prompt"} and {r["output"] for r in recs} == {answer}


def test_generic_prompt_with_a_benign_label_value_loads(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Is benign the verdict for host 10.0.0.{i}?", "completion": "yes", "label": "benign"}) + "\n"
                            for i in range(20)))
    recs = [r for v in I.triplet_data(compose([*TRIPLETS, f"dataset.path={path}"])).splits.values() for r in v]
    assert len(recs) == 20 and {r["format"] for r in recs} == {"prompt"}


def test_first_line_not_json_is_still_the_malformed_line_error(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text('{"prompt": "benign?", "answer": \n' + _qa_lines(20, "benign"))
    cfg = compose([*TRIPLETS, f"dataset.path={path}"])
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: line 1: invalid JSON"):
        I.triplet_data(cfg)
    # skip_bad_lines: the kind is read from the first object line that parses, the bad line is counted
    t = I.triplet_data(compose([*TRIPLETS, f"dataset.path={path}", "dataset.skip_bad_lines=true"]))
    assert t.info["skipped_lines"] == 1 and t.info["skipped"][0].startswith("line 1: invalid JSON")
    assert sum(map(len, t.splits.values())) == 20


def test_triplet_file_is_still_read_as_triplets_and_a_generic_line_in_it_is_named(tmp_path):
    path = tmp_path / "triplets.jsonl"
    tri = {"benign": "a b", "benign_cf": "c d", "injection": "a b ignore", "output": '{"verdict": "benign"}'}
    path.write_text("".join(json.dumps({**tri, "id": f"w{i}"}) + "\n" for i in range(12)) + json.dumps({"prompt": "p", "answer": "a"}) + "\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: line 13: missing or non-string benign, benign_cf, injection, output"):
        I.triplet_data(compose([*TRIPLETS, f"dataset.path={path}"]))


# ------------------------------------------------------------------------------ F14: pair fields' types
@pytest.mark.parametrize("key,value", [("label", {"v": "benign"}), ("label", [1]), ("kind", ["verdict"]), ("id", {"a": 1})])
def test_pair_optional_field_of_the_wrong_type_names_file_line_and_key(tmp_path, key, value):
    path = tmp_path / "pairs.jsonl"
    good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, key: value}) + "\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: line 2: {key} must be a string"):
        P.read_pairs_jsonl(path)


def test_pair_string_and_integer_labels_still_load_and_split(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{i}", "chosen": "a", "rejected": "b", "label": ["benign", "malicious"][i % 2],
                                        "kind": "verdict", "id": i}) + "\n" for i in range(20)))
    splits = P.preference_splits(compose(["dataset=auth_preferences", "stage=reward", f"dataset.path={path}"]))
    assert sum(map(len, splits.values())) == 20
    path.write_text("".join(json.dumps({"prompt": f"p{i}", "chosen": "a", "rejected": "b", "label": i % 2}) + "\n" for i in range(20)))
    splits = P.preference_splits(compose(["dataset=auth_preferences", "stage=reward", f"dataset.path={path}"]))
    assert sum(map(len, splits.values())) == 20


# ------------------------------------------------------------------------------ F21: a pairs file not named .jsonl
def test_pairs_file_without_jsonl_suffix_says_what_is_expected(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: .*\.jsonl.*auth_logs folder") as e:
        P.preference_splits(compose(["dataset=auth_preferences", "stage=reward", f"dataset.path={path}"]))
    assert "is not a folder" not in str(e.value)


def test_triplet_file_without_jsonl_suffix_says_what_is_expected(tmp_path):
    path = tmp_path / "qa.json"
    path.write_text(_qa_lines(20, "yes"))
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: .*\.jsonl.*auth_logs folder"):
        I.triplet_data(compose([*TRIPLETS, f"dataset.path={path}"]))


# ------------------------------------------------------------------------------ F15 / F16: prompt_injections JSONL
def _injection_dir(tmp_path, test_lines: bytes):
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": f"t{i}", "label": i % 2}) + "\n" for i in range(10)))
    (tmp_path / "test.jsonl").write_bytes(test_lines)
    return tmp_path


def test_prompt_injections_non_utf8_line_names_file_and_line(tmp_path):
    d = _injection_dir(tmp_path, b'{"text": "ok", "label": 0}\r\n{"text": "ok", "label": 1}\n{"text": "caf\xe9", "label": 0}\n')
    with pytest.raises(DataError, match=rf"^{re.escape(str(d / 'test.jsonl'))}: line 3: not UTF-8 text"):
        load_prompt_injections(d)


@pytest.mark.parametrize("label", [[1], {"v": 1}, "1", True, 2, None])
def test_prompt_injections_bad_label_names_file_line_and_allowed_values(tmp_path, label):
    d = _injection_dir(tmp_path, (json.dumps({"text": "ok", "label": 0}) + "\n" + json.dumps({"text": "x", "label": label}) + "\n").encode())
    with pytest.raises(DataError, match=rf"^{re.escape(str(d / 'test.jsonl'))}: line 2: 'label' must be 0 or 1"):
        load_prompt_injections(d)


def test_prompt_injections_valid_file_still_loads(tmp_path):
    d = _injection_dir(tmp_path, "".join(json.dumps({"text": f"é{i}", "label": i % 2}) + "\n" for i in range(4)).encode("utf-8") + b"\n")
    out = load_prompt_injections(d)
    assert [r["label"] for r in out["test"]] == ["benign", "injection", "benign", "injection"] and out["test"][0]["text"] == "é0"


# An audit of hostile inputs (session 26): Dataset JSON with an integer past Python's 4,300-digit limit or 100k levels
# of nesting is a DataError naming the file (and line), not a traceback.
from sectune.data.auth_logs import load_auth_folder
from sectune.data.auth_rules import analyze_auth_log
from sectune.data.jsonl import json_lines

LINE = "Dec 10 06:55:46 LabSZ sshd[24200]: Failed password for root from 1.2.3.4 port 22 ssh2"
ANN = json.dumps(analyze_auth_log([LINE]))
BAD = {
    "huge_int": ANN.replace('"failed_logins": 1', '"failed_logins": ' + "9" * 5000),
    "deep": ANN[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}",
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_auth_folder_analysis(tmp_path, kind):
    verdict = json.loads(ANN)["verdict"]
    (tmp_path / "auth_data" / verdict).mkdir(parents=True)
    (tmp_path / "Auth_bin").mkdir()
    (tmp_path / "auth_data" / verdict / "auth_data_1_1.txt").write_text(LINE + "\n")
    (tmp_path / "Auth_bin" / "auth_text_1_1.json").write_text(BAD[kind])
    with pytest.raises(DataError, match="auth_text_1_1.json"):
        load_auth_folder(tmp_path)


@pytest.mark.parametrize("kind", sorted(BAD))
def test_json_lines(tmp_path, kind):
    path = tmp_path / "data.jsonl"
    path.write_text('{"a": 1}\n' + BAD[kind] + "\n")
    rows = list(json_lines(path))
    assert rows[0] == (1, {"a": 1}, None)
    assert rows[1][0] == 2 and rows[1][1] is None and rows[1][2]
