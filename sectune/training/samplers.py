"""Training samplers whose order is a function of the seed and the epoch only, so that a run resumed from a checkpoint
draws the batches the uninterrupted run draws: Trainer's length-grouped sampler with a generator of its own, and any
sampler that keeps a ``generator`` (TRL's GRPO ``RepeatSampler``) reseeded before each epoch."""

from __future__ import annotations

import torch


def epoch_seeded(sampler, seed: int):
    """``sampler`` with a ``set_epoch`` that reseeds its generator to ``seed + epoch``: Trainer calls it before each
    epoch, a resumed run's included, so epoch e's order is a function of (seed, e); epoch 0 keeps ``seed``. A generator
    seeded once and continued across epochs gave a run resumed in epoch e epoch 0's order (an audit, session 35: SFT
    with length grouping, DPO grouped, GRPO, each past its first epoch)."""

    def set_epoch(epoch: int) -> None:
        sampler.generator.manual_seed(int(seed) + int(epoch))

    sampler.set_epoch = set_epoch
    return sampler


def seeded_length_grouped_sampler(trainer, train_dataset=None, lengths=None):
    """Trainer's LengthGroupedSampler, but drawing from its own seeded generator, reseeded for each epoch.

    Trainer builds it without a generator, so its order comes from the global RNG, which a
    checkpoint restores mid-epoch: a resumed run would then see other batches than the
    uninterrupted one. A generator of its own makes the order a function of ``train.seed`` and the epoch only,
    the same on every rank.
    """
    from transformers.trainer_pt_utils import LengthGroupedSampler

    dataset = train_dataset if train_dataset is not None else trainer.train_dataset
    args = trainer.args
    if lengths is None:  # SFT/classify rows; other layouts (DPO pairs) pass their own
        lengths = [len(ids) for ids in dataset["input_ids"]]
    seed = args.data_seed if args.data_seed is not None else args.seed
    generator = torch.Generator().manual_seed(seed)
    # Grouped by the *global* batch: under DDP, accelerate hands consecutive per-device slices of
    # each global batch to the ranks, so N processes see exactly the batches one process would.
    global_batch = args.train_batch_size * args.gradient_accumulation_steps * max(1, args.world_size)
    return epoch_seeded(LengthGroupedSampler(global_batch, lengths=lengths, generator=generator), seed)
