"""stage=infer: the RL → DPO → SFT → base chain, schema-constrained decoding, bad inputs, and model
output that is parsed, never evaluated. In-process runs (``runner.run``) keep it fast; one CLI run
checks the exit code and the one-line error a user sees."""

from __future__ import annotations

import ast
import json
import re
import shutil
import time
from pathlib import Path

import pytest
import torch

from conftest import compose, sectune
from sectune import data, runner
from sectune.data import auth_logs
from sectune.stages import infer

ROOT = Path(__file__).resolve().parents[1]
BASE = ["stage=infer", "logger=none"]
N_HELD_OUT = 8


def run_infer(overrides: list[str], run_dir: Path):
    cfg = compose(BASE + overrides)
    code, _ = runner.run(cfg, run_dir)
    return code, json.loads((run_dir / "result.json").read_text())


@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> Path:
    """The first held-out (validation split) windows of the auth-log folder, one log file each."""
    cfg = compose(BASE)
    val = data.sft_splits(cfg)["validation"]  # the validation windows every stage holds out
    keep = {r["id"] for r in val}
    folder = tmp_path_factory.mktemp("held_out")
    samples = [s for s in auth_logs.load_auth_folder(data.auth_logs_folder(cfg)) if s.id in keep]
    for s in sorted(samples, key=lambda s: len(s.log_text))[:N_HELD_OUT]:  # the shortest: fast prompts
        (folder / f"auth_{s.id}.log").write_text(s.log_text + "\n")
    return folder


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    """A LoRA adapter for the tiny model, saved as stage=sft saves one (safetensors + tokenizer)."""
    from sectune.models import modeling

    cfg = compose(BASE)
    path = modeling.model_path(cfg)
    model = modeling.apply_lora(modeling.load_model(cfg, path=path), cfg)
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    modeling.save_pretrained_atomic(model, modeling.load_tokenizer(cfg, path), out)
    return out


def make_step(step_dir: Path, stage: str, adapter: Path | None, status: str = "succeeded") -> None:
    step_dir.mkdir(parents=True, exist_ok=True)
    artifacts = {}
    if adapter is not None:
        shutil.copytree(adapter, step_dir / "adapter")
        artifacts["adapter"] = "adapter"
    (step_dir / "result.json").write_text(json.dumps({"stage": stage, "status": status, "metrics": {}, "artifacts": artifacts}))


def make_pipeline(root: Path, adapter: Path) -> Path:
    for step in ("sft", "dpo", "rl"):
        make_step(root / step, step, adapter)
    (root / "result.json").write_text(json.dumps({"stage": "pipeline", "status": "succeeded", "metrics": {},
                                                 "artifacts": {s: s for s in ("sft", "dpo", "rl")}}))
    return root


# ------------------------------------------------------------------------------ constrained
def test_constrained_decoding_is_schema_valid_on_held_out_windows(held_out, tmp_path):
    # The tiny model is untrained: left alone it writes 100-digit integers and fills every string to
    # its maxLength. 96 new tokens is less than such an object takes, so the budget must close it.
    out = tmp_path / "answers" / "analyses.json"
    code, res = run_infer([f"infer.input_file={held_out}", "infer.constrained=true", f"infer.output_file={out}",
                           "infer.batch_size=8", "generation.max_new_tokens=96"], tmp_path / "run")
    assert code == 0, res.get("error")
    records = json.loads(out.read_text())
    assert [r["input"] for r in records] == sorted(p.name for p in held_out.iterdir())
    for r in records:
        assert r["json_valid"] and r["schema_valid"] and not r["repaired"] and r["error"] is None, r
        assert r["model_used"] == "base" and not auth_logs.validate_analysis(r["analysis"])
    m = res["metrics"]
    assert m["json_valid_rate"] == m["schema_valid_rate"] == 1.0 and m["repaired_rate"] == 0.0
    assert m["constrained"] == 1 and m["analyses_per_s"] > 0
    assert Path(res["artifacts"]["output"]) == out.resolve()
    assert [r for r in records if r["absent_names"]]  # the untrained model makes names up


def test_grounded_decoding_names_nothing_its_window_does_not_hold(held_out, tmp_path):
    """infer.grounded_fields: the untrained model, which makes names up (the test above), names only the window's own."""
    out = tmp_path / "analyses.json"
    code, res = run_infer([f"infer.input_file={held_out}", "infer.constrained=true", f"infer.output_file={out}",
                           "infer.batch_size=8", "generation.max_new_tokens=96",
                           "infer.grounded_fields=[source_ips.ip:address,invalid_users:user,targeted_users:user]"], tmp_path / "run")
    assert code == 0, res.get("error")
    records = json.loads(out.read_text())
    assert all(r["schema_valid"] for r in records)
    a = [r["analysis"] for r in records]
    assert [r["absent_names"] for r in records if r["absent_names"]] == [] and res["metrics"]["absent_names_rate"] == 0
    named = sum(len(x["source_ips"]) + len(x["invalid_users"]) + len(x["targeted_users"]) for x in a)
    from sectune.paths import shared_data_dir

    if not named and not (shared_data_dir() / "loghub_openssh_2k").is_dir():  # a fresh clone: generated logs, another tokenizer
        pytest.skip("the untrained model built from generated data named no one in these windows, so there is no name to "
                    "check against them (the real logs' model does: the test runs where ../shared/data is)")
    assert named > 0  # names were written, and every one is the window's own


def test_a_grounded_field_the_schema_lacks_is_named_before_a_model_loads(held_out, tmp_path):
    for value, message in (("[source_ips.port:address]", "infer.grounded_fields: 'source_ips.port': the schema has no property 'port' there"),
                           ("[source_ips.ip:ipv4]", "infer.grounded_fields: 'source_ips.ip:ipv4': write path:kind, the kind one of "
                                                    "address, user (source_ips.ip:address)"),
                           ("[source_ips.ip]", "infer.grounded_fields: 'source_ips.ip': write path:kind")):
        run = sectune([*BASE, f"infer.input_file={held_out}", "infer.constrained=true", f"infer.grounded_fields={value}"],
                      tmp_path / "run")
        assert run.returncode == 2, run.stderr[-2000:]
        assert message in run.stderr.strip().splitlines()[-1], run.stderr[-800:]
        assert "answered by" not in run.stdout


def test_the_held_out_tables_constrained_rows_show_grounding_beside_it():
    """The table's constrained row decodes as infer is configured; when that grounds nothing, a second row grounds the
    names, so every make run shows what grounding costs and buys (invented names 0%)."""
    from sectune.evaluation.analyst_eval import Row, constrained_rows, load_windows
    from sectune.evaluation.analyst_scoring import score

    cfg = compose([*BASE, "generation.max_new_tokens=96"])
    test = load_windows(cfg)["test"][:3]
    best = Row(name="SFT", kind="policy", verdicts=[], step="sft")
    rows = constrained_rows(best, [("SFT", "sft", cfg, "base", None)], test, 3, print)
    assert [(r.name, r.constrained, r.grounded) for r in rows] == [
        ("SFT + constrained decoding", True, False), ("SFT + constrained decoding, names grounded", True, True)]
    assert all(rows[1].schema_valid) and score(rows[1], test)["invented_names_rate"] == 0
    grounded = compose([*BASE, "generation.max_new_tokens=96", "infer.grounded_fields=[source_ips.ip:address]"])
    rows = constrained_rows(best, [("SFT", "sft", grounded, "base", None)], test, 3, print)
    assert [(r.name, r.grounded) for r in rows] == [("SFT + constrained decoding", True)]  # grounded as configured, alone


def test_window_addresses_are_its_ips_and_host_names_and_nothing_else():
    from sectune.models.constrained import window_addresses

    text = ("Dec 10 07:28:25 LabSZ sshd[24265]: Failed password for root from 112.95.230.3 port 41506 ssh2\n"
            "Jun 15 02:04:59 combo sshd(pam_unix)[20882]: authentication failure; logname= uid=0 euid=0 tty=NODEVssh "
            "ruser= rhost=220-135-151-1.hinet-ip.hinet.net  user=root\n"
            "Jul  1 09:00:01 combo sshd[1]: Accepted password for bob from 2001:db8::7 port 22 ssh2 (OpenSSH_7.4.1).")
    assert window_addresses(text) == ["112.95.230.3", "2001:db8::7", "220-135-151-1.hinet-ip.hinet.net"]


def test_window_users_are_the_words_sshd_and_pam_name_as_users():
    from sectune.models.constrained import window_users

    text = ("sshd[1]: Invalid user  0101 from 5.188.10.180\nsshd[2]: Failed password for invalid user admin from 1.2.3.4\n"
            "sshd[3]: Failed password for root from 1.2.3.4 port 22 ssh2\npam_unix(sshd:auth): authentication failure; "
            "logname= uid=0 euid=0 tty=ssh ruser= rhost=1.2.3.4  user=oracle\nsshd[4]: Accepted password for bob from 1.2.3.4")
    assert window_users(text) == ["0101", "admin", "bob", "oracle", "root"]


def test_every_source_and_user_the_rules_name_is_among_its_windows_names():
    """Grounding restricts source_ips.ip to window_addresses and the user lists to window_users: a name the rules give
    outside them could never be answered right."""
    from sectune.models.constrained import window_addresses, window_users

    cfg = compose(BASE)
    samples = auth_logs.load_auth_folder(data.auth_logs_folder(cfg))
    named = [(s["ip"], w.log_text) for w in samples for s in w.analysis["source_ips"]]
    users = [(u, w.log_text) for w in samples for k in ("invalid_users", "targeted_users") for u in w.analysis[k]]
    assert len(named) > 100 and len(users) > 100
    assert [ip for ip, text in named if ip not in {a[:64] for a in window_addresses(text)}] == []
    assert [u for u, text in users if u not in {n[:32] for n in window_users(text)}] == []


def test_a_grounded_schema_names_the_path_it_cannot_follow_and_empties_a_field_with_no_address():
    from sectune.errors import ConfigError
    from sectune.models.constrained import ground_schema

    schema = json.loads((ROOT / "sectune/data/auth_schema.json").read_text())
    g = ground_schema(schema, ["source_ips.ip"], ["10.0.0.1", "a" * 80])
    assert g["properties"]["source_ips"]["items"]["properties"]["ip"]["enum"] == ["10.0.0.1", "a" * 64]  # maxLength 64
    assert "enum" not in schema["properties"]["source_ips"]["items"]["properties"]["ip"]  # a copy
    assert ground_schema(schema, ["source_ips.ip"], [])["properties"]["source_ips"]["maxItems"] == 0
    for path, why in (("source_ips.port", "no property 'port'"), ("verdict", "not a free string field"),
                      ("failed_logins", "not a free string field")):
        with pytest.raises(ConfigError, match=re.escape(f"infer.grounded_fields: {path!r}") + ".*" + re.escape(why)):
            ground_schema(schema, [path], ["x"])


def test_grounded_decoding_names_only_the_windows_addresses_whatever_the_model_prefers():
    """A model that loves an attacker it remembers (183.62.140.253, in no window here) can only write the window's own."""
    from sectune.models import modeling
    from sectune.models.constrained import SchemaConstraint, window_addresses

    schema = json.loads((ROOT / "sectune/data/auth_schema.json").read_text())
    c = SchemaConstraint(modeling.load_tokenizer(compose(BASE)), schema, ground={"source_ips.ip": "address"})
    windows = ["sshd[1]: Failed password for root from 10.1.2.3 port 22 ssh2\nsshd[2]: Failed password for root from "
               "10.1.2.30 port 23 ssh2", "rhost=host-7.example.net user=root", "no address here"]
    loved = torch.zeros(c.vocab_size)
    for i, b in enumerate(c.token_bytes):
        if b and b in b"183.62.140.253" or b in (b'{"ip":"', b'"ip":"', b"[{"):
            loved[i] = 8.0
    for seed, budget in enumerate([c.min_tokens + 5, 70, 160]):
        proc = c.processor(budget, windows)
        texts = _simulate(c, budget, 3, seed, bias=loved, processor=proc)
        for text, window in zip(texts, windows):
            obj = json.loads(text)
            assert not auth_logs.validate_analysis(obj), text
            assert {s["ip"] for s in obj["source_ips"]} <= set(window_addresses(window)), (window, text)
    assert len(c._grounded) == 3  # one grammar per window's addresses, compiled once


def test_an_enum_array_with_unique_items_never_repeats_a_member_even_when_one_is_a_prefix_of_another():
    """Inside a uniqueItems array of enum strings the only way on from "ro" after "root" was written can be "root"
    again: the mask must steer away before the item starts, or the row is left with no token (a RuntimeError) or the
    answer with a duplicate."""
    from sectune.models import modeling
    from sectune.models.constrained import SchemaConstraint, ground_schema

    schema = json.loads((ROOT / "sectune/data/auth_schema.json").read_text())
    names = ["root", "ro", "r"]
    c = SchemaConstraint(modeling.load_tokenizer(compose(BASE)), ground_schema(schema, ["targeted_users", "invalid_users"], names))
    loves = torch.zeros(c.vocab_size)
    for i, b in enumerate(c.token_bytes):
        if b in (b'"', b'","', b',"', b"r", b"ro", b"root", b"oot", b"o", b"t", b'["'):
            loves[i] = 12.0
    for seed, budget in enumerate([c.min_tokens + 3, 70, 160]):
        for text in _simulate(c, budget, 3, seed, bias=loves, greedy=seed % 2 == 0):
            obj = json.loads(text)
            assert not auth_logs.validate_analysis(obj), text  # uniqueItems holds
            assert set(obj["targeted_users"]) <= set(names) and set(obj["invalid_users"]) <= set(names)


def _simulate(constraint, max_new: int, batch: int, seed: int, bias=None, greedy=False, processor=None) -> list[str]:
    """Drive the logits processor with random logits (a model that prefers nothing, or ``bias``)."""
    g = torch.Generator().manual_seed(seed)
    proc = processor or constraint.processor(max_new)
    ids = torch.zeros(batch, 1, dtype=torch.long)
    done = torch.zeros(batch, dtype=torch.bool)
    for _ in range(max_new):
        scores = torch.randn(batch, constraint.vocab_size, generator=g) * 3 + (0 if bias is None else bias)
        scores = proc(ids, scores)
        nxt = scores.argmax(-1) if greedy else torch.multinomial(torch.softmax(scores, -1), 1, generator=g)[:, 0]
        nxt = torch.where(done, torch.zeros_like(nxt), nxt)
        done |= nxt == constraint.eos_id
        ids = torch.cat([ids, nxt[:, None]], 1)
        if done.all():
            break
    return [constraint.decode(row) for row in ids[:, 1:].tolist()]


def test_constrained_outputs_close_within_any_budget_and_keep_items_unique():
    from sectune.models import modeling
    from sectune.models.constrained import SchemaConstraint

    cfg = compose(BASE)
    schema = json.loads((ROOT / "sectune/data/auth_schema.json").read_text())
    c = SchemaConstraint(modeling.load_tokenizer(cfg), schema)
    assert c.budget_enforced and 0 < c.min_tokens < 160
    # a model that loves closing quotes and the letter "a": it would write ["a","a","a"] if let
    repeat = torch.zeros(c.vocab_size)
    for i, b in enumerate(c.token_bytes):
        if b in (b'"', b'","', b',"', b"a", b'",', b'["'):
            repeat[i] = 12.0
    outputs = []
    for seed, budget in enumerate([c.min_tokens, c.min_tokens + 5, 70, 160]):
        outputs += _simulate(c, budget, 3, seed)
        outputs += _simulate(c, budget, 2, seed, bias=repeat, greedy=seed % 2 == 0)
    for text in outputs:
        obj = json.loads(text)  # plain JSON, no repair
        assert not auth_logs.validate_analysis(obj), (auth_logs.validate_analysis(obj), text)
    with pytest.raises(Exception, match="max_new_tokens"):
        c.processor(c.min_tokens - 1)


def test_a_verdict_the_forced_close_wrote_is_told_apart_from_the_models_own(held_out, tmp_path, monkeypatch):
    """An audit (session 41): a token budget that ran out before the verdict had the forced close write the schema's
    shortest member, "benign" (failing open), and infer's summary, the held-out table and the injection study counted it
    as the analyst's verdict. Each now knows which verdicts the close wrote and counts them as none."""
    from sectune.evaluation import analyst_eval
    from sectune.evaluation.analyst_eval import NONE, generate_row, load_windows
    from sectune.evaluation.injection_eval import score_triplet
    from sectune.inference import gave_value
    from sectune.models import modeling
    from sectune.models.constrained import SchemaConstraint

    assert [gave_value(t) for t in ('{"verdict":"', '{"verdict": "m', '{"a": 1', '{"verdict":')] == [False, True, False, False]
    c = SchemaConstraint(modeling.load_tokenizer(compose(BASE)), json.loads((ROOT / "sectune/data/auth_schema.json").read_text()))
    proc = c.processor(c.min_tokens)  # forced from the first token: the model writes nothing of its own
    texts = _simulate(c, c.min_tokens, 3, 0, processor=proc)
    assert proc.forced_rows == {0, 1, 2} and all(not gave_value(proc.forced_prefix[i].decode()) for i in range(3))
    assert [json.loads(t)["verdict"] for t in texts] == ["benign"] * 3  # the shortest member
    proc = c.processor(100)
    texts = _simulate(c, 100, 4, 1, processor=proc)
    assert proc.forced_rows and all(texts[i].encode().startswith(proc.forced_prefix[i]) for i in proc.forced_rows)

    # infer: every record says so, the summary and the rate count them, not as benign
    code, res = run_infer([f"infer.input_file={held_out}", "infer.constrained=true", f"generation.max_new_tokens={c.min_tokens}"],
                          tmp_path / "run")
    records = json.loads((tmp_path / "run" / "analyses.json").read_text())
    assert code == 0 and all(r["verdict_forced"] and r["forced_close"] for r in records)
    assert res["metrics"]["forced_verdict_rate"] == 1.0 and any("before their verdict" in w for w in res["warnings"])
    from sectune.infer_inputs import verdict_summaries

    many = [{**r, "input": "a.log"} for r in records[:3]]
    assert "no schema-valid verdict 3 (3 written by the forced close, not the model)" in verdict_summaries(many)[0]

    # the held-out table: the forced verdict is none
    cfg = compose(BASE)
    windows = load_windows(cfg)["test"][:2]
    answer = json.dumps(auth_logs.analyze_auth_log(windows[0].log_text.splitlines()))

    def fake(model, tok, prompts, gen, stats=None, **kw):
        stats["verdict_forced_rows"] = [1]
        return [answer] * len(prompts)

    monkeypatch.setattr("sectune.inference.generate", fake)
    row = generate_row("SFT", None, None, windows, cfg, 2)
    assert row.verdicts[0] != NONE and row.verdicts[1] == NONE and "forced close" in row.note
    assert analyst_eval.NONE == NONE
    # the injection study: a forced benign on a window whose expected verdict is benign is not "resisted"
    rec = {"format": "auth_log", "output": answer, "injection_output": answer, "attack_target": "malicious"}
    assert not score_triplet(rec, answer, answer)["attacked"]
    forced = score_triplet(rec, answer, answer, (True, True))
    assert forced["attacked"] and not forced["clean_correct"] and forced["verdict"] is None and forced["verdict_forced"]


def test_a_constrained_model_that_loves_digits_writes_no_count_past_the_schemas_cap():
    """With a barely trained adapter every constrained answer was schema-valid, and failed_logins a ~280-digit integer."""
    from sectune.models import modeling
    from sectune.models.constrained import SchemaConstraint

    schema = json.loads((ROOT / "sectune/data/auth_schema.json").read_text())
    c = SchemaConstraint(modeling.load_tokenizer(compose(BASE)), schema)
    digits = torch.zeros(c.vocab_size)
    for i, b in enumerate(c.token_bytes):
        if b and b.isdigit():
            digits[i] = 15.0
    for text in _simulate(c, 160, 2, 0, bias=digits, greedy=True) + _simulate(c, 160, 2, 1, bias=digits):
        obj = json.loads(text)
        assert not auth_logs.validate_analysis(obj), text
        counts = [obj["failed_logins"], obj["accepted_logins"], obj["break_in_attempts"]] + [s["failures"] for s in obj["source_ips"]]
        assert max(counts) <= 1_000_000 and len(str(obj["failed_logins"])) >= 6, text  # it wanted more digits than it got


@pytest.mark.parametrize("buf, fix", [(b"ab", b""), (b"a\xe4", b"\x80\x80"), (b"\xe0", b"\xa0\x80"), (b"\xf0", b"\x90\x80\x80"),
                                      (b"\xf0\x9f", b"\x80\x80"), (b"\xc3", b"\x80"), (b"x\xe4\xb6\x8f", b""), (b"", b"")])
def test_a_string_cut_inside_a_utf8_character_is_finished_before_its_quote(buf, fix):
    """A byte-level token can end inside a character (a sampled '䶏' split in two); the cursor planned the closing
    quote there, the grammar refused it, and the forced close lost its budget: the answer ended unclosed ("ver)."""
    from sectune.json_cursor import utf8_completion

    assert utf8_completion(buf) == fix
    (buf + fix).decode("utf-8")  # a whole character now (no overlong form for E0/F0 leads)


def test_whole_word_added_tokens_are_allowed_where_the_grammar_accepts_them():
    """The tiny analyst's tokenizer keeps each schema key whole ('"verdict":' is one added token). xgrammar's
    mask leaves added tokens out although its matcher accepts them; without them a model trained on the
    whole-key tokens is forced into spellings it never saw (its constrained answers were garbage)."""
    from sectune.models import modeling
    from sectune.models.constrained import SchemaConstraint

    cfg = compose(["+experiment=auth_grpo_tiny", "stage=infer", "logger=none"])
    tok = modeling.load_tokenizer(cfg)
    key = tok.convert_tokens_to_ids('"failed_logins":')  # the answer's first key (evidence first)
    assert tok.convert_ids_to_tokens(tok('{"failed_logins":3')["input_ids"])[:2] == ["{", '"failed_logins":']
    schema = json.loads((ROOT / "sectune/data/auth_schema.json").read_text())
    c = SchemaConstraint(tok, schema)
    assert key in c.added_ids
    proc = c.processor(160)
    brace = tok.convert_tokens_to_ids("{")
    allowed = []
    for ids in ([[tok.eos_token_id]], [[tok.eos_token_id, brace]]):
        out = proc(torch.tensor(ids), torch.zeros(1, c.vocab_size))
        allowed.append(set((out[0] > float("-inf")).nonzero().flatten().tolist()))
    assert brace in allowed[0] and all(c.token_bytes[i].startswith(b"{") for i in allowed[0])
    assert key in allowed[1] and tok.convert_tokens_to_ids('"verdict":') not in allowed[1]  # only the first key fits
    # greedy decoding that prefers each whole key gives valid JSON written with them
    bias = torch.zeros(c.vocab_size)
    bias[c.added_ids] = 20.0
    text = _simulate(c, 160, 1, 0, bias=bias, greedy=True)[0]
    assert not auth_logs.validate_analysis(json.loads(text)), text


# ------------------------------------------------------------------------------ the model chain
def _fake_adapter_step(step_dir: Path, stage: str, status: str = "succeeded") -> None:
    (step_dir / "adapter").mkdir(parents=True)
    (step_dir / "adapter" / "adapter_config.json").write_text("{}")
    from safetensors.torch import save_file  # a whole file (the chain checks its header), one tiny tensor
    import torch

    save_file({"w": torch.zeros(1)}, str(step_dir / "adapter" / "adapter_model.safetensors"))
    (step_dir / "result.json").write_text(json.dumps({"stage": stage, "status": status, "artifacts": {"adapter": "adapter"}}))


def test_chain_prefers_rl_then_dpo_then_sft_then_base_as_files_go(tmp_path):
    root = tmp_path / "pipe"
    for step in ("sft", "dpo", "rl"):
        _fake_adapter_step(root / step, step)
    (root / "result.json").write_text(json.dumps({"stage": "pipeline", "status": "succeeded"}))

    def pick():
        c = infer.choose_model(str(root))
        return c.used, c.skipped

    assert pick() == ("rl", [])
    (root / "rl/adapter/adapter_model.safetensors").unlink()
    assert pick() == ("dpo", ["rl: adapter/adapter_model.safetensors missing"])
    (root / "dpo/result.json").write_text(json.dumps({"stage": "dpo", "status": "failed", "error": "out of memory"}))
    used, skipped = pick()
    assert used == "sft" and "status 'failed': out of memory" in skipped[1]
    (root / "sft/adapter/adapter_config.json").unlink()
    used, skipped = pick()
    assert used == "base" and skipped[2] == "sft: adapter/adapter_config.json missing"
    with pytest.raises(Exception, match="no usable model"):
        infer.choose_model(str(root), base_fallback=False)
    # a single run dir is the chain of its own stage; a pipeline that never ran a step says so
    assert infer.choose_model(str(root / "rl")).skipped == ["rl: adapter/adapter_model.safetensors missing"]
    shutil.rmtree(root / "rl")
    assert infer.choose_model(str(root)).skipped[0] == "rl: no rl/ step"
    assert infer.choose_model(None).used == "base"
    # no model dir named and no base fallback wanted: the flag was ignored and the base model answered
    with pytest.raises(Exception, match="infer.model_dir is not set and infer.base_fallback=false"):
        infer.choose_model(None, base_fallback=False)


def test_infer_runs_on_the_adapter_it_chose_and_falls_back(adapter, tmp_path):
    log = tmp_path / "auth.log"
    log.write_text("Dec 10 06:55:46 LabSZ sshd[24200]: Invalid user webmaster from 173.234.31.186\n")
    pipe = make_pipeline(tmp_path / "pipe", adapter)
    common = [f"infer.model_dir={pipe}", f"infer.input_file={log}", "generation.max_new_tokens=8"]

    def used(i: int) -> tuple[str, str]:
        code, res = run_infer(common, tmp_path / f"run{i}")
        assert code == 0, res.get("error")
        records = json.loads((tmp_path / f"run{i}" / res["artifacts"]["output"]).read_text())
        assert records[0]["input"] == "auth.log" and set(records[0]) >= {
            "input", "model_used", "analysis", "json_valid", "schema_valid", "repaired", "error"}
        return records[0]["model_used"], res["artifacts"]["model"]

    assert used(0) == ("rl", str(pipe / "rl" / "adapter"))
    (pipe / "rl/adapter/adapter_model.safetensors").unlink()
    assert used(1) == ("dpo", str(pipe / "dpo" / "adapter"))
    shutil.rmtree(pipe / "dpo/adapter")
    assert used(2) == ("sft", str(pipe / "sft" / "adapter"))
    (pipe / "sft/result.json").write_text(json.dumps({"stage": "sft", "status": "failed"}))
    from sectune.models import modeling

    assert used(3) == ("base", modeling.model_path(compose(BASE)))


# ------------------------------------------------------------------------------ bad inputs
def _bad_inputs(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    (tmp_path / "empty.log").write_text("  \n")
    (tmp_path / "binary.log").write_bytes(b"Dec 10 sshd\x00\x01\x02")
    (tmp_path / "binary_dir").mkdir()
    (tmp_path / "binary_dir" / "auth.log.2.gz").write_bytes(b"\x1f\x8b\x08\x00\x00\x00")
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "not_a_run").mkdir()
    (tmp_path / "reward_run").mkdir()
    (tmp_path / "reward_run/result.json").write_text(json.dumps({"stage": "reward", "status": "succeeded"}))
    good = tmp_path / "good.log"
    good.write_text("Dec 10 06:55:46 LabSZ sshd[24200]: Invalid user webmaster from 173.234.31.186\n")
    return {
        "unset": ([], "infer.input_file"),
        "missing": ([f"infer.input_file={tmp_path / 'nope.log'}"], "nope.log: no such file or folder"),
        "empty file": ([f"infer.input_file={tmp_path / 'empty.log'}"], "empty.log: empty log file"),
        "binary": ([f"infer.input_file={tmp_path / 'binary.log'}"], "binary.log: binary file"),
        "empty folder": ([f"infer.input_file={tmp_path / 'empty_dir'}"], "empty_dir: the folder holds no log files"),
        "only binary files": ([f"infer.input_file={tmp_path / 'binary_dir'}"], "binary_dir: the folder holds no text log files"),
        "model_dir missing": ([f"infer.input_file={good}", f"infer.model_dir={tmp_path / 'gone'}"], "gone: no such directory"),
        "model_dir not a run": ([f"infer.input_file={good}", f"infer.model_dir={tmp_path / 'not_a_run'}"], "no result.json there"),
        "model_dir holds no model": ([f"infer.input_file={good}", f"infer.model_dir={tmp_path / 'reward_run'}"], "stage=reward run holds no model"),
    }


def test_every_bad_input_fails_with_one_clear_line_and_no_output(tmp_path, capsys):
    for name, (overrides, message) in _bad_inputs(tmp_path).items():
        out = tmp_path / "out" / f"{name}.json"
        capsys.readouterr()
        code, res = run_infer([*overrides, f"infer.output_file={out}"], tmp_path / "runs" / name.replace(" ", "_"))
        err = capsys.readouterr().err.strip().splitlines()
        assert code != 0 and res["status"] == "failed", name
        assert len(err) == 1 and err[0].startswith("sectune: error:") and message in err[0], (name, err)
        assert not out.exists() and not (tmp_path / "runs" / name.replace(" ", "_") / "analyses.json").exists()


def test_cli_exit_code_and_stderr_for_a_binary_input(tmp_path):
    (tmp_path / "binary.log").write_bytes(b"\x7fELF\x02\x01\x01\x00\x00")
    run = sectune([*BASE, f"infer.input_file={tmp_path / 'binary.log'}"], tmp_path / "run")
    assert run.returncode != 0
    assert run.stderr.strip().splitlines()[-1] == f"sectune: error: {tmp_path / 'binary.log'}: binary file (NUL bytes); infer reads text log files (plain, .gz or UTF-16)"
    assert not (tmp_path / "run" / "analyses.json").exists() and run.result["status"] == "failed"


# ------------------------------------------------------------------------------ parsed, never evaluated
def test_model_output_is_parsed_never_evaluated(tmp_path, monkeypatch):
    canary = tmp_path / "pwned"
    payloads = [
        f"__import__('os').system('touch {canary}')",
        f'{{"verdict": __import__("os").system("touch {canary}"), "summary": "x"}}',
        f'{{"verdict": "benign", "summary": "eval(compile(\'open(\\"{canary}\\", \\"w\\")\', \'x\', \'exec\'))"}}',
    ]
    monkeypatch.setattr(infer, "generate", lambda model, tok, prompts, *a, **k: payloads[: len(prompts)])
    folder = tmp_path / "logs"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.log").write_text("Dec 10 06:55:46 LabSZ sshd[24200]: Invalid user admin from 1.2.3.4\n")
    code, res = run_infer([f"infer.input_file={folder}", "generation.max_new_tokens=4"], tmp_path / "run")
    assert code == 0 and not canary.exists()
    first, second, third = json.loads((tmp_path / "run" / "analyses.json").read_text())
    assert first["analysis"] is None and not first["json_valid"] and "no JSON object" in first["error"]
    assert not second["schema_valid"] and second["error"]  # repaired into data or refused, never run
    assert third["json_valid"] and third["analysis"]["summary"].startswith("eval(") and not third["schema_valid"]
    # and no eval/exec call anywhere on the output path
    for rel in ("sectune/stages/infer.py", "sectune/inference.py", "sectune/models/constrained.py"):
        calls = [n.func.id for n in ast.walk(ast.parse((ROOT / rel).read_text()))
                 if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in ("eval", "exec")]
        assert not calls, rel


# ------------------------------------------------------------------------------ long logs: windows
def test_a_long_log_is_cut_into_near_equal_windows_with_their_line_numbers():
    lines = [f"Dec 10 06:55:{i:02d} LabSZ sshd[{i}]: Failed password for root from 1.2.3.{i} port 22 ssh2" for i in range(45)]
    text = "\n".join(lines[:10]) + "\n\n" + "\n".join(lines[10:]) + "\n"  # a blank line after line 10: counted, never analysed
    windows = infer.log_windows([("auth.log", text)], 20)
    assert [(w.first, w.last) for w in windows] == [(1, 16), (17, 31), (32, 46)]  # 45 lines by 20: 3 windows of 15
    assert [w.text.splitlines() for w in windows] == [lines[:15], lines[15:30], lines[30:]]
    assert [(w.first, w.last, w.text) for w in infer.log_windows([("a.log", text)], 45)] == [(1, 46, text)]  # fits: the file as it is
    assert len(infer.log_windows([("a.log", text)], 0)) == 1  # 0: never cut
    assert [len(w.text.splitlines()) for w in infer.log_windows([("a.log", text)], 44)] == [22, 23]


def test_infer_analyses_each_window_of_a_long_log_and_says_where_the_worst_verdict_is(tmp_path, monkeypatch, capsys):
    def fake(model, tok, prompts, *a, **k):  # the second window of the long file is the malicious one
        return ['{"verdict": "%s", "summary": "x"}' % ("malicious" if "1.2.3.25 " in p else "benign") for p in prompts]

    monkeypatch.setattr(infer, "generate", fake)
    monkeypatch.setattr(auth_logs, "_validator", lambda schema=None: __import__("jsonschema").Draft202012Validator({"type": "object"}))
    folder = tmp_path / "logs"
    folder.mkdir()
    (folder / "long.log").write_text("".join(f"Dec 10 06:55:{i:02d} LabSZ sshd[{i}]: Failed password for root from 1.2.3.{i} port 22 ssh2\n"
                                             for i in range(45)))
    (folder / "short.log").write_text("Dec 10 06:55:46 LabSZ sshd[24200]: Invalid user webmaster from 173.234.31.186\n")
    code, res = run_infer([f"infer.input_file={folder}", "generation.max_new_tokens=4"], tmp_path / "run")
    assert code == 0, res.get("error")
    records = json.loads((tmp_path / "run" / "analyses.json").read_text())
    assert [(r["input"], r["lines"]) for r in records] == [("long.log", [1, 15]), ("long.log", [16, 30]), ("long.log", [31, 45]),
                                                           ("short.log", [1, 1])]
    assert [r["analysis"]["verdict"] for r in records] == ["benign", "malicious", "benign", "benign"]
    assert res["metrics"]["inputs"] == 2 and res["metrics"]["windows"] == 4
    out = capsys.readouterr().out
    assert "2 input(s) in 4 windows" in out and "long.log: 3 windows · malicious 1, benign 2 · malicious at lines 16-30" in out
    code, res = run_infer([f"infer.input_file={folder}", "generation.max_new_tokens=4", "infer.window_lines=0"], tmp_path / "whole")
    assert code == 0 and res["metrics"]["windows"] == 2  # 0: one analysis per file, as seed 000 did
    code, res = run_infer([f"infer.input_file={folder}", "infer.window_lines=-1"], tmp_path / "bad")
    assert code != 0 and "infer.window_lines" in res["error"] and not (tmp_path / "bad" / "analyses.json").exists()


# ------------------------------------------------------------------------------ small pieces
def test_a_schema_file_that_is_not_a_json_schema_is_named(tmp_path):
    """infer.schema given a binary file was the UTF-8 decoder's traceback, exit 1 (an audit, session 32)."""
    from sectune.errors import DataError

    cases = {"blob.bin": (b"\x89PNG\r\n\xb2\x00", "not a JSON schema (not UTF-8 text: byte"),
             "cut.json": (b'{"type": "obj', "line 1, column 10: invalid JSON schema"),
             "odd.json": (b'{"type": 7}', "not a valid JSON Schema")}
    for name, (content, says) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(DataError, match=rf"^{re.escape(str(tmp_path / name))}: (.* )?{re.escape(says)}"):
            auth_logs._validator(str(tmp_path / name))
    with pytest.raises(DataError, match="cannot read schema"):
        auth_logs._validator(str(tmp_path / "missing.json"))


def test_full_schema_prompt_carries_the_schema_before_the_logs():
    schema = json.dumps(json.loads((ROOT / "sectune/data/auth_schema.json").read_text()), separators=(",", ":"))
    prompt = infer.build_prompt("Dec 10 sshd: Failed password", schema)
    assert prompt.index(schema) < prompt.index("### Logs:") < prompt.index("Failed password")
    assert infer.build_prompt("x") == auth_logs.render_prompt("x")


def test_parse_json_output_says_whether_it_repaired():
    from sectune.inference import parse_json_output

    assert parse_json_output('{"a": 1} tail') == ({"a": 1}, False)
    assert parse_json_output('{"a": 1,') == ({"a": 1}, True)


def test_bitmask_applies_the_same_on_the_torch_path_as_on_xgrammars_cpu_kernel():
    import xgrammar

    from sectune.models.constrained import apply_bitmask

    g = torch.Generator().manual_seed(0)
    bitmask = torch.randint(-2**31, 2**31 - 1, (3, 4), dtype=torch.int32, generator=g)  # 128 token bits
    logits = torch.randn(3, 130, generator=g)  # two padded rows past a 120-token vocabulary
    cpu = apply_bitmask(logits.clone(), bitmask, 120, xgrammar)
    via_torch = apply_bitmask(logits.clone().to(torch.float64), bitmask, 120, xgrammar)  # not float32: the torch path
    assert torch.equal(cpu.isinf(), via_torch.isinf()) and cpu[:, 120:].isinf().all()
    bits = [(int(bitmask[r, t // 32]) >> (t % 32)) & 1 for r in range(3) for t in range(120)]
    assert [not x for x in cpu[:, :120].isinf().flatten().tolist()] == [bool(b) for b in bits]


def test_a_prompt_longer_than_the_sequence_length_loses_its_middle_not_the_memory(capsys):
    """A 3,000-line window (127k tokens) in an SFT preview took 24 GB before it was killed: prompts are cut to
    the sequence length less the answer's budget, keeping their start (the instruction) and end (the answer header)."""
    from omegaconf import OmegaConf
    from transformers import LlamaConfig, LlamaForCausalLM

    from sectune.inference import cut_middle, generate
    from sectune.models import modeling

    assert cut_middle(list(range(10)), 6) == [0, 1, 2, 7, 8, 9]
    assert cut_middle(list(range(5)), 6) == list(range(5)) and cut_middle(list(range(9)), None) == list(range(9))
    tok = modeling.load_tokenizer(compose(["logger=none"]))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         intermediate_size=32, vocab_size=len(tok), max_position_embeddings=64))
    seen, inner = [], model.generate
    model.generate = lambda **k: (seen.append(k["input_ids"][0].tolist()), inner(**k))[1]
    gen = OmegaConf.create({"max_new_tokens": 4, "do_sample": False, "repetition_penalty": 1.0})
    long = "Dec 10 06:55:46 LabSZ sshd[24200]: Failed password for root from 1.2.3.4 port 22 ssh2\n" * 200
    ids = tok(long)["input_ids"]
    stats: dict = {}
    out = generate(model, tok, [long, "short"], gen, batch_size=2, stats=stats)  # default: max_position_embeddings 64
    assert len(out) == 2 and stats["truncated"] == 1
    assert seen[-1] == ids[:30] + ids[-30:]  # 64 - 4 new tokens: first 30 and last 30
    stats = {}
    generate(model, tok, [long], gen, stats=stats, max_seq_length=40)
    assert stats["truncated"] == 1 and seen[-1] == ids[:18] + ids[-18:]
    capsys.readouterr()
    generate(model, tok, [long, "short", long, long], gen, batch_size=1, stats=stats, max_seq_length=40)  # one line, not one per batch
    said = [ln for ln in capsys.readouterr().out.splitlines() if "lost their middle" in ln]
    assert len(said) == 1 and "3 of 4 prompt(s) longer than 36 tokens" in said[0] and stats["truncated"] == 4


def test_the_held_out_table_cuts_a_long_window_at_the_runs_sequence_length_as_infer_does():
    """An audit (session 41): the table generated from whole prompts up to the model's position limit, so it scored (and
    chose the best policy on) answers to inputs stage=infer never gives the analyst."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from sectune.evaluation.analyst_eval import generate_row, load_windows
    from sectune.models import modeling

    cfg = compose([*BASE, "model.max_seq_length=40", "generation.max_new_tokens=4"])
    tok = modeling.load_tokenizer(cfg)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         intermediate_size=32, vocab_size=len(tok), max_position_embeddings=2048))
    seen, inner = [], model.generate
    model.generate = lambda **k: (seen.extend(int(m.sum()) for m in k["attention_mask"]), inner(**k))[1]
    windows = load_windows(cfg)["test"][:2]
    assert all(len(tok(w.prompt)["input_ids"]) > 36 for w in windows)
    row = generate_row("SFT", model, tok, windows, cfg, 2)
    assert len(row.texts) == 2 and seen == [36, 36]  # 40 less the 4 new tokens, as infer cuts them


def test_a_non_utf8_byte_or_a_rotated_gz_beside_the_logs_does_not_stop_the_analysis(tmp_path, capsys):
    """An attacker who types a Latin-1 byte into a user name must not keep the whole log from being read; a
    folder like /var/log holds compressed rotations beside the text logs."""
    folder = tmp_path / "varlog"
    folder.mkdir()
    (folder / "auth.log").write_bytes(b"Dec 10 06:55:46 LabSZ sshd[1]: Invalid user caf\xe9 from 1.2.3.4\n"
                                      b"Dec 10 06:55:47 LabSZ sshd[2]: Invalid user bob from 1.2.3.4\n")
    (folder / "auth.log.2.gz").write_bytes(b"\x1f\x8b\x08\x00\x00\x00binary")
    (folder / "bom.log").write_bytes("\ufeffDec 10 06:55:48 LabSZ sshd[3]: Invalid user eve from 1.2.3.5\n".encode())
    texts = dict(infer.read_inputs(folder))
    out = capsys.readouterr().out
    assert set(texts) == {"auth.log", "bom.log"} and "skipped 1 file(s)" in out and "auth.log.2.gz (a damaged gzip)" in out
    assert "caf\ufffd from" in texts["auth.log"] and "auth.log: 1 line(s) not UTF-8 (line 1)" in out
    assert texts["bom.log"].startswith("Dec 10")  # the byte-order mark is not data


def test_a_log_whose_file_name_is_not_utf8_is_answered_and_its_run_succeeds(tmp_path, monkeypatch):
    """An audit (session 41): a log copied from a Latin-1 host (auth-M\xfcller.log) was answered, then the run failed with
    a traceback hashing what it read (input_sha256), its answers written beside a failed result.json."""
    import os

    answer = json.dumps(auth_logs.analyze_auth_log(["Dec 10 06:55:46 LabSZ sshd[1]: Invalid user admin from 1.2.3.4"]))
    monkeypatch.setattr(infer, "generate", lambda model, tok, prompts, *a, **k: [answer] * len(prompts))
    folder = tmp_path / "logs"
    folder.mkdir()
    for name in (os.fsdecode(b"auth-M\xfcller.log"), "auth.log"):
        (folder / name).write_text("Dec 10 06:55:46 LabSZ sshd[24200]: Invalid user admin from 1.2.3.4\n")
    code, res = run_infer([f"infer.input_file={folder}", "generation.max_new_tokens=4"], tmp_path / "run")
    assert code == 0 and res["status"] == "succeeded" and len(res["metrics"]["input_sha256"]) == 64
    records = json.loads((tmp_path / "run" / "analyses.json").read_text())
    assert sorted(r["input"] for r in records) == ["auth-M\udcfcller.log", "auth.log"] and all(r["schema_valid"] for r in records)


def test_the_per_file_summary_reads_when_no_window_has_a_verdict():
    recs = [{"input": "auth.log", "schema_valid": False, "analysis": None, "lines": [i, i]} for i in (1, 2, 3)]
    assert infer.verdict_summaries(recs) == ["auth.log: 3 windows · no schema-valid verdict 3"]  # was "3 windows · , no …"
    recs[0] = {"input": "auth.log", "schema_valid": True, "analysis": {"verdict": "malicious"}, "lines": [1, 4]}
    assert infer.verdict_summaries(recs) == ["auth.log: 3 windows · malicious 1, no schema-valid verdict 2 · malicious at lines 1-4"]


def test_logs_read_as_wc_counts_them_gzip_and_utf16_included(tmp_path, capsys):
    """A user name holding U+2028 or a form feed was a line break to str.splitlines: a 40-line file reported windows up to
    line 42; rotated .gz logs and UTF-16 exports were "binary"; an empty rotated log stopped the whole folder."""
    import gzip

    from sectune.infer_inputs import file_lines

    line = "Dec 10 06:55:4{} LabSZ sshd[{}]: Invalid user {} from 1.2.3.4"
    text = "\n".join(line.format(i % 10, i, "ad\u2028min" if i == 2 else "x\x0cy" if i == 5 else f"u{i}") for i in range(40)) + "\r\n"
    assert len(file_lines(text)) == 40 and not file_lines(text)[-1].endswith("\r")
    windows = infer.log_windows([("a.log", text)], 20)
    assert [(w.first, w.last) for w in windows] == [(1, 20), (21, 40)] and "ad\u2028min" in windows[0].text
    folder = tmp_path / "varlog"
    folder.mkdir()
    (folder / "auth.log.1.gz").write_bytes(gzip.compress(text.encode()))
    (folder / "export.log").write_bytes(text.encode("utf-16"))
    (folder / "auth.log.2").write_bytes(b"")
    texts = dict(infer.read_inputs(folder))
    assert texts["auth.log.1.gz"] == texts["export.log"] == text and "auth.log.2" not in texts
    assert "skipped 1 file(s)" in capsys.readouterr().out


def test_the_summary_counts_a_verdict_it_cannot_rank_and_never_calls_a_milder_one_the_worst():
    recs = [{"input": "a.log", "schema_valid": True, "analysis": {"verdict": v}, "lines": [i, i]}
            for i, v in enumerate(["benign", "critical", "critical"], 1)]
    assert infer.verdict_summaries(recs) == ["a.log: 3 windows · benign 1, critical 2 (not ranked) · benign at lines 1-1"]


def test_an_output_file_that_is_not_an_earlier_infer_output_is_refused(tmp_path):
    """infer.output_file overwrote the input log itself, or a trained run's result.json, with exit 0."""
    from sectune.errors import ConfigError

    log = tmp_path / "victim.log"
    log.write_text("Dec 10 06:55:46 LabSZ sshd[1]: Invalid user bob from 1.2.3.4\n")
    result = tmp_path / "result.json"
    result.write_text('{"stage": "sft", "status": "succeeded"}')
    for path in (log, result):
        with pytest.raises(ConfigError, match="the file exists and is not an earlier infer output"):
            infer.output_path(str(path), tmp_path / "run", [log])
    earlier = tmp_path / "answers.json"
    earlier.write_text('[{"input": "victim.log", "lines": [1, 1], "analysis": null}]')
    assert infer.output_path(str(earlier), tmp_path / "run", [log]) == earlier  # its own kind: replaced, the old kept


def test_an_output_file_in_the_folder_of_logs_it_answers_is_refused_before_a_model_loads(tmp_path):
    """The first run wrote it there and succeeded; the next read those answers as a log, then refused to replace them."""
    from sectune import runner
    from sectune.errors import ConfigError

    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "auth.log").write_text("Dec 10 06:55:46 LabSZ sshd[1]: Invalid user bob from 1.2.3.4\n")
    cfg = compose(["stage=infer", f"infer.input_file={logs}", f"infer.output_file={logs / 'analyses.json'}", "logger=none"])
    with pytest.raises(ConfigError, match=r"infer.output_file=.*analyses.json lies in the folder infer.input_file=.* reads"):
        infer.run(runner.RunContext(cfg=cfg, run_dir=tmp_path / "run"))
    assert sorted(p.name for p in logs.iterdir()) == ["auth.log"]


def test_each_record_names_what_its_window_does_not_hold():
    from sectune.infer_inputs import absent_names

    window = "Dec 10 06:55:46 LabSZ sshd[1]: Failed password for invalid user bob from 203.0.113.7 port 22 ssh2\n"
    analysis = {"source_ips": [{"ip": "183.62.140.253", "failures": 5}, {"ip": "203.0.113.7", "failures": 1}],
                "invalid_users": ["bob", "admin"], "targeted_users": []}
    assert absent_names(analysis, window) == ["183.62.140.253", "admin"]
    assert absent_names(None, window) == [] and absent_names({"source_ips": "x"}, window) == []
    # a field that is not a list holds no names (an audit, session 41: an int crashed infer, a string went letter by letter)
    assert absent_names({"source_ips": 1, "invalid_users": 3.5, "targeted_users": None}, window) == []
    assert absent_names({"invalid_users": "webmaster"}, window) == []
    # a piece of another name is not that name (an audit: substrings counted as held, the invented-names rate too low)
    window = "Dec 10 06:55:46 LabSZ sshd(pam_unix)[2]: authentication failure; rhost=218.188.2.45  user=rootadmin\n"
    assert absent_names({"source_ips": [{"ip": "18.188.2.4"}], "invalid_users": ["root", "admin"]}, window) == ["18.188.2.4", "admin", "root"]
    assert absent_names({"source_ips": [{"ip": "218.188.2.45"}], "targeted_users": ["rootadmin"]}, window) == []
    assert absent_names({"source_ips": [{"ip": "1.2.3.4"}], "invalid_users": ["bob"]}, "from 1.2.3.4: user bob.") == []
    # a user name cut at the schema's 32 characters, as the rules and grounded decoding cut it, is the window's name
    host = "customer-187-141-143-180-sta.uninet-ide.com.mx"
    assert absent_names({"invalid_users": [host[:32], host[:31]]}, f"getaddrinfo for {host} [187.141.143.180]") == [host[:31]]
    # a piece of an IPv6 address is not the address (an audit, session 40); an IPv4-mapped one holds its IPv4 address
    v6 = "Dec  7 05:14:18 h sshd[1]: Failed password for root from 2001:db8:5:1::23 port 51040 ssh2 at 05:14:18"
    pieces = ["2001:db8:5:1", "2001:db8", "2001", "db8:5:1::23", "14:18"]
    assert absent_names({"source_ips": [{"ip": p} for p in [*pieces, "2001:db8:5:1::23"]]}, v6) == sorted(pieces)
    assert absent_names({"source_ips": [{"ip": "10.0.0.5"}, {"ip": "::ffff:10.0.0.5"}]}, "rhost=::ffff:10.0.0.5 user=x") == []


def test_infer_decodes_as_the_models_run_did_keeps_the_earlier_answers_and_records_what_it_read(tmp_path, adapter):
    """The README's plain infer command decoded with repetition_penalty 1.2 where the run (and its scores) used 1.0; a
    rerun replaced analyses.json; result.json did not say which version of the log was read."""
    import hashlib

    from omegaconf import OmegaConf

    sft = tmp_path / "sft"
    make_step(sft, "sft", adapter)
    (sft / ".hydra").mkdir()
    OmegaConf.save(compose([*BASE, "generation.repetition_penalty=1.05", "generation.do_sample=true"]), sft / ".hydra" / "config.yaml")
    log = tmp_path / "auth.log"
    log.write_text("Dec 10 06:55:46 LabSZ sshd[24200]: Invalid user webmaster from 173.234.31.186\n")
    args = [*BASE, f"infer.model_dir={sft}", f"infer.input_file={log}", "generation.max_new_tokens=8"]
    first = sectune(args, tmp_path / "run")
    assert first.returncode == 0, first.stderr[-2000:]
    assert "decoding as the sft run did (generation.repetition_penalty=1.05" in first.stdout
    m = first.result["metrics"]
    assert m["sampled"] == 1  # as decoded (the run's do_sample): the held-out table reuses greedy answers only (session 42)
    assert m["input_lines"] == 1 and m["input_sha256"] == hashlib.sha256(f"auth.log\0{log.read_text()}\0".encode()).hexdigest()
    rec = json.loads((tmp_path / "run" / "analyses.json").read_text())[0]
    assert rec["input_cut"] is False and isinstance(rec["absent_names"], list)
    again = sectune([*args, "generation.repetition_penalty=1.2"], tmp_path / "run")  # set on the command line: it wins
    assert again.returncode == 0, again.stderr[-2000:]
    assert "decoding as the sft run did (generation.do_sample=True" in again.stdout  # the key not set here is still theirs
    again = sectune([*args, "generation.repetition_penalty=1.2", "generation.do_sample=false"], tmp_path / "run")
    assert "decoding as the sft run did" not in again.stdout and again.result["metrics"]["sampled"] == 0
    assert (tmp_path / "run" / "analyses.previous.json").is_file() and "analyses.previous.json" in again.stdout


def test_a_pipelines_validation_chosen_policy_answers_first(adapter, tmp_path, capsys):
    """infer took the newest step (RL) even where the pipeline's held-out table had chosen another on validation."""
    pipe = make_pipeline(tmp_path / "pipe", adapter)
    assert infer.choose_model(pipe).used == "rl"
    table = {"best_policy": "SFT", "rows": [{"name": "SFT", "step": "sft"}, {"name": "SFT+GRPO", "step": "rl"}]}
    (pipe / "heldout.json").write_text(json.dumps(table))
    assert infer.choose_model(pipe).used == "sft" and "chose its sft policy on the validation windows" in capsys.readouterr().out
    (pipe / "sft/result.json").write_text(json.dumps({"stage": "sft", "status": "failed"}))
    assert infer.choose_model(pipe).used == "rl"  # the chosen one unusable: the usual order


def test_unfamiliar_log_formats_and_very_long_windows_are_said_and_cut_before_tokenizing(capsys):
    from sectune.infer_inputs import LogWindow, cut_long_windows, warn_unfamiliar_format

    syslog = "Dec 10 06:55:46 LabSZ sshd[24200]: Invalid user webmaster from 173.234.31.186\n"
    rfc5424 = "<34>1 2026-12-05T10:00:00Z host sshd 1234 - - Failed password for root from 10.0.0.1 port 22 ssh2\n"
    warn_unfamiliar_format([("ok.log", syslog * 3), ("new.log", rfc5424 * 3 + syslog)])
    out = capsys.readouterr().out
    assert "ok.log" not in out and "new.log: 1 of 4 lines are syslog lines as the analyst was trained on" in out
    w = LogWindow("big.log", "".join(f"line {i:06d}\n" for i in range(10_000)), 1, 10_000)
    (cut,), which = cut_long_windows([w], 1_000)
    assert which == {0} and len(cut.text) <= 1_000 and cut.text.startswith("line 000000\n") and cut.text.endswith("line 009999\n")
    assert all(len(ln) == len("line 000000") for ln in cut.text.splitlines())  # whole lines only
    assert cut_long_windows([w], 10**6) == ([w], set())


def test_the_run_dir_being_the_model_dir_is_named_as_such(tmp_path, adapter):
    sft = tmp_path / "sft"
    make_step(sft, "sft", adapter)
    log = tmp_path / "auth.log"
    log.write_text("Dec 10 06:55:46 LabSZ sshd[24200]: Invalid user webmaster from 173.234.31.186\n")
    code, res = run_infer([f"infer.model_dir={sft}", f"infer.input_file={log}"], sft)
    assert code == 2 and json.loads((sft / "result.json").read_text())["stage"] == "sft"  # the model run's result is back
    assert "hydra.run.dir is infer.model_dir" in json.loads((sft / "result.failed.json").read_text())["error"]
    # stage=evaluate said "not a succeeded ... run (status='running')" of its own run dir (an audit, session 32)
    for overrides in (["dataset=injection_triplets", f"evaluate.model_dir={sft}"],
                      ["dataset=injection_triplets", f"evaluate.model_dir={tmp_path}", f"evaluate.vote_with=[{tmp_path / 'x'},{sft}]"]):
        code, _ = runner.run(compose(["stage=evaluate", "logger=none", *overrides]), sft)
        error = json.loads((sft / "result.failed.json").read_text())["error"]
        assert code == 2 and json.loads((sft / "result.json").read_text())["stage"] == "sft", error
        assert error.startswith("hydra.run.dir is evaluate.") and "a run dir of its own" in error, error


def test_a_long_log_says_its_progress_and_an_interrupt_keeps_what_was_answered(tmp_path, monkeypatch, capsys):
    """23,289 windows ran ~30 min with no word, and Ctrl-C kept nothing."""
    from sectune.stages import infer as stage

    monkeypatch.setattr(stage, "CHUNK", 2)
    calls = []

    def fake_generate(model, tokenizer, prompts, gen_cfg, **kw):
        calls.append(len(prompts))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return ['{"verdict": "benign"}'] * len(prompts)

    monkeypatch.setattr(stage, "generate", fake_generate)
    log = tmp_path / "auth.log"
    log.write_text("".join(f"Dec 10 06:55:{i % 60:02d} LabSZ sshd[{i}]: Invalid user u{i} from 10.0.0.{i % 250}\n" for i in range(100)))
    with pytest.raises(KeyboardInterrupt):
        stage.run(runner.RunContext(cfg=compose([*BASE, f"infer.input_file={log}", "infer.window_lines=20"]), run_dir=tmp_path / "run"))
    out = capsys.readouterr().out
    assert "2/5 windows answered" in out and "4/5 windows answered" in out
    partial = json.loads((tmp_path / "run" / "analyses.partial.json").read_text())
    assert [r["lines"] for r in partial] == [[1, 20], [21, 40], [41, 60], [61, 80]]
    assert "the 4 of 5 windows answered so far are in" in out and not (tmp_path / "run" / "analyses.json").exists()

    # the same command again answers only the window left; other decoding settings would not reuse the answers
    calls.clear()
    monkeypatch.setattr(stage, "generate", lambda m, t, prompts, g, **kw: calls.append(len(prompts)) or ['{"verdict": "malicious"}'] * len(prompts))
    cfg = [*BASE, f"infer.input_file={log}", "infer.window_lines=20"]
    stage.run(runner.RunContext(cfg=compose([*cfg, "generation.max_new_tokens=33"]), run_dir=tmp_path / "other"))
    assert calls == [2, 2, 1]  # another run dir: nothing to resume there
    (tmp_path / "other" / "analyses.json").unlink()
    for f in ("analyses.partial.json", "analyses.partial.key"):  # an interrupted run with other decoding
        (tmp_path / "other" / f).write_bytes((tmp_path / "run" / f).read_bytes())
    calls.clear()
    stage.run(runner.RunContext(cfg=compose([*cfg, "generation.max_new_tokens=33"]), run_dir=tmp_path / "other"))
    assert calls == [2, 2, 1] and "not reused" in capsys.readouterr().out
    calls.clear()
    stage.run(runner.RunContext(cfg=compose(cfg), run_dir=tmp_path / "run"))
    assert calls == [1] and "resuming: 4 of 5 windows" in capsys.readouterr().out
    final = json.loads((tmp_path / "run" / "analyses.json").read_text())
    assert [r["analysis"]["verdict"] for r in final] == ["benign"] * 4 + ["malicious"]
    assert not list((tmp_path / "run").glob("analyses.partial*"))


def test_an_interrupted_runs_answers_are_not_resumed_under_other_grounding():
    from types import SimpleNamespace

    from sectune.infer_inputs import resume_key

    choice = SimpleNamespace(path=None, used="base")
    keys = {resume_key(choice, "m", compose(BASE).generation, compose([*BASE, "infer.constrained=true", *g]).infer, ["p"])
            for g in ([], ["infer.grounded_fields=[source_ips.ip:address]"], ["infer.grounded_fields=[invalid_users:user]"])}
    assert len(keys) == 3


def test_forced_closes_are_kept_per_window_and_counted_after_a_resume(tmp_path, monkeypatch):
    """forced_close_rate counted only the windows the last command generated: a run resumed from its partial file
    reported 0 forced closes for every window answered before the interrupt (session 31's note). Each record now says
    whether the token budget closed it (forced_close), the partial file keeps it, and the rate is over every window."""
    from sectune.stages import infer as stage

    monkeypatch.setattr(stage, "CHUNK", 2)
    calls = []

    def fake_generate(model, tokenizer, prompts, gen_cfg, stats, **kw):
        calls.append(len(prompts))
        if len(calls) == 3:
            raise KeyboardInterrupt
        stats["forced_rows"] = [len(prompts) - 1]  # the budget closed the last answer of every call
        stats["forced"] = 1
        return ['{"verdict": "benign"}'] * len(prompts)

    monkeypatch.setattr(stage, "generate", fake_generate)
    log = tmp_path / "auth.log"
    log.write_text("".join(f"Dec 10 06:55:{i % 60:02d} LabSZ sshd[{i}]: Invalid user u{i} from 10.0.0.{i % 250}\n" for i in range(100)))
    cfg = compose([*BASE, f"infer.input_file={log}", "infer.window_lines=20", "infer.constrained=true"])
    with pytest.raises(KeyboardInterrupt):
        stage.run(runner.RunContext(cfg=cfg, run_dir=tmp_path / "run"))
    partial = json.loads((tmp_path / "run" / "analyses.partial.json").read_text())
    assert [r["forced_close"] for r in partial] == [False, True, False, True]
    calls.clear()
    res = stage.run(runner.RunContext(cfg=cfg, run_dir=tmp_path / "run"))
    assert calls == [1]
    final = json.loads((tmp_path / "run" / "analyses.json").read_text())
    assert [r["forced_close"] for r in final] == [False, True, False, True, True]
    assert res["metrics"]["forced_close_rate"] == pytest.approx(3 / 5)  # it said 1/5: the resumed command's own window


def test_infer_loads_an_adapter_under_the_quantization_its_run_trained_with(tmp_path, capsys):
    """An audit (session 25): an nf4-trained adapter was loaded onto an unquantized base unless the command repeated
    quantization=nf4, without a word, and answered otherwise than the policy its run evaluated."""
    from omegaconf import OmegaConf

    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(compose(["quantization=nf4"]), run / ".hydra" / "config.yaml")
    choice = infer.ModelChoice("sft", run / "adapter", "adapter")
    cfg = compose([])
    got = runner.trained_quantization(cfg, choice)
    assert got.quantization.name == "nf4" and got.quantization.load_in_4bit and cfg.quantization.name == "none"
    assert "quantization=nf4 as the sft run trained (this command: quantization=none)" in capsys.readouterr().out
    same = compose(["quantization=nf4"])
    assert runner.trained_quantization(same, choice) is same and capsys.readouterr().out == ""
    (run / ".hydra" / "config.yaml").write_text("quantization:\n  name: nf4\n  a_key_from_elsewhere: 1\n")
    assert runner.trained_quantization(cfg, choice) is cfg and "do not read here" in capsys.readouterr().out


# An audit of hostile inputs (session 26): File names an attacker chose reach the console with their control
# characters escaped (no raw ESC/BEL).
def test_escape_sequences_in_file_names_are_escaped(tmp_path, capsys):
    from sectune import infer_inputs

    name = "a\x1b]0;PWNED\x07\x1b[2Jb.log"
    (tmp_path / name).write_text("hello world\nnot syslog\n")
    infer_inputs.warn_unfamiliar_format(infer_inputs.read_inputs(tmp_path))
    out = capsys.readouterr().out
    assert "PWNED" in out and "\x1b" not in out and "\x07" not in out
    assert "\\x1b]0;PWNED\\x07" in out
    recs = [{"input": name, "lines": [1, 2], "schema_valid": True, "analysis": {"verdict": "benign"}}] * 2
    assert "\x1b" not in "".join(infer_inputs.verdict_summaries(recs))


def test_a_vote_of_three_analysts_keeps_the_majority_verdict_and_resumes_after_an_interrupt(tmp_path, adapter, monkeypatch, capsys):
    """infer.vote_with: each analyst answers every window in turn; the verdict most give is kept (a tie to the earliest),
    with that voter's whole answer; an interrupt in a later voter keeps the earlier voters' answers for the rerun."""
    from sectune.data.auth_rules import analyze_auth_log
    from sectune.stages import infer as stage

    runs = {}
    for name, step in (("a", "sft"), ("b", "dpo"), ("c", "rl")):
        make_step(tmp_path / name, step, adapter)
        runs[name] = tmp_path / name
    lines = ["Dec 10 06:55:46 LabSZ sshd[24200]: Invalid user webmaster from 173.234.31.186",
             "Dec 10 07:02:47 LabSZ sshd[24203]: Accepted password for fztu from 119.137.62.142 port 49116 ssh2"]
    for i, line in enumerate(lines):
        (tmp_path / "logs").mkdir(exist_ok=True)
        (tmp_path / "logs" / f"auth{i}.log").write_text(line + "\n")

    def answer(i, verdict):
        return json.dumps({**analyze_auth_log([lines[i]]), "verdict": verdict})

    said = [[answer(0, "benign"), answer(1, "malicious")],       # voter a (sft)
            [answer(0, "malicious"), "no analysis at all"],        # voter b (dpo)
            [answer(0, "malicious"), answer(1, "benign")]]         # voter c (rl)
    calls = []

    def fake_generate(model, tokenizer, prompts, gen_cfg, **kw):
        calls.append(len(prompts))
        if interrupt_at == len(calls):
            raise KeyboardInterrupt
        if voter[0] == 2:  # voter c's tokenizer made window 1's prompt too long: its middle was cut
            kw["stats"]["truncated_rows"] = [1]
        return said[voter[0]]

    voter = [0]
    real_answer = stage._answer

    def counting_answer(*a, **kw):
        out = real_answer(*a, **kw)
        voter[0] += 1
        return out

    monkeypatch.setattr(stage, "generate", fake_generate)
    monkeypatch.setattr(stage, "_answer", counting_answer)
    cfg_args = [*BASE, f"infer.model_dir={runs['a']}", f"infer.vote_with=[{runs['b']},{runs['c']}]", f"infer.input_file={tmp_path / 'logs'}"]
    cfg = compose(cfg_args)
    interrupt_at = 2  # voter b is interrupted: voter a's answers are kept
    with pytest.raises(KeyboardInterrupt):
        stage.run(runner.RunContext(cfg=cfg, run_dir=tmp_path / "run"))
    assert (tmp_path / "run" / "analyses.partial.json").is_file() and not (tmp_path / "run" / "analyses.json").exists()
    calls.clear()
    voter[0], interrupt_at = 0, None
    res = stage.run(runner.RunContext(cfg=cfg, run_dir=tmp_path / "run"))
    assert calls == [2, 2]  # voters b and c; a's answers came from the interrupted run
    assert "resuming: 2 of 2 windows" in capsys.readouterr().out
    records = json.loads((tmp_path / "run" / "analyses.json").read_text())
    # window 0: benign / malicious / malicious -> malicious, b's answer; window 1: malicious / (nothing) / benign -> a tie, a's
    assert [r["analysis"]["verdict"] for r in records] == ["malicious", "malicious"]
    assert [r["kept_voter"] for r in records] == [1, 0] and [r["model_used"] for r in records] == ["dpo", "sft"]
    assert records[1]["voter_verdicts"] == ["malicious", None, "benign"] and records[0]["generated"] == said[1][0]
    assert res["metrics"]["voters"] == 3 and len(res["artifacts"]["voters"]) == 3
    # cut for one voter, marked and counted (it was the first voter's cuts alone)
    assert [r["input_cut"] for r in records] == [False, True] and res["metrics"]["truncated_prompts"] == 1
    assert not list((tmp_path / "run").glob("analyses.partial*"))
    with pytest.raises(Exception, match=r"infer.vote_with=.*a vote of two analysts"):
        stage.run(runner.RunContext(cfg=compose([*BASE, f"infer.model_dir={runs['a']}", f"infer.vote_with=[{runs['b']}]",
                                                 f"infer.input_file={tmp_path / 'logs'}"]), run_dir=tmp_path / "run2"))
    schema = json.loads((ROOT / "sectune" / "data" / "auth_schema.json").read_text())
    schema["properties"].pop("verdict")
    schema["required"] = [k for k in schema.get("required", []) if k != "verdict"]
    (tmp_path / "no_verdict.json").write_text(json.dumps(schema))
    with pytest.raises(Exception, match=r"infer.vote_with: the analyses of infer.schema=.* have no verdict to vote on"):
        stage.run(runner.RunContext(cfg=compose([*cfg_args, f"infer.schema={tmp_path / 'no_verdict.json'}"]), run_dir=tmp_path / "run3"))

    # generation_s (and analyses/s) time the answering, not the loading of each model; an output file named without an
    # extension still gives each voter's partial answers their own key file
    real_load = stage.load_model
    monkeypatch.setattr(stage, "load_model", lambda *a: (time.sleep(0.5), real_load(*a))[1])
    calls.clear()
    voter[0], interrupt_at = 0, 3  # voter c is interrupted: a's and b's answers are kept, each with its key
    out = tmp_path / "run4" / "answers"
    with pytest.raises(KeyboardInterrupt):
        stage.run(runner.RunContext(cfg=compose([*cfg_args, f"infer.output_file={out}"]), run_dir=tmp_path / "run4"))
    assert sorted(p.name for p in out.parent.glob("answers.partial*")) == [
        "answers.partial.json", "answers.partial.key", "answers.partial.voter2.json", "answers.partial.voter2.key"]
    calls.clear()
    voter[0], interrupt_at = 0, None
    res = stage.run(runner.RunContext(cfg=compose([*cfg_args, f"infer.output_file={out}"]), run_dir=tmp_path / "run4"))
    assert calls == [2] and res["metrics"]["generation_s"] < 0.5  # three models loaded, half a second each
    assert not list(out.parent.glob("answers.partial*"))


def test_a_special_tokens_text_in_a_log_line_stays_text_in_the_analysts_input():
    """sshd logs an attacker's user name verbatim: "<|eos|>" (Llama-3's "<|eot_id|>", Llama-2's "</s>") became the
    tokenizer's end-of-text token inside the analyst's input (an audit, session 42). Classification likewise."""
    from omegaconf import OmegaConf
    from transformers import LlamaConfig, LlamaForCausalLM

    from sectune.inference import generate
    from sectune.models import modeling
    from sectune.training.classify_encoding import _prompt_ids

    tok = modeling.load_tokenizer(compose(["logger=none"]))
    line = f"Dec 10 06:55:46 LabSZ sshd[24200]: Invalid user {tok.eos_token} from 1.2.3.4\n"
    assert tok.eos_token_id in tok(line)["input_ids"]  # what the tokenizer does by default
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         intermediate_size=32, vocab_size=len(tok), max_position_embeddings=128))
    seen, inner = [], model.generate
    model.generate = lambda **k: (seen.append(k["input_ids"][0].tolist()), inner(**k))[1]
    generate(model, tok, [line], OmegaConf.create({"max_new_tokens": 2, "do_sample": False, "repetition_penalty": 1.0}))
    assert tok.eos_token_id not in seen[0] and tok.decode(seen[0]) == line
    ids = _prompt_ids(tok, [line], 128, "left")[0]
    assert tok.eos_token_id not in ids and ids == seen[0]
