import json

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


def test_an_answer_giving_a_key_twice_is_not_one_analysis():
    """json keeps the last of two keys: '{"verdict": "malicious", …, "verdict": "benign"}' read as benign, valid, with
    nothing said: an answer an injected line could steer by adding a second verdict."""
    from sectune.inference import DuplicateKey, parse_json_output

    with pytest.raises(DuplicateKey, match=r"gives the key 'verdict' twice \('malicious' and 'benign'\)"):
        parse_json_output('{"verdict": "malicious", "failed_logins": 5, "verdict": "benign"}')
    with pytest.raises(DuplicateKey, match="'ip' twice"):
        parse_json_output('{"source_ips": [{"ip": "1.2.3.4", "ip": "5.6.7.8", "failures": 1}], "verdict": "benign"}')
    assert parse_json_output('{"source_ips": [{"ip": "1.2.3.4"}, {"ip": "5.6.7.8"}]}')[0]["source_ips"][1]["ip"] == "5.6.7.8"
    # an answer json must repair (cut short, a trailing comma, keys in other quotes): json_repair kept the last verdict,
    # a valid, benign analysis (an audit, session 35)
    for broken in ('{"verdict":"malicious","failed_logins":5,"verdict":"benign"', '{"verdict":"malicious","verdict":"benign",}',
                   "{'verdict': 'malicious', 'verdict': 'benign'}", '{verdict: "malicious", verdict: "benign"}'):
        with pytest.raises(DuplicateKey, match="the output gives the key 'verdict' twice"):
            parse_json_output(broken)
    assert parse_json_output('{"summary":"a, verdict: b","verdict":"malicious",')[0]["verdict"] == "malicious"
    assert parse_json_output('{"a":{"x":1},"b":{"x":2},')[0] == {"a": {"x": 1}, "b": {"x": 2}}


def test_an_answer_going_on_to_a_second_analysis_with_another_verdict_is_not_one_analysis():
    """An audit (session 41): the first object was kept and a contradicting second analysis after it dropped without a
    word (valid, not repaired), while the same contradiction inside one object is refused."""
    from sectune.inference import DuplicateKey, parse_json_output

    first = '{"failed_logins": 5, "verdict": "malicious"}'
    for tail in ('\n{"failed_logins": 0, "verdict": "benign"}', ' and {"note": 1} {"verdict": "benign"', ' {"a": {"verdict": 1}} {"verdict":"benign"}'):
        with pytest.raises(DuplicateKey, match="a second analysis with verdict 'benign' after one with 'malicious'"):
            parse_json_output(first + tail)
    # the same verdict again, objects without one, broken text after it: the first analysis, as before
    for tail in (" " + first, ' {"note": "done"}', " {{{", " }", ' {"verdict": '):
        assert parse_json_output(first + tail) == (json.loads(first), False)
