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
