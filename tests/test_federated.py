"""stage=federated: FedAvg of LoRA adapters on Flower (issue 16, federated half; seed 003)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from conftest import compose, sectune
from sectune import federated, modeling
from sectune.data.synthetic_hdfs import write_deeplog_files
from sectune.errors import ConfigError, DataError

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
    from sectune.planner import lora_param_count, param_count

    # the published sizes (SmolLM-360M: 362M, SmolLM-1.7B: 1.71B) from the presets' arch numbers alone
    for name, params in (("smollm_135m", 134_515_008), ("smollm_360m", 361_821_120), ("smollm_1_7b", 1_711_376_384)):
        arch = dict(compose(["+experiment=hdfs_federated", f"model={name}"]).model.arch)
        assert param_count(arch) == params, name
    # seed 003's r=8 on q_proj, v_proj: 292x fewer bytes per message than the full SmolLM-135M (README)
    assert round(134_515_008 / lora_param_count(dict(cfg.model.arch), 8, list(cfg.lora.target_modules))) == 292


@requires_flwr
def test_simulation_three_clients_two_rounds_end_to_end(tmp_path):
    data = tmp_path / "hdfs"
    write_deeplog_files(data, n_normal=300, n_anomalous=150, seed=1)
    run = sectune([*TINY, f"paths.cache_dir={tmp_path / 'cache'}", f"dataset.path={data}", "federated.num_clients=3",
                   "federated.client_frac=1.0", "federated.rounds=2", "federated.local_steps=3", "train.batch_size=8"],
                  run_dir=tmp_path / "run", timeout=600, env={"OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
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
