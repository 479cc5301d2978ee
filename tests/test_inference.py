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


def test_deeply_nested_or_nan_output_is_an_invalid_answer_not_a_crash():
    """1,000 nested brackets raised RecursionError (callers catch ValueError: the whole infer batch was lost, and a
    GRPO reward crashed mid-training); NaN/Infinity were accepted and made analyses.json invalid JSON."""
    with pytest.raises(ValueError, match="nests more than"):
        extract_json('{"verdict": ' + "[" * 1000 + "]" * 1000 + "}")
    for text in ('{"verdict": "benign", "failed_logins": NaN}', '{"verdict": "benign", "x": Infinity}'):
        with pytest.raises(ValueError):
            extract_json(text)
    assert extract_json('{"verdict": "benign", "users": [["a"]]}') == {"verdict": "benign", "users": [["a"]]}
