"""Several processes (torchrun / accelerate launch) resolving one run.

Hydra resolves ``${now:}`` in each process separately, so two ranks started a second apart would
write two run dirs. Before Hydra starts, every rank agrees on one run dir: rank 0 picks it and
appends ``hydra.run.dir=<it>`` to its argv; the other ranks receive the same value.

How the value travels, most robust first:

1. torchrun (and ``accelerate launch``, which runs torchrun's elastic agent) hosts a key-value
   store for the launch at MASTER_ADDR:MASTER_PORT (``TORCHELASTIC_USE_AGENT_STORE=True``). Its
   keys live exactly as long as this launch (and we key by ``TORCHELASTIC_RESTART_COUNT``), so a
   value from an earlier launch can never be read. Workers connect as clients, as
   ``init_process_group`` itself does later.
2. Otherwise (a hand-rolled launcher that only sets RANK/WORLD_SIZE): a small file in the temp
   dir, keyed by MASTER_ADDR/PORT, the run id and the launching parent process (pid + start
   time: the same for every local rank of one launch, different for the next launch). Rank 0
   writes a fresh nonce-stamped file; the others accept it only if it was written after their
   launcher started, so a stale file from an earlier launch on the same port is ignored.

Only rank 0 writes result.json, artifacts and W&B (runner, tracking, the stages' guards). Scoring after training
(classify's validation and test rows, reward's held-out pairs) is shared out across the ranks and gathered back
(:func:`gathered`), so every rank holds the same numbers and takes the same decisions.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

STORE_KEY = "sectune/run_dir"


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return rank() == 0


def bind_local_gpu() -> int | None:
    """Under torchrun on GPUs, make this rank's GPU (``LOCAL_RANK``) CUDA's current device before any model loads.

    Until accelerate's state starts (when a stage builds its Trainer, after the model loaded) the current device is GPU 0
    in every rank, and sectune places models on ``"cuda"`` (bitsandbytes' ``device_map={"": "cuda"}``, ``.to("cuda")``,
    the reward model GRPO scores with, ``mem_get_info``): every rank's copy landed on GPU 0, and a quantized stage=dpo
    met its batch on ``cuda:LOCAL_RANK`` (an audit, session 42). Returns the index bound, or None."""
    local = os.environ.get("LOCAL_RANK")
    if world_size() <= 1 or local is None:
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    torch.cuda.set_device(int(local))
    return int(local)


def _has_override(argv: list[str], key: str) -> bool:
    return any(a.split("=", 1)[0].lstrip("+") == key for a in argv)


def _new_run_dir(root: str = "outputs") -> str:
    """What Hydra's default ``hydra.run.dir`` (root ``outputs``) or ``hydra.sweep.dir`` (``multirun``) would give rank 0,
    made absolute."""
    from sectune.paths import fresh_run_dir

    return str(Path(fresh_run_dir(root)).resolve())


def _via_agent_store(timeout_s: float, root: str = "outputs") -> str | None:
    """Exchange the run dir through torchrun's launch store; None when there is none."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true":
        return None
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port:
        return None
    from datetime import timedelta

    import torch.distributed as dist

    store = dist.TCPStore(addr, int(port), is_master=False, timeout=timedelta(seconds=timeout_s))
    key = f"{STORE_KEY}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    if is_main_process():
        store.set(key, _new_run_dir(root))
    try:
        return store.get(key).decode()  # blocks until rank 0 has set it (or the timeout)
    except RuntimeError as e:  # torch raises DistStoreError (a RuntimeError) on timeout
        raise SystemExit(f"sectune: rank {rank()} waited {timeout_s:.0f}s for rank 0's run dir ({e})") from None


def _launcher_identity() -> tuple[str, float]:
    """(id, start time) of the process that launched this rank: shared by one launch's ranks."""
    ppid = os.getppid()
    try:
        import psutil

        started = psutil.Process(ppid).create_time()
    except Exception:
        started = 0.0
    return f"{ppid}-{int(started)}", started


def _via_file(timeout_s: float, root: str = "outputs") -> str:
    parent, parent_started = _launcher_identity()
    key = "_".join(
        os.environ.get(k, "") for k in ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")
    ) + f"_{parent}"
    note = Path(tempfile.gettempdir()) / f"sectune_run_dir_{key.replace('/', '_')}"
    if is_main_process():
        run_dir = _new_run_dir(root)
        tmp = note.with_name(f"{note.name}.tmp{os.getpid()}")
        tmp.write_text(run_dir, encoding="utf-8")
        os.replace(tmp, note)
        return run_dir
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            # Written after our launcher started = this launch's note, not a stale one.
            if note.stat().st_mtime >= parent_started - 1:
                text = note.read_text(encoding="utf-8").strip()
                if text:
                    return text
        except FileNotFoundError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"sectune: rank {rank()} waited {timeout_s:.0f}s for rank 0's run dir ({note})")
        time.sleep(0.2)


def share_run_dir_across_ranks(timeout_s: float = 300.0, argv: list[str] | None = None) -> str | None:
    """Append one ``hydra.run.dir=…`` override (``hydra.sweep.dir=…`` for a ``-m`` sweep), identical on every rank, to
    ``argv`` (sys.argv): each rank computing Hydra's per-second default itself split a sweep whose ranks started either
    side of a second into two dirs. A no-op for one process and when the user already set that key. Returns the dir
    it added, or None.
    """
    argv = sys.argv if argv is None else argv
    sweep = "-m" in argv or "--multirun" in argv
    key, root = ("hydra.sweep.dir", "multirun") if sweep else ("hydra.run.dir", "outputs")
    if world_size() <= 1 or _has_override(argv[1:], key):
        return None
    run_dir = _via_agent_store(timeout_s, root) or _via_file(timeout_s, root)
    argv.append(f"{key}={run_dir}")
    return run_dir


def barrier() -> None:
    """Wait for every rank when a process group is up; a no-op otherwise."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()
    except Exception:
        pass


def _process_group():
    """``torch.distributed`` when a process group of more than one rank is up, else None."""
    try:
        import torch.distributed as dist

        return dist if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else None
    except Exception:
        return None


def group_is_up() -> bool:
    """Whether a process group of more than one rank is up (Trainer starts it; a stage without training has none)."""
    return _process_group() is not None


def gathered(fn: Callable[..., Sequence], *columns: Sequence, key: Sequence | None = None) -> list:
    """``fn(*columns)`` (one value per row, in row order) with the rows shared out across the ranks of the process
    group and the values gathered back, in order, on every rank: each rank computes its share, all take part in
    the gather, and all hold the same list. Rows with equal ``key`` (the same prompt) go to the same rank; without
    ``key`` rank r takes rows r, r + N, …. Without a process group (one process): just ``fn(*columns)``."""
    dist = _process_group()
    if dist is None:
        return list(fn(*columns))
    n, r = dist.get_world_size(), dist.get_rank()
    rows = len(columns[0]) if columns else 0
    if key is None:
        owner = [i % n for i in range(rows)]
    else:
        first: dict = {}
        owner = [first.setdefault(k, len(first) % n) for k in key]
    mine = [i for i in range(rows) if owner[i] == r]
    values = list(fn(*([c[i] for i in mine] for c in columns))) if mine else []
    if len(values) != len(mine):
        raise ValueError(f"gathered: {len(values)} values for {len(mine)} rows")
    parts: list = [None] * n
    dist.all_gather_object(parts, (mine, values))
    out: list = [None] * rows
    for idx, vals in parts:
        for i, v in zip(idx, vals):
            out[i] = v
    return out


def gathered_lists(values: Sequence) -> list:
    """Every rank's ``values`` concatenated in rank order, on every rank (collective); one process: ``values``."""
    dist = _process_group()
    if dist is None:
        return list(values)
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, list(values))
    return [v for part in parts for v in part]


#: a failed rank's error, left in the run dir for rank 0 (which alone writes result.json) to name
RANK_ERROR_FILE = ".sectune_rank{}_error.json"
#: how an error reads when this rank failed because another one did first: its peer's sockets closed (gloo), torchrun's
#: SIGTERM once a rank died, a collective that timed out or was aborted
KNOCK_ON = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "interrupted (SIGTERM)",
            "DistNetworkError", "DistBackendError", "NCCL communicator was aborted", "Timed out", "timed out")


def is_knock_on(error: str) -> bool:
    """Whether ``error`` reads as a failure caused by another rank's (see :data:`KNOCK_ON`)."""
    return any(k in error for k in KNOCK_ON)


def report_rank_error(run_dir: Path, error: str) -> None:
    """On a rank other than 0: leave this rank's error where rank 0's result.json can name it (best effort)."""
    import json

    path = Path(run_dir) / RANK_ERROR_FILE.format(rank())
    try:
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps({"rank": rank(), "error": error, "time": time.time()}), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass


def clear_earlier_rank_errors(run_dir: Path) -> None:
    """On rank 0 as a run starts: the error files an earlier launch's ranks left in this run dir. Rank 0 reads them only
    while it fails, so one written after it had read (every rank failed alike, rank 0 a moment first) stayed there beside
    every later run's result, a succeeded one's too. This launch's own (a rank that failed before rank 0 got here) stay."""
    launched = _launcher_identity()[1] if world_size() > 1 else float("inf")
    for path in Path(run_dir).glob(RANK_ERROR_FILE.format("*")):
        try:
            if path.stat().st_mtime < launched - 1:
                path.unlink()
        except OSError:
            pass


def root_cause(run_dir: Path, own_error: str, own_time: float, wait_s: float = 5.0) -> tuple[str, dict[int, str]]:
    """On rank 0 of a failed run under several processes: (the error result.json should name, every rank's error).

    Rank 0 alone writes result.json, and when another rank fails first rank 0 fails too, with gloo's "Connection closed
    by peer" or torchrun's SIGTERM: that is what result.json said, not the failing rank's error. The other ranks leave
    theirs (:func:`report_rank_error`, written before their process exits, so before their sockets close); the first error
    that is not a knock-on (:func:`is_knock_on`) is the cause, rank 0's own when it is one. Files from an earlier launch
    are removed unread, this launch's once read. One process: ``(own_error, {})``."""
    import json

    if world_size() <= 1:
        return own_error, {}
    _, launched = _launcher_identity()
    deadline = time.monotonic() + (wait_s if is_knock_on(own_error) else 0.0)
    found: dict[int, tuple[float, str]] = {}
    while True:
        for r in range(1, world_size()):
            path = Path(run_dir) / RANK_ERROR_FILE.format(r)
            try:
                if r in found:
                    continue
                if path.stat().st_mtime < launched - 1:  # an earlier launch's, in a run dir used again
                    path.unlink(missing_ok=True)
                    continue
                rec = json.loads(path.read_text(encoding="utf-8"))
                found[r] = (float(rec["time"]), str(rec["error"]))
                path.unlink(missing_ok=True)
            except (OSError, ValueError, KeyError, TypeError):
                continue
        causes = [t for t in found.values() if not is_knock_on(t[1])]
        if causes or len(found) == world_size() - 1 or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    errors = {0: own_error, **{r: e for r, (_, e) in sorted(found.items())}}
    if not found:
        return own_error, errors
    timeline = sorted([(own_time, 0, own_error), *((t, r, e) for r, (t, e) in found.items())])
    first = next((x for x in timeline if not is_knock_on(x[2])), timeline[0])
    if first[1] == 0 or first[2] == own_error:  # Ctrl-C reaches every rank: the same interrupt, not another rank's failure
        return own_error, errors
    return f"rank {first[1]} of {world_size()}: {first[2]} (rank 0: {own_error})", errors
