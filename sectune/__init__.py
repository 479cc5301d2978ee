"""sectune: config-driven fine-tuning of language models for security work."""

__version__ = "0.1.0"
