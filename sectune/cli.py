"""``sectune`` / ``python -m sectune``: the Hydra app. A thin entry: compose, validate, run."""

from __future__ import annotations

import os
import sys

# Quiet, offline-friendly defaults before any heavy import; a user's own settings win.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("WANDB_SILENT", "true")

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from sectune import config, distributed  # noqa: E402
from sectune.paths import PROJECT_ROOT  # noqa: E402

config.register()


@hydra.main(config_path=str(PROJECT_ROOT / "conf"), config_name="config", version_base="1.3")
def _app(cfg: DictConfig):
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from sectune import runner

    code, objective = runner.run(cfg)
    # In a sweep a failed job is a failed row, not the end of the sweep; a single run exits
    # with the runner's code so shells and schedulers see the failure.
    if HydraConfig.get().mode == RunMode.RUN and code != 0:
        sys.exit(code)
    return objective


def main() -> None:
    distributed.share_run_dir_across_ranks()
    _app()


if __name__ == "__main__":
    main()
