"""stage=federated: FedAvg of LoRA adapters on Flower (issue 16, federated half; seed 003)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from conftest import compose, sectune
from sectune.models import modeling
from sectune.paths import PROJECT_ROOT
from sectune.data.synthetic_hdfs import write_deeplog_files
from sectune.errors import ConfigError, DataError
from sectune.training import federated

HAS_FLWR = importlib.util.find_spec("flwr") is not None and importlib.util.find_spec("ray") is not None
requires_flwr = pytest.mark.skipif(not HAS_FLWR, reason="Flower not installed: pip install -c constraints.txt 'flwr[simulation]>=1.20'")

TINY = ["+experiment=hdfs_federated_tiny", "logger=none"]


def tiny_cfg(tmp_path: Path, *extra: str):
    return compose([*TINY, f"paths.cache_dir={tmp_path / 'cache'}", *extra])


def tiny_lora_model(tmp_path: Path):
    cfg = tiny_cfg(tmp_path)
    path = modeling.model_path(cfg)
    return cfg, modeling.apply_lora(modeling.load_model(cfg, path=path), cfg)


# ----------------------------------------------------------------------------- partitions
SESSIONS = [(k, k, 5) for k in range(1, 11) for _ in range(30)]  # 300 sessions, dominant keys 1..10, 30 each


def test_iid_partition_sizes_cover_everything_and_are_seeded():
    parts = federated.partition(SESSIONS, 7, "iid", seed=0)
    assert sorted(len(p) for p in parts) == [42] * 1 + [43] * 6  # 300 = 6 × 43 + 42
    assert sorted(i for p in parts for i in p) == list(range(300))  # every session once
    assert parts == federated.partition(SESSIONS, 7, "iid", seed=0)
    assert parts != federated.partition(SESSIONS, 7, "iid", seed=1)


def test_shards_are_contiguous_pieces_sorted_by_dominant_key():
    parts = federated.partition(SESSIONS, 10, "shards")
    assert [len(p) for p in parts] == [30] * 10
    assert [{SESSIONS[i][0] for i in p} for p in parts] == [{k} for k in range(1, 11)]  # one dominant key per client
    assert federated.partition_skew(parts, SESSIONS) == 1.0


def test_dirichlet_small_alpha_is_skewed_large_alpha_is_not_and_both_are_seeded():
    small = federated.partition(SESSIONS, 5, "dirichlet", alpha=0.05, seed=0)
    large = federated.partition(SESSIONS, 5, "dirichlet", alpha=100.0, seed=0)
    for parts in (small, large):
        assert sorted(i for p in parts for i in p) == list(range(300)) and min(map(len, parts)) >= 1
    # 10 dominant keys over 5 clients: a client holding all keys evenly scores 0.1, one key alone 1.0
    assert federated.partition_skew(small, SESSIONS) > 0.4 > 0.2 > federated.partition_skew(large, SESSIONS)
    assert small == federated.partition(SESSIONS, 5, "dirichlet", alpha=0.05, seed=0)
    assert small != federated.partition(SESSIONS, 5, "dirichlet", alpha=0.05, seed=1)


def test_partition_errors_name_the_setting():
    with pytest.raises(ConfigError, match="federated.partition='zipf'"):
        federated.partition(SESSIONS, 3, "zipf")
    with pytest.raises(DataError, match="federated.num_clients"):  # a client would get no data
        federated.partition(SESSIONS[:3], 5, "iid")
    with pytest.raises(DataError, match="dirichlet_alpha"):
        federated.partition(SESSIONS[:40], 30, "dirichlet", alpha=0.01, max_tries=3)
    for alpha in (float("nan"), float("inf")):  # nan proportions: 100 empty draws, then "raise federated.dirichlet_alpha"
        with pytest.raises(ConfigError, match=f"federated.dirichlet_alpha={alpha}: must be a finite number > 0"):
            federated.partition(SESSIONS, 3, "dirichlet", alpha=alpha)


def test_lr_schedule_over_rounds_and_clients_per_round():
    assert federated.round_lr(1.0, 3, 5, "constant") == 1.0
    assert [round(federated.round_lr(1.0, r, 5, "linear", 0.0), 4) for r in range(1, 6)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    cos = [federated.round_lr(1.0, r, 5, "cosine", 0.1) for r in range(1, 6)]
    assert cos[0] == 1.0 and abs(cos[-1] - 0.1) < 1e-12 and cos == sorted(cos, reverse=True)
    assert federated.clients_per_round(50, 0.1) == 5 and federated.clients_per_round(3, 0.1) == 1
    with pytest.raises(ConfigError, match="client_frac"):
        federated.clients_per_round(10, 0.0)


@pytest.fixture
def flower_task(monkeypatch):
    """Messages made outside a Flower runtime need the identity the runtime would set in the process."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


# ----------------------------------------------------------------------------- what travels
def test_only_lora_tensors_travel_and_bytes_equal_their_sizes(tmp_path):
    cfg, model = tiny_lora_model(tmp_path)
    state = federated.adapter_state(model)
    lora_params = {n.replace(".default", "") for n, _ in model.named_parameters() if "lora_" in n}
    assert set(state) == lora_params  # exactly the adapter; lm_head is a target, yet no embedding matrix is added
    assert all("lora_" in k for k in state) and not any(k.endswith(("embed_tokens.weight", "lm_head.weight")) for k in state)
    assert federated.tensor_bytes(state) == sum(p.numel() * 4 for n, p in model.named_parameters() if "lora_" in n)
    base = model.get_base_model()
    tied = base.get_input_embeddings().weight.data_ptr() == base.get_output_embeddings().weight.data_ptr()
    base_numel = sum(p.numel() for n, p in base.named_parameters() if "lora_" not in n)
    if tied:  # named_parameters lists a tied weight once already
        assert federated.full_model_bytes(model) == base_numel * 4
    assert federated.full_model_bytes(model) > 5 * federated.tensor_bytes(state)


@requires_flwr
def test_the_client_app_replies_with_the_adapter_only_and_its_sample_count(tmp_path, flower_task):
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

    cfg, model = tiny_lora_model(tmp_path)

    class FakeClient:  # what stages/federated.Client does, without training
        def fit(self, state, lr, rnd):
            federated.load_adapter_state(model, state)
            return {"train_loss": 1.5}, 17

        def state(self):
            return federated.adapter_state(model)

    app = federated.make_client_app(lambda pid: FakeClient(), dp=False)
    sent = federated.adapter_state(model)
    msg = Message(RecordDict({"arrays": ArrayRecord(sent), "config": ConfigRecord({"lr": 0.1, "server-round": 1})}),
                  dst_node_id=1, message_type="train")
    reply = app(msg, Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 1}, state=RecordDict(), run_config={}))
    assert not reply.has_error()
    arrays = reply.content["arrays"]
    assert set(arrays.keys()) == set(sent) and reply.content["metrics"]["num-examples"] == 17
    assert sum(a.numpy().nbytes for a in arrays.values()) == federated.tensor_bytes(sent)


@requires_flwr
def test_flower_fedavg_weights_hand_made_client_updates_by_sample_counts(flower_task):
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

    g = torch.Generator().manual_seed(0)
    updates = [{"a.lora_A.weight": torch.randn(4, 3, generator=g), "a.lora_B.weight": torch.randn(3, 4, generator=g)} for _ in range(3)]
    counts = [10, 30, 60]
    hand = {k: sum(u[k] * (n / 100) for u, n in zip(updates, counts)) for k in updates[0]}
    fed = compose(["stage=federated", "federated.num_clients=3", "federated.client_frac=1.0"]).federated
    recorded = {}
    strategy = federated.make_strategy(fed, 3, 0.1, lambda d, r, n: recorded.__setitem__((d, r), n))
    replies = [Message(RecordDict({"arrays": ArrayRecord(u), "metrics": MetricRecord({"num-examples": n})}), dst_node_id=i + 1,
                       message_type="train") for i, (u, n) in enumerate(zip(updates, counts))]
    arrays, _ = strategy.aggregate_train(1, replies)
    got = arrays.to_torch_state_dict()
    for k in hand:
        torch.testing.assert_close(got[k], hand[k], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(federated.weighted_average(updates, counts)[k], hand[k])
    assert recorded[("up", 1)] == sum(ArrayRecord(u).count_bytes() for u in updates)
    # unweighted would differ: the weights matter
    assert not torch.allclose(got["a.lora_A.weight"], sum(u["a.lora_A.weight"] for u in updates) / 3)


# ----------------------------------------------------------------------------- failed clients
class FakeGrid:
    """A Grid whose nodes answer at once: a node in ``failing`` with Flower's error reply for a ClientApp that raised,
    the others with the adapter they were sent and 5 examples."""

    def __init__(self, nodes, failing=(), partitions=None):
        from flwr.serverapp import Grid

        partitions = partitions or {n: i for i, n in enumerate(nodes)}

        class _Grid(Grid):
            set_run = create_message = push_messages = pull_messages = lambda *a, **k: None
            run = property(lambda self: None)

            def get_node_ids(self):
                return list(nodes)

            def send_and_receive(self, messages, *, timeout=None):
                from flwr.app import Error, Message, MetricRecord, RecordDict

                out = []
                for i, msg in enumerate(messages):
                    msg.metadata.__dict__["_message_id"] = f"m{i}"  # what pushing it would set
                    if msg.metadata.message_type == "query":  # which partition a node holds (its ClientApp's answer)
                        out.append(Message(RecordDict({"metrics": MetricRecord({"partition-id": partitions[msg.metadata.dst_node_id]})}),
                                           reply_to=msg))
                    elif msg.metadata.dst_node_id in failing:
                        out.append(Message(Error(code=2, reason=f"<class 'ValueError'>:<'boom on node {msg.metadata.dst_node_id}'>"),
                                           reply_to=msg))
                    else:
                        out.append(Message(RecordDict({"arrays": msg.content["arrays"], "metrics": MetricRecord({"num-examples": 5})}),
                                           reply_to=msg))
                return out

        self.grid = _Grid()


@requires_flwr
def test_which_clients_train_in_a_round_depends_on_the_seed_not_on_flowers_random_node_ids(flower_task):
    """FedAvg sampled with the process's global random over node ids Flower draws at random: two runs with the same
    seed trained different clients. Now the partitions a round samples are a function of (seed, round)."""
    import random

    fed = compose(["stage=federated", "federated.num_clients=10", "federated.client_frac=0.3", "federated.rounds=3"]).federated

    def run(seed: int, node_seed: int) -> dict:
        ids = random.Random(node_seed).sample(range(1, 2**62), 10)  # a fresh simulation's node ids, partition i on ids[i]
        sampled: dict = {}
        strategy = federated.make_strategy(fed, 3, 0.1, lambda *a: None, seed, sampled)
        done: dict = {}
        before = random.getstate()
        federated.serve(FakeGrid(list(reversed(ids)), partitions={n: i for i, n in enumerate(ids)}).grid, strategy,
                        {"a.lora_A.weight": torch.ones(2, 2)}, 3, None, done)
        assert "arrays" in done and random.getstate() == before  # the rest of the process's draws are left alone
        return sampled

    first = run(seed=1, node_seed=0)
    assert sorted(first) == [1, 2, 3] and all(len(p) == 3 and len(set(p)) == 3 and set(p) <= set(range(10)) for p in first.values())
    assert run(seed=1, node_seed=99) == first  # other node ids, the same clients
    assert len({tuple(p) for p in first.values()}) > 1  # rounds differ from each other
    assert run(seed=2, node_seed=0) != first


@requires_flwr
def test_the_client_app_tells_the_server_its_partition_even_with_dp_clipping_on(tmp_path, flower_task):
    from flwr.app import ConfigRecord, Context, Message, RecordDict

    for dp in (False, True):
        app = federated.make_client_app(lambda pid: None, dp=dp, num_clients=4)
        msg = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=7, message_type="query")
        reply = app(msg, Context(run_id=1, node_id=7, node_config={"partition-id": 2, "num-partitions": 4}, state=RecordDict(), run_config={}))
        assert not reply.has_error() and reply.content["metrics"]["partition-id"] == 2


def fed_settings(*extra: str):
    return compose(["stage=federated", "federated.num_clients=3", "federated.client_frac=1.0", "federated.rounds=2", *extra]).federated


def test_flower_error_reasons_become_one_line():
    assert federated.error_reason("<class 'ZeroDivisionError'>:<'division by zero'>") == "ZeroDivisionError: division by zero"
    ray = ("<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'\x1b[36mray::ClientAppActor.run()\x1b[39m (pid=1)\n"
           "  File \"x.py\", line 3\nflwr.clientapp.client_app.ClientAppException: \nException ClientAppException occurred. "
           "Message: debug.fail_at_step=1: simulated interruption after step 1'>")
    assert federated.error_reason(ray) == "debug.fail_at_step=1: simulated interruption after step 1"
    assert federated.error_reason(None, 5) == "error code 5"


@requires_flwr
@pytest.mark.parametrize("dp", [False, True])
def test_a_round_whose_clients_all_fail_stops_the_run_naming_the_round_and_errors(flower_task, dp):
    recorded = {}
    strategy = federated.make_strategy(fed_settings(f"federated.dp={str(dp).lower()}"), 3, 0.1,
                                       lambda d, r, n: recorded.__setitem__((d, r), n))
    done: dict = {}
    federated.serve(FakeGrid([1, 2, 3], failing={1, 2, 3}).grid, strategy, {"a.lora_A.weight": torch.ones(2, 2)}, 2, None, done)
    err = done["error"]
    assert isinstance(err, federated.RoundFailed) and "arrays" not in done  # nothing to save: the stage raises it
    assert str(err).startswith("federated round 1: all 3 sampled client(s) failed, so FedAvg has nothing to average: ")
    for node in (1, 2, 3):
        assert f"node {node}: ValueError: boom on node {node}" in str(err)
    assert ("down", 2) not in recorded  # the run stopped in round 1


@requires_flwr
def test_an_interrupted_simulation_ends_the_servers_thread_waiting_for_replies(flower_task):
    """An audit (session 25): after Ctrl-C the run wrote result.json and then hung, its ServerApp thread (not a daemon)
    polling Flower's in-memory grid for replies no client would send. The stop event ends it at its next poll."""
    import threading

    grid = FakeGrid([1, 2, 3]).grid
    polls = []

    def send_and_receive(messages, *, timeout=None):  # as Flower's InMemoryGrid: push, then poll until every reply is in
        while True:
            polls.append(grid.pull_messages([]))
            time.sleep(0.01)

    grid.send_and_receive = send_and_receive
    strategy = federated.make_strategy(fed_settings(), 3, 0.1, lambda d, r, n: None)
    done: dict = {"stop": threading.Event()}
    server = threading.Thread(target=federated.serve, args=(grid, strategy, {"a.lora_A.weight": torch.ones(2, 2)}, 2, None, done),
                              daemon=True)  # a regression fails the test, not the test session
    server.start()
    time.sleep(0.3)
    assert server.is_alive() and polls  # waiting for replies
    done["stop"].set()
    server.join(timeout=5)
    assert not server.is_alive() and "arrays" not in done and "error" not in done


@requires_flwr
@pytest.mark.parametrize("dp", [False, True])
def test_a_round_where_some_clients_fail_goes_on_and_counts_them(flower_task, dp, capsys):
    recorded = {}
    strategy = federated.make_strategy(fed_settings(f"federated.dp={str(dp).lower()}"), 3, 0.1,
                                       lambda d, r, n: recorded.__setitem__((d, r), n))
    done: dict = {}
    federated.serve(FakeGrid([1, 2, 3], failing={2}).grid, strategy, {"a.lora_A.weight": torch.ones(2, 2)}, 2, None, done)
    assert "error" not in done and "arrays" in done
    assert recorded[("failed", 1)] == recorded[("failed", 2)] == 1
    assert recorded[("up", 1)] == recorded[("up", 2)] > 0  # both rounds count as done, with the two adapters that came back
    out = capsys.readouterr().out
    assert "sectune: warning: federated round 1: 1 of 3 sampled client(s) failed: node 2: ValueError: boom on node 2; " in out
    assert ("Flower skips this round's aggregation" if dp else "FedAvg averages the 2 adapter(s) that came back") in out


@requires_flwr
def test_the_stage_fails_when_a_rounds_clients_all_fail_and_records_partial_failures(tmp_path, monkeypatch, flower_task):
    """The stage under a Grid whose clients fail (no Ray): all fail → RoundFailed, no adapter saved; one of three
    fails each round → the run succeeds and says so in its metrics and rounds.json."""
    from sectune.runner import RunContext
    from sectune.stages import federated as stage

    data = tmp_path / "hdfs"
    write_deeplog_files(data, n_normal=120, n_anomalous=60, seed=1)
    cfg = tiny_cfg(tmp_path, f"dataset.path={data}", "federated.num_clients=3", "federated.client_frac=1.0", "federated.rounds=2",
                   "federated.detection=false")
    failing: set = {1, 2, 3}

    def simulate(cfg, run_dir, strategy, initial, evaluate_fn, done):
        federated.serve(FakeGrid([1, 2, 3], failing).grid, strategy, initial, int(cfg.federated.rounds), evaluate_fn, done)

    monkeypatch.setattr(stage, "simulate", simulate)
    with pytest.raises(federated.RoundFailed, match=r"^federated round 1: all 3 sampled client\(s\) failed.*node 1: ValueError: boom"):
        stage.run(RunContext(cfg=cfg, run_dir=tmp_path / "all"))
    assert not (tmp_path / "all" / "adapter").exists() and not (tmp_path / "all" / "rounds.json").exists()

    failing = {3}
    out = stage.run(RunContext(cfg=cfg, run_dir=tmp_path / "some"))
    m = out["metrics"]
    assert m["rounds_done"] == 2 and m["clients_failed"] == 2 and m["rounds_with_failed_clients"] == 2
    rounds = json.loads((tmp_path / "some" / "rounds.json").read_text())["rounds"]
    assert [r["clients_failed"] for r in rounds] == [0, 1, 1]  # round 0 is the initial evaluation
    assert m["rounds_aggregated"] == 2
    # with DP, Flower skips every round with a failed client: none aggregated, and the run said it succeeded with the
    # untrained adapter
    dp_cfg = tiny_cfg(tmp_path, f"dataset.path={data}", "federated.num_clients=3", "federated.client_frac=1.0",
                      "federated.rounds=2", "federated.detection=false", "federated.dp=true")
    from sectune.errors import SectuneError

    with pytest.raises(SectuneError, match=r"^none of the 2 rounds was aggregated"):
        stage.run(RunContext(cfg=dp_cfg, run_dir=tmp_path / "dp"))
    assert not (tmp_path / "dp" / "adapter").exists()


@requires_flwr
def test_the_servers_model_goes_to_the_runs_device_and_cpu_clients_are_said(tmp_path, monkeypatch, capsys):
    """The server's copy of the model (every round's global evaluation) was left where from_pretrained put it, the CPU,
    on a GPU machine too; and Ray hides the GPU from simulated clients that ask for none (federated.client_num_gpus=0)."""
    from sectune.runner import RunContext
    from sectune.stages import federated as stage

    data = tmp_path / "hdfs"
    write_deeplog_files(data, n_normal=60, n_anomalous=30, seed=1)
    moved = []

    class Stop(Exception):
        pass

    def simulate(cfg, run_dir, strategy, initial, evaluate_fn, done):
        raise Stop

    monkeypatch.setattr(stage.modeling, "device_for", lambda cfg: "cuda")  # train.device=auto on a GPU machine
    monkeypatch.setattr(stage.modeling, "to_run_device", lambda model, cfg: moved.append(model) or model)
    monkeypatch.setattr(stage, "simulate", simulate)
    with pytest.raises(Stop):
        stage.run(RunContext(cfg=tiny_cfg(tmp_path, f"dataset.path={data}", "federated.detection=false"), run_dir=tmp_path / "run"))
    assert len(moved) == 1 and hasattr(moved[0], "peft_config")  # the server's LoRA model
    assert "federated.client_num_gpus=0: Ray hides the GPU from the simulated clients" in capsys.readouterr().err


@pytest.mark.slow  # ~1 min: Ray's start-up
@requires_flwr
def test_simulation_whose_clients_all_fail_exits_2_naming_the_round_and_the_error(tmp_path):
    """debug.fail_at_step=1: every client's Trainer dies after its first local step, so round 1 has nothing to average."""
    data = tmp_path / "hdfs"
    write_deeplog_files(data, n_normal=120, n_anomalous=60, seed=1)
    run = sectune([*TINY, f"paths.cache_dir={tmp_path / 'cache'}", f"dataset.path={data}", "federated.num_clients=2",
                   "federated.client_frac=1.0", "federated.rounds=2", "federated.local_steps=3", "train.batch_size=8",
                   "federated.detection=false", "debug.fail_at_step=1"],
                  run_dir=tmp_path / "run", timeout=600, env={"OMP_NUM_THREADS": "1"})
    assert run.returncode == 2, run.stderr[-3000:]
    line = run.stderr.strip().splitlines()[-1]
    assert line.startswith("sectune: error: federated round 1: all 2 sampled client(s) failed, so FedAvg has nothing to average: node ")
    assert line.count("debug.fail_at_step=1: simulated interruption after step 1") == 2
    assert run.result["status"] == "failed" and run.result["error"].startswith("federated round 1: all 2 sampled client(s) failed")
    assert not (tmp_path / "run" / "adapter").exists()


# ----------------------------------------------------------------------------- the stage
def test_stage_refuses_lora_none_and_other_datasets(tmp_path):
    from sectune.runner import RunContext
    from sectune.stages import federated as stage

    if not HAS_FLWR:
        pytest.skip("Flower not installed")
    with pytest.raises(ConfigError, match="lora=none"):
        stage.run(RunContext(cfg=tiny_cfg(tmp_path, "lora=none"), run_dir=tmp_path))
    with pytest.raises(ConfigError, match="dataset=hdfs"):
        stage.run(RunContext(cfg=tiny_cfg(tmp_path, "dataset=auth_logs"), run_dir=tmp_path))


def test_presets_compose_with_seed_003_settings():
    cfg = compose(["+experiment=hdfs_federated", "logger=none"])
    f = cfg.federated
    assert (cfg.model.name, cfg.lora.r, f.num_clients, f.client_frac, f.rounds, f.local_steps, cfg.train.batch_size) == \
        ("smollm_135m", 8, 50, 0.1, 50, 10, 32)
    from sectune.training.planner import lora_param_count, param_count

    # the published sizes (SmolLM-360M: 362M, SmolLM-1.7B: 1.71B) from the presets' arch numbers alone
    for name, params in (("smollm_135m", 134_515_008), ("smollm_360m", 361_821_120), ("smollm_1_7b", 1_711_376_384)):
        arch = dict(compose(["+experiment=hdfs_federated", f"model={name}"]).model.arch)
        assert param_count(arch) == params, name
    # seed 003's r=8 on q_proj, v_proj: 292x fewer bytes per message than the full SmolLM-135M (README)
    assert round(134_515_008 / lora_param_count(dict(cfg.model.arch), 8, list(cfg.lora.target_modules))) == 292


def _simulate(tmp_path: Path, data: Path, *extra: str, env: dict | None = None):
    """A tiny Flower simulation of every client each round on ``data``, as a user runs it."""
    return sectune([*TINY, f"paths.cache_dir={tmp_path / 'cache'}", f"dataset.path={data}", "federated.client_frac=1.0", *extra],
                   run_dir=tmp_path / "run", timeout=600, env={"OMP_NUM_THREADS": "1", **(env or {})})


@requires_flwr
def test_simulation_three_clients_two_rounds_end_to_end(tmp_path):
    """Under a TMPDIR as long as a CI runner's: Ray's socket paths under it passed the 107-byte limit, one OSError (an
    audit, session 41); Ray's session then goes to a short folder of its own, removed afterwards."""
    data = tmp_path / "hdfs"
    write_deeplog_files(data, n_normal=300, n_anomalous=150, seed=1)
    long_tmp = tmp_path / ("a-ci-runners-work-temp-" * 2)
    long_tmp.mkdir()
    before = set(Path("/tmp").glob("ray-*"))
    run = _simulate(tmp_path, data, "federated.num_clients=3", "federated.rounds=2", "federated.local_steps=3", "train.batch_size=8",
                    env={"TMPDIR": str(long_tmp)})
    assert run.returncode == 0, run.stderr[-3000:]
    assert set(Path("/tmp").glob("ray-*")) <= before  # the short folder went with the run
    m = run.result["metrics"]
    assert m["rounds_done"] == 2 and m["clients_per_round"] == 3
    assert m["val_loss_end"] < m["val_loss_start"]
    assert m["bytes_up_per_round"] == m["bytes_down_per_round"] > 3 * m["adapter_bytes"]  # three adapters + npy headers / keys
    assert m["bytes_up_per_round"] < 3 * m["adapter_bytes"] * 1.05
    assert m["bytes_reduction"] == pytest.approx(m["bytes_full_model"] / m["adapter_bytes"])
    for r in (0, 1, 2):
        assert f"round_{r}_val_loss" in m and f"round_{r}_test_f1" in m
    assert (tmp_path / "run" / "plots" / "federated_rounds.png").stat().st_size > 0
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    # the console: sectune's round lines, not Flower's ~70-line INFO summary of them, alembic's set-up lines, Flower's
    # and Ray's notes on sectune's own choices (fraction_evaluate=0, run_simulation, ray.init); the last line names the
    # adapter (an audit, session 44)
    said = run.stdout + run.stderr
    for noise in ("Starting RoundFedAvg strategy", "Aggregated MetricRecord", "alembic", "fraction_evaluate is set to 0.0",
                  "`run_simulation` function is deprecated", "Ray will no longer override accelerator"):
        assert noise not in said, noise
    assert "sectune: round 2:" in run.stdout
    done = [ln for ln in run.stdout.splitlines() if ln.startswith("sectune: federated done")]
    assert done and f"adapter at {tmp_path / 'run' / 'adapter'} · " in done[0], done
    # every node answered the partition query through Ray's ClientApp actors
    assert json.loads((tmp_path / "run" / "rounds.json").read_text())["sampled_clients"] == {"1": [0, 1, 2], "2": [0, 1, 2]}
    # the split its clients trained on, as an sft run records it, for stage=evaluate to check (session 42)
    record = json.loads((tmp_path / "run" / "splits.json").read_text())
    assert run.result["artifacts"]["splits"] == "splits.json" and len(record["train_ids"]) == sum(
        json.loads((tmp_path / "run" / "rounds.json").read_text())["partition_sizes"])


@pytest.mark.slow  # ~1.5 min: two Ray simulations
@requires_flwr
def test_two_simulations_with_one_seed_give_the_same_global_adapter_bit_for_bit(tmp_path):
    """The same clients train (seeded sampling) and FedAvg adds their adapters up in partition order, not in the order
    Ray's actors finish: the global adapter of two runs is the same to the bit."""
    from safetensors.torch import load_file

    data = tmp_path / "hdfs"
    write_deeplog_files(data, n_normal=300, n_anomalous=150, seed=1)
    adapters = []
    for i in (1, 2):
        run = sectune([*TINY, f"paths.cache_dir={tmp_path / 'cache'}", f"dataset.path={data}", "federated.num_clients=3",
                       "federated.client_frac=0.67", "federated.rounds=2", "federated.local_steps=3", "train.batch_size=8"],
                      run_dir=tmp_path / f"run{i}", timeout=600, env={"OMP_NUM_THREADS": "1"})
        assert run.returncode == 0, run.stderr[-3000:]
        adapters.append(load_file(tmp_path / f"run{i}" / "adapter" / "adapter_model.safetensors"))
    assert adapters[0].keys() == adapters[1].keys() and all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])


# ----------------------------------------------------------------------------- deployment runtime (item 5)
def test_node_config_gives_the_partition_with_clear_errors():
    assert federated.node_partition({"partition-id": 2, "num-partitions": 3}, 3) == 2
    with pytest.raises(ConfigError, match='--node-config "partition-id=<i> num-partitions=3"'):
        federated.node_partition({}, 3)
    with pytest.raises(ConfigError, match="num-partitions=2 but the run has federated.num_clients=3"):
        federated.node_partition({"partition-id": 0, "num-partitions": 2}, 3)
    with pytest.raises(ConfigError, match="partition-id=3: must be in 0..2"):
        federated.node_partition({"partition-id": 3, "num-partitions": 3}, 3)


@requires_flwr
def test_deployment_runtime_is_refused_outside_flower_and_unknown_runtimes_are_named(tmp_path):
    from sectune.runner import RunContext
    from sectune.stages import federated as stage

    from sectune.paths import FLOWER_APP_DIR

    assert (FLOWER_APP_DIR / "pyproject.toml").is_file()
    with pytest.raises(ConfigError, match=re.escape(f"flwr run {FLOWER_APP_DIR} <connection>")):
        stage.run(RunContext(cfg=tiny_cfg(tmp_path, "federated.runtime=deployment"), run_dir=tmp_path))
    with pytest.raises(ConfigError, match="federated.runtime='grpc'"):
        stage.run(RunContext(cfg=tiny_cfg(tmp_path, "federated.runtime=grpc"), run_dir=tmp_path))
    from sectune.training import flower_app

    with pytest.raises(ConfigError, match="choose stage=sft"):
        flower_app.compose({"overrides": "stage=sft"})


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def wait_for_port(port: int, procs: list, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if any(p.poll() is not None for p in procs):
            raise AssertionError(f"a Flower process exited early (code {[p.poll() for p in procs]})")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f}s")


@pytest.mark.slow  # ~1.5 min: a SuperLink, 2 SuperNodes and one ClientApp process per client and round
@requires_flwr
def test_deployment_runtime_superlink_and_two_supernodes_on_localhost(tmp_path):
    data = tmp_path / "hdfs"
    write_deeplog_files(data, n_normal=300, n_anomalous=150, seed=1)
    link, node0, node1 = free_ports(3)
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr"), "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "OMP_NUM_THREADS": "1"}
    (tmp_path / "flwr").mkdir()
    (tmp_path / "flwr" / "config.toml").write_text(
        f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{link}"\ninsecure = true\n')
    procs, logs = [], []

    def start(cmd: str, log_name: str, *args: str) -> None:
        log = open(tmp_path / f"{log_name}.log", "w")
        logs.append(log)
        # its own session: the teardown ends it and the SuperExec / app processes it starts, nothing else
        procs.append(subprocess.Popen([str(bin_dir / cmd), "--insecure", *args], cwd=tmp_path, env=env, stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True))

    try:
        start("flower-superlink", "superlink", "--port", str(link), "--disable-runtime-dependency-installation")
        wait_for_port(link, procs)
        for i, port in enumerate((node0, node1)):
            start("flower-supernode", f"supernode{i}", "--superlink", f"127.0.0.1:{link}", "--port", str(port),
                  "--node-config", f"partition-id={i} num-partitions=2")
        overrides = " ".join([*TINY, f"paths.cache_dir={tmp_path / 'cache'}", f"dataset.path={data}", "federated.num_clients=2", "federated.client_frac=1.0",
                              "federated.rounds=2", "federated.local_steps=3", "train.batch_size=8"])
        run = subprocess.run([str(bin_dir / "flwr"), "run", str(PROJECT_ROOT / "experiments/hdfs_federated/flower_app"), "test",
                              "--stream", "--run-config", f'overrides="{overrides}" run-dir="{tmp_path / "run"}"'],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        result_file = tmp_path / "run" / "result.json"
        assert result_file.is_file(), (run.stdout[-3000:], run.stderr[-2000:])
        result = json.loads(result_file.read_text())
        assert result["status"] == "succeeded", result.get("error")
        m = result["metrics"]
        assert m["rounds_done"] == 2 and m["num_clients"] == 2 and m["clients_per_round"] == 2
        assert m["val_loss_end"] < m["val_loss_start"]
        assert m["bytes_up_per_round"] == m["bytes_down_per_round"] > 2 * m["adapter_bytes"]
        assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
        # the SuperNodes (their node-config partition ids) answered the server's partition query
        assert json.loads((tmp_path / "run" / "rounds.json").read_text())["sampled_clients"] == {"1": [0, 1], "2": [0, 1]}
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for p in procs:
                try:
                    os.killpg(p.pid, sig)  # the group outlives its leader: the SuperExec children
                except ProcessLookupError:
                    pass
            if sig == signal.SIGTERM:
                time.sleep(3)
        for p in procs:
            p.wait(timeout=30)
        for log in logs:
            log.close()


# ----------------------------------------------------------------------------- one client = centralised (item 8)
@pytest.mark.slow  # ~1 min: a stage=sft run and a Flower simulation (Ray's start-up is most of it)
@requires_flwr
def test_one_client_with_all_data_is_centralised_training(tmp_path):
    """num_clients=1, client_frac=1, 1 round × N local steps = stage=sft for N steps: the same LoRA init (train.seed),
    the same data order (client 0's round-1 Trainer seed is train.seed), a constant lr, a fresh AdamW in both.
    stage=sft must not group batches by length (its default without packing) and TRL refuses lm_head targets."""
    from safetensors.torch import load_file

    from sectune.data.hdfs import NORMAL, load_hdfs, render_keys

    data = tmp_path / "hdfs"
    write_deeplog_files(data, n_normal=300, n_anomalous=150, seed=1)
    common = [*TINY, f"paths.cache_dir={tmp_path / 'cache'}", f"dataset.path={data}", "train.batch_size=8",
              "lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"]
    env = {"OMP_NUM_THREADS": "1"}
    sft = sectune([*common, "stage=sft", "train.max_steps=6", "train.lr_scheduler=constant", "train.group_by_length=false"],
                  run_dir=tmp_path / "sft", env=env)
    assert sft.returncode == 0, sft.stderr[-3000:]
    fed = sectune([*common, "federated.num_clients=1", "federated.client_frac=1.0", "federated.rounds=1", "federated.local_steps=6",
                   "federated.detection=false"], run_dir=tmp_path / "fed", timeout=600, env=env)
    assert fed.returncode == 0, fed.stderr[-3000:]

    a = load_file(tmp_path / "sft" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "fed" / "adapter" / "adapter_model.safetensors")
    assert set(a) == set(b) and len(a) == 28
    diff = sum(float((a[k] - b[k]).pow(2).sum()) for k in a) ** 0.5 / sum(float(a[k].pow(2).sum()) for k in a) ** 0.5
    assert diff < 1e-3, diff  # 8e-5 measured: fp32 round-off (TRL's loss path, padding widths) through 6 Adam steps
    rounds = json.loads((tmp_path / "fed" / "rounds.json").read_text())["rounds"]
    assert rounds[-1]["clients_train_loss"] == pytest.approx(sft.result["metrics"]["train_loss"], rel=1e-5)

    # the same validation loss, both adapters scored by the same function
    cfg = tiny_cfg(tmp_path, f"dataset.path={data}", common[-1])
    tokenizer = modeling.load_tokenizer(cfg, modeling.model_path(cfg))
    model = modeling.apply_lora(modeling.load_model(cfg, path=modeling.model_path(cfg)), cfg)
    val = [render_keys(s.keys) for s in load_hdfs(cfg).splits["validation"] if s.label == NORMAL]
    rows = federated.encode_sessions(tokenizer, "session:", val, int(cfg.model.max_seq_length))
    federated.load_adapter_state(model, {k: v for k, v in a.items()})
    sft_val = federated.lm_loss(model, rows, int(tokenizer.pad_token_id or 0))
    assert sft_val == pytest.approx(fed.result["metrics"]["val_loss_end"], rel=1e-3)
    assert fed.result["metrics"]["val_loss_end"] < fed.result["metrics"]["val_loss_start"]


def test_the_train_settings_a_federated_round_replaces_are_named_when_changed():
    """train.max_steps, lr_scheduler, ... were silently replaced by each client's round (federated.local_steps at the
    round's rate); the run now says which of the ones the config changed do nothing."""
    assert federated.replaced_train_settings(compose(["+experiment=hdfs_federated_tiny"])) == []
    changed = compose(["+experiment=hdfs_federated_tiny", "train.max_steps=5", "train.lr_scheduler=cosine", "train.batch_size=3"])
    assert federated.replaced_train_settings(changed) == ["train.max_steps=5", "train.lr_scheduler=cosine"]


@requires_flwr
def test_fedavg_adds_the_adapters_up_in_partition_order_whatever_order_the_replies_arrive_in(flower_task):
    """Replies arrive in whatever order the clients finish; FedAvg's weighted float sums depended on it, so two runs
    of the same seed gave different global adapters. Values chosen so float32 addition order shows: (a + b) + c != (a + c) + b."""
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    fed = compose(["stage=federated", "federated.num_clients=3", "federated.client_frac=1.0"]).federated
    strategy = federated.make_strategy(fed, 3, 0.1, lambda *a: None)
    nodes = [71, 5, 33]  # partitions 0, 1, 2 on node ids that do not sort in partition order
    grid = FakeGrid(nodes, partitions={n: i for i, n in enumerate(nodes)}).grid
    sent = list(strategy.configure_train(1, ArrayRecord({"w": torch.zeros(1)}), ConfigRecord(), grid))
    value = {71: 1e8, 5: 1.0, 33: -1e8}

    def reply(msg):
        return Message(RecordDict({"arrays": ArrayRecord({"w": torch.tensor([value[msg.metadata.dst_node_id]])}),
                                   "metrics": MetricRecord({"num-examples": 5})}), reply_to=msg)

    by_node = {m.metadata.dst_node_id: m for m in sent}
    got = [strategy.aggregate_train(1, [reply(by_node[n]) for n in order])[0].to_torch_state_dict()["w"]
           for order in ([71, 5, 33], [33, 71, 5], [5, 33, 71])]
    assert all(torch.equal(g, got[0]) for g in got), got
    third = torch.tensor(1 / 3, dtype=torch.float32)  # the partition order: (1e8/3 + 1/3) - 1e8/3 in float32
    assert torch.equal(got[0], (torch.tensor([1e8]) * third + torch.tensor([1.0]) * third) + torch.tensor([-1e8]) * third)


def test_sigterm_handlers_survive_the_ray_start_so_an_interrupted_round_is_recorded(monkeypatch):
    """An audit (session 36): Ray's driver installs its own SIGTERM handler, which aborted a federated run (exit 134,
    result.json left "running") where every other stage records the run as interrupted (exit 143). Ray is now started
    before Flower's simulation and this process's handlers put back after it."""
    import signal

    import ray

    from sectune.stages import federated as F

    def ours(signum, frame):
        raise KeyboardInterrupt

    started = {}

    def fake_init(**kwargs):  # as Ray's driver does: its own handler for SIGTERM
        started.update(kwargs)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    old = signal.signal(signal.SIGTERM, ours)
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))  # _start_ray sets it, as Flower does, for the actors
    try:
        monkeypatch.setattr(ray, "is_initialized", lambda: False)
        monkeypatch.setattr(ray, "init", fake_init)
        F._start_ray({"num_cpus": 1, "log_to_driver": False})
        assert signal.getsignal(signal.SIGTERM) is ours
        assert started["num_cpus"] == 1 and started["include_dashboard"] is False and "PYTHONPATH" in started["runtime_env"]["env_vars"]
    finally:
        signal.signal(signal.SIGTERM, old)


@requires_flwr
@pytest.mark.slow  # ~36 s (a Ray start for one round): make test-all runs it
def test_a_round_whose_averaged_adapter_diverged_stops_naming_the_round_not_with_a_traceback(tmp_path):
    """An audit (session 36): with detection on (the preset's default), NaN scores reached sklearn inside Flower's server
    thread: "ValueError: Input contains NaN", exit 1. Now one line naming the round and what to lower, exit 2."""
    data = tmp_path / "hdfs"
    write_deeplog_files(data, n_normal=120, n_anomalous=60, seed=1)
    run = _simulate(tmp_path, data, "federated.num_clients=2", "federated.rounds=1", "federated.local_steps=2", "train.learning_rate=1e30")
    assert run.returncode == 2, run.stderr[-3000:]
    assert "round 1: the averaged adapter's validation loss is nan" in run.result["error"] and "Input contains NaN" not in run.stderr


def test_rays_session_goes_to_a_short_folder_only_where_its_socket_paths_would_be_too_long(tmp_path, monkeypatch):
    from sectune.stages.federated import ray_temp_dir

    monkeypatch.delenv("RAY_TMPDIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", "/tmp")
    assert ray_temp_dir() is None
    monkeypatch.setattr(tempfile, "tempdir", "/home/runner/work/_temp/sectune-tests-abcdefgh")
    short = ray_temp_dir()
    try:
        assert short is not None and short.startswith("/tmp/ray-") and Path(short).is_dir() and len(short) + 64 <= 107
    finally:
        Path(short).rmdir()
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # the user's say
    assert ray_temp_dir() is None


def test_two_nodes_with_one_partition_id_and_a_prompt_that_fills_the_sequence_are_refused(tmp_path):
    """Two SuperNodes started with one partition-id trained that partition twice (double weight in FedAvg) and another
    never; model.max_seq_length no longer than the prompt trained nothing and reported validation loss 0 → 0 (an audit,
    session 42)."""
    from sectune.training.federated_sampling import check_distinct_partitions

    check_distinct_partitions({11: 0, 22: 1, 33: 2})
    with pytest.raises(ConfigError, match=r"nodes 11, 22 were all started with partition-id=0"):
        check_distinct_partitions({11: 0, 22: 0, 33: 1})
    check_distinct_partitions({11: 0, 22: 0, 33: 1}, up={22, 33})  # node 11 restarted as 22: gone, not a second node
    assert "train.packing=bfd" in federated.replaced_train_settings(compose([*TINY, "train.packing=bfd"]))
    cfg = compose(TINY)  # the prompt's length is the local tiny tokenizer's (built from the real logs or generated ones)
    n = len(modeling.load_tokenizer(cfg, modeling.model_path(cfg))(str(cfg.dataset.prompt_template))["input_ids"])
    run = sectune([*TINY, f"model.max_seq_length={n}"], tmp_path / "run")
    assert run.returncode == 2 and f"model.max_seq_length={n}: the prompt alone" in run.stderr and "no session keeps a key token" in run.stderr
