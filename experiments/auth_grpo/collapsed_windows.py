"""Round twenty-five: does the tiny analyst count better when a window's repeated lines are written once, with their
number (``uniq -c`` after leaving out what differs between repeats)? Every prompt sectune renders (SFT, its warm-up,
the held-out table, infer) goes through ``collapse_repeats`` below; the annotations still come from the raw lines.

    OMP_NUM_THREADS=1 python experiments/auth_grpo/collapsed_windows.py +experiment=auth_grpo_tiny \\
        'pipeline.steps=[sft,infer]' train.seed=S logger=none hydra.run.dir=<dir>

The same command with ``python -m sectune`` is the baseline. Not kept (experiments/auth_grpo/README.md).
"""

from __future__ import annotations

import re

from sectune.data import auth_logs, auth_preferences, injection
from sectune.data.auth_rules import _HEADER

_PORT = re.compile(r"\bport \d+")
_render = auth_logs.render_prompt


def collapse_repeats(log_text: str) -> str:
    """Lines equal once their timestamp, process id and port are left out, written once with their number
    (``[6] LabSZ sshd: Failed password for root from 1.2.3.4 port * ssh2``), in order of first appearance."""
    counts: dict[str, int] = {}
    for line in log_text.strip().splitlines():
        m = _HEADER.match(line.strip())
        key = line.strip() if not m else f"{line.split()[3]} {m['proc'].strip()}: {_PORT.sub('port *', m['msg'])}".rstrip()
        counts[key] = counts.get(key, 0) + 1
    return "\n".join(f"[{n}] {k}" for k, n in counts.items())


def render_collapsed(log_text: str) -> str:
    return _render(collapse_repeats(log_text))


if __name__ == "__main__":
    for module in (auth_logs, auth_preferences, injection):  # the modules that hold their own reference to it
        module.render_prompt = render_collapsed
    from sectune.cli import main

    main()
