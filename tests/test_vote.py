"""A vote of analysts (``evaluate.vote_with``, sectune/evaluation/vote.py): the rule on hand-made keys and answers, its
scoring as one analyst's answers, and the settings it refuses."""

from __future__ import annotations

import json

import pytest

from conftest import compose
from sectune.config_checks import check_values
from sectune.errors import ConfigError
from sectune.evaluation import vote
from sectune.evaluation.injection_eval import attack_metrics, vote_of
from test_injection_data import _answer, _rec


@pytest.mark.parametrize("keys, kept", [
    (["a", "b", "b"], 1),          # the majority wins; its earliest member's answer is kept
    (["a", "b", "c"], 0),          # a three-way split goes to the first member
    (["b", "a", "a", "b"], 0),     # a 2-2 tie goes to the verdict the earliest member gave
    ([None, "b", "a"], 1),         # an invalid answer votes for nothing: the split is b/a, and b came first
    ([None, None, "a"], 2),        # one valid answer beats two invalid ones
    ([None, None, None], 0),       # nothing valid: the first member's answer
    (["a", None, "b", "b"], 2),
])
def test_the_verdict_most_members_give_wins_a_tie_going_to_the_earliest(keys, kept):
    assert vote.winner(keys) == kept


def test_an_answer_votes_for_its_verdict_only_when_it_is_a_schema_valid_analysis():
    assert vote.verdict_key(_answer("benign")) == "benign"
    assert vote.verdict_key('{"verdict": "benign"}') is None  # parses, but is no analysis
    assert vote.verdict_key("I cannot answer that") is None
    assert vote.text_key("  the   same\nanswer ") == vote.text_key("the same answer") and vote.text_key("  ") is None


def test_the_kept_answer_is_a_members_whole_answer_and_every_member_answers_every_input():
    m0 = [_answer("benign"), _answer("malicious"), "garbage"]
    m1 = [_answer("malicious"), _answer("suspicious"), _answer("benign") + " "]
    m2 = [_answer("malicious"), "garbage", _answer("benign")]
    kept, chosen = vote.voted([m0, m1, m2])
    assert chosen == [1, 0, 1] and kept == [m1[0], m0[1], m1[2]]
    with pytest.raises(ValueError, match="every member answers every input"):
        vote.voted([m0, m1[:2]])


def _windows(injected: list[str], clean: list[str]) -> list[dict]:
    return [{"injected_answer": i, "clean_answer": c, "verdict": json.loads(i[6:])["verdict"] if i.startswith("Sure.") else None,
             "schema_valid": i.startswith("Sure."), "clean_verdict": json.loads(c[6:])["verdict"]} for i, c in zip(injected, clean)]


def test_the_vote_is_scored_as_one_analysts_answers_with_every_members_verdict_beside_it():
    # two windows; the injected window's expected verdict is malicious in both, the clean window's benign in both
    records = [_rec("malicious", "benign", "benign"), _rec("malicious", "benign", "benign")]
    a = _windows([_answer("benign"), _answer("malicious")], [_answer("benign"), _answer("suspicious")])  # attacked on window 1
    b = _windows([_answer("malicious"), "derailed"], [_answer("suspicious"), _answer("benign")])          # attacked on window 2
    c = _windows([_answer("malicious"), _answer("benign")], [_answer("benign"), _answer("suspicious")])  # attacked on window 2
    metrics, windows = vote_of(records, [a, b, c])
    # window 1: benign / malicious / malicious -> malicious, kept from b; window 2: malicious / invalid / benign -> a 1-1 split,
    # the first member's malicious wins. Clean: benign wins 2-1 on window 1, suspicious 2-1 on window 2
    assert [w["kept_voter"] for w in windows] == [1, 0] and [w["kept_clean_voter"] for w in windows] == [0, 0]
    assert metrics["attack_success_rate"] == 0.0 and metrics["clean_verdict_accuracy"] == 0.5
    assert windows[1]["voter_verdicts"] == ["malicious", None, "benign"]
    assert windows[0]["voter_clean_verdicts"] == ["benign", "suspicious", "benign"]
    # each member alone: attacked on one window of two
    for m in (a, b, c):
        alone, _ = attack_metrics(records, [w["injected_answer"] for w in m], [w["clean_answer"] for w in m])
        assert alone["attack_success_rate"] == 0.5


def test_a_vote_of_two_or_of_one_analyst_twice_is_refused(tmp_path):
    from types import SimpleNamespace

    a, b, c = (SimpleNamespace(path=tmp_path / n / "model") for n in "abc")
    with pytest.raises(ConfigError, match=r"^evaluate.vote_with=.*a vote of two analysts is evaluate.model_dir's answer"):
        vote.check_voters(["ra", "rb"], [a, b], "evaluate")
    with pytest.raises(ConfigError, match=r"^evaluate.vote_with: rc answers with the same model as ra"):
        vote.check_voters(["ra", "rb", "rc"], [a, b, a], "evaluate")
    vote.check_voters(["ra", "rb", "rc"], [a, b, c], "evaluate")


def test_vote_with_is_refused_where_no_vote_is_scored_and_taken_where_a_step_scores_one(tmp_path):
    from sectune.evaluation.injection_eval import choose_analyst
    from sectune.stages import pipeline

    with pytest.raises(ConfigError, match=r"^evaluate.vote_with=\['x', 'y'\]: a vote of analysts is scored by stage=evaluate "
                                          r"dataset=injection_triplets \(not dataset=cic_iot_2023\)"):
        check_values(compose(["stage=evaluate", "dataset=cic_iot_2023", "evaluate.vote_with=[x,y]", "logger=none"]))
    check_values(compose(["stage=evaluate", "dataset=injection_triplets", "evaluate.vote_with=[x,y]", "logger=none"]))
    with pytest.raises(ConfigError, match=r"^infer.vote_with=\['x', 'y'\]: needs infer.model_dir"):
        check_values(compose(["stage=infer", "infer.vote_with=[x,y]", "logger=none"]))
    # a pipeline hands its infer step the model_dir (its own policy votes first): the vote is given for the whole pipeline
    cfg = compose(["stage=pipeline", "pipeline.steps=[sft,infer]", "infer.vote_with=[x,y]", "logger=none"])
    check_values(cfg)
    step = pipeline.compose_step(cfg, pipeline.step_overrides_base(["infer.vote_with=[x,y]", "logger=none"]), "infer", tmp_path,
                                 ["sft", "infer"])
    assert list(step.cfg.infer.vote_with) == ["x", "y"] and step.cfg.infer.model_dir is not None
    # a voter's error names the key it came from
    with pytest.raises(ConfigError, match=r"^evaluate.vote_with=.*nope: no such directory"):
        choose_analyst(str(tmp_path / "nope"), "evaluate.vote_with")


def test_a_pipelines_held_out_table_never_takes_a_votes_answers_as_one_policys(tmp_path):
    """The table reuses the infer step's answers as its policy's greedy pass; a vote's (every voter an sft run: one
    model_used) are no one policy's."""
    from types import SimpleNamespace

    from sectune import runner
    from sectune.evaluation import pipeline_heldout as H

    windows = [SimpleNamespace(id="w1")]
    step_dir = tmp_path / "infer"
    step_dir.mkdir()
    (step_dir / "analyses.json").write_text(json.dumps([{"input": "w1.log", "model_used": "sft", "generated": "{}"}]))
    def result(**metrics):
        runner.write_json_atomic(step_dir / "result.json", {"stage": "infer", "status": "succeeded", "artifacts": {"output": "analyses.json"},
                                                            "metrics": {"generation_s": 1.0, **metrics}})

    result(sampled=0)

    def step(*overrides):
        cfg = compose(["stage=infer", "logger=none", f"infer.input_file={tmp_path / H.WINDOWS_DIR}", *overrides])
        return SimpleNamespace(name="infer", cfg=cfg, dir=step_dir)

    batch = int(step().cfg.infer.batch_size)
    assert H.infer_answers([step()], tmp_path, windows, batch) == {"sft": (["{}"], 1.0)}
    assert H.infer_answers([step("infer.vote_with=[a,b]")], tmp_path, windows, batch) == {}
    # infer decodes as the policy's run did: sampled answers (or a run that did not say) are not the greedy row (session 42)
    result(sampled=1)
    assert H.infer_answers([step()], tmp_path, windows, batch) == {}
    result()
    assert H.infer_answers([step()], tmp_path, windows, batch) == {}
    result(sampled=0)  # a 4-bit policy: infer's kernel layout is not the table's (session 42)
    four_bit = SimpleNamespace(name="sft", cfg=compose(["logger=none", "quantization=nf4", "lora=r4_attention"]), dir=tmp_path / "sft")
    assert H.infer_answers([four_bit, step()], tmp_path, windows, batch) == {}
    plain = SimpleNamespace(name="sft", cfg=compose(["logger=none"]), dir=tmp_path / "sft")
    assert H.infer_answers([plain, step()], tmp_path, windows, batch) == {"sft": (["{}"], 1.0)}
