"""Federated LoRA fine-tuning of the next-log-key model on Flower (seed 003; issue 16).

Read top to bottom: the HDFS split and its client partitions → the server's copy of the model (for the
global evaluation only) → Flower's ServerApp (FedAvg, lr schedule, bytes counted) and ClientApp (local
Trainer steps on the client's own sessions) → ``flwr.simulation.run_simulation`` (``federated.runtime=
simulation``), or FedAvg on the Grid of Flower's deployment runtime (``deployment``: this stage then runs inside
the ServerApp of :mod:`sectune.training.flower_app`, which ``flwr run`` starts) → per-round metrics, the final global
adapter, a PNG. Every client loads the base weights itself; only the adapter travels.

Per round (``federated.eval_every``) the server scores the global model: validation loss on the normal
validation sessions, and detection with sectune.evaluation.anomaly (g / threshold chosen on validation, then test).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from sectune import tracking
from sectune.data.hdfs import ANOMALOUS, DEFAULT_PROMPT, NORMAL, load_hdfs, render_keys
from sectune.data.hdfs_splits import RECORD_FILE, split_record
from sectune.errors import ConfigError, SectuneError
from sectune.evaluation import anomaly
from sectune.models import modeling
from sectune.runner import RunContext, write_json_atomic
from sectune.training import federated

_CACHE: dict = {}  # per process (a Ray actor serves many clients in turn): the model and the data load once


class Client:
    """One client's data and (process-wide) model; ``fit`` = load the global adapter, train locally."""

    def __init__(self, cfg, pid: int, model, tokenizer, rows: list[dict]):
        self.cfg, self.pid, self.model, self.tokenizer, self.rows = cfg, pid, model, tokenizer, rows

    def fit(self, global_state: dict, lr: float, server_round: int) -> tuple[dict, int]:
        federated.load_adapter_state(self.model, global_state)
        # round 1 of client 0 trains with train.seed itself: one client, one round = stage=sft's data order
        seed = int(self.cfg.train.seed) + 1000 * (server_round - 1) + self.pid
        out = Path(str(self.cfg.federated.client_dir)) / f"client_{self.pid}"
        loss = federated.local_train(self.cfg, self.model, self.rows, int(self.tokenizer.pad_token_id or 0), lr,
                                     int(self.cfg.federated.local_steps), seed, out)
        # the L2 norm of this client's update before any DP clipping: what federated.dp_clipping_norm is set against
        norm = sum(float((v - global_state[k]).pow(2).sum()) for k, v in self.state().items()) ** 0.5
        return {"train_loss": loss, "update_norm": norm}, len(self.rows)

    def state(self) -> dict:
        return federated.adapter_state(self.model)


class ClientFactory:
    """Picklable (Ray sends it to its actors): a resolved config; each client reads its own partition."""

    def __init__(self, cfg_container: dict):
        self.cfg_container = cfg_container

    def __call__(self, pid: int) -> Client:
        import torch

        cfg = OmegaConf.create(self.cfg_container)
        if "model" not in _CACHE:
            torch.set_num_threads(int(cfg.federated.client_num_cpus))
            path = modeling.model_path(cfg)
            tokenizer = modeling.load_tokenizer(cfg, path)
            _CACHE["model"] = (modeling.apply_lora(modeling.load_model(cfg, path=path), cfg), tokenizer)
            _CACHE["train"] = [s.keys for s in load_hdfs(cfg).splits["train"]]
        model, tokenizer = _CACHE["model"]
        parts = _CACHE.setdefault("parts", client_partitions(cfg, _CACHE["train"]))
        prompt = str(cfg.dataset.prompt_template or DEFAULT_PROMPT)
        rows = federated.encode_sessions(tokenizer, prompt, [render_keys(_CACHE["train"][i]) for i in parts[pid]],
                                         int(cfg.model.max_seq_length))
        return Client(cfg, pid, model, tokenizer, rows)


def client_partitions(cfg, train_keys) -> list[list[int]]:
    f = cfg.federated
    return federated.partition(train_keys, int(f.num_clients), str(f.partition), float(f.dirichlet_alpha), int(f.partition_seed))


def run(ctx: RunContext) -> dict:
    federated.require_flwr()
    cfg, run_dir, fed = ctx.cfg, ctx.run_dir, ctx.cfg.federated
    t0 = time.perf_counter()
    if fed.runtime not in federated.RUNTIMES:
        raise ConfigError(f"federated.runtime={fed.runtime!r}: choose one of {', '.join(federated.RUNTIMES)}")
    grid = federated.DEPLOYMENT.get("grid")
    if fed.runtime == "deployment" and grid is None:
        from sectune.paths import FLOWER_APP_DIR

        raise ConfigError("federated.runtime=deployment runs inside Flower's deployment runtime, not from the sectune "
                          "command: start a SuperLink and one SuperNode per client, then `flwr run "
                          f"{FLOWER_APP_DIR} <connection>` (experiments/hdfs_federated/README.md)")
    if cfg.dataset.name != "hdfs":
        raise ConfigError(f"stage=federated trains the next-log-key model: needs dataset=hdfs (got dataset={cfg.dataset.name})")
    if not cfg.lora.enabled:
        raise ConfigError("stage=federated sends only LoRA weights: choose a LoRA preset (e.g. lora=r4_attention), not lora=none")
    if int(fed.rounds) < 1 or int(fed.local_steps) < 1:
        raise ConfigError(f"federated.rounds={fed.rounds} and federated.local_steps={fed.local_steps} must be >= 1")
    replaced = federated.replaced_train_settings(cfg)
    if replaced:
        print(f"sectune: note: stage=federated does not use {', '.join(replaced)}: each round's clients train federated.local_steps "
              "steps at the round's rate (federated.lr_schedule), with no checkpoints or evaluations of their own", file=sys.stderr)

    # 1. data: the split of stage=sft / evaluate, the training sessions cut into client partitions
    data = load_hdfs(cfg)
    train_keys = [s.keys for s in data.splits["train"]]
    parts = client_partitions(cfg, train_keys)
    per_round = federated.clients_per_round(int(fed.num_clients), float(fed.client_frac))
    sizes = [len(p) for p in parts]
    print(f"sectune: federated: {len(train_keys)} training sessions over {fed.num_clients} clients ({fed.partition}; "
          f"sizes {min(sizes)}..{max(sizes)}), {per_round} per round, {fed.rounds} round{'s' if fed.rounds != 1 else ''} × {fed.local_steps} local step{'s' if fed.local_steps != 1 else ''}")

    # 2. the server's model: the global evaluation only (clients load their own copy of the base weights)
    path = modeling.model_path(cfg)
    tokenizer = modeling.load_tokenizer(cfg, path)
    model = modeling.to_run_device(modeling.apply_lora(modeling.load_model(cfg, path=path), cfg), cfg)  # was left on the CPU
    model.eval()
    if fed.runtime == "simulation" and not float(fed.client_num_gpus) and modeling.device_for(cfg) == "cuda":
        print("sectune: warning: federated.client_num_gpus=0: Ray hides the GPU from the simulated clients, which train on "
              "the CPU (the server evaluates on the GPU); give them a share, e.g. federated.client_num_gpus=0.2", file=sys.stderr)
    prompt = str(cfg.dataset.prompt_template or DEFAULT_PROMPT)
    prompt_ids, cand_ids = anomaly.key_token_ids(tokenizer, data.num_keys, prompt)
    pad_id = int(tokenizer.pad_token_id or 0)
    initial = federated.adapter_state(model)
    adapter_bytes, full_bytes = federated.tensor_bytes(initial), federated.full_model_bytes(model)
    val, test = data.splits["validation"], data.splits["test"]
    p_len = len(prompt_ids)  # (key_token_ids: the text as text, as the clients train on it)
    if p_len >= int(cfg.model.max_seq_length):  # every row kept the prompt alone: clients trained on nothing and the run
        # reported validation loss 0 → 0, succeeded (stage=sft refuses it; an audit, session 42)
        raise ConfigError(f"model.max_seq_length={cfg.model.max_seq_length}: the prompt alone ({prompt!r}) takes {p_len} tokens, "
                          "so no session keeps a key token to train on; raise model.max_seq_length")
    val_rows = federated.encode_sessions(tokenizer, prompt, [render_keys(s.keys) for s in val if s.label == NORMAL],
                                         int(cfg.model.max_seq_length))
    val_y = np.array([s.label == ANOMALOUS for s in val], dtype=int)
    test_y = np.array([s.label == ANOMALOUS for s in test], dtype=int)
    batch = int(cfg.evaluate.batch_size)

    def predict(uniq):
        return anomaly.lm_logprobs(model, uniq, prompt_ids, cand_ids, batch_size=batch, pad_id=pad_id)

    history: dict[int, dict] = {}
    traffic: dict[tuple[str, int], int] = {}

    round_s: dict[int, float] = {}
    clock = [time.perf_counter()]

    def evaluate_fn(server_round: int, arrays):
        # a round's wall time: from the end of the last global evaluation to this one (sampling, the clients' training,
        # the messages, FedAvg); the evaluation itself is eval_s
        if server_round:
            round_s[server_round] = time.perf_counter() - clock[0]
        try:
            return evaluate(server_round, arrays)
        finally:
            clock[0] = time.perf_counter()

    def evaluate(server_round: int, arrays):
        from flwr.app import MetricRecord

        # this round's traffic is counted by now (aggregate_train runs before the global evaluation)
        sent = {"bytes_up": traffic.get(("up", server_round), 0), "bytes_down": traffic.get(("down", server_round), 0),
                "round_s": round_s.get(server_round, 0.0), "clients_failed": traffic.get(("failed", server_round), 0)}
        last = server_round == int(fed.rounds)
        if server_round % max(1, int(fed.eval_every)) and not last and server_round != 0:
            tracking.log(ctx.tracker, {f"federated/{k}": v for k, v in sent.items()}, step=server_round)
            return None
        t = time.perf_counter()
        federated.load_adapter_state(model, arrays.to_torch_state_dict())
        row = {"round": server_round, **sent, "val_loss": federated.lm_loss(model, val_rows, pad_id, batch)}
        if not np.isfinite(row["val_loss"]):  # the detection's scores are NaN too: sklearn's "Input contains NaN" traceback
            raise SectuneError(f"round {server_round}: the averaged adapter's validation loss is {row['val_loss']}: the "
                               "weights diverged (lower train.learning_rate, or federated.local_steps); rounds before it: "
                               + (", ".join(f"{r} val_loss {h['val_loss']:.4g}" for r, h in sorted(history.items())) or "none"))
        if fed.detection:
            det = anomaly.detect(anomaly.score_all(predict, [s.keys for s in val]), val_y,
                                 anomaly.score_all(predict, [s.keys for s in test]), test_y)
            chosen = det[det["chosen"]]
            row.update({f"test_{k}": chosen["test"][k] for k in ("f1", "fpr", "precision", "recall")},
                       val_f1=chosen["val_f1"], rule_is_top_g=int(det["chosen"] == "top_g"), top_g=det["top_g"]["g"])
        row["eval_s"] = time.perf_counter() - t
        history[server_round] = row
        tracking.log(ctx.tracker, {f"federated/{k}": v for k, v in row.items() if k != "round"}, step=server_round)
        print(f"sectune: round {server_round}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "round"))
        return MetricRecord({k: float(v) for k, v in row.items()})

    def record(direction: str, server_round: int, n: int) -> None:
        traffic[(direction, server_round)] = traffic.get((direction, server_round), 0) + n

    # 3. the Flower apps, run by the simulation runtime (Ray; one actor per client_num_cpus of ray_num_cpus), or
    # FedAvg on the deployment runtime's Grid (the SuperNodes run sectune.training.flower_app's ClientApp)
    sampled: dict[int, list[int]] = {}  # round -> the partitions that trained in it (seeded by train.seed)
    done: dict = {}
    t_sim = time.perf_counter()
    with flower_quiet(bool(fed.verbose) or fed.runtime == "deployment"):
        strategy = federated.make_strategy(fed, per_round, float(cfg.train.learning_rate), record, int(cfg.train.seed), sampled)
        if fed.runtime == "deployment":
            federated.serve(grid, strategy, initial, int(fed.rounds), evaluate_fn, done)
        else:
            simulate(cfg, run_dir, strategy, initial, evaluate_fn, done)
    sim_s = time.perf_counter() - t_sim
    if "error" in done:  # a round whose clients all failed (federated.RoundFailed): nothing was saved
        raise done["error"]
    rounds_done = sum(1 for (d, _r) in traffic if d == "up")
    if "arrays" not in done or rounds_done < int(fed.rounds):
        raise RuntimeError(f"the Flower {fed.runtime} ended after {rounds_done} of {fed.rounds} rounds (see its log above)")
    rounds_aggregated = rounds_done - sum(1 for (d, _r) in traffic if d == "skipped")
    if rounds_aggregated == 0:  # every round skipped (federated.dp with a failing client): the adapter never changed
        raise SectuneError(f"none of the {rounds_done} rounds was aggregated (with federated.dp=true Flower skips a round in "
                           "which any client failed; see the failures above): the global adapter is the untrained one")

    # 4. the final global adapter, metrics, the per-round table and PNG
    federated.load_adapter_state(model, done["arrays"].to_torch_state_dict())
    modeling.save_pretrained_atomic(model, tokenizer, run_dir / "adapter")
    rounds = sorted(history)
    for r, m in done.get("train_metrics", {}).items():
        if r in history:
            history[r].update({f"clients_{k}": v for k, v in m.items()})
    up = [traffic.get(("up", r), 0) for r in range(1, int(fed.rounds) + 1)]
    down = [traffic.get(("down", r), 0) for r in range(1, int(fed.rounds) + 1)]
    first, last = history[rounds[0]], history[rounds[-1]]
    metrics = {
        "rounds_done": rounds_done, "rounds_aggregated": rounds_aggregated, "num_clients": int(fed.num_clients),
        "clients_per_round": per_round,
        "adapter_bytes": adapter_bytes, "bytes_full_model": full_bytes, "bytes_reduction": full_bytes / adapter_bytes,
        "bytes_up_per_round": float(np.mean(up)), "bytes_down_per_round": float(np.mean(down)),
        "bytes_up_total": int(sum(up)), "bytes_down_total": int(sum(down)),
        # what a full-model FedAvg would have sent in the same rounds, over what was sent
        "bytes_reduction_on_wire": (full_bytes * per_round * 2 * rounds_done) / max(1, sum(up) + sum(down)),
        "val_loss_start": first["val_loss"], "val_loss_end": last["val_loss"],
        "simulation_s": round(sim_s, 2), "round_s_mean": float(np.mean(list(round_s.values()))),
        "partition_skew": federated.partition_skew(parts, train_keys),
        "adapter_params": sum(t.numel() for t in initial.values()),
        # clients that failed in a round the others carried (federated.check_round printed their errors)
        "clients_failed": sum(n for (d, _r), n in traffic.items() if d == "failed"),
        "rounds_with_failed_clients": sum(1 for (d, _r) in traffic if d == "failed"),
    }
    for k in ("test_f1", "test_fpr", "test_precision", "test_recall", "val_f1", "top_g"):
        if k in last:
            metrics[k] = last[k]
            metrics[f"{k}_start"] = first[k]
    norms = [m["update_norm"] for m in done.get("train_metrics", {}).values() if "update_norm" in m]
    if norms:
        metrics["client_update_norm_mean"] = float(np.mean(norms))
    for r in rounds:
        for k in ("val_loss", "test_f1", "test_fpr"):
            if k in history[r]:
                metrics[f"round_{r}_{k}"] = history[r][k]
    bigram = anomaly.BigramModel(data.num_keys, end_marker=True, alpha=float(cfg.evaluate.bigram_alpha)).fit(train_keys)
    base = anomaly.detect(anomaly.score_all(lambda u: [bigram.logprobs(s) for s in u], [s.keys for s in val]), val_y,
                          anomaly.score_all(lambda u: [bigram.logprobs(s) for s in u], [s.keys for s in test]), test_y)
    metrics.update(baseline_test_f1=base[base["chosen"]]["test"]["f1"], baseline_test_fpr=base[base["chosen"]]["test"]["fpr"])
    write_json_atomic(run_dir / "rounds.json", {"rounds": [history[r] for r in rounds], "bytes_up": up, "bytes_down": down,
                                                "sampled_clients": {str(r): sampled[r] for r in sorted(sampled)},
                                                "partition_sizes": sizes, "data": data.info})
    plot_rounds(run_dir / "plots" / "federated_rounds.png", [history[r] for r in rounds], up, down, full_bytes * per_round,
                f"federated · {modeling.model_title(cfg.model)} · {fed.num_clients} clients ({fed.partition})")
    metrics["runtime_s"] = round(time.perf_counter() - t0, 2)
    print(f"sectune: federated done · adapter at {run_dir / 'adapter'} · {rounds_done} round{'s' if rounds_done != 1 else ''} in {sim_s:.0f}s · val loss {metrics['val_loss_start']:.3f} → "
          f"{metrics['val_loss_end']:.3f}" + (f" · test F1 {metrics['test_f1']:.4f} FPR {metrics['test_fpr']:.4f}" if "test_f1" in metrics else "")
          + (f" (bigram baseline F1 {metrics['baseline_test_f1']:.4f} FPR {metrics['baseline_test_fpr']:.4f})"
             if "baseline_test_f1" in metrics and "baseline_test_fpr" in metrics else "")
          + f" · {metrics['bytes_up_per_round']:.0f} B up / round, {metrics['bytes_reduction']:.0f}x smaller than the full model")
    # the split its clients trained on, which stage=evaluate checks as it does an sft run's (an audit, session 42)
    write_json_atomic(run_dir / RECORD_FILE, split_record(data))
    return {"metrics": metrics, "artifacts": {"adapter": "adapter", "rounds": "rounds.json", "rounds_plot": "plots/federated_rounds.png",
                                              "splits": RECORD_FILE}}


def client_app(cfg, client_dir: Path):
    """The ClientApp both runtimes run: each client trains on the partition its node config names."""
    client_cfg = OmegaConf.to_container(cfg, resolve=True)
    client_cfg["federated"]["client_dir"] = str(cfg.federated.client_dir or client_dir)
    return federated.make_client_app(ClientFactory(client_cfg), bool(cfg.federated.dp), int(cfg.federated.num_clients))


class FlowerNotes(logging.Filter):
    """Flower's warnings about sectune's own choices, which no setting of a user's changes: "fraction_evaluate is set to
    0.0. Federated evaluation will be skipped." (sectune evaluates the global adapter on the server, every round, and
    prints it; the warning came twice, once through Hydra's handler) and run_simulation's deprecation notice."""

    NOTES = ("fraction_evaluate is set to 0.0", "`run_simulation` function is deprecated")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(n in record.getMessage() for n in self.NOTES)


@contextlib.contextmanager
def flower_quiet(verbose: bool):
    """While entered, :class:`FlowerNotes` on Flower's logger, and unless ``verbose`` its INFO lines off (the strategy's
    ~70-line summary and per-round records repeat sectune's own ``round N:`` lines) with those of alembic, which Flower's
    state store sets up and Hydra's root handler printed (``setup plugin alembic.autogenerate.*``). Warnings stay."""
    flwr, alembic, notes = logging.getLogger("flwr"), logging.getLogger("alembic"), FlowerNotes()
    levels = flwr.level, alembic.level
    flwr.addFilter(notes)
    if not verbose:
        flwr.setLevel(logging.WARNING)
        alembic.setLevel(logging.WARNING)
    try:
        yield
    finally:
        flwr.removeFilter(notes)
        flwr.setLevel(levels[0])
        alembic.setLevel(levels[1])


def simulate(cfg, run_dir: Path, strategy, initial: dict, evaluate_fn, done: dict) -> None:
    """Flower's simulation runtime: ``num_clients`` virtual SuperNodes, the ClientApps in Ray actors."""
    from flwr.simulation import run_simulation

    fed = cfg.federated
    server_app = federated.make_server_app(strategy, initial, int(fed.rounds), evaluate_fn, done)
    backend = {"client_resources": {"num_cpus": int(fed.client_num_cpus), "num_gpus": float(fed.client_num_gpus)},
               "init_args": {"num_cpus": int(fed.ray_num_cpus or fed.client_num_cpus), "log_to_driver": bool(fed.verbose)}}
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not fed.verbose:  # Flower prints through its own handler; Hydra's root handler would print each line again
        logging.getLogger("flwr").propagate = False
    done["stop"] = threading.Event()  # Ctrl-C: the ServerApp's thread (not a daemon) polled for replies forever
    short = ray_temp_dir()
    if short is not None:
        backend["init_args"]["_temp_dir"] = short
    _start_ray(backend["init_args"])
    try:
        run_simulation(server_app=server_app, client_app=client_app(cfg, run_dir / "clients"), num_supernodes=int(fed.num_clients),
                       backend_config=backend, verbose_logging=bool(fed.verbose))
    except BaseException:
        done["stop"].set()
        raise
    finally:
        if short is not None:
            import ray

            ray.shutdown()
            shutil.rmtree(short, ignore_errors=True)


def ray_temp_dir() -> str | None:
    """A short folder for Ray's session files where its sockets under the usual one
    (``$TMPDIR/ray/session_<date>_<time>_<usec>_<pid>/sockets/plasma_store``: 64 characters after ``$TMPDIR/ray``) would
    pass the 107-byte limit of a socket's path: with a TMPDIR of 42 characters or more (a CI runner's
    /home/runner/work/_temp/…) stage=federated failed in one OSError naming neither (an audit, session 41). None where
    they fit, or where RAY_TMPDIR says where they go."""
    if os.environ.get("RAY_TMPDIR") or len(os.path.join(tempfile.gettempdir(), "ray")) + 64 <= 100:
        return None
    return tempfile.mkdtemp(prefix="ray-", dir="/tmp")


def _start_ray(init_args: dict) -> None:
    """Ray started here as Flower's backend would start it (which then finds it running), and this process's SIGTERM and
    SIGHUP handlers put back after it: Ray's driver installs its own, which aborted the process (exit 134, result.json
    left "running") where every other stage records the run as interrupted (an audit, session 36)."""
    import signal

    import ray

    if ray.is_initialized():
        return
    kept = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
    pythonpath = os.pathsep.join(sys.path) + (f"{os.pathsep}{os.environ['PYTHONPATH']}" if os.environ.get("PYTHONPATH") else "")
    os.environ["PYTHONPATH"] = pythonpath  # as flwr's RayBackend.init_ray sets it for the actors
    ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, **{"include_dashboard": False, **init_args})
    if threading.current_thread() is threading.main_thread():
        for sig, handler in kept.items():
            if handler is not None:
                signal.signal(sig, handler)


def plot_rounds(path: Path, rows: list[dict], up: list[int], down: list[int], full_per_round: int, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = [row["round"] for row in rows]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    axes[0].plot(r, [row["val_loss"] for row in rows], marker="o")
    axes[0].set(xlabel="round", ylabel="global validation loss")
    if "test_f1" in rows[0]:
        axes[1].plot(r, [row["test_f1"] for row in rows], marker="o", label="test F1")
        axes[1].plot(r, [row["test_fpr"] for row in rows], marker="x", label="test FPR")
        axes[1].legend()
    axes[1].set(xlabel="round", ylabel="detection (rule chosen on validation)")
    rr = list(range(1, len(up) + 1))
    axes[2].plot(rr, up, label="adapter bytes up")
    axes[2].plot(rr, down, label="adapter bytes down", linestyle="--")
    axes[2].axhline(full_per_round, color="grey", linestyle=":", label="full model, one way")
    axes[2].set(xlabel="round", ylabel="bytes per round", yscale="log")
    axes[2].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
