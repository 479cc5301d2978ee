"""sectune: config-driven fine-tuning of language models for security work."""

import os

__version__ = "0.1.0"

# transformers >= 5.2x loads every model with use_kernels=True: on a GPU it swaps layers (RMSNorm, GELU, ...)
# for kernels downloaded from the Hugging Face hub at load time (kernels-community/*). That is code from the
# network run without trust_remote_code, a download at run time, and numbers that differ from torch's layers.
# Off for every load in a sectune process; a user who wants them exports USE_HUB_KERNELS=1.
os.environ.setdefault("USE_HUB_KERNELS", "0")


def _on_import(name: str, wrap) -> None:
    """Runs module ``name``'s import through ``wrap(load)`` (``load(module)`` executes it) when it is first imported:
    a finder ahead of the others that asks them for the spec, then wraps the loader's ``exec_module``."""
    import importlib.abc
    import importlib.util
    import sys

    class Hook(importlib.abc.MetaPathFinder):
        busy = False  # while it asks the other finders (transformers' availability checks land here too)

        def find_spec(self, fullname, path=None, target=None):
            if fullname != name or self.busy:
                return None
            self.busy = True
            try:
                spec = importlib.util.find_spec(fullname)
            finally:
                self.busy = False
            if spec is not None and spec.loader is not None:
                spec.loader.exec_module = wrap(spec.loader.exec_module)
            return spec

    sys.meta_path.insert(0, Hook())


def _refuse_hub_kernels() -> None:
    """bitsandbytes (>= 0.50, on CPUs with AVX512-bf16) asks the ``kernels`` package for a hub kernel when it is
    imported, in every run: a network lookup and, but for kernels' own publisher check, code from the network.
    With hub kernels off, ``kernels.get_kernel`` refuses, and bitsandbytes keeps its built-in matmul. Patched when
    ``kernels`` is first imported (importing it here cost half of ``sectune --help``'s start-up)."""
    import sys

    if os.environ.get("USE_HUB_KERNELS", "0").strip().lower() not in ("0", "false", "no", "off", ""):
        return

    def get_kernel(repo_id, *args, **kwargs):
        raise RuntimeError(f"sectune does not fetch hub kernels ({repo_id}): code from the network (USE_HUB_KERNELS=1 allows them)")

    import logging

    class QuietRefusal(logging.Filter):
        """bitsandbytes then logs the refusal as a failure ("... Please make sure you already `pip install kernels`"),
        at every import, with or without quantization: sectune's own choice, not the user's to fix."""

        def filter(self, record: logging.LogRecord) -> bool:
            return "sectune does not fetch hub kernels" not in record.getMessage()

    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(QuietRefusal())
    if "kernels" in sys.modules:
        sys.modules["kernels"].get_kernel = get_kernel
        return

    def patched(load):
        def exec_module(module):
            load(module)
            module.get_kernel = get_kernel
        return exec_module

    _on_import("kernels", patched)


_refuse_hub_kernels()

# PEFT asks every model for `is_gradient_checkpointing`, which transformers 5 deprecates with a FutureWarning each
# time: eight lines of a library's note to another in every `make run`, nothing a sectune user can act on.
import warnings  # noqa: E402

warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
# TRL's generation helpers (DPO's, GRPO's) switch checkpointing off and on again through the aliases transformers 5
# deprecates: two FutureWarnings pointing into transformers in every DPO run, for a call sectune does not make.
warnings.filterwarnings("ignore", message="`gradient_checkpointing_(enable|disable)` is deprecated", category=FutureWarning)
# Ray (2.55, pinned) tells every ray.init of stage=federated that a future Ray will stop hiding GPUs from actors given
# num_gpus=0: a note to the code calling ray.init (sectune's _start_ray), which no setting of a user's changes.
warnings.filterwarnings("ignore", message="Tip: In future versions of Ray, Ray will no longer override accelerator",
                        category=FutureWarning)


def _quiet_wandb_mode_banner() -> None:
    """transformers' integration module prints ``[INFO] Running in WANDB offline mode`` when it is imported with
    ``WANDB_MODE=offline`` (its only use of the variable at import): under ``logger=none`` too, where no W&B run exists,
    and with ``logger=wandb`` it said neither where the run went nor how to upload it (sectune says both at the end of
    the run: :func:`sectune.tracking.finish`). The variable is hidden from that one module's import."""
    import sys

    target = "transformers.integrations.integration_utils"
    if target in sys.modules:
        return

    def hidden(load):
        def exec_module(module):
            mode = os.environ.pop("WANDB_MODE", None)
            try:
                load(module)
            finally:
                if mode is not None:
                    os.environ["WANDB_MODE"] = mode
        return exec_module

    _on_import(target, hidden)


_quiet_wandb_mode_banner()
