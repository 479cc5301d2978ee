"""stage=federated on Flower's deployment runtime: the module-level ServerApp and ClientApp ``flwr run`` loads.

The Flower app project is ``experiments/hdfs_federated/flower_app/pyproject.toml``: it names ``server_app`` and
``client_app`` below and carries two run-config values, ``overrides`` (sectune's Hydra overrides, one string, as
typed after ``sectune``) and ``run-dir`` (where the server writes result.json, the adapter and the per-round table;
a relative path is taken from the SuperLink's working directory). Every machine needs sectune installed (the FAB
holds only the pyproject) and the data and model the overrides name.

- The ServerApp composes the config with ``federated.runtime=deployment`` and runs stage=federated through
  sectune's runner, handing it the Grid: FedAvg, the global evaluation and the artifacts are the simulation's code.
- The ClientApp composes the same config in each message's process (the SuperNode starts one per message) and
  trains on the partition its SuperNode was started with: ``--node-config "partition-id=<i> num-partitions=<n>"``,
  ``n`` = ``federated.num_clients``. Clients' Trainer folders: ``federated.client_dir``, else the temp dir.
"""

from __future__ import annotations

import shlex
import tempfile
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from sectune.errors import ConfigError
from sectune.training import federated


def compose(run_config) -> "object":
    """The run's sectune config from the Flower run config's ``overrides`` string (+ federated.runtime=deployment)."""
    from sectune.stages.pipeline import compose as hydra_compose

    overrides = str(run_config.get("overrides", ""))
    cfg = hydra_compose([*shlex.split(overrides), "federated.runtime=deployment"])
    if cfg.stage.name != "federated":
        raise ConfigError(f"the Flower run config's overrides={overrides!r} choose stage={cfg.stage.name}: the Flower app "
                          "runs stage=federated (e.g. overrides=\"+experiment=hdfs_federated_tiny\")")
    return cfg


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    from sectune import runner

    cfg = compose(context.run_config)
    run_dir = str(context.run_config.get("run-dir", "")).strip()
    if not run_dir:
        raise ConfigError("the Flower run config has no run-dir: give --run-config 'run-dir=\"<folder>\"'")
    federated.DEPLOYMENT["grid"] = grid
    try:
        code, _ = runner.run(cfg, run_dir=Path(run_dir).expanduser().resolve())
    finally:
        federated.DEPLOYMENT.pop("grid", None)
    if code:
        raise RuntimeError(f"sectune stage=federated failed (exit code {code}): see {run_dir}/result.json and the log above")


client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    from sectune.stages import federated as stage

    cfg = compose(context.run_config)
    return stage.client_app(cfg, Path(tempfile.gettempdir()) / "sectune_federated_clients")(msg, context)


@client_app.query()
def query(msg: Message, context: Context) -> Message:  # the ServerApp asks each SuperNode for its partition id
    from sectune.stages import federated as stage

    cfg = compose(context.run_config)
    return stage.client_app(cfg, Path(tempfile.gettempdir()) / "sectune_federated_clients")(msg, context)
