"""Models and tokenizers: how a preset becomes weights ready to train or generate with.

Tokenizer and model from the config, with quantization and LoRA (``modeling``), the tiny offline model and
tokenizer built from the shipped data (``tiny``), seeded BPE-dropout for classification (``subword``), the reward
model (a trained Bradley-Terry scorer or the heuristic fallback, ``reward_model``) and schema-constrained
decoding (``constrained``).
"""
