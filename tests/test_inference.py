import pytest

from sectune.inference import extract_json


def test_extract_plain_object_after_text():
    assert extract_json('analysis: {"verdict": "benign", "n": 1} trailing') == {"verdict": "benign", "n": 1}


def test_extract_ignores_braces_in_strings_and_takes_first_object():
    text = '{"summary": "a } inside", "k": [1, 2]} {"second": true}'
    assert extract_json(text) == {"summary": "a } inside", "k": [1, 2]}


def test_extract_repairs_trailing_comma_and_missing_brace():
    assert extract_json('{"verdict": "malicious", "failed_logins": 3,}') == {"verdict": "malicious", "failed_logins": 3}
    assert extract_json('{"verdict": "suspicious", "brute_force": false') == {"verdict": "suspicious", "brute_force": False}


@pytest.mark.parametrize("text", ["no json here", "", "[1, 2, 3]"])
def test_extract_raises_value_error_saying_why(text):
    with pytest.raises(ValueError):
        extract_json(text)
