"""The training engine: what a stage hands its data, model and objective to.

The trainer builder with its shared callbacks and resume (``engine``), which checkpoint ``train.resume`` takes
(``checkpoints``), the predicted memory budget and the memory check before a run (``planner``, ``memory``),
per-example attention for packed SFT rows (``packed_attention``), one run dir across torchrun ranks
(``distributed``), the trainers sectune owns beside TRL's (``contrastive_trainer``, the shared-prompt
``grpo_trainer``, ``classification``'s data, heads and weighted cross-entropy trainer), how a GRPO run is followed
(``rl_progress``), and federated LoRA fine-tuning on Flower (``federated``, ``federated_sampling``, and
``flower_app``, the module-level apps ``flwr run`` loads).
"""
