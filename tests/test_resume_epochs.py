"""Resuming past the first epoch, and the settings a resume must match (an audit, session 35): samplers whose generator
was seeded once and continued gave a run resumed in epoch e epoch 0's order (SFT with length grouping, DPO grouped,
GRPO); GRPO's generation settings and contrastive's debug mode were resumed under other values without a word; GRPO
trained 0 steps and "succeeded" on fewer windows than one step takes; a checkpoint inside a num_iterations cycle."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from conftest import compose
from sectune import runner
from sectune.errors import ConfigError
from sectune.training import checkpoints, samplers


def _epochs(sampler, epochs):
    out = []
    for e in epochs:
        sampler.set_epoch(e)
        out.append(list(sampler))
    return out


def test_a_length_grouped_order_is_a_function_of_seed_and_epoch():
    from transformers.trainer_pt_utils import LengthGroupedSampler

    lengths = [(i * 37) % 101 + 5 for i in range(64)]
    args = SimpleNamespace(data_seed=None, seed=7, train_batch_size=4, gradient_accumulation_steps=2, world_size=1)

    def sampler():
        return samplers.seeded_length_grouped_sampler(SimpleNamespace(args=args, train_dataset=None), lengths=lengths)

    straight = _epochs(sampler(), [0, 1, 2])
    assert _epochs(sampler(), [2]) == straight[2:] and _epochs(sampler(), [1, 2]) == straight[1:]  # resumed in epoch 1 or 2
    assert straight[0] != straight[1] != straight[2]
    plain = LengthGroupedSampler(8, lengths=lengths, generator=torch.Generator().manual_seed(7))
    assert list(plain) == straight[0]  # the first epoch's order is what it was


def test_a_grpo_prompt_order_is_a_function_of_seed_and_epoch():
    from sectune.training.grpo_trainer import SharedPromptGRPOTrainer

    trainer = SharedPromptGRPOTrainer.__new__(SharedPromptGRPOTrainer)  # the attributes TRL's sampler reads, no model
    trainer.__dict__.update(train_dataset=list(range(12)), num_generations=2, num_iterations=1, shuffle_dataset=True,
                            args=SimpleNamespace(generation_batch_size=8, steps_per_generation=1, seed=3))

    def sampler():
        return SharedPromptGRPOTrainer._get_train_sampler(trainer)

    straight = _epochs(sampler(), [0, 1, 2])
    assert _epochs(sampler(), [2]) == straight[2:] and straight[1] != straight[2]
    assert len(straight[0]) == 12 * 2 // 8 * 8  # whole batches of 4 prompts, each twice


def test_resuming_grpo_under_other_sampling_or_contrastive_out_of_debug_mode_is_refused(tmp_path):
    ckpt_dir = tmp_path / "run" / "checkpoints"
    rl = ["stage=rl", "loss=grpo", "logger=none"]
    checkpoints.resolve_resume(compose(rl), ckpt_dir)
    ckpt = ckpt_dir / "checkpoint-2"
    with pytest.raises(ConfigError, match=r"other settings \(generation.repetition_penalty: 1.2 there, 1.5 now\)"):
        checkpoints._check_same_training(compose([*rl, "generation.repetition_penalty=1.5"]), ckpt, "train.resume=auto")
    record = json.loads((ckpt_dir / checkpoints.RESUME_RECORD).read_text())
    for k in [k for k in record if k.startswith("generation.") or k == "debug.enabled"]:
        record.pop(k)  # a record from before these were recorded: nothing to compare them with
    (ckpt_dir / checkpoints.RESUME_RECORD).write_text(json.dumps(record))
    checkpoints._check_same_training(compose([*rl, "generation.repetition_penalty=1.5"]), ckpt, "train.resume=auto")

    con = ["stage=contrastive", "loss=causal_contrastive", "dataset=injection_triplets", "logger=none"]
    other = tmp_path / "c" / "checkpoints"
    checkpoints.resolve_resume(compose([*con, "debug.enabled=true"]), other)
    with pytest.raises(ConfigError, match=r"other settings \(debug.enabled: True there, False now\)"):
        checkpoints._check_same_training(compose(con), other / "checkpoint-4", "train.resume=auto")


def test_grpo_with_fewer_windows_than_a_step_takes_or_a_checkpoint_inside_a_generation_cycle_is_refused(tmp_path):
    from sectune.stages import rl

    base = ["stage=rl", "loss=grpo", "logger=none", "rl.allow_fresh_adapter=true", "rl.heldout_windows=0"]
    with pytest.raises(ConfigError, match=r"train.save_steps=3: must be a multiple of rl.num_iterations=2"):
        rl.run_grpo(runner.RunContext(cfg=compose([*base, "rl.num_iterations=2", "train.save_steps=3"]), run_dir=tmp_path / "a"))
    # 10 windows leave 8 for training after the held-out ones; a step takes 8 x 2 prompts: 0 steps, "succeeded", before
    with pytest.raises(ConfigError, match=r"^dataset: \d+ train windows fit, fewer than one GRPO step's 16 prompts "
                                          r"\(train.batch_size=8 × train.grad_accum=2\); raise dataset.max_samples"):
        rl.run_grpo(runner.RunContext(cfg=compose([*base, "dataset.max_samples=10", "train.batch_size=8", "train.grad_accum=2"]),
                                      run_dir=tmp_path / "b"))


def test_an_adapter_trained_on_another_quantization_is_said_when_a_stage_starts_from_it(tmp_path, capsys):
    """An audit (session 41): an nf4 SFT adapter as dpo/rl/contrastive's init_from loaded onto an unquantized base (logits
    2.4 off the trained policy on the tiny model) without a word; contrastive with lora=none merged it into those weights."""
    from omegaconf import OmegaConf

    from sectune.run_records import warn_other_quantization

    run = tmp_path / "sft"
    (run / ".hydra").mkdir(parents=True)
    (run / "adapter").mkdir()
    (run / "result.json").write_text(json.dumps({"stage": "sft", "status": "succeeded", "artifacts": {"adapter": "adapter"}}))
    OmegaConf.save(compose(["quantization=nf4"]), run / ".hydra" / "config.yaml")
    warn_other_quantization(compose(["quantization=none"]), run / "adapter", "rl.init_from=x")
    said = capsys.readouterr().err
    assert "rl.init_from=x: the adapter in" in said and "trained on a quantization=nf4 base; this command loads quantization=none" in said
    warn_other_quantization(compose(["quantization=nf4", "quantization.bnb_4bit_quant_type=fp4"]), run / "adapter", "k", merged=True)
    assert "loads quantization=nf4 and merges it into those weights" in capsys.readouterr().err  # another 4-bit setting
    warn_other_quantization(compose(["quantization=nf4"]), run / "adapter", "k")
    warn_other_quantization(compose([]), tmp_path / "elsewhere", "k")  # no run record: nothing to compare
    assert capsys.readouterr().err == ""


def test_what_a_resume_must_know_that_trainer_does_not_keep(tmp_path, monkeypatch):
    """An audit of resume (session 41): a checkpoint where its run stopped early was trained on to max_steps (Trainer
    clears the stop when training begins); a save step that was not a log step left the loss since the last log out of a
    resumed run's train_loss; classify's length-grouped batches came from the global RNG a checkpoint restores."""
    from datasets import Dataset
    from transformers import TrainerControl

    from sectune.training.classification import WeightedCETrainer
    from sectune.training.resume_callbacks import LogAtSave, stopped_early

    def state(step, max_steps, stop):
        d = tmp_path / f"c{step}-{max_steps}-{stop}"
        d.mkdir()
        (d / "trainer_state.json").write_text(json.dumps({"global_step": step, "max_steps": max_steps, "stateful_callbacks": {
            "TrainerControl": {"args": {"should_training_stop": stop}}}}))
        return str(d)

    assert stopped_early(state(10, 12, True)) and not stopped_early(state(10, 12, False))
    assert not stopped_early(state(12, 12, True))  # at its own max_steps: a resume that lengthens the run goes on
    assert not stopped_early(str(tmp_path / "none"))
    control = TrainerControl(should_save=True)
    LogAtSave().on_step_end(None, None, control)
    assert control.should_log
    control = TrainerControl()
    LogAtSave().on_step_end(None, None, control)
    assert not control.should_log

    args = SimpleNamespace(train_sampling_strategy="group_by_length", data_seed=None, seed=3, train_batch_size=2,
                           gradient_accumulation_steps=1, world_size=1)
    fake = SimpleNamespace(args=args, train_dataset=Dataset.from_dict({"input_ids": [[1] * n for n in range(1, 41)]}))
    orders = []
    for global_seed in (0, 99):
        torch.manual_seed(global_seed)
        orders.append(list(WeightedCETrainer._get_train_sampler(fake)))
    assert orders[0] == orders[1] and sorted(orders[0]) == list(range(40))


def test_the_sft_adapter_starts_from_the_seed_whether_its_warm_up_trained_or_was_reused(tmp_path, monkeypatch):
    """An audit (session 41): a warm-up trained in this command advanced the random state, a reused one did not, so the
    SFT's LoRA (lora_A is drawn) differed between a run and its rerun or resume (adapter max |d| 0.19)."""
    from sectune import runner
    from sectune.models import modeling
    from sectune.stages import sft

    class Stop(Exception):
        pass

    states = []

    def at_lora(model, cfg):
        states.append(torch.get_rng_state())
        raise Stop

    for draws in (1000, 0):  # a warm-up that trained (drew numbers), then one reused (drew none)
        monkeypatch.setattr(sft, "warmup", lambda ctx, n=draws: (torch.rand(n), {"artifacts": {"model": "model"}})[1])
        monkeypatch.setattr(modeling, "load_tokenizer", lambda *a, **k: None)
        monkeypatch.setattr(modeling, "load_model", lambda *a, **k: None)
        monkeypatch.setattr(modeling, "apply_lora", at_lora)
        torch.manual_seed(0)
        with pytest.raises(Stop):
            sft.run(runner.RunContext(cfg=compose(["stage=sft", "logger=none"]), run_dir=tmp_path / "run"))
    assert torch.equal(states[0], states[1])
