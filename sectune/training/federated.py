"""Federated LoRA fine-tuning on Flower (seed 003): partitions, what travels, and the Flower apps.

Each client holds the base model and its own partition of the normal training sessions; per round the
server samples ``client_frac`` of the ``num_clients`` clients and sends them the global LoRA adapter
(``peft.get_peft_model_state_dict``: the adapter tensors only, never a base weight). A client loads it,
trains ``local_steps`` steps with transformers' Trainer on its sessions and sends its adapter back with
its number of training sessions; Flower's ``FedAvg`` averages the adapters weighted by those counts.
``DifferentialPrivacyClientSideFixedClipping`` + ``fixedclipping_mod`` (Flower's own) add client-side
clipping and Gaussian noise on the aggregate when ``federated.dp=true``.

Flower >= 1.20 (Message API: ``ServerApp`` / ``ClientApp``, ``flwr.serverapp.strategy.FedAvg``). Two runtimes
run the same apps: ``federated.runtime=simulation`` (``flwr.simulation.run_simulation``, on Ray, one machine) and
``deployment`` (a SuperLink and one SuperNode per client; ``flwr run`` starts :mod:`sectune.training.flower_app`, whose
ServerApp runs the stage with the Grid it is given). ``pip install 'sectune[federated]'``.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from sectune.errors import ConfigError, DataError, SectuneError
from sectune.training.federated_sampling import PARTITION_KEY, PartitionOrderedGrid, check_distinct_partitions, node_partitions

PARTITIONS = ("iid", "shards", "dirichlet")
LR_SCHEDULES = ("constant", "linear", "cosine")
RUNTIMES = ("simulation", "deployment")

#: the deployment runtime's Grid while sectune.training.flower_app's ServerApp runs the stage in Flower's ServerApp process
DEPLOYMENT: dict = {}


def require_flwr():
    try:
        import flwr  # noqa: F401
    except ImportError:
        raise ConfigError("stage=federated needs Flower: pip install 'sectune[federated]' (in sectune's repository: "
                          "pip install -c constraints.txt -e '.[federated]', which keeps the CPU torch)") from None
    return flwr


# ----------------------------------------------------------------------------- partitions
def dominant_key(keys: Sequence[int]) -> int:
    """The most frequent key of a session (ties: the smallest key)."""
    counts = Counter(keys)
    return min(counts, key=lambda k: (-counts[k], k))


def partition(sessions: Sequence[Sequence[int]], num_clients: int, how: str = "iid", alpha: float = 0.5,
              seed: int = 0, min_size: int = 1, max_tries: int = 100) -> list[list[int]]:
    """Indices of ``sessions`` per client, deterministic in ``seed``.

    iid: a seeded shuffle cut into equal parts (sizes differ by at most one).
    shards: sessions sorted by dominant key (stable), cut into ``num_clients`` contiguous pieces: each
    client sees a few dominant keys (McMahan et al.'s sort-and-shard non-IID split).
    dirichlet: for each dominant key, its sessions are spread over the clients in Dirichlet(α)
    proportions (small α: each key lives on few clients); redrawn until every client has ``min_size``
    sessions, an error after ``max_tries``.
    """
    n = len(sessions)
    if num_clients < 1:
        raise ConfigError(f"federated.num_clients={num_clients}: needs at least one client")
    if how not in PARTITIONS:
        raise ConfigError(f"federated.partition={how!r}: choose one of {', '.join(PARTITIONS)}")
    if n < num_clients * min_size:
        raise DataError(f"{n} training sessions cannot give {num_clients} clients {min_size} session(s) each; "
                        "lower federated.num_clients or raise dataset.max_samples")
    if how == "iid":
        order = list(range(n))
        random.Random(seed).shuffle(order)
        return [sorted(order[c::num_clients]) for c in range(num_clients)]
    dom = [dominant_key(s) for s in sessions]
    if how == "shards":
        order = sorted(range(n), key=lambda i: (dom[i], i))
        cuts = np.linspace(0, n, num_clients + 1).round().astype(int)
        return [sorted(order[cuts[c]:cuts[c + 1]]) for c in range(num_clients)]
    if not (math.isfinite(alpha) and alpha > 0):  # nan drew nan proportions, then "raise federated.dirichlet_alpha" 100 draws later
        raise ConfigError(f"federated.dirichlet_alpha={alpha}: must be a finite number > 0")
    rng = np.random.default_rng(seed)
    by_key: dict[int, list[int]] = {}
    for i, k in enumerate(dom):
        by_key.setdefault(k, []).append(i)
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for k in sorted(by_key):
            idx = np.array(by_key[k])
            rng.shuffle(idx)
            props = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(props) * len(idx)).round().astype(int)[:-1]
            for c, piece in enumerate(np.split(idx, cuts)):
                parts[c].extend(int(i) for i in piece)
        if min(len(p) for p in parts) >= min_size:
            return [sorted(p) for p in parts]
    raise DataError(f"federated.partition=dirichlet with α={alpha}: some of the {num_clients} clients got fewer than {min_size} "
                    f"session(s) in {max_tries} draws; raise federated.dirichlet_alpha or lower federated.num_clients")


def partition_skew(parts: list[list[int]], sessions: Sequence[Sequence[int]]) -> float:
    """Mean over clients of the share of its most common dominant key (1.0 = every client one key)."""
    shares = []
    for p in parts:
        c = Counter(dominant_key(sessions[i]) for i in p)
        shares.append(max(c.values()) / len(p) if p else 0.0)
    return float(np.mean(shares))


# ----------------------------------------------------------------------------- schedule and sampling
def round_lr(base: float, server_round: int, rounds: int, schedule: str = "constant", min_ratio: float = 0.1) -> float:
    """The clients' learning rate in round ``server_round`` (1-based): constant, or decaying linearly /
    by a cosine from ``base`` in round 1 to ``base * min_ratio`` in the last round."""
    if schedule not in LR_SCHEDULES:
        raise ConfigError(f"federated.lr_schedule={schedule!r}: choose one of {', '.join(LR_SCHEDULES)}")
    if schedule == "constant" or rounds <= 1:
        return float(base)
    t = (server_round - 1) / (rounds - 1)
    frac = 1 - t if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * t))
    return float(base * (min_ratio + (1 - min_ratio) * frac))


def clients_per_round(num_clients: int, client_frac: float) -> int:
    """How many clients FedAvg samples per round: ``int(num_clients * client_frac)``, at least one."""
    if not 0 < client_frac <= 1:
        raise ConfigError(f"federated.client_frac={client_frac}: must be in (0, 1]")
    return max(1, int(num_clients * client_frac + 1e-9))


# ----------------------------------------------------------------------------- what travels
def adapter_state(model) -> dict:
    """The LoRA adapter's tensors (peft's own adapter state dict), detached on the CPU: all that is sent."""
    from peft import get_peft_model_state_dict

    # save_embedding_layers=False: with lm_head / embed_tokens among the targets peft would otherwise add the
    # (base) embedding matrix to the adapter's state dict
    state = get_peft_model_state_dict(model, save_embedding_layers=False)
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def load_adapter_state(model, state: dict) -> None:
    from peft import set_peft_model_state_dict

    out = set_peft_model_state_dict(model, state)
    missing = [k for k in getattr(out, "unexpected_keys", []) or []]
    if missing:
        raise ConfigError(f"the global adapter holds tensors this client's model lacks: {missing[:3]}")


def tensor_bytes(state: dict) -> int:
    """Bytes of the tensors' data (numel × element size), without any serialisation overhead."""
    return int(sum(t.numel() * t.element_size() for t in state.values()))


def full_model_bytes(model) -> int:
    """Bytes of every base weight in its dtype: what one full-model FedAvg message carries (tied weights once)."""
    seen, total = set(), 0
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for name, p in base.named_parameters():
        if "lora_" in name or p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    return int(total)


def weighted_average(states: list[dict], weights: list[float]) -> dict:
    """FedAvg by hand (for checks): sum_i w_i x_i / sum_i w_i, per tensor."""
    total = float(sum(weights))
    return {k: sum(s[k].double() * (w / total) for s, w in zip(states, weights)).to(states[0][k].dtype) for k in states[0]}


# ----------------------------------------------------------------------------- local training
def encode_sessions(tokenizer, prompt: str, completions: Sequence[str], max_len: int) -> list[dict]:
    """prompt + completion + EOS as ids, loss on the completion and EOS only (what stage=sft trains: the text as text,
    the EOS appended as the token, :func:`sectune.inference.text_ids`)."""
    from sectune.inference import text_ids

    p_len = len(text_ids(tokenizer, prompt))
    out = []
    for text in completions:
        ids = (text_ids(tokenizer, prompt + text) + [tokenizer.eos_token_id])[:max_len]
        out.append({"input_ids": ids, "labels": [-100] * min(p_len, len(ids)) + ids[p_len:]})
    return out


class PadCollator:
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


#: the train settings each client's round replaces (local_train): set to anything else, they are said to do nothing
REPLACED_TRAIN_KEYS = ("max_steps", "epochs", "lr_scheduler", "warmup_ratio", "save_steps", "eval_steps", "group_by_length",
                       "packing")  # clients pad their batches (packing was taken without a word: an audit, session 42)



def replaced_train_settings(cfg) -> list[str]:
    """``train.<key>=<value>`` for each of :data:`REPLACED_TRAIN_KEYS` the config changed from sectune's default."""
    from sectune.config import TrainConfig

    default = TrainConfig()
    return [f"train.{k}={cfg.train[k]}" for k in REPLACED_TRAIN_KEYS if cfg.train[k] != getattr(default, k)
            and not (k == "packing" and cfg.train[k] == "none")]  # none is what the clients do (they pad)


def local_train(cfg, model, rows: list[dict], pad_id: int, lr: float, steps: int, seed: int, out_dir: Path) -> float:
    """``steps`` optimizer steps of transformers' Trainer (sectune's train settings, constant lr within the round)."""
    from transformers import Trainer, TrainingArguments

    from sectune.training import engine

    kwargs = engine.training_kwargs(cfg, out_dir, has_eval=False)
    kwargs.update(max_steps=steps, learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, seed=seed, data_seed=seed,
                  save_strategy="no", report_to=[], disable_tqdm=True, logging_steps=max(1, steps), logging_first_step=False,
                  per_device_train_batch_size=int(cfg.federated.batch_size or cfg.train.batch_size),
                  train_sampling_strategy="random", remove_unused_columns=False)
    # debug.fail_at_step: the client dies after that local step of every round (the tests' fault injection)
    trainer = Trainer(model=model, args=TrainingArguments(**kwargs), train_dataset=rows, data_collator=PadCollator(pad_id),
                      callbacks=engine.fail_callbacks(cfg))
    out = trainer.train()
    model.eval()
    return float(out.training_loss)


def lm_loss(model, rows: list[dict], pad_id: int, batch_size: int = 64) -> float:
    """Mean next-token loss over the completion tokens of ``rows`` (the global validation loss)."""
    import torch

    collate, total, count = PadCollator(pad_id), 0.0, 0
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        for b in range(0, len(rows), batch_size):
            batch = {k: v.to(device) for k, v in collate(rows[b:b + batch_size]).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
            labels = batch["labels"][:, 1:]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                                     ignore_index=-100, reduction="sum")
            total += float(loss)
            count += int((labels != -100).sum())
    return total / count if count else float("nan")  # no token scored is no loss of 0 (it ranked a run that trained nothing best)


# ----------------------------------------------------------------------------- the Flower apps
class RoundFailed(SectuneError):
    """No client of a round sent its adapter back: FedAvg has nothing to average, so the run stops there."""


def error_reason(reason: str | None, code: int = 0) -> str:
    """One line of a failed client's reply: Flower sends ``<class 'X'>:<'str(exception)'>``, where the exception
    may be Ray's (a traceback, colour codes included) around ``ClientAppException``'s ``… Message: <the client's error>``."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(reason or "")).strip()
    if not text:
        return f"error code {code}"
    kind = ""
    m = re.fullmatch(r"<class '([^']+)'>:<'(.*)'>", text, flags=re.S)
    if m:
        kind, text = m.group(1).rsplit(".", 1)[-1], m.group(2)
    if "Message: " in text:  # ClientAppException: the client's own error follows
        kind, text = "", text.rsplit("Message: ", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    text = lines[-1] if lines else text
    return (f"{kind}: " if kind else "") + " ".join(text.split())[:300]


def reply_errors(replies) -> list[str]:
    """``node <id>: <error>`` for each reply that carries an error (Flower's reason: the client's exception)."""
    return [f"node {m.metadata.src_node_id}: {error_reason(m.error.reason, m.error.code)}" for m in replies if m.has_error()]


def check_round(server_round: int, replies: list, sent: int, then: str) -> int:
    """How many of the ``sent`` sampled clients failed (an error reply or none), printed with their errors and ``then``
    (what the round does about it); RoundFailed when none replied with an adapter."""
    errors = reply_errors(replies)
    ok = len(replies) - len(errors)
    missing = max(0, sent - len(replies))
    said = (f": {'; '.join(errors)}" if errors else "") + (f"; {missing} sent no reply" if missing else "")
    if ok == 0:
        raise RoundFailed(f"federated round {server_round}: all {max(sent, len(replies))} sampled client(s) failed, so FedAvg has "
                          f"nothing to average{said} (the clients' tracebacks are in the Flower log above)")
    if errors or missing:
        print(f"sectune: warning: federated round {server_round}: {len(errors) + missing} of {max(sent, len(replies))} sampled "
              f"client(s) failed{said}; {then.format(ok=ok)}", flush=True)
    return len(errors) + missing


def make_strategy(fed, num_train: int, base_lr: float, record: Callable[[str, int, int], None], seed: int = 0,
                  sampled: dict | None = None):
    """Flower's FedAvg (weighted by ``num-examples``) with the lr schedule in each round's config and the bytes
    of every message counted; wrapped in Flower's client-side fixed-clipping DP when ``fed.dp``. A round whose
    sampled clients all fail raises :class:`RoundFailed`; when some fail, ``record("failed", round, count)``.
    Which clients train in a round is a function of ``seed`` and the round (Flower's sampling alone drew from the
    process's global ``random`` over random node ids); ``sampled[round]`` gets their partition ids."""
    from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvg

    sent: dict[int, int] = {}
    partition_of: dict[int, int] = {}
    sampled = {} if sampled is None else sampled

    def up_bytes(replies, key: str) -> int:
        return sum(m.content[key].count_bytes() for m in replies if not m.has_error())

    class RoundFedAvg(FedAvg):
        def configure_train(self, server_round, arrays, config, grid):
            config["lr"] = round_lr(base_lr, server_round, int(fed.rounds), str(fed.lr_schedule), float(fed.lr_min_ratio))
            partition_of.update(node_partitions(grid, partition_of, self.min_available_nodes))
            # the nodes up now: a restarted SuperNode comes back under a new node id, beside its old one (a review, session 42)
            check_distinct_partitions(partition_of, up=set(grid.get_node_ids()))
            state = random.getstate()
            random.seed(f"sectune-federated:{seed}:{server_round}")  # str seeds hash the same in every process
            try:
                messages = list(super().configure_train(server_round, arrays, config, PartitionOrderedGrid(grid, partition_of)))
            finally:
                random.setstate(state)  # the rest of the process draws as it would have
            sampled[server_round] = sorted(partition_of.get(m.metadata.dst_node_id, -1) for m in messages)
            sent[server_round] = len(messages)
            record("down", server_round, sum(m.content[self.arrayrecord_key].count_bytes() for m in messages))
            return messages

        def aggregate_train(self, server_round, replies):
            # in partition order, not arrival order: FedAvg's float sums then add up the same way in every run
            replies = sorted(replies, key=lambda m: (partition_of.get(m.metadata.src_node_id, -1), m.metadata.src_node_id))
            failed = check_round(server_round, replies, sent.get(server_round, len(replies)),
                                 "FedAvg averages the {ok} adapter(s) that came back")
            record("up", server_round, up_bytes(replies, self.arrayrecord_key))
            if failed:
                record("failed", server_round, failed)
            return super().aggregate_train(server_round, replies)

    class RoundDP(DifferentialPrivacyClientSideFixedClipping):
        # Flower's DP wrapper skips a round with an error reply without calling FedAvg: check and count that round here
        # (a round without error replies reaches RoundFedAvg.aggregate_train, which does)
        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            if not replies or any(m.has_error() for m in replies):
                failed = check_round(server_round, replies, sent.get(server_round, len(replies)),
                                     "with federated.dp=true Flower skips this round's aggregation: the global adapter stays as it was")
                record("up", server_round, up_bytes(replies, self.strategy.arrayrecord_key))
                record("failed", server_round, failed)
                record("skipped", server_round, 1)
            return super().aggregate_train(server_round, replies)

    strategy = RoundFedAvg(fraction_train=float(fed.client_frac), fraction_evaluate=0.0, min_train_nodes=num_train,
                           min_available_nodes=int(fed.num_clients))
    if fed.dp:
        strategy = RoundDP(strategy, noise_multiplier=float(fed.dp_noise_multiplier), clipping_norm=float(fed.dp_clipping_norm),
                           num_sampled_clients=num_train)
    return strategy


class _Stopped(Exception):
    """The run was interrupted: the server's rounds end (Flower's grid would wait for replies that never come)."""


def serve(grid, strategy, initial_state: dict, rounds: int, evaluate_fn, done: dict) -> None:
    """The ServerApp's work under either runtime: FedAvg's rounds on ``grid``; the global adapter into ``done``, or
    the :class:`RoundFailed` that stopped them into ``done["error"]`` (the stage raises it once the runtime has ended)."""
    from flwr.app import ArrayRecord

    stop = done.get("stop")
    if stop is not None:  # the simulation's main thread was interrupted: end this (non-daemon) thread at its next poll
        pull = grid.pull_messages

        def pull_unless_stopped(*args, **kwargs):
            if stop.is_set():
                raise _Stopped
            return pull(*args, **kwargs)

        grid.pull_messages = pull_unless_stopped
    try:
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(initial_state), num_rounds=rounds, evaluate_fn=evaluate_fn)
    except RoundFailed as e:
        done["error"] = e
        return
    except _Stopped:
        return
    done["arrays"] = result.arrays
    # the clients' metrics per round, averaged by FedAvg with the same sample-count weights
    done["train_metrics"] = {r: dict(m) for r, m in result.train_metrics_clientapp.items()}


def make_server_app(strategy, initial_state: dict, rounds: int, evaluate_fn, done: dict):
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        serve(grid, strategy, initial_state, rounds, evaluate_fn, done)

    return app


def node_partition(node_config, num_clients: int | None = None) -> int:
    """This client's partition id from its node config (the simulation sets it; a SuperNode gets it from
    ``--node-config "partition-id=<i> num-partitions=<n>"``), checked against ``federated.num_clients``."""
    if "partition-id" not in node_config:
        raise ConfigError('this SuperNode has no partition-id: start it with --node-config "partition-id=<i> '
                          f'num-partitions={num_clients or "<federated.num_clients>"}"')
    pid, n = int(node_config["partition-id"]), int(node_config.get("num-partitions", num_clients or 0))
    if num_clients is not None and n != num_clients:
        raise ConfigError(f"this SuperNode has num-partitions={n} but the run has federated.num_clients={num_clients}: "
                          "start one SuperNode per client, each with num-partitions=<federated.num_clients>")
    if not 0 <= pid < n:
        raise ConfigError(f"this SuperNode has partition-id={pid}: must be in 0..{n - 1} (num-partitions={n})")
    return pid


def make_client_app(client_fn: Callable[[int], "object"], dp: bool, num_clients: int | None = None):
    """``client_fn(partition_id)`` → an object with ``fit(global_state, lr, round) -> (metrics, num_examples)`` and
    ``state()`` (the adapter to send back): sectune.stages.federated.Client."""
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.clientapp.mod import fixedclipping_mod

    app = ClientApp()

    @app.query()
    def query(msg: Message, context: Context) -> Message:  # the server asks which partition this node holds
        pid = node_partition(context.node_config, num_clients)
        return Message(content=RecordDict({"metrics": MetricRecord({PARTITION_KEY: pid})}), reply_to=msg)

    @app.train(mods=[fixedclipping_mod] if dp else [])  # clipping only what is averaged
    def train(msg: Message, context: Context) -> Message:
        client = client_fn(node_partition(context.node_config, num_clients))
        config = msg.content["config"]
        metrics, n = client.fit(msg.content["arrays"].to_torch_state_dict(), float(config["lr"]), int(config["server-round"]))
        content = RecordDict({"arrays": ArrayRecord(client.state()), "metrics": MetricRecord({**metrics, "num-examples": n})})
        return Message(content=content, reply_to=msg)

    return app
