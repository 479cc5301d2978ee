"""sectune: config-driven fine-tuning of language models for security work."""

import os

__version__ = "0.1.0"

# transformers >= 5.2x loads every model with use_kernels=True: on a GPU it swaps layers (RMSNorm, GELU, ...)
# for kernels downloaded from the Hugging Face hub at load time (kernels-community/*). That is code from the
# network run without trust_remote_code, a download at run time, and numbers that differ from torch's layers.
# Off for every load in a sectune process; a user who wants them exports USE_HUB_KERNELS=1.
os.environ.setdefault("USE_HUB_KERNELS", "0")
