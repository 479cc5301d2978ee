"""``stage=report``: the sweep table as a stage (``sectune-report DIR`` is the same thing).

Reads every ``DIR/N/result.json`` (and ``.hydra/overrides.yaml``) of the sweep dir named by
``report.dir`` and writes ``DIR/report.csv``, ``DIR/report.md`` and ``DIR/plots/<key>.png``
(sectune.report does the work). Artifact paths are relative to this run's own dir, as every
result.json's are.
"""

from __future__ import annotations

import os
from pathlib import Path

from sectune import report
from sectune.errors import ConfigError
from sectune.runner import RunContext


def run(ctx: RunContext) -> dict:
    rc = ctx.cfg.report
    if not rc.dir:
        raise ConfigError("stage=report needs report.dir=<a sweep dir, e.g. multirun/DATE/TIME>")
    out = report.write_report(Path(rc.dir), sort_by=rc.sort_by, ascending=rc.ascending, sort_by_setting="report.sort_by")
    print(out["markdown"])
    frame = out["frame"]
    counts = frame["status"].value_counts()
    n_ok, n_not, n_earlier, n_live = (int(counts.get(k, 0)) for k in ("succeeded", report.NOT_STARTED, report.EARLIER_SWEEP,
                                                                         report.RUNNING))

    def rel(p: Path) -> str:
        return os.path.relpath(Path(p).resolve(), ctx.run_dir.resolve())

    artifacts = {"report_csv": rel(out["csv"]), "report_md": rel(out["md"])}
    artifacts.update({f"plot_{p.stem}": rel(p) for p in out["plots"]})
    metrics = {"jobs": len(frame) - n_earlier, "succeeded": n_ok, "failed": len(frame) - n_earlier - n_ok - n_not - n_live}
    metrics.update({k: v for k, v in (("not_started", n_not), ("earlier_sweep_dirs", n_earlier), ("running", n_live)) if v})
    return {"metrics": metrics, "artifacts": artifacts}
