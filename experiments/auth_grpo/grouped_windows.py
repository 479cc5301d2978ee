"""Round twenty-seven: does the tiny analyst count better when a window's lines are grouped by source, as an analyst
who greps an address sees them? Every prompt sectune renders (SFT, its warm-up, the held-out table, infer, the
injection triplets) goes through ``group_by_source`` below; the annotations still come from the raw lines, and the
rules give the same analysis of the grouped lines (they read a window per process id, whose lines keep their order;
``check`` verifies it on every real window).

    OMP_NUM_THREADS=1 python experiments/auth_grpo/grouped_windows.py +experiment=auth_grpo_tiny \\
        'pipeline.steps=[sft,infer]' train.seed=S logger=none hydra.run.dir=<dir>
    python experiments/auth_grpo/grouped_windows.py check     # the rules' analysis unchanged on every window

The same command with ``python -m sectune`` is the baseline.
"""

from __future__ import annotations

import sys

from sectune.data import auth_logs, auth_preferences, injection
from sectune.data.auth_rules import _BREAK_IN, _FROM_IP, _HEADER, _KLOG_FAIL, _PAM_FAIL, _PAM_MORE, _REPEATED

_render = auth_logs.render_prompt


def _line_source(proc: str, msg: str) -> tuple[str | None, bool]:
    """(the address a line names, whether the rules take it before any other: an sshd ``from IP``)."""
    body = (r["inner"] if (r := _REPEATED.search(msg)) else msg)
    if (ip := _FROM_IP.search(body)) and proc.split("(")[0] == "sshd":
        return ip["ip"], True
    for rx, group in ((_BREAK_IN, "ip"), (_PAM_MORE, "rhost"), (_PAM_FAIL, "rhost"), (_KLOG_FAIL, "ip")):
        if (m := rx.search(body)) and m.groupdict().get(group):
            return m[group], False
    return None, False


def group_by_source(log_text: str) -> str:
    """The window's lines grouped by the source of their process id (the rules' source: the first sshd ``from IP``,
    else a reverse-mapping address or PAM's rhost), sources in order of first appearance, then by process id in order
    of first appearance; a line keeps its place among its process id's lines. Lines without a process id or source
    stay where their source (or their own position) puts them."""
    lines = log_text.strip().splitlines()
    keys, src = [], {}
    for i, raw in enumerate(lines):
        m = _HEADER.match(raw.strip())
        pid = m["pid"] if m and m["pid"] else f"line{i}"
        keys.append(pid)
        ip, strong = _line_source(m["proc"].strip(), m["msg"]) if m else (None, False)
        if ip is not None and (pid not in src or (strong and not src[pid][1])):
            src[pid] = (ip, strong)
    first_src, first_pid = {}, {}
    for i, pid in enumerate(keys):
        s = src[pid][0] if pid in src else pid
        first_src.setdefault(s, i)
        first_pid.setdefault(pid, i)
    order = sorted(range(len(lines)), key=lambda i: (first_src[src[keys[i]][0] if keys[i] in src else keys[i]],
                                                      first_pid[keys[i]], i))
    return "\n".join(lines[i] for i in order)


def render_grouped(log_text: str) -> str:
    return _render(group_by_source(log_text))


def check() -> None:
    import os
    from pathlib import Path

    from sectune.data.auth_rules import REAL_SOURCES, analyze_auth_log

    root = Path(os.environ.get("SECTUNE_SHARED_DATA", "../shared/data"))
    n = bad = 0
    for rel in REAL_SOURCES:
        lines = (root / rel).read_text(errors="replace").splitlines()
        for size in (20, 37, 50):
            for start in range(0, len(lines) - size, 7):
                w = "\n".join(lines[start:start + size])
                n += 1
                bad += analyze_auth_log(w.splitlines()) != analyze_auth_log(group_by_source(w).splitlines())
    print(f"{n} windows, {bad} whose analysis changes when grouped")


if __name__ == "__main__":
    if sys.argv[1:] == ["check"]:
        check()
        sys.exit(0)
    for module in (auth_logs, auth_preferences, injection):  # the modules that hold their own reference to it
        module.render_prompt = render_grouped
    from sectune.cli import main

    main()
