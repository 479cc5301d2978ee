"""Several processes (torchrun / accelerate launch) resolving one run.

Hydra resolves ``${now:}`` in each process separately, so two ranks started a second apart would
write two run dirs. Before Hydra starts, every rank agrees on one run dir: rank 0 picks it and
the others read it from a small file keyed by the launcher's rendezvous (MASTER_ADDR/PORT).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return rank() == 0


def _has_override(argv: list[str], key: str) -> bool:
    return any(a.split("=", 1)[0].lstrip("+") == key for a in argv)


def share_run_dir_across_ranks(timeout_s: float = 120.0) -> None:
    """Add one ``hydra.run.dir=…`` override, identical on every rank, to ``sys.argv``."""
    if world_size() <= 1 or _has_override(sys.argv[1:], "hydra.run.dir") or "-m" in sys.argv:
        return
    key = f"{os.environ.get('MASTER_ADDR', 'localhost')}_{os.environ.get('MASTER_PORT', '0')}"
    key += f"_{os.environ.get('TORCHELASTIC_RUN_ID', '')}".replace("/", "_")
    note = Path(tempfile.gettempdir()) / f"sectune_run_dir_{key}"
    if is_main_process():
        run_dir = Path("outputs") / datetime.now().strftime("%Y-%m-%d/%H-%M-%S")
        tmp = note.with_suffix(".tmp")
        tmp.write_text(str(run_dir.resolve()))
        os.replace(tmp, note)
    else:
        deadline = time.monotonic() + timeout_s
        while not note.exists():
            if time.monotonic() > deadline:
                raise SystemExit(f"sectune: rank {rank()} waited {timeout_s:.0f}s for rank 0's run dir ({note})")
            time.sleep(0.2)
        run_dir = Path(note.read_text().strip())
    sys.argv.append(f"hydra.run.dir={run_dir}")
