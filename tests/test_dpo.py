"""stage=dpo: TRL's DPOTrainer agrees with sectune.losses.dpo_loss, the reference costs no second copy
of the weights, a DPO run from a short SFT run raises held-out preference accuracy, and a bad
``dpo.init_from`` is one clear line."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from conftest import FAST, compose, requires_real_data, sectune
from sectune.data.auth_logs import render_prompt
from sectune.errors import ConfigError

LOGS = [
    "Dec 10 06:55:46 LabSZ sshd[24200]: Failed password for root from 173.234.31.186 port 38926 ssh2",
    "Dec 10 07:02:47 LabSZ sshd[24203]: Invalid user webmaster from 173.234.31.186\n"
    "Dec 10 07:02:49 LabSZ sshd[24203]: Failed password for invalid user webmaster from 173.234.31.186 port 38926 ssh2",
    "Dec 10 09:32:20 LabSZ sshd[24680]: Accepted password for fztu from 119.137.62.142 port 49116 ssh2",
]
CHOSEN = ['{"verdict":"suspicious","failed_logins":1}', '{"verdict":"malicious","failed_logins":1,"invalid_users":["webmaster"]}', '{"verdict":"benign","accepted_logins":1}']
REJECTED = ['{"verdict":"benign","failed_logins":0}', '{"verdict":"benign","failed_logins":3}', '{"verdict":"malicious","accep']
PAIRS = [{"prompt": render_prompt(log), "chosen": c, "rejected": r, "kind": k} for log, c, r, k in zip(LOGS, CHOSEN, REJECTED, ["verdict", "counts", "truncated"])]
UNIT = ["stage=dpo", "loss=dpo", "dataset=auth_preferences", "logger=none", "train.precision=fp32", "train.max_steps=1"]


def build(tmp_path, overrides=()):
    from sectune.models import modeling
    from sectune.stages import dpo

    cfg = compose([*UNIT, *overrides])
    tokenizer = modeling.load_tokenizer(cfg)
    model, ref_model, _ = dpo.build_policy(cfg, modeling.model_path(cfg))
    trainer = dpo.build_dpo_trainer(cfg, model, ref_model, tokenizer, PAIRS, [], tmp_path / "checkpoints")
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
    return cfg, trainer, batch


def plain_logps(model, batch) -> torch.Tensor:
    """Completion log-probs from the full logits (not TRL's fused head): an independent computation."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (logp * batch["completion_mask"][:, 1:]).sum(dim=1)


def moved_logps(model, batch) -> tuple[torch.Tensor, ...]:
    """(policy chosen, policy rejected, reference chosen, reference rejected) log-probs once the adapter's lora_B are
    drawn at random (a policy that differs from the reference), from the full logits."""
    gen = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=gen) * 0.3
    policy_c, policy_r = plain_logps(model, batch).chunk(2)  # the batch is [chosen..., rejected...]
    with model.disable_adapter():
        ref_c, ref_r = plain_logps(model, batch).chunk(2)
    return policy_c, policy_r, ref_c, ref_r


def base_param_count() -> int:
    from sectune.models import modeling

    return sum(p.numel() for p in modeling.load_model(compose(UNIT)).parameters())


def save_sft_like_adapter(tmp_path, seed=0):
    """A LoRA adapter with non-zero B matrices, saved as an SFT run would save it (adapter/ + result.json)."""
    from sectune.models import modeling

    cfg = compose(UNIT)
    model = modeling.apply_lora(modeling.load_model(cfg), cfg)
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=gen) * 0.3
    run_dir = tmp_path / "sft_run"
    model.save_pretrained(run_dir / "adapter")
    (run_dir / "result.json").write_text(json.dumps({"stage": "sft", "status": "succeeded", "artifacts": {"adapter": "adapter"}}))
    return run_dir


def test_quantized_policy_keeps_the_loaded_adapter_fp32_bit_for_bit(tmp_path):
    """An audit (precision; tests/test_sft.py's quantized adapter test): TRL's DPOTrainer cast a 4/8-bit policy's trainable
    LoRA weights to bf16 in its constructor whatever train.precision said (here fp32), rounding the SFT adapter DPO starts
    from and training it with bf16 AdamW state. The policy's adapter stays as saved, in fp32."""
    from safetensors.torch import load_file

    sft = save_sft_like_adapter(tmp_path)
    _, trainer, _ = build(tmp_path, ["quantization=nf4", f"dpo.init_from={sft}"])
    saved = load_file(str(sft / "adapter" / "adapter_model.safetensors"))
    trainable = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and {n.replace(".default", "") for n in trainable} == set(saved)
    for n, p in trainable.items():
        assert p.dtype == torch.float32 and torch.equal(p.detach().cpu(), saved[n.replace(".default", "")]), n


def test_fresh_adapter_is_the_reference_exactly_and_the_loss_is_log2(tmp_path):
    from sectune.stages import dpo

    _, trainer, batch = build(tmp_path)
    model = trainer.model
    # the reference is the same model with the adapter disabled: no ref model, no second copy of the weights
    assert trainer.ref_model is None and "ref" not in model.peft_config
    lora_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert sum(p.numel() for p in model.parameters()) == base_param_count() + lora_params
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())
    # log π/π_ref = 0 for every completion: B = 0 makes the adapter an exact no-op
    policy = plain_logps(model, batch)
    with model.disable_adapter():
        reference = plain_logps(model, batch)
    assert torch.equal(policy, reference)
    ds = trainer.train_dataset
    assert [torch.equal(a, b) for a, b in zip(dpo.pair_logps(trainer, ds), dpo.pair_logps(trainer, ds, reference=True))] == [True, True]
    assert dpo.fresh_adapter_on_reference(trainer)  # so the stage skips the policy's start pass: it equals the reference's
    loss = trainer.compute_loss(model, batch)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)


def test_trl_dpo_loss_equals_sectune_dpo_loss_on_the_same_logps(tmp_path):
    from sectune import losses
    from sectune.stages import dpo

    _, trainer, batch = build(tmp_path, ["loss.beta=0.3"])
    model = trainer.model
    assert trainer.beta == 0.3
    policy_c, policy_r, ref_c, ref_r = moved_logps(model, batch)  # a policy that differs from the reference
    assert (policy_c - ref_c).abs().max() > 0.1  # the log-ratios are not trivially zero
    assert not dpo.fresh_adapter_on_reference(trainer)  # a trained adapter: the policy's start pass is needed
    expected = losses.dpo_loss(policy_c, policy_r, ref_c, ref_r, beta=0.3)
    torch.testing.assert_close(trainer.compute_loss(model, batch).detach(), expected, rtol=1e-5, atol=1e-6)
    # the stage's held-out pass (TRL's fused LM head, batches sorted by length) gives the same log-probs
    ds = trainer.train_dataset
    for got, want in zip((*dpo.pair_logps(trainer, ds), *dpo.pair_logps(trainer, ds, reference=True)), (policy_c, policy_r, ref_c, ref_r)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    m = dpo.preference_metrics((policy_c, policy_r), (ref_c, ref_r), ds["kind"], 0.3)
    assert m["heldout_dpo_loss"] == pytest.approx(expected.item(), rel=1e-6)
    assert set(m) >= {"preference_accuracy", "logp_margin", "preference_accuracy_verdict", "preference_accuracy_truncated"}


def test_sft_weight_adds_the_chosen_answers_token_mean_nll_to_the_dpo_loss(tmp_path):
    """dpo.sft_weight (RPO): loss = DPO + w × mean NLL over every chosen answer token of the batch."""
    from sectune import losses

    _, trainer, batch = build(tmp_path, ["loss.beta=0.3", "dpo.sft_weight=0.5"])
    model = trainer.model
    policy_c, policy_r, ref_c, ref_r = moved_logps(model, batch)
    chosen_tokens = batch["completion_mask"][:, 1:].chunk(2)[0].sum()
    expected = losses.dpo_loss(policy_c, policy_r, ref_c, ref_r, beta=0.3) + 0.5 * (-policy_c.sum() / chosen_tokens)
    torch.testing.assert_close(trainer.compute_loss(model, batch).detach(), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="dpo.sft_weight"):
        build(tmp_path, ["dpo.sft_weight=-1"])


def test_label_smoothing_trains_robust_dpo_with_that_flip_probability(tmp_path):
    """loss.label_smoothing = ε (robust DPO, Chowdhury et al. 2024): ((1-ε)·-logσ(βΔ) - ε·-logσ(-βΔ)) / (1-2ε). It was
    passed to TRL beside its "sigmoid" loss, which in TRL 1.16 reads no smoothing: ε changed nothing."""
    import torch.nn.functional as F

    _, trainer, batch = build(tmp_path, ["loss.beta=0.3", "loss.label_smoothing=0.2"])
    model = trainer.model
    policy_c, policy_r, ref_c, ref_r = moved_logps(model, batch)
    delta, eps = 0.3 * ((policy_c - ref_c) - (policy_r - ref_r)), 0.2
    expected = ((-(1 - eps) * F.logsigmoid(delta) + eps * F.logsigmoid(-delta)) / (1 - 2 * eps)).mean()
    assert (expected - (-F.logsigmoid(delta).mean())).abs() > 1e-3  # ε matters on these pairs
    torch.testing.assert_close(trainer.compute_loss(model, batch).detach(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reference", ["base", "init"])
def test_sft_adapter_loads_trainable_and_the_reference_shares_the_base_weights(tmp_path, reference):
    from sectune.stages import dpo

    run_dir = save_sft_like_adapter(tmp_path)
    _, trainer, batch = build(tmp_path, [f"dpo.init_from={run_dir}", f"dpo.reference={reference}"])
    model = trainer.model
    assert trainer.ref_model is None
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and trainable == {n for n in lora if ".default." in n}  # the SFT adapter trains, nothing else
    # no second copy of the base weights: the only parameters beside the base model's are LoRA matrices
    base = [n for n, _ in model.named_parameters() if "lora_" not in n]
    assert len(base) == len(set(base)) and not any(".ref." in n for n in base)
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n) == base_param_count()
    ds = trainer.train_dataset
    policy, ref = dpo.pair_logps(trainer, ds), dpo.pair_logps(trainer, ds, reference=True)
    assert not dpo.fresh_adapter_on_reference(trainer)  # an SFT adapter (its B not zero), or its frozen "ref" copy
    if reference == "base":  # π_ref = the base model: the SFT adapter already moves the log-probs
        assert "ref" not in model.peft_config and (policy[0] - ref[0]).abs().max() > 0.1
    else:  # π_ref = a frozen copy of the SFT adapter (LoRA matrices only): equal before training
        assert set(model.peft_config) == {"default", "ref"} and torch.equal(policy[0], ref[0])
        assert dpo.preference_metrics(policy, ref, ds["kind"], 0.1)["preference_accuracy"] == 0.0  # ties count as wrong


def test_full_weight_sft_run_gets_a_fresh_adapter_whose_reference_is_those_weights(tmp_path):
    """lora=none SFT (the tiny analyst's): DPO puts a fresh LoRA adapter on the SFT weights, so the policy
    starts equal to its reference (the adapter off = π_SFT, no second copy), records artifacts.base_model,
    and infer / the held-out table load the saved adapter onto those weights, not onto model.name_or_path."""
    from sectune.evaluation import analyst_eval
    from sectune.models import modeling
    from sectune.stages import dpo, infer

    cfg = compose(UNIT)
    sft = modeling.load_model(cfg)
    with torch.no_grad():
        for p in sft.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)  # "trained" weights
    run_dir = tmp_path / "sft_run"
    sft.save_pretrained(run_dir / "model")
    modeling.load_tokenizer(cfg).save_pretrained(run_dir / "model")
    (run_dir / "result.json").write_text(json.dumps({"stage": "sft", "status": "succeeded", "artifacts": {"model": "model"}}))
    assert dpo.sft_weights(str(run_dir)) == run_dir / "model" and dpo.sft_weights(str(save_sft_like_adapter(tmp_path / "lora"))) is None

    _, trainer, batch = build(tmp_path, [f"dpo.init_from={run_dir}", "lora=r16_all_linear"])
    model = trainer.model
    assert trainer.ref_model is None and {n for n, p in model.named_parameters() if p.requires_grad} == {n for n, _ in model.named_parameters() if "lora_" in n}
    ds = trainer.train_dataset
    policy, ref = dpo.pair_logps(trainer, ds), dpo.pair_logps(trainer, ds, reference=True)
    assert torch.equal(policy[0], ref[0]) and dpo.fresh_adapter_on_reference(trainer)  # fresh adapter: π = π_ref
    torch.testing.assert_close(ref[0], plain_logps(sft, batch).chunk(2)[0], rtol=1e-5, atol=1e-4)  # π_ref = the SFT weights

    # the saved adapter, with the run's result.json as the stage writes it, loads back onto the SFT weights
    dpo_dir = tmp_path / "dpo_run"
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.fill_(0.01)
    model.save_pretrained(dpo_dir / "adapter")
    (dpo_dir / "result.json").write_text(json.dumps({"stage": "dpo", "status": "succeeded", "artifacts": {
        "adapter": "adapter", "base_model": "../sft_run/model"}}))
    assert modeling.adapter_base(dpo_dir / "adapter", cfg) == str(dpo_dir / "../sft_run/model")
    ids = torch.arange(1, 30)[None]
    with torch.no_grad():
        want = model(input_ids=ids).logits
        loaded, _ = analyst_eval.load_policy(cfg, "adapter", dpo_dir / "adapter")
        torch.testing.assert_close(loaded(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)
        chosen = infer.choose_model(str(dpo_dir))
        loaded2, _, _ = infer.load_model(cfg, chosen)
        torch.testing.assert_close(loaded2(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)
        # DPO started from that adapter (a chain: rl/contrastive → dpo) loads it onto the same SFT weights
        _, chained, _ = build(tmp_path / "chain", [f"dpo.init_from={dpo_dir}", "lora=r16_all_linear"])
        torch.testing.assert_close(chained.model.eval()(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)
        # without the record, the local folder the adapter names as its base (base_model_name_or_path): the same answers
        # (session 36: DPO and RL had put it on the configured base, infer alone on this one)
        (dpo_dir / "result.json").write_text(json.dumps({"stage": "dpo", "status": "succeeded", "artifacts": {"adapter": "adapter"}}))
        same, _ = analyst_eval.load_policy(cfg, "adapter", dpo_dir / "adapter")
        torch.testing.assert_close(same(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)
        # and with that folder gone too, the configured (random) base, whose answers differ
        (run_dir / "model").rename(run_dir / "moved")
        wrong, _ = analyst_eval.load_policy(cfg, "adapter", dpo_dir / "adapter")
        assert (wrong(input_ids=ids).logits - want).abs().max() > 1e-2


def test_dpo_takes_the_tokenizer_saved_with_the_sft_run_it_starts_from(tmp_path, monkeypatch):
    """An SFT run that added tokens (the tiny preset's answer keys) and DPO configured without them: the pairs are
    tokenized, and the adapter saved, with the SFT run's tokenizer (before, the configured model's: every added key
    decoded to nothing and the DPO analyst lost its whole answer format)."""
    import sectune.data
    from sectune.runner import RunContext
    from sectune.stages import dpo
    from test_rl import CaughtTokenizer, extended_sft_run, tokenizer_catcher

    seen = []
    monkeypatch.setattr(dpo, "fitting_pairs", tokenizer_catcher(seen))
    monkeypatch.setattr(sectune.data, "preference_pairs", lambda cfg: {"train": PAIRS, "validation": [], "test": []})
    run, vocab = extended_sft_run(tmp_path)
    with pytest.raises(CaughtTokenizer):
        dpo.run(RunContext(cfg=compose([*UNIT, f"dpo.init_from={run}", "lora=r16_all_linear"]), run_dir=tmp_path / "dpo"))
    assert len(seen[0]) == vocab and seen[0].convert_tokens_to_ids('"verdict":') == vocab - 1


def test_init_from_errors_name_the_path_and_what_is_missing(tmp_path):
    from sectune.stages import dpo

    run_dir = save_sft_like_adapter(tmp_path)
    assert dpo.init_source(str(run_dir), "adapter") == run_dir / "adapter"
    assert dpo.init_source(str(run_dir / "adapter"), "adapter") == run_dir / "adapter"
    cases = {
        tmp_path / "nope": "does not exist",
        tmp_path: "neither result.json",
    }
    (tmp_path / "failed").mkdir()
    (tmp_path / "failed" / "result.json").write_text(json.dumps({"stage": "sft", "status": "failed", "artifacts": {}}))
    cases[tmp_path / "failed"] = "result.json says status 'failed'; start from a run that succeeded"
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "result.json").write_text(json.dumps({"stage": "sft", "status": "succeeded", "artifacts": {}}))
    cases[tmp_path / "bare"] = "lists no 'adapter' artifact (stage=sft, status=succeeded"
    for name, res in (("classify", {"stage": "classify", "status": "succeeded", "artifacts": {"adapter": "adapter"}}),
                      ("list", []), ("stringy", {"stage": "sft", "artifacts": "adapter"})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "result.json").write_text(json.dumps(res))
    # a classifier's adapter was taken for an SFT adapter (rl, dpo and contrastive started from it, exit 0)
    cases[tmp_path / "classify"] = "is a stage=classify run (a classifier), not a policy"
    cases[tmp_path / "list"] = "is not a sectune result"  # was AttributeError: 'list' object has no attribute 'get'
    cases[tmp_path / "stringy"] = "is not a sectune result"
    for path, words in cases.items():
        with pytest.raises(ConfigError, match=f"dpo.init_from={path}.*") as e:
            dpo.init_source(str(path), "adapter")
        assert words in str(e.value)
    from sectune.runner import init_source

    with pytest.raises(ConfigError, match="rl.init_from=.*is a stage=classify run"):
        init_source(str(tmp_path / "classify"))
    with pytest.raises(ConfigError, match="rl.init_from=.*is not a sectune result"):
        init_source(str(tmp_path / "list"))
    # an infer run's artifacts.model is the base it answered with: RL started from it as "the SFT weights" (session 36)
    (tmp_path / "infer").mkdir()
    (tmp_path / "infer" / "result.json").write_text(json.dumps({"stage": "infer", "status": "succeeded",
                                                                 "artifacts": {"model": str(run_dir / "adapter")}}))
    with pytest.raises(ConfigError, match="is a stage=infer run .*not a policy"):
        init_source(str(tmp_path / "infer"))
    # a failed run's adapter folder given directly is refused as its run dir is
    res = json.loads((run_dir / "result.json").read_text())
    (run_dir / "result.json").write_text(json.dumps({**res, "status": "failed", "error": "eval_loss is nan"}))
    for call in (lambda: init_source(str(run_dir / "adapter")), lambda: dpo.init_source(str(run_dir / "adapter"), "adapter")):
        with pytest.raises(ConfigError, match="says status 'failed': eval_loss is nan; start from a run that succeeded"):
            call()
    (run_dir / "result.json").write_text(json.dumps(res))
    with pytest.raises(ConfigError, match="holds a LoRA adapter"):
        dpo.init_source(str(run_dir / "adapter"), "model")
    # an adapter that does not load (corrupt weights) is the same kind of error, naming the folder
    (run_dir / "adapter" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    cfg = compose([*UNIT, f"dpo.init_from={run_dir}"])
    from sectune.models import modeling

    with pytest.raises(ConfigError, match=f"dpo.init_from={run_dir}: {run_dir / 'adapter' / 'adapter_model.safetensors'} is damaged"):
        dpo.build_policy(cfg, modeling.model_path(cfg))  # named before any model loads


def test_bad_init_from_exits_nonzero_with_one_line_naming_the_path(tmp_path):
    missing = tmp_path / "no_such_run"
    run = sectune(["stage=dpo", "loss=dpo", "dataset=auth_preferences", *FAST, f"dpo.init_from={missing}"], tmp_path / "run")
    assert run.returncode != 0
    lines = [ln for ln in run.stderr.strip().splitlines() if ln.startswith("sectune: error")]
    assert len(lines) == 1 and str(missing) in lines[0] and "does not exist" in lines[0], run.stderr[-2000:]
    assert run.result["status"] == "failed" and str(missing) in run.result["error"]
    assert "Traceback" not in run.stderr


# ----------------------------------------------------------------------------- real data, end to end
#: a short SFT run, then DPO. Checked by hand over SFT+DPO seeds 42, 1, 2 (test preference accuracy, start →
#: end): β=0.5, 20 steps: 0.535→0.686, 0.535→0.674, 0.547→0.698 (+0.14..0.15); β=0.1, 20 steps: +0.08..0.16;
#: 10 steps is not enough (seed 2: +0.01 at β=0.1, +0.02 at β=0.5).
SFT_ARGS = ["train.max_steps=30", *FAST]
DPO_ARGS = ["stage=dpo", "loss=dpo", "dataset=auth_preferences", "train.max_steps=20", "loss.beta=0.5", *FAST]


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    sft = sectune(SFT_ARGS, root / "sft")
    assert sft.returncode == 0, sft.stderr[-3000:]
    run = sectune([*DPO_ARGS, f"dpo.init_from={root / 'sft'}"], root / "dpo")
    assert run.returncode == 0, run.stderr[-3000:]
    return run


@requires_real_data
def test_dpo_raises_heldout_preference_accuracy_above_its_start(dpo_run):
    res = dpo_run.result
    assert res["status"] == "succeeded" and res["stage"] == "dpo"
    m = res["metrics"]
    assert m["train_steps"] == 20 and m["train_loss"] > 0
    assert m["preference_accuracy"] > m["preference_accuracy_start"] + 0.05, m
    assert m["heldout_dpo_loss"] < m["heldout_dpo_loss_start"], m
    for key in ("logp_margin", "logp_margin_start", "peak_rss_bytes", "preference_accuracy_truncated", "preference_accuracy_schema_invalid"):
        assert key in m, key


@requires_real_data
def test_dpo_adapter_reloads_with_plain_peft(dpo_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir, res = dpo_run.run_dir, dpo_run.result
    adapter = run_dir / res["artifacts"]["adapter"]
    assert (adapter / "adapter_model.safetensors").is_file() and not (adapter / "ref").exists()
    assert (run_dir / res["artifacts"]["loss_curve"]).is_file() and (run_dir / res["artifacts"]["train_history"]).is_file()
    base_path = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), adapter).eval()
    sft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), run_dir.parent / "sft" / "adapter").eval()
    ids = torch.arange(1, 40)[None]
    with torch.no_grad():
        assert (model(input_ids=ids).logits - sft(input_ids=ids).logits).abs().max() > 1e-3  # DPO moved the SFT policy


def test_dpo_loss_type_trains_trls_loss_of_that_name_and_bad_choices_are_refused(tmp_path):
    """dpo.loss_type=hinge (SLiC): mean relu(1 - βΔ), computed by TRL; a name TRL lacks, a smoothing the loss does not
    read and exo_pair without one are refused before the models load."""
    from sectune.config_checks import check_values

    _, trainer, batch = build(tmp_path, ["loss.beta=0.3", "dpo.loss_type=hinge"])
    model = trainer.model
    policy_c, policy_r, ref_c, ref_r = moved_logps(model, batch)
    expected = torch.relu(1 - 0.3 * ((policy_c - ref_c) - (policy_r - ref_r))).mean()
    torch.testing.assert_close(trainer.compute_loss(model, batch).detach(), expected, rtol=1e-5, atol=1e-6)
    base = ["stage=dpo", "loss=dpo", "dataset=auth_preferences"]
    for bad, match in ((["dpo.loss_type=kto"], "^dpo.loss_type=kto: choose one of sigmoid"),
                       (["dpo.loss_type=hinge", "loss.label_smoothing=0.1"], "^loss.label_smoothing=0.1: dpo.loss_type=hinge does not read it"),
                       (["dpo.loss_type=exo_pair"], "^dpo.loss_type=exo_pair: needs loss.label_smoothing > 0")):
        with pytest.raises(ConfigError, match=match):
            check_values(compose([*base, *bad]))
    check_values(compose([*base, "dpo.loss_type=exo_pair", "loss.label_smoothing=0.001"]))


def test_sectunes_dpo_loss_names_are_trls():
    from trl import DPOConfig

    from sectune.loss_settings import DPO_LOSSES

    documented = set(re.findall(r"`'(\w+)'`", DPOConfig.__dataclass_fields__["loss_type"].metadata["help"]))
    assert set(DPO_LOSSES) == documented - {"sft"}
