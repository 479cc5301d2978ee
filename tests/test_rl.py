"""stage=rl: the GRPO pure functions against hand-computed values, TRL's GRPOTrainer agreeing with them (and
with sectune's shared-prompt generation and scoring), a short GRPO run from a brief SFT run raising the mean
reward, the init_from / fresh-adapter contract, and simplified_ppo saying it is supervised fine-tuning."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose, requires_real_data, sectune
from sectune import losses
from sectune.errors import ConfigError

#: a contended 2-core box spends most of a small op's time in OpenMP barriers with 2 threads
#: (a [8,128]x[128,128] matmul: 4 ms vs 0.02 ms with 1); the runs here use one thread each
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------- pure functions
def test_grpo_advantages_are_group_normalised_with_bessels_std():
    adv = losses.grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5]), num_generations=4)
    # group 1: mean 0.5, sample std sqrt(4 · 0.25 / 3) = sqrt(1/3); group 2: all equal -> 0
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    torch.testing.assert_close(adv, torch.tensor([a, -a, -a, a, 0.0, 0.0, 0.0, 0.0]))
    # G = 2: mean 2, std sqrt(2)
    b = 1 / (math.sqrt(2) + 1e-4)
    torch.testing.assert_close(losses.grpo_advantages(torch.tensor([3.0, 1.0]), 2), torch.tensor([b, -b]))
    torch.testing.assert_close(losses.grpo_advantages(torch.tensor([3.0, 1.0]), 2, scale=False), torch.tensor([1.0, -1.0]))
    # scale="batch": the same centring, divided by the std of all 8 rewards: mean 0.5, squares 4 · 0.25, /7
    c = 0.5 / (math.sqrt(1 / 7) + 1e-4)
    torch.testing.assert_close(losses.grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5]), 4, scale="batch"),
                               torch.tensor([c, -c, -c, c, 0.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(losses.grpo_advantages(torch.tensor([3.0, 1.0]), 2, scale="none"), torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="scale"):
        losses.grpo_advantages(torch.ones(4), 2, scale="batches")
    with pytest.raises(ValueError):
        losses.grpo_advantages(torch.ones(5), 2)


def test_k3_kl_is_zero_for_the_reference_itself_and_positive_elsewhere():
    logp = torch.log(torch.tensor([0.5, 0.1, 0.9]))
    assert torch.equal(losses.k3_kl(logp, logp), torch.zeros(3))
    # π = 0.5, π_ref = 0.25: 0.5 - log 0.5 - 1 = 0.193147
    assert losses.k3_kl(torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])).item() == pytest.approx(0.1931472, abs=1e-6)
    assert (losses.k3_kl(logp, logp.roll(1)) > 0).all()


def test_rule_rewards_score_against_the_datasets_annotation_not_the_rules_own_analysis():
    """rl_rewards.rule_reward hands each rule the dataset's annotation column: where an annotation differs from what the
    rules would say of the window (a user's own labels), the annotation is the reference. The TRL side-by-side test
    cannot tell (its annotations are the rules' analyses)."""
    from sectune.data.auth_logs import render_completion
    from sectune.data.auth_rules import analyze_auth_log
    from sectune.evaluation.rl_rewards import rule_reward

    window = LOGS[1]  # one accepted login: the rules say benign
    rules = analyze_auth_log(window.splitlines())
    annotated = {**rules, "verdict": "suspicious"}
    verdict = rule_reward("verdict")
    assert verdict.__name__ == "verdict"
    got = verdict(["p", "p"], [render_completion(annotated), render_completion(rules)], window=[window, window],
                  annotation=[json.dumps(annotated)] * 2)
    assert got == [1.0, 0.0]


# two completions, two token slots: ratios π/π_old [[1.5, 0.9], [0.5, (1.0, masked)]], advantages [1, -2], ε = 0.2
OLD = torch.log(torch.tensor([[0.4, 0.5], [0.2, 0.3]]))
LOGP = OLD + torch.log(torch.tensor([[1.5, 0.9], [0.5, 1.0]]))
REF = torch.log(torch.tensor([[0.3, 0.45], [0.2, 0.3]]))
ADV = torch.tensor([1.0, -2.0])
MASK = torch.tensor([[1, 1], [1, 0]])


def test_grpo_loss_equals_hand_computed_values():
    # per token -min(ρA, clip(ρ)A): 1.5 -> clipped to 1.2: -1.2; 0.9: -0.9; ρ=0.5, A=-2: -min(-1, -1.6) = 1.6
    assert losses.grpo_loss(LOGP, OLD, None, ADV, MASK, 0.2, beta=0.0).item() == pytest.approx(-0.5 / 3, abs=1e-6)
    assert losses.grpo_loss(LOGP, OLD, None, ADV, MASK, 0.2, beta=0.0, loss_type="grpo").item() == pytest.approx((-1.05 + 1.6) / 2, abs=1e-6)
    # + β·k3: token 1 of row 1: π_ref/π = 0.5 -> 0.193147; row 2: 2 -> 2 - log 2 - 1 = 0.306853; sum 0.5
    assert losses.grpo_loss(LOGP, OLD, REF, ADV, MASK, 0.2, beta=0.1).item() == pytest.approx((-0.5 + 0.05) / 3, abs=1e-6)
    # KL is 0 for a policy equal to the reference: the same loss as without the KL term
    assert losses.grpo_loss(LOGP, OLD, LOGP, ADV, MASK, 0.2, beta=0.5).item() == pytest.approx(-0.5 / 3, abs=1e-6)
    # the gradient pushes the positive-advantage token inside the clip up, and ignores the clipped ones
    logp = LOGP.clone().requires_grad_(True)
    losses.grpo_loss(logp, OLD, None, ADV, MASK, 0.2, beta=0.0).backward()
    assert logp.grad[0, 1] < 0 and logp.grad[0, 0] == 0 and logp.grad[1, 0] == 0 and logp.grad[1, 1] == 0


def test_clip_fraction_counts_tokens_whose_gradient_the_clip_removes():
    assert losses.clip_fraction(LOGP, OLD, ADV, MASK, 0.2).item() == pytest.approx(2 / 3)
    assert losses.clip_fraction(OLD, OLD, ADV, MASK, 0.2).item() == 0.0  # π = π_old (μ = 1): nothing clipped


def test_curve_metrics_average_the_first_and_last_quarter_of_the_rewarded_steps():
    from sectune.stages import rl

    steps = [{"step": i, "reward": r, "verdict_mean": r / 2, "kl": 0.1 * i, "clip_fraction": 0.0, "completion_length": 10}
             for i, r in enumerate([0.1, 0.3, 0.5, 0.5, 0.6, 0.8, 0.7, 0.9], start=1)]
    steps.insert(3, {"step": 3.5, "kl": 0.0, "loss": 0.0})  # μ > 1: a step without a generation logs no reward
    m = rl.curve_metrics(steps)
    assert m["reward_mean_start"] == pytest.approx(0.2) and m["reward_mean_end"] == pytest.approx(0.8)
    assert m["reward_verdict_start"] == pytest.approx(0.1) and m["reward_verdict_end"] == pytest.approx(0.4)
    assert m["kl_mean"] == pytest.approx(sum(0.1 * i for i in range(1, 9)) / 9) and m["clip_fraction_mean"] == 0.0


def test_heldout_rewards_are_the_weighted_total_of_each_windows_greedy_answer(monkeypatch):
    """rl_rewards.heldout_rewards (the before/after number and keep_best's score) had no test of its own: per window,
    Σ weight · reward of the greedy answer, a reward that returned None counting 0, the model's mode put back."""
    from sectune import inference
    from sectune.evaluation.rl_rewards import heldout_rewards

    records = unit_records()
    seen = {}

    def fake_generate(model, tokenizer, prompts, gen, **kw):
        seen.update(prompts=prompts, do_sample=gen.do_sample, max_new_tokens=gen.max_new_tokens)
        return ["answer 0", "answer 1"]

    def first(prompts, completions, window, annotation, **_):
        assert completions == ["answer 0", "answer 1"] and window == LOGS and annotation == [r["completion"] for r in records]
        return [1.0, 0.0]

    def second(prompts, completions, **_):
        return [None, 0.5]

    monkeypatch.setattr(inference, "generate", fake_generate)
    model = torch.nn.Linear(1, 1).train()
    got = heldout_rewards(compose(UNIT), model, None, records, [first, second], [2.0, 0.5])
    assert got == pytest.approx([2.0 * 1.0 + 0.5 * 0.0, 2.0 * 0.0 + 0.5 * 0.5]) and model.training
    assert seen == {"prompts": [r["prompt"] for r in records], "do_sample": False, "max_new_tokens": 12}  # greedy, rl.max_completion_length


def test_heldout_best_scores_every_eval_steps_and_restores_the_best_weights():
    """rl.eval_steps / rl.keep_best: the held-out reward is taken every eval_steps steps; restore() puts
    back the trainable weights of the best score (step 0, the starting policy, included), not frozen ones."""
    from types import SimpleNamespace

    from sectune.stages import rl

    model = torch.nn.Linear(2, 1)
    model.bias.requires_grad_(False)
    scores = iter([0.5, 0.4, 0.7, 0.6])  # step 0, 2, 4, 6
    best = rl.HeldOutBest(lambda m: next(scores), eval_steps=2)
    assert best.evaluate(model, 0) == 0.5
    for step in range(1, 7):
        with torch.no_grad():
            model.weight.fill_(float(step))
            model.bias.fill_(float(step))
        best.on_step_end(None, SimpleNamespace(global_step=step), None, model=model)
    assert best.scores == {0: 0.5, 2: 0.4, 4: 0.7, 6: 0.6} and (best.step, best.score) == (4, 0.7)
    best.restore(model)
    assert torch.all(model.weight == 4.0) and torch.all(model.bias == 6.0)  # frozen weights untouched
    never = rl.HeldOutBest(lambda m: 1.0, eval_steps=0)
    never.on_step_end(None, SimpleNamespace(global_step=4), None, model=model)
    assert never.scores == {}


def test_heldout_best_keeps_a_later_step_only_when_its_paired_gain_beats_one_standard_error():
    """rl.keep_best_se: per-window held-out rewards; a later step replaces the kept one only when its mean gain
    exceeds keep_best_se standard errors of the paired per-window differences. Hand-computed:
    step 0 = [.5 .5 .5 .5]; step 2 = [1 .5 .5 .5]: diffs [.5 0 0 0], mean .125, sd .25, SE .125 -> gain .125 is
    not > 1 SE (kept: step 0); step 4 = [.9 .9 .9 .5]: diffs [.4 .4 .4 0], mean .3, sd .2, SE .1 -> kept."""
    from sectune.stages import rl

    model = torch.nn.Linear(2, 1)
    runs = {0: [0.5, 0.5, 0.5, 0.5], 2: [1.0, 0.5, 0.5, 0.5], 4: [0.9, 0.9, 0.9, 0.5]}

    def tracker(margin_se):  # the model's weight says which step's per-window rewards score_fn returns
        return rl.HeldOutBest(lambda m: runs[int(m.weight[0, 0])], eval_steps=2, margin_se=margin_se)

    def evaluate_at(best, steps):
        for step in steps:
            with torch.no_grad():
                model.weight.fill_(float(step))
            best.evaluate(model, step)
        return best

    best = evaluate_at(tracker(1.0), (0, 2))
    assert best.scores == {0: 0.5, 2: 0.625} and best.step == 0 and best.score == 0.5
    assert math.isclose(best.margin(runs[2]), 0.125)
    assert math.isclose(best.margin(runs[4]), 0.1)
    evaluate_at(best, (4,))
    assert best.step == 4 and math.isclose(best.score, 0.8)
    # margin 0 (the earlier behaviour): the first higher mean wins, step 2
    assert evaluate_at(tracker(0.0), (0, 2)).step == 2
    # 2.5 SE: step 4's gain of 0.3 (> 0.25) is still kept; at 3.5 SE (0.35) it is not
    for k, kept in ((2.5, 4), (3.5, 0)):
        assert evaluate_at(tracker(k), (0, 4)).step == kept, k


def test_the_heldout_reward_curve_goes_to_the_open_wandb_run_on_trainers_step_axis(monkeypatch):
    """The validation curve rl.keep_best chooses on was in train_history.json and the plot but never in W&B (an audit,
    session 39); nothing is logged where no run is open."""
    import sys
    from types import SimpleNamespace

    from sectune.stages import rl

    logged = []
    monkeypatch.setitem(sys.modules, "wandb", SimpleNamespace(run=SimpleNamespace(log=logged.append)))
    best = rl.HeldOutBest(lambda m: [1.0, 0.0, 0.5, 0.5], eval_steps=2)
    best.evaluate(torch.nn.Linear(2, 1), 0)
    best.evaluate(torch.nn.Linear(2, 1), 4)
    assert logged == [{"eval/reward_heldout": 0.5, "train/global_step": 0}, {"eval/reward_heldout": 0.5, "train/global_step": 4}]
    monkeypatch.setitem(sys.modules, "wandb", SimpleNamespace(run=None))
    best.evaluate(torch.nn.Linear(2, 1), 6)
    assert len(logged) == 2 and best.scores[6] == 0.5


def test_keep_best_se_must_not_be_negative(tmp_path):
    from sectune.runner import RunContext
    from sectune.stages import rl

    with pytest.raises(ConfigError, match=r"rl.keep_best_se=-1.0: must be >= 0"):
        rl.run_grpo(RunContext(cfg=compose([*UNIT, "rl.keep_best_se=-1"]), run_dir=tmp_path))
    with pytest.raises(ConfigError, match=r"rl.scale_rewards='batches': choose group"):
        rl.run_grpo(RunContext(cfg=compose([*UNIT, "rl.scale_rewards=batches"]), run_dir=tmp_path))



class CaughtTokenizer(Exception):
    """A stage reached the first use of its tokenizer (:func:`tokenizer_catcher`): the test stops it there."""


def tokenizer_catcher(seen: list):
    def catch(tokenizer, *a, **k):
        seen.append(tokenizer)
        raise CaughtTokenizer

    return catch


def extended_sft_run(tmp_path):
    """A lora=none SFT run dir (full weights, the tiny analyst's) whose tokenizer adds a whole-token answer key
    the configured model lacks, as the tiny preset's do."""
    from sectune.models import modeling

    cfg = compose(["logger=none"])
    tok = modeling.load_tokenizer(cfg)
    tok.add_tokens(['"verdict":'])
    model = modeling.load_model(cfg)
    model.resize_token_embeddings(len(tok))
    run = tmp_path / "sft"
    modeling.save_pretrained_atomic(model, tok, run / "model")
    (run / "result.json").write_text(json.dumps({"stage": "sft", "status": "succeeded", "artifacts": {"model": "model"}}))
    return run, len(tok)


@pytest.mark.parametrize("loss", ["grpo", "simplified_ppo"])
def test_quantized_policy_adapter_stays_fp32_through_the_trl_trainer(tmp_path, loss):
    """An audit (precision; tests/test_sft.py's quantized adapter test): TRL's GRPOTrainer and SFTTrainer (simplified_ppo)
    cast a 4/8-bit policy's trainable LoRA weights to bf16 in their constructor whatever train.precision said (here fp32):
    bf16 adapters, bf16 AdamW state. They leave the constructor as they entered it, bit for bit."""
    from sectune.models import modeling
    from sectune.stages import rl

    cfg = compose([*UNIT, f"loss={loss}", "quantization=nf4", "rl.rewards.reward_model=0"])
    tokenizer = modeling.load_tokenizer(cfg)
    model = rl.build_policy(cfg, modeling.model_path(cfg))[0]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert before and all(t.dtype == torch.float32 for t in before.values())  # peft's fp32 adapter
    if loss == "grpo":
        funcs, weights, _ = rl.reward_functions(cfg)
        rl.build_grpo_trainer(cfg, model, tokenizer, unit_records(), funcs, weights, tmp_path / "ckpt")
    else:
        rl.build_sft_trainer(cfg, model, tokenizer, unit_records(), tmp_path / "ckpt")
    after = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert after.keys() == before.keys()
    for n, p in after.items():
        assert p.dtype == torch.float32 and torch.equal(p.detach(), before[n]), n


@pytest.mark.parametrize("loss", ["grpo", "simplified_ppo"])
def test_rl_takes_the_tokenizer_saved_with_the_sft_weights_it_starts_from(tmp_path, monkeypatch, loss):
    """An SFT run that added tokens (the tiny preset's answer keys): the policy must read and write with that
    tokenizer, not the configured model's, or every added key decodes to nothing (attack success 1.0 seen)."""
    from sectune.runner import RunContext
    from sectune.stages import rl

    seen = []
    capture = tokenizer_catcher(seen)
    monkeypatch.setattr(rl, "fitting_prompts", capture)  # GRPO: the first use of the tokenizer
    monkeypatch.setattr(rl, "build_sft_trainer", lambda cfg, model, tokenizer, *a, **k: capture(tokenizer))  # simplified PPO
    monkeypatch.setattr(rl.data, "sft_splits", lambda cfg: {"train": unit_records(), "validation": [], "test": []})
    run, vocab = extended_sft_run(tmp_path)
    cfg = compose([*UNIT, f"loss={loss}", f"rl.init_from={run}", "rl.allow_fresh_adapter=false", "rl.rewards.reward_model=0"])
    with pytest.raises(CaughtTokenizer):
        (rl.run_grpo if loss == "grpo" else rl.run_simplified_ppo)(RunContext(cfg=cfg, run_dir=tmp_path / "rl"))
    assert len(seen[0]) == vocab and seen[0].convert_tokens_to_ids('"verdict":') == vocab - 1


# --------------------------------------------------------------------- TRL side by side (tiny model)
LOGS = [
    "Dec 10 06:55:46 LabSZ sshd[24200]: Failed password for root from 173.234.31.186 port 38926 ssh2\n"
    "Dec 10 06:55:48 LabSZ sshd[24200]: Failed password for root from 173.234.31.186 port 38926 ssh2",
    "Dec 10 09:32:20 LabSZ sshd[24680]: Accepted password for fztu from 119.137.62.142 port 49116 ssh2",
]
UNIT = ["stage=rl", "loss=grpo", "logger=none", "train.precision=fp32", "train.max_steps=1", "train.batch_size=2",
        "rl.num_generations=4", "rl.max_completion_length=12", "rl.allow_fresh_adapter=true", "loss.beta=0.1"]


def unit_records():
    from sectune.data.auth_logs import render_completion, render_prompt
    from sectune.data.auth_rules import analyze_auth_log

    return [{"prompt": render_prompt(log), "completion": render_completion(analyze_auth_log(log.splitlines())), "id": str(i), "label": "x"}
            for i, log in enumerate(LOGS)]


@pytest.fixture(scope="module")
def unit_trainer(tmp_path_factory):
    from sectune.models import modeling
    from sectune.stages import rl

    cfg = compose(UNIT)
    tokenizer = modeling.load_tokenizer(cfg)
    model, start, fresh, _, _ = rl.build_policy(cfg, modeling.model_path(cfg))
    assert fresh and "fresh" in start
    funcs, weights, _ = rl.reward_functions(cfg)
    trainer = rl.build_grpo_trainer(cfg, model, tokenizer, unit_records(), funcs, weights, tmp_path_factory.mktemp("grpo") / "ckpt")
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop; one micro-batch here
    return cfg, trainer


def generation_batch(trainer):
    torch.manual_seed(0)
    return trainer._generate_and_score_completions([dict(trainer.train_dataset[i]) for i in (0, 0, 0, 0, 1, 1, 1, 1)])


def trl_logps(trainer, inputs, reference=False):
    """TRL's own padded-batch log-probs (its fused LM head), the adapter disabled for the reference."""
    import contextlib

    from trl import GRPOTrainer
    from trl.trainer.utils import use_adapter

    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    with use_adapter(trainer.model, adapter_name=None) if reference else contextlib.nullcontext():
        return GRPOTrainer._get_per_token_logps_and_entropies(trainer, trainer.model, ids, mask, ids.shape[1] - inputs["prompt_ids"].shape[1])[0]


def test_reference_is_the_model_with_the_adapter_disabled_and_kl_is_zero_for_a_fresh_adapter(unit_trainer):
    from sectune.models import modeling

    cfg, trainer = unit_trainer
    model = trainer.model
    assert trainer.ref_model is None and set(model.peft_config) == {"default"}  # no second copy of anything
    base = sum(p.numel() for p in modeling.load_model(cfg).parameters())
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n) == base
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())
    inputs = generation_batch(trainer)  # fresh adapter: B = 0, the policy IS the reference
    logps = trainer._get_per_token_logps_and_entropies(model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
                                                       torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1), inputs["completion_ids"].shape[1])[0]
    m = inputs["completion_mask"].bool()
    assert torch.equal(logps[m], inputs["ref_per_token_logps"][m])
    trainer._metrics["train"].clear()
    trainer._compute_loss(model, inputs)
    assert trainer._metrics["train"]["kl"] == [0.0]


def test_trl_grpo_loss_equals_sectune_grpo_loss_and_shared_prompt_scoring_equals_trls(unit_trainer):
    _, trainer = unit_trainer
    model = trainer.model
    gen = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():  # a policy that differs from the reference
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=gen) * 0.3
    inputs = generation_batch(trainer)
    m = inputs["completion_mask"].bool()
    policy, ref = trl_logps(trainer, inputs), trl_logps(trainer, inputs, reference=True)
    # sectune's shared-prompt rows give TRL's padded-batch log-probs, for the policy and the reference
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    shared = trainer._get_per_token_logps_and_entropies(model, ids, mask, inputs["completion_ids"].shape[1])[0]
    torch.testing.assert_close(shared[m], policy[m], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(inputs["ref_per_token_logps"][m], ref[m], rtol=1e-4, atol=1e-4)
    assert (policy - ref)[m].abs().max() > 0.05  # the KL term is not trivially zero
    # the advantages TRL used are sectune's group normalisation of the weighted total reward
    w = torch.tensor(trainer.args.reward_weights)
    per_func = torch.tensor([list(trainer._logs["rewards"][n])[-8:] for n in trainer.reward_func_names]).T
    torch.testing.assert_close(inputs["advantages"], losses.grpo_advantages(per_func @ w, 4))
    # the untrained unit model's rewards tie within each group: with fixed rewards that differ (and a group of near
    # ties), TRL's advantages under each rl.scale_rewards are sectune's grpo_advantages of the weighted total
    fixed = torch.rand(8, len(w), generator=torch.Generator().manual_seed(3))
    fixed[4:] = fixed[4] + 0.01 * fixed[4:]
    trainer._calculate_rewards = lambda *args: fixed.clone()
    by_scale = {}
    try:
        for scale in ("group", "batch", "none"):
            trainer.scale_rewards = scale
            by_scale[scale] = generation_batch(trainer)["advantages"]
            torch.testing.assert_close(by_scale[scale], losses.grpo_advantages(fixed @ w, 4, scale=scale))
    finally:
        trainer.scale_rewards = "group"
        del trainer._calculate_rewards
    assert not torch.allclose(by_scale["group"], by_scale["batch"])
    assert by_scale["batch"][4:].abs().max() < 0.2 < by_scale["group"][4:].abs().max()  # near ties stay near 0 under batch
    # TRL's loss (its own padded path) = sectune.losses.grpo_loss on the same log-probs (π_old = π: μ = 1)
    trainer.shared_prompt = False
    try:
        model.zero_grad()
        trl_loss = trainer._compute_loss(model, inputs)
        trl_loss.backward()
        trl_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    finally:
        trainer.shared_prompt = True
    expected = losses.grpo_loss(policy, policy.detach(), ref, inputs["advantages"], inputs["completion_mask"], 0.2, beta=0.1, loss_type="dapo")
    torch.testing.assert_close(trl_loss.detach(), expected.detach(), rtol=1e-5, atol=1e-6)
    # and the shared-prompt path gives the same gradient
    model.zero_grad()
    trainer._compute_loss(model, inputs).backward()
    assert trl_grads and all(torch.allclose(p.grad, trl_grads[n], rtol=1e-3, atol=1e-6) for n, p in model.named_parameters() if n in trl_grads)


def test_shared_prompt_sampling_runs_on_a_cpu_and_a_gpu_samples_with_trls_generate(unit_trainer, monkeypatch):
    """Measured on an H200: the token-by-token shared-prompt sampler took 2x TRL's whole step there."""
    from types import SimpleNamespace

    _, trainer = unit_trainer
    assert trainer.shared_prompt and trainer._shared_generation_ok(None, None)
    monkeypatch.setattr(trainer, "accelerator", SimpleNamespace(device=torch.device("cuda", 0)))
    assert not trainer._shared_generation_ok(None, None)


def test_shared_prompt_sampling_is_generate_greedy_when_top_k_is_one():
    from sectune.models import modeling
    from sectune.training.grpo_trainer import sample_shared_prompt

    cfg = compose(UNIT)
    tok = modeling.load_tokenizer(cfg)
    model = modeling.load_model(cfg).eval()
    prompts = [r["prompt"] for r in unit_records()]  # two lengths: left padding is exercised
    ids = [tok(p)["input_ids"] for p in prompts]
    mine = sample_shared_prompt(model, [i for i in ids for _ in range(3)], max_new_tokens=10, eos_token_ids=[tok.eos_token_id],
                                pad_token_id=tok.pad_token_id, top_k=1)
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = model.generate(**enc, do_sample=False, max_new_tokens=10, pad_token_id=tok.pad_token_id)[:, enc["input_ids"].shape[1]:]
    for i, row in enumerate(ref.tolist()):
        assert mine[3 * i] == mine[3 * i + 1] == mine[3 * i + 2] == row[: len(mine[3 * i])] and len(mine[3 * i]) > 0


def test_shared_prompt_sampling_applies_the_repetition_penalty_as_generate_does():
    """GRPO now samples with generation.repetition_penalty (seed 000's 1.2 outside the tiny preset), which the shared
    sampler did not apply: such runs fell back to TRL's generate (slower on a CPU). Greedy (top_k=1), it must
    decode exactly what generate decodes with the penalty, and something else without it."""
    from sectune.models import modeling
    from sectune.training.grpo_trainer import sample_shared_prompt

    cfg = compose(UNIT)
    tok = modeling.load_tokenizer(cfg)
    model = modeling.load_model(cfg).eval()
    prompts = [r["prompt"] for r in unit_records()]
    # and a prompt of one token repeated: the random tiny model then repeats its first answer token, so the penalty must
    # change the decode (the windows' 12-token answers repeat nothing with the tokenizer a clone without ../shared builds)
    ids = [tok(p)["input_ids"] for p in prompts] + [[1000] * 8]
    width = max(map(len, ids))  # left-padded, as generate takes a batch
    enc = {"input_ids": torch.tensor([[tok.pad_token_id] * (width - len(i)) + i for i in ids]),
           "attention_mask": torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])}
    outs = {}
    for rp in (1.0, 3.0):
        mine = sample_shared_prompt(model, [i for i in ids for _ in range(2)], max_new_tokens=12, eos_token_ids=[tok.eos_token_id],
                                    pad_token_id=tok.pad_token_id, top_k=1, repetition_penalty=rp)
        with torch.no_grad():
            ref = model.generate(**enc, do_sample=False, max_new_tokens=12, pad_token_id=tok.pad_token_id,
                                 repetition_penalty=rp)[:, enc["input_ids"].shape[1]:]
        for i, row in enumerate(ref.tolist()):
            assert mine[2 * i] == mine[2 * i + 1] == row[: len(mine[2 * i])] and len(mine[2 * i]) > 0, (rp, i)
        outs[rp] = mine
    assert outs[1.0] != outs[3.0]  # the penalty changed what was decoded


def test_merged_lora_decodes_as_the_adapter_does_and_puts_the_base_weights_back_bit_for_bit():
    from sectune.models import modeling
    from sectune.training.grpo_trainer import sample_shared_prompt

    cfg = compose(UNIT + ["lora=r16_all_linear"])
    tok = modeling.load_tokenizer(cfg)
    torch.manual_seed(0)
    model = modeling.apply_lora(modeling.load_model(cfg), cfg).eval()
    with torch.no_grad():  # a trained adapter: B is no longer zero
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = [tok(r["prompt"])["input_ids"] for r in unit_records()]
    enc = torch.tensor([ids[0]])
    kw = dict(max_new_tokens=10, eos_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id, top_k=1)
    with torch.no_grad():
        plain_logits = model(input_ids=enc).logits
    plain = sample_shared_prompt(model, [i for i in ids for _ in range(2)], **kw)
    with modeling.merged_lora(model) as m:
        layers = modeling._lora_layers(m)
        assert layers and all(layer.merged for layer in layers)
        with torch.no_grad():
            merged_logits = m(input_ids=enc).logits
        merged = sample_shared_prompt(m, [i for i in ids for _ in range(2)], **kw)
    assert not any(layer.merged for layer in layers)
    assert (merged_logits - plain_logits).abs().max() < 1e-4 and merged == plain
    after = dict(model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)  # base and adapter: every bit as before


def test_inference_generate_decodes_a_lora_model_merged_with_the_same_texts_and_weights_back():
    """stage=infer, the held-out table, GRPO's held-out evaluations and the injection evaluation all decode through
    inference.generate: on a CPU a LoRA model is merged while it decodes, gives the texts the unmerged model gives,
    and has every weight back afterwards."""
    from sectune.inference import generate
    from sectune.models import modeling

    cfg = compose(UNIT + ["lora=r16_all_linear"])
    tok = modeling.load_tokenizer(cfg)
    torch.manual_seed(0)
    model = modeling.apply_lora(modeling.load_model(cfg), cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    prompts = [r["prompt"] for r in unit_records()][:3]
    greedy = OmegaConf.create({"max_new_tokens": 8, "do_sample": False, "repetition_penalty": 1.0})
    merged_during = []
    real_generate = model.generate

    def spy(*a, **kw):
        merged_during.append(all(layer.merged for layer in modeling._lora_layers(model)))
        return real_generate(*a, **kw)

    model.generate = spy
    texts = generate(model, tok, prompts, greedy, batch_size=1)
    assert len(prompts) >= 2 and merged_during == [True] * len(prompts)  # one batch each, every one decoded merged
    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        ids = real_generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)[:, enc["input_ids"].shape[1]:]
    assert texts == tok.batch_decode(ids, skip_special_tokens=True) and any(t.strip() for t in texts)
    after = dict(model.named_parameters())
    assert not any(layer.merged for layer in modeling._lora_layers(model))
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_merged_lora_leaves_a_quantized_base_and_a_plain_model_alone():
    from sectune.models import modeling

    cfg = compose(UNIT + ["lora=r16_all_linear", "quantization=nf4"])
    model = modeling.apply_lora(modeling.load_model(cfg), cfg)
    assert modeling.quantized_module_count(model) > 0
    with modeling.merged_lora(model) as m:
        assert m is model and not any(layer.merged for layer in modeling._lora_layers(model))
    plain = modeling.load_model(compose(UNIT))
    with modeling.merged_lora(plain) as m:
        assert m is plain


def test_merged_lora_leaves_an_adapter_on_a_tied_lm_head_unmerged():
    """LoRA on ``lm_head`` of a model whose head is its input embeddings (the tiny hdfs_federated preset; SmolLM and
    Llama-3.2-1B tie them): folded in, the adapter changed the embeddings as well, and decoding read logits 4.9 apart
    from the adapter's own (an audit, session 44). Such a model decodes unmerged."""
    from sectune.models import modeling

    cfg = compose(UNIT + ["lora=r16_all_linear", "lora.target_modules=[q_proj,v_proj,lm_head]"])
    torch.manual_seed(0)
    model = modeling.apply_lora(modeling.load_model(cfg), cfg).eval()
    head = model.get_output_embeddings()
    assert head.get_base_layer().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()  # tied
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
        enc = torch.tensor([[1, 5, 9, 3]])
        plain = model(input_ids=enc).logits
        with modeling.merged_lora(model) as m:
            assert not any(layer.merged for layer in modeling._lora_layers(m))
            torch.testing.assert_close(m(input_ids=enc).logits, plain)


def test_merged_lora_does_not_copy_base_weights_past_its_memory_limit(monkeypatch):
    from sectune.models import lora, modeling

    cfg = compose(UNIT + ["lora=r16_all_linear"])
    model = modeling.apply_lora(modeling.load_model(cfg), cfg)
    targeted = sum(layer.get_base_layer().weight.nbytes for layer in modeling._lora_layers(model))
    monkeypatch.setattr(lora, "MERGE_COPY_LIMIT", targeted - 1)  # one byte short: decoded unmerged
    with modeling.merged_lora(model) as m:
        assert m is model and not any(layer.merged for layer in modeling._lora_layers(model))
    monkeypatch.setattr(lora, "MERGE_COPY_LIMIT", targeted)
    with modeling.merged_lora(model):
        assert all(layer.merged for layer in modeling._lora_layers(model))


# ------------------------------------------------------------------------------ contract errors
def test_init_from_and_reward_settings_errors_name_what_to_fix(tmp_path, monkeypatch):
    from sectune.stages import rl

    missing = tmp_path / "no_such_run"
    with pytest.raises(ConfigError, match=f"{missing}.*does not exist.*allow_fresh_adapter"):
        rl.build_policy(compose(["stage=rl", f"rl.init_from={missing}"]), "unused")
    with pytest.raises(ConfigError, match="rl.init_from is not set"):
        rl.build_policy(compose(["stage=rl"]), "unused")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "result.json").write_text(json.dumps({"stage": "sft", "status": "succeeded", "artifacts": {}}))
    with pytest.raises(ConfigError, match="lists no adapter or model"):
        rl.init_source(str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="rl.reward_model is not set"):
        rl.reward_functions(compose(["stage=rl", "rl.rewards.reward_model=0.5"]))
    (tmp_path / "not_a_reward_run").mkdir()
    with pytest.raises(ConfigError, match=f"^rl.reward_model={tmp_path / 'not_a_reward_run'}: "):  # the error named the path, not the key
        rl.reward_functions(compose(["stage=rl", "rl.rewards.reward_model=0.5", f"rl.reward_model={tmp_path / 'not_a_reward_run'}"]))
    # a reward model saved without score statistics (an older sectune) is refused unless raw scores are asked for
    old_rm = type("OldRM", (), {"kind": "trained", "norm": None, "score": lambda self, p, c: [5.0] * len(c)})()
    monkeypatch.setattr("sectune.models.reward_model.load_reward_model", lambda *a, **k: old_rm)
    with pytest.raises(ConfigError, match="no score statistics.*rl.normalize_reward_model=false"):
        rl.reward_functions(compose(["stage=rl", "rl.rewards.reward_model=0.5", "rl.reward_model=somewhere"]))
    funcs, w, kind = rl.reward_functions(compose(["stage=rl", "rl.rewards.reward_model=0.5", "rl.reward_model=somewhere",
                                                  "rl.normalize_reward_model=false"]))
    assert kind == "trained" and w[-1] == 0.5 and funcs[-1](["p"], ["c"]) == [5.0]
    with pytest.raises(ConfigError, match="unknown reward 'verdcit'"):
        rl.reward_functions(compose(["stage=rl", "+rl.rewards.verdcit=1"]))
    with pytest.raises(ConfigError, match="predicted peak .* GB.*or use quantization=nf4 / train.gradient_checkpointing=true"):
        rl.run(type("Ctx", (), {"cfg": compose(["stage=rl", "loss=grpo", "reward.memory_limit_gb=0.001"]), "run_dir": tmp_path})())
    # the advice names only what the run does not use yet (auth_grpo, nf4 with checkpointing, was told to use both)
    with pytest.raises(ConfigError, match=r"model.max_seq_length$"):
        rl.run(type("Ctx", (), {"cfg": compose(["stage=rl", "loss=grpo", "reward.memory_limit_gb=0.001", "quantization=nf4",
                                                "lora=r4_attention", "train.gradient_checkpointing=true"]), "run_dir": tmp_path})())


def test_simplified_ppo_preset_is_the_seeds_recipe_and_picks_the_best_windows():
    from sectune.stages import rl

    cfg = compose(["stage=rl", "loss=simplified_ppo"])
    assert (cfg.loss.name, cfg.train.max_steps, cfg.train.batch_size, cfg.train.grad_accum, cfg.train.optimizer, cfg.rl.lr_scale) == \
        ("simplified_ppo", 50, 1, 4, "adafactor", 0.5)
    recs = [{"id": str(i), "label": lab, "completion": json.dumps({"failed_logins": n, "source_ips": [{"ip": "a"}] * (n % 2)})}
            for i, (lab, n) in enumerate([("a", 1), ("a", 9), ("b", 3), ("b", 0), ("c", 5), ("a", 4)])]
    assert [r["id"] for r in rl.highest_quality(recs, 4)] == ["1", "2", "4", "5"]  # per class, most evidence first
    assert [r["id"] for r in rl.highest_quality(recs, 2, fits=lambda r: r["id"] != "1")] == ["5", "2"]


def test_simplified_ppo_never_trains_on_a_window_the_max_samples_split_holds_out(tmp_path):
    """An audit (session 25): with dataset.max_samples=N simplified_ppo split every window and took N of that split's
    train windows, while every other stage (the pipeline's table, infer, evaluate) held out the N-window split's test
    windows: 10 of 150 windows trained on were test windows there. N is 60 here, well under both the real logs' 289
    windows and the 149 a fresh clone generates (150 asked for more train windows than the generated logs hold: it
    failed on every clone without ../shared)."""
    from sectune import data
    from sectune.stages import rl

    cfg = compose(["stage=rl", "loss=simplified_ppo", "dataset.max_samples=60", f"paths.cache_dir={tmp_path / 'cache'}"])
    own = data.sft_splits(cfg)
    held = {r["id"] for r in own["validation"] + own["test"]}
    picked = rl.simplified_ppo_windows(cfg)
    assert len(picked) == 60 and not {rl._parent_id(r["id"]) for r in picked} & held
    full = data.sft_splits(compose(["dataset.max_samples=null", f"paths.cache_dir={tmp_path / 'cache'}"]))["train"]
    assert {rl._parent_id(r["id"]) for r in full} & held  # without the exclusion the pool held some of them


# ---------------------------------------------------------------------------- runs, end to end
#: a brief full-weight SFT run (30 steps: the tiny model then writes JSON-shaped answers), then GRPO with a LoRA
#: adapter on those weights. The reward: valid JSON within 32 tokens at temperature 0.7, which 30 SFT steps leave
#: at ~0.7 and the policy can move in 16 steps (checked by hand over 7 seeds, see the stage's report)
SFT_ARGS = ["train.max_steps=30", "lora=none", "logger=none", "generation.preview_samples=0", "train.batch_size=4"]
GRPO_ARGS = ["stage=rl", "loss=grpo", "logger=none", "train.precision=fp32", "train.max_steps=16", "train.batch_size=2",
             "rl.num_generations=8", "rl.max_completion_length=32", "rl.temperature=0.7", "rl.lr_scale=2",
             "rl.rewards.json_valid=1", "rl.rewards.schema_valid=0", "rl.rewards.verdict=0", "rl.rewards.fields=0"]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl")
    run = sectune(SFT_ARGS, root / "sft", env=ONE_THREAD)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def grpo_run(sft_run):
    run = sectune([*GRPO_ARGS, f"rl.init_from={sft_run.run_dir}"], sft_run.run_dir.parent / "grpo", env=ONE_THREAD)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


@requires_real_data
def test_grpo_raises_the_mean_reward_and_logs_every_reward_per_step(grpo_run):
    res = grpo_run.result
    assert res["status"] == "succeeded" and res["stage"] == "rl"
    m = res["metrics"]
    assert m["train_steps"] == 16 and m["fresh_adapter"] == 0 and m["learning_rate"] == pytest.approx(2e-2)
    assert m["reward_mean_end"] > m["reward_mean_start"] + 0.05, m
    assert m["kl_mean"] > 0 and m["clip_fraction_mean"] == 0.0  # μ = 1: π_old = π, nothing to clip
    # the same validation windows scored greedily before and after (0..1: json_valid is the only weight here)
    assert m["reward_heldout_windows"] > 0 and 0 <= m["reward_heldout_start"] <= 1 and 0 <= m["reward_heldout_end"] <= 1
    # rl.keep_best (eval_steps 0: start and end only): the saved adapter is the better of the two
    assert m["reward_heldout_best"] == max(m["reward_heldout_start"], m["reward_heldout_end"])
    assert m["best_step"] == (16 if m["reward_heldout_end"] >= m["reward_heldout_start"] else 0)
    assert m["kept_step"] == m["best_step"]  # rl.keep_best (default): the saved adapter is the best step's
    history = json.loads((grpo_run.run_dir / res["artifacts"]["train_history"]).read_text())
    assert history["heldout"] == {"0": m["reward_heldout_start"], "16": m["reward_heldout_end"]}  # the end evaluation too
    steps = history["steps"]
    assert len(steps) == 16
    for key in ("reward", "reward_std", "kl", "clip_fraction", "completion_length", *(f"{n}_{s}" for n in ("json_valid", "schema_valid", "verdict", "fields") for s in ("mean", "std"))):
        assert all(key in s for s in steps), key
    assert (grpo_run.run_dir / res["artifacts"]["reward_curve"]).stat().st_size > 10_000


@requires_real_data
def test_grpo_adapter_reloads_with_plain_peft_on_the_sft_weights(grpo_run, sft_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = grpo_run.run_dir / grpo_run.result["artifacts"]["adapter"]
    assert (adapter / "adapter_model.safetensors").is_file() and not (adapter / "ref").exists()
    base_path = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base_path == str(sft_run.run_dir / "model")  # the policy is a LoRA adapter on the SFT weights
    assert (grpo_run.run_dir / grpo_run.result["artifacts"]["base_model"]).resolve() == (sft_run.run_dir / "model").resolve()
    sft = AutoModelForCausalLM.from_pretrained(base_path).eval()
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), adapter).eval()
    ids = torch.arange(1, 40)[None]
    with torch.no_grad():
        assert (policy(input_ids=ids).logits - sft(input_ids=ids).logits).abs().max() > 1e-3


@requires_real_data
def test_grpo_from_an_rl_run_keeps_its_adapter_on_the_sft_weights(grpo_run, sft_run, capsys):
    """GRPO started from an earlier GRPO run's adapter loaded it on the SFT weights but recorded no base_model: infer
    and the next stage then put the new adapter on the random base model (held-out reward 0.113 -> 0.000)."""
    args = [a if not a.startswith("train.max_steps=") else "train.max_steps=2" for a in GRPO_ARGS]
    run_dir = grpo_run.run_dir.parent / "grpo_again"
    code, res, out = run_in_process([*args, f"rl.init_from={grpo_run.run_dir}", "rl.heldout_windows=4"], run_dir, capsys)
    assert code == 0, out[-2000:]
    assert (run_dir / res["artifacts"]["base_model"]).resolve() == (sft_run.run_dir / "model").resolve()
    from sectune.models import modeling

    assert Path(modeling.adapter_base(run_dir / res["artifacts"]["adapter"], compose(args))).resolve() == (sft_run.run_dir / "model").resolve()


def run_in_process(overrides: list[str], run_dir, capsys) -> tuple[int, dict, str]:
    """The stage through the runner in this process (imports already paid for), result.json and console."""
    from sectune import runner

    capsys.readouterr()
    code, _ = runner.run(compose(overrides), run_dir)
    return code, json.loads((run_dir / "result.json").read_text()), capsys.readouterr().out


@requires_real_data
def test_simplified_ppo_trains_and_says_it_is_supervised_finetuning(sft_run, capsys):
    run_dir = sft_run.run_dir.parent / "sppo"
    code, res, out = run_in_process(["stage=rl", "loss=simplified_ppo", "logger=none", "train.max_steps=2", f"rl.init_from={sft_run.run_dir}"], run_dir, capsys)
    assert code == 0 and res["status"] == "succeeded", res.get("error")
    m = res["metrics"]
    assert m["is_supervised_finetuning"] == 1 and m["train_steps"] == 2 and m["train_examples"] == 20
    assert m["learning_rate"] == pytest.approx(5e-3) and m["fresh_adapter"] == 0
    assert "not PPO" in out and "not PPO" in (run_dir / res["artifacts"]["note"]).read_text()
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_missing_init_from_starts_a_fresh_adapter_only_when_allowed(tmp_path, capsys):
    # refused without rl.allow_fresh_adapter: test_init_from_and_reward_settings_errors_name_what_to_fix
    missing = tmp_path / "no_such_run"
    code, res, out = run_in_process(["stage=rl", "loss=grpo", "logger=none", f"rl.init_from={missing}", "rl.allow_fresh_adapter=true",
                                     "train.max_steps=1", "train.batch_size=1", "rl.num_generations=2", "rl.max_completion_length=8",
                                     "dataset.max_samples=12"], tmp_path / "fresh", capsys)
    assert code == 0 and res["status"] == "succeeded", res.get("error")
    assert res["metrics"]["fresh_adapter"] == 1 and "FRESH LoRA adapter" in out and str(missing) in out
    assert (tmp_path / "fresh" / "adapter" / "adapter_model.safetensors").is_file()


@requires_real_data
def test_grpo_resumed_keeps_the_same_best_step_as_the_uninterrupted_run(sft_run, tmp_path):
    """rl.keep_best after train.resume=auto: the checkpoint carries the held-out scores so far (step 0's included)
    and the kept weights, so the resumed run compares every evaluation, as the uninterrupted one does (it used to
    forget steps 0 and 2, and could keep a worse later adapter)."""
    from safetensors.torch import load_file

    args = [*GRPO_ARGS, f"rl.init_from={sft_run.run_dir}", "train.max_steps=6", "train.save_steps=2", "rl.eval_steps=2",
            "rl.heldout_windows=4", "rl.num_generations=4", "rl.max_completion_length=16", "rl.keep_best_se=0"]
    straight = sectune(args, tmp_path / "straight", env=ONE_THREAD)
    assert straight.returncode == 0, straight.stderr[-3000:]
    broken = sectune([*args, "debug.fail_at_step=3"], tmp_path / "broken", env=ONE_THREAD)
    assert broken.returncode != 0 and (tmp_path / "broken/checkpoints/checkpoint-2/heldout_best.json").is_file()
    resumed = sectune([*args, "train.resume=auto"], tmp_path / "broken", env=ONE_THREAD)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    def heldout(run):
        return json.loads((run.run_dir / "train_history.json").read_text())["heldout"]

    a, b = heldout(straight), heldout(resumed)
    assert sorted(a, key=int) == sorted(b, key=int) == ["0", "2", "4", "6"]
    assert all(abs(a[k] - b[k]) < 1e-3 for k in a), (a, b)
    m, n = straight.result["metrics"], resumed.result["metrics"]
    assert m["best_step"] == n["best_step"] and abs(m["reward_heldout_start"] - n["reward_heldout_start"]) < 1e-9
    want, got = load_file(straight.run_dir / "adapter/adapter_model.safetensors"), load_file(resumed.run_dir / "adapter/adapter_model.safetensors")
    assert want.keys() == got.keys() and all(torch.allclose(want[k], got[k], atol=1e-4) for k in want)


def test_sample_next_applies_temperature_top_k_and_top_p_as_generate_orders_them():
    """GRPO's shared-prompt sampler was tested greedy (top_k=1) only: top-p, top-k > 1 and the temperature never ran.
    4,000 seeded draws from p = [0.5, 0.3, 0.15, 0.05] against the distributions worked out by hand."""
    from sectune.training.grpo_trainer import sample_next

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(4000, 1)

    def shares(**kw):
        torch.manual_seed(0)
        return (torch.bincount(sample_next(logits, **kw), minlength=4).float() / 4000).tolist()

    assert shares(top_p=0.4) == [1.0, 0.0, 0.0, 0.0]  # the first token alone holds 0.5 >= 0.4
    s = shares(top_p=0.7)  # the token that crosses 0.7 stays: {0, 1}, renormalised to 5/8, 3/8
    assert s[2] == s[3] == 0.0 and s[0] == pytest.approx(5 / 8, abs=0.03)
    s = shares(top_k=3)  # {0, 1, 2}: 0.5 / 0.95
    assert s[3] == 0.0 and s[0] == pytest.approx(0.5 / 0.95, abs=0.03)
    s = shares(temperature=0.5)  # p² renormalised: 0.25 / 0.365
    assert s[0] == pytest.approx(0.25 / 0.365, abs=0.03) and s[3] < 0.02
    s = shares()
    assert s[0] == pytest.approx(0.5, abs=0.03) and s[3] == pytest.approx(0.05, abs=0.02)


# ------------------------------------------------------- the reward model on the policy's own base weights
@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_a_lora_reward_model_scores_on_the_policys_own_base_and_leaves_the_policy_as_it_was(tmp_path, quant):
    """GRPO loaded the reward model as a second copy of the base (seed 000's RL step: 4.65 GB of its 20.06 GiB on an H100).
    A LoRA reward model trained on the weights the policy's adapter sits on now rides on the policy's model: its scores
    equal those of the reward model as its stage trained it (to 1e-5), and so do the separate copy's (nf4: 3.4% of the
    score spread off until session 29, because the copy kept bitsandbytes' AVX512-BF16 inference kernel, which training
    switches off; session 28 had put the gap down to the norms' dtype, which the copy and training share), and the
    policy comes back with its adapter active, its modes,
    its trainable parameters and its outputs unchanged; the saved policy holds no reward adapter. A reward model trained
    on other weights loads separately, as before."""
    from types import SimpleNamespace

    from peft import PeftModel

    from sectune.models import modeling
    from sectune.models import reward_model as RM
    from sectune.models import shared_reward as SR
    from sectune.stages import rl

    over = ["model=tiny_llama", "lora=r4_attention", f"quantization={quant}", "logger=none"]
    run = sectune(["stage=reward", "loss=bradley_terry", "dataset=auth_preferences", "train.max_steps=2", "train.learning_rate=1e-2",
                   "dataset.max_samples=12", "train.precision=fp32", *over], tmp_path / "reward", env=ONE_THREAD)
    assert run.returncode == 0, run.stderr[-2000:]
    folder = tmp_path / "reward" / run.result["artifacts"]["reward_model"]
    cfg = compose([*UNIT, *over, "rl.rewards.reward_model=0.5", f"rl.reward_model={tmp_path / 'reward'}"])
    base = modeling.model_path(cfg)
    policy, *_ = rl.build_policy(cfg, base)
    torch.manual_seed(0)
    with torch.no_grad():  # a policy adapter unlike the reward's: the wrong adapter active would change every score
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    policy.train()
    ids = torch.arange(3, 40).view(1, -1)
    torch.manual_seed(1)  # (train mode: LoRA dropout draws the same masks after a reseed)
    before = policy(input_ids=ids).logits.detach().clone()
    modes = {n: m.training for n, m in policy.named_modules()}
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}

    separate = RM.load_reward_model(folder, cfg)
    shared = RM.load_reward_model(folder, cfg, policy=policy, policy_base=base)
    assert type(separate) is RM.TrainedRewardModel and type(shared) is SR.SharedBaseRewardModel
    records = unit_records()
    prompts = [r["prompt"] for r in records for _ in range(2)]
    completions = [c for r in records for c in (r["completion"], r["completion"].replace("malicious", "benign")[:-9])]
    # the reward model as its stage trained it: sectune's loader (nf4: prepare_model_for_kbit_training's fp32 norms and
    # embeddings, as the policy's base has them) + its adapter and head
    trained_as = modeling.load_model(cfg, task="seq_cls", num_labels=1, path=base)
    trained_as.config.pad_token_id = separate.tokenizer.pad_token_id
    trained_as = RM.TrainedRewardModel(PeftModel.from_pretrained(trained_as, str(folder)), separate.tokenizer, separate.max_length)
    want, got = trained_as.score(prompts, completions), shared.score(prompts, completions)
    spread = max(want) - min(want)
    assert spread > 0 and all(abs(a - b) <= 1e-5 * max(1.0, spread) for a, b in zip(want, got)), (want, got)
    # the separate copy, in the 4-bit layout training keeps
    copy = separate.score(prompts, completions)
    assert all(abs(a - b) <= 1e-5 * max(1.0, spread) for a, b in zip(copy, got)), (copy, got)

    assert policy.active_adapter == "default" and {n: m.training for n, m in policy.named_modules()
                                                   if RM.SHARED_ADAPTER not in n} == modes
    assert {n for n, p in policy.named_parameters() if p.requires_grad} == trainable  # the reward adapter frozen
    torch.manual_seed(1)
    torch.testing.assert_close(policy(input_ids=ids).logits, before)
    # the saved policy is the policy's adapter alone
    tokenizer = modeling.load_tokenizer(cfg)
    rl.save_policy(SimpleNamespace(accelerator=SimpleNamespace(unwrap_model=lambda m, keep_fp32_wrapper: m), model=policy),
                   tokenizer, tmp_path / "adapter")
    assert not (tmp_path / "adapter" / RM.SHARED_ADAPTER).exists()
    reloaded = PeftModel.from_pretrained(modeling.load_model(cfg, path=base), str(tmp_path / "adapter"))
    assert list(reloaded.peft_config) == ["default"]
    # trained on other weights: a separate copy
    other, *_ = rl.build_policy(cfg, base)
    assert type(RM.load_reward_model(folder, cfg, policy=other, policy_base=str(tmp_path))) is RM.TrainedRewardModel


def test_the_shared_reward_model_follows_the_policy_to_its_device():
    """The reward head is made beside the policy before GRPOTrainer moves the policy to the GPU: scoring put the inputs on
    the head's device (the CPU) while the body sat on CUDA, a device mismatch at the first reward. The inputs now go
    where the policy's embeddings are and the head follows the body's output ("meta" stands in for the GPU here)."""
    from peft import LoraConfig

    from sectune.models import modeling
    from sectune.models import reward_model as RM
    from sectune.models import shared_reward as SR
    from sectune.stages import rl

    cfg = compose([*UNIT, "model=tiny_llama", "lora=r4_attention", "train.device=cpu"])
    policy, *_ = rl.build_policy(cfg, modeling.model_path(cfg))
    policy.add_adapter(RM.SHARED_ADAPTER, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], inference_mode=True))
    tokenizer = modeling.load_tokenizer(cfg)
    scorer = SR.SharedBaseRewardModel(policy, torch.nn.Linear(policy.config.hidden_size, 1, bias=False), tokenizer, 256)
    assert len(scorer.score(["a window", "a window"], ["benign", "malicious"])) == 2
    policy.to("meta")  # what Trainer's move to CUDA does to the policy, and not to the head beside it
    assert scorer._device() == torch.device("meta")
    rows, _ = RM.encode_group(tokenizer, "a window", ["benign", "malicious"], 256)
    batch = {k: v.to(scorer._device()) for k, v in RM.SharedPromptCollator(tokenizer.pad_token_id)([rows]).items()}
    out = scorer._forward(batch)
    assert out.device == torch.device("meta") and out.shape == (2,) and scorer.head.weight.device == torch.device("meta")


@pytest.mark.parametrize("trained", ["modules_to_save", "bias", "policy_bias"])
def test_a_reward_adapter_that_trained_base_weights_loads_separately_and_leaves_the_policys_base_alone(tmp_path, trained):
    """A reward model trained with lora.modules_to_save (the embeddings here) or lora.bias=all saves those base weights
    in its adapter file. Riding on the policy's model, loading them there replaced the policy's own (its outputs moved by
    ~1-3 on tiny_llama / tiny_gpt2, and so did the disabled adapter GRPO's reference is): such a reward model now loads
    separately. So does one beside a policy whose own adapter trains its base's biases (lora.bias=all): the reward model
    scored on the policy's trained biases (off by ~1.4x the score spread on tiny_gpt2 with the biases moved)."""
    import json as _json

    from peft import LoraConfig, get_peft_model

    from sectune.models import modeling
    from sectune.models import reward_model as RM
    from sectune.stages import rl

    model = "tiny_llama" if trained == "modules_to_save" else "tiny_gpt2"
    cfg = compose([*UNIT, f"model={model}", "lora=r4_attention", "rl.rewards.reward_model=0.5", f"rl.reward_model={tmp_path}",
                   *(["lora.bias=all"] if trained == "policy_bias" else [])])
    base = modeling.model_path(cfg)
    tokenizer = modeling.load_tokenizer(cfg)
    scorer = modeling.load_model(cfg, task="seq_cls", num_labels=1, path=base)
    scorer.config.pad_token_id = tokenizer.pad_token_id
    gpt2 = model == "tiny_gpt2"
    scorer = get_peft_model(scorer, LoraConfig(r=4, target_modules=["c_attn"] if gpt2 else ["q_proj", "v_proj"], fan_in_fan_out=gpt2,
                                               task_type="SEQ_CLS", bias="all" if trained == "bias" else "none",
                                               modules_to_save=["embed_tokens"] if trained == "modules_to_save" else None))
    torch.manual_seed(0)
    with torch.no_grad():  # as training would have moved them
        for n, p in scorer.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    scorer.save_pretrained(str(tmp_path))
    tokenizer.save_pretrained(str(tmp_path))
    (tmp_path / RM.META_FILE).write_text(_json.dumps({"kind": "trained", "base_model": base, "max_length": 256, "quantization": "none"}))

    policy, *_ = rl.build_policy(cfg, base)
    policy.eval()
    ids = torch.arange(3, 40).view(1, -1)
    before = policy(input_ids=ids).logits.detach().clone()
    got = RM.load_reward_model(tmp_path, cfg, policy=policy, policy_base=base)
    assert type(got) is RM.TrainedRewardModel and list(policy.peft_config) == ["default"]
    torch.testing.assert_close(policy(input_ids=ids).logits, before)
    from sectune.training.memory import reward_model_bytes  # the memory check plans the separate copy the stage loads

    assert "a second none copy of the base" in reward_model_bytes(cfg)[1]


def test_no_validation_window_leaves_grpo_without_held_out_scoring_not_an_index_error(capsys):
    """dataset.val_fraction=0 crashed GRPO after the model loaded (a tokenizer given no text raises IndexError), in a
    pipeline after the earlier steps had trained (an audit, session 40)."""
    from sectune.stages.rl import fitting_prompts

    assert fitting_prompts(None, [], 10) == ([], 0)
