"""One table (and a plot per swept key) over a Hydra multirun: ``sectune-report DIR``.

Why: a sweep leaves ``DIR/0/``, ``DIR/1/``, ... each with Hydra's ``.hydra/overrides.yaml`` and
the runner's ``result.json``; comparing them by hand means opening N files. This reads them all
into one DataFrame, one row per job, and writes ``report.csv``, ``report.md`` and ``plots/``.

Choices:

* A job that crashed before the runner finished (no result.json, or one still saying
  ``running``) and a garbled result.json are rows with ``status=failed`` and an ``error`` that
  says which: failures stay visible instead of silently shrinking the grid.
* Every override key is a column (so the CSV is complete), but only *swept* keys, those whose
  value differs between jobs, are shown in report.md's table and get a plot; the fixed ones are
  listed once above the table. ``frame.attrs["swept"]`` / ``["fixed"]`` carry that split.
* Override values are parsed as YAML, plus Hydra's float spellings (``1e-4``), so numbers
  are numbers and sort/plot as such.
* Sort metric: the first of :data:`DEFAULT_SORT` present (``eval_loss``, classify's ``val_macro_f1``, federated's
  ``val_loss_end``, a pipeline's ``heldout_val_verdict_macro_f1`` (its chosen policy's, on the validation windows),
  contrastive's ``best_eval_causal_stability``), else the first metric that is not a test number (:data:`TEST_METRIC`),
  else job order (unranked); names containing ``loss`` sort
  ascending, other metrics (accuracy, f1, reward) descending, non-metric columns ascending;
  ``ascending`` overrides. Failed rows (no metric) go last.
* Plots show the sort metric against each swept key over succeeded runs: every run as a point,
  and a line through the mean per value (the mean over the other swept keys).

* A swept seed (``train.seed``, ``dataset.split_seed``: :func:`seed_keys`) makes runs repeats of one setting:
  ``report_seeds.csv`` and a section of report.md give each setting of the other swept keys its mean ± sd and run
  count (:func:`over_seeds`), so a 4-seed sweep is one line per setting instead of a hand-made table.

Every file is written to a temporary name and renamed, so a reader never sees half a file.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from sectune.errors import ConfigError, DataError, shown
from sectune.runner import write_text_atomic
from sectune.sweeps import TEST_METRIC
from sectune.sweep_jobs import (BASE_COLUMNS, EARLIER_SWEEP, NOT_RUN, NOT_STARTED, RUNNING, expected_jobs, job_dirs, parse_value,
                                raw_overrides, read_overrides, read_result, sweep_objective)



def build_report(sweep_dir, sort_by: str | None = None, ascending: bool | None = None,
                 sort_by_setting: str = "--sort-by") -> pd.DataFrame:
    """One row per job dir: job, override keys, status, metrics, error; sorted by a metric (``sort_by_setting``:
    how the caller's user set ``sort_by``, named in the error for a column that does not exist)."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise DataError(f"{sweep_dir}: no such sweep directory")
    jobs = job_dirs(sweep_dir)
    if not jobs:
        raise DataError(f"{sweep_dir}: no job dirs (0/, 1/, ...) found; is this a `sectune -m` sweep dir?")

    rows, keys, metric_names = [], [], []
    expected = expected_jobs(sweep_dir)
    for job in jobs:
        ov, res = read_overrides(job), read_result(job)
        n = int(job.name)
        given = raw_overrides(job)
        if not given and not (job / ".hydra").exists() and expected is not None and n < len(expected):
            # hydra.output_subdir=null: no job records its overrides; multirun.yaml's job n is this one (every job was
            # disowned as an earlier sweep's, and nothing was ranked: an audit, session 36)
            given, ov = expected[n], {k.lstrip("+"): parse_value(v) for k, _, v in (o.partition("=") for o in expected[n])}
        if expected is not None and (n >= len(expected) or set(given) != set(expected[n])):
            # a rerun in this dir with other values replaced jobs 0..k and left the rest: not this sweep's results
            res = {**res, "status": EARLIER_SWEEP, "error": f"not of the sweep in multirun.yaml (its job {n} is "
                   f"{' '.join(expected[n]) if n < len(expected) else 'none'}): left by an earlier sweep in this dir"}
        keys += [k for k in ov if k not in keys]
        metric_names += [m for m in res["metrics"] if m not in metric_names]
        rows.append((n, ov, res))
    live = any(res["status"] == RUNNING for _, _, res in rows)
    for n in sorted(set(range(len(expected or ()))) - {int(j.name) for j in jobs}):  # the sweep stopped before them
        ov = {k.lstrip("+"): parse_value(v) for k, _, v in (o.partition("=") for o in expected[n])}
        keys += [k for k in ov if k not in keys]
        why = "no job dir yet: the sweep is still running" if live else "no job dir: the sweep stopped before this job"
        rows.append((n, ov, {"status": NOT_STARTED, "metrics": {}, "error": why}))

    environments, legend = _environments(rows)
    taken = set(BASE_COLUMNS) | set(keys)
    metric_cols = {m: (f"metric.{m}" if m in taken else m) for m in metric_names}
    records = []
    for num, ov, res in rows:
        rec: dict[str, Any] = {"job": num}
        rec.update({k: ov.get(k) for k in keys})
        rec["status"] = res["status"]
        if environments:
            rec["environment"] = environments.get(num, "")
        rec.update({metric_cols[m]: res["metrics"].get(m, math.nan) for m in metric_names})
        rec["error"] = res["error"]
        records.append(rec)
    frame = pd.DataFrame.from_records(records, columns=["job", *keys, "status", *(["environment"] if environments else []),
                                                        *metric_cols.values(), "error"])
    for m in metric_cols.values():  # counts stay integers beside a failed job's empty cell (report.md said 5.649e+05)
        vals = [r[m] for r in records if not (isinstance(r[m], float) and math.isnan(r[m]))]
        if vals and all(isinstance(v, int) and not isinstance(v, bool) for v in vals) and len(vals) < len(records):
            frame[m] = frame[m].astype("Int64")
    for k in keys:  # numbers with a missing cell stay numeric (NaN), not object
        vals = frame[k].dropna()
        if len(vals) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            frame[k] = pd.to_numeric(frame[k])

    swept = [k for k in keys if frame[k].astype(str).nunique(dropna=False) > 1]
    fixed = {k: frame[k].iloc[0] for k in keys if k not in swept}
    metrics = list(metric_cols.values())
    if sort_by is None:  # the sweep's own objective (sweep.objective / sweep.direction, as Optuna optimised it)
        objective, direction = sweep_objective(jobs)
        if objective in metrics:
            sort_by = objective
            ascending = direction != "maximize" if ascending is None else ascending
    frame = sort_frame(frame, metrics, sort_by, ascending, sort_by_setting)
    frame.attrs.update(swept=swept, fixed=fixed, metrics=metrics, sweep_dir=str(sweep_dir),
                       environments=legend)
    return frame


def _environment_text(env: dict | None) -> str | None:
    """The code and machine a job's numbers came from (result.json's ``environment``), in one line."""
    if not env:
        return None
    packages = env.get("packages") or {}
    libs = ", ".join(f"{k} {packages[k]}" for k in ("torch", "transformers", "trl", "peft") if k in packages)
    return f"sectune {env.get('sectune_commit') or env.get('sectune')}; {libs}; {env.get('device')}"


def _environments(rows) -> tuple[dict[int, str], dict[str, str]]:
    """(job → ``E1``, ``E2``, …; ``E1`` → what it is) where the succeeded jobs ran more than one code or machine (a sweep
    rerun with sweep.skip_done after an upgrade reuses the jobs an older sectune trained); ({}, {}) where they all ran one."""
    texts = {n: _environment_text(res.get("environment")) for n, _, res in rows if res.get("status") == "succeeded"}
    distinct = list(dict.fromkeys(t for t in texts.values() if t))
    if len(distinct) < 2:
        return {}, {}
    return ({n: f"E{distinct.index(t) + 1}" for n, t in texts.items() if t},
            {f"E{i + 1}": t for i, t in enumerate(distinct)})


#: metric names (substrings) where smaller is better: sorted ascending (an FPR sorted descending listed the worst
#: first), as is a name ending in ``_s`` (seconds: ``latency_p95_s``)
LOWER_IS_BETTER = ("loss", "fpr", "false_positive", "attack_success", "error", "perplexity", "seconds", "wall_time", "bytes",
                   "latency", "invalid", "invented", "_fp", "_fn", "failed")
#: ... unless one of these is in the name too (checked first): a rate or ratio of something good (``bytes_reduction``,
#: ``rows_per_s``)
HIGHER_IS_BETTER = frozenset({"reduction", "ratio", "speedup"})  # whole words of the name; and a name with "per_s"


def lower_is_better(name: str) -> bool:
    n = name.lower()
    words = set(re.split(r"[^a-z0-9]+", n))  # whole words: "ratio" is inside generation_s and duration_s
    if words & HIGHER_IS_BETTER or n.endswith("per_s") or "_per_s_" in n:
        return False
    return any(w in n for w in LOWER_IS_BETTER) or n.endswith("_s")


#: the default sort metric, the first one the jobs report: the validation loss (SFT, DPO, reward), classify's validation
#: macro-F1 (its jobs report no eval_loss, and sorting them by train_loss ranked the best-fitting, not the best, first),
#: federated's final validation loss, a pipeline's held-out table (its best policy's verdict macro-F1; a pipeline's other
#: metrics are its infer step's, and the first of them, ``inputs``, ranked nothing), contrastive's validation causal
#: stability at its kept checkpoint (else its attack success: its first metric, ``causal_stability_start``, is the same
#: number in every job)
DEFAULT_SORT = ("eval_loss", "val_macro_f1", "val_loss_end", "heldout_val_verdict_macro_f1", "best_eval_causal_stability", "val_f1")


def sort_frame(frame: pd.DataFrame, metrics: list[str], sort_by: str | None, ascending: bool | None,
               sort_by_setting: str = "--sort-by") -> pd.DataFrame:
    """Sort by ``sort_by`` (default: :data:`DEFAULT_SORT`, else first metric); loss-like ascending, NaN last. ``sort_by_setting``
    names where ``sort_by`` came from: ``--sort-by`` (sectune-report) or ``report.sort_by`` (stage=report)."""
    if sort_by is None:  # the validation number the stages select on, else the first metric that is not a test number
        sort_by = next((m for m in DEFAULT_SORT if m in metrics),
                       next((m for m in metrics if not TEST_METRIC.search(m) and "_is_" not in m), None))  # not a 0/1 flag
    if sort_by is None:  # only test numbers: job order, and the report says why
        out = frame.reset_index(drop=True)
        out.attrs.update(frame.attrs, sort_by=None, ascending=True, unranked=bool(metrics))
        return out
    if sort_by not in frame.columns:
        given = f"{sort_by_setting} {sort_by}" if sort_by_setting.startswith("--") else f"{sort_by_setting}={sort_by}"
        raise ConfigError(f"{given}: not a column; metrics are {', '.join(metrics) or '(none)'}")
    if ascending is None:  # losses and non-metric columns (job, swept keys) smallest first
        ascending = sort_by not in metrics or lower_is_better(sort_by)
    by = [sort_by] + (["job"] if sort_by != "job" else [])
    out = frame.sort_values(by, ascending=[ascending, True][: len(by)], na_position="last", kind="mergesort")
    ran = ~out["status"].isin(NOT_RUN)
    out = pd.concat([out[ran], out[~ran]]).reset_index(drop=True)  # rows that are not this sweep's results last
    out.attrs.update(frame.attrs, sort_by=sort_by, ascending=ascending)
    return out


def _cell(v: Any) -> str:
    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    # a job's error names what its input named (a log file an attacker called "\x1b]0;…"): escaped here, not played by
    # the terminal that prints the table, nor by one that cats report.md
    text = shown(str(v).replace("\n", " ")).replace("|", "\\|")
    return text if len(text) <= 120 else text[:117] + "..."


def to_markdown(frame: pd.DataFrame) -> str:
    """A GitHub Markdown table: job, swept keys, status, metrics, error; fixed keys above it."""
    a = frame.attrs
    cols = ["job", *a.get("swept", []), "status", *(["environment"] if a.get("environments") else []), *a.get("metrics", []), "error"]
    counts = frame["status"].value_counts()
    n_ok, others = int(counts.get("succeeded", 0)), {s: int(counts.get(s, 0)) for s in NOT_RUN}
    n_run = len(frame) - others[EARLIER_SWEEP]
    lines = [f"# Sweep report: {a.get('sweep_dir', '')}", "",
             f"{n_run} jobs: {n_ok} succeeded, {n_run - n_ok - others[NOT_STARTED] - others[RUNNING]} failed"
             + (f", {others[RUNNING]} still running" if others[RUNNING] else "")
             + (f", {others[NOT_STARTED]} {'not started yet' if others[RUNNING] else 'never started'}" if others[NOT_STARTED] else "")
             + "."
             + (f" {others[EARLIER_SWEEP]} job dir(s) left by an earlier sweep in this dir are listed last, not ranked."
                if others[EARLIER_SWEEP] else "")]
    if a.get("sort_by"):
        lines[-1] += f" Sorted by `{a['sort_by']}` ({'ascending' if a.get('ascending') else 'descending'})."
        if TEST_METRIC.search(str(a["sort_by"])):
            lines[-1] += (" That is a test number: the top row was chosen on test, so its score is optimistic (the best of "
                          f"{n_ok} noisy scores); choose on a validation metric and read the chosen row's test number.")
    elif a.get("unranked"):
        lines[-1] += (" Not ranked (job order): every metric here is measured on the test split, and choosing by one would "
                      "choose on test; --sort-by names one if you must.")
    if a.get("fixed"):
        lines.append("Fixed overrides: " + ", ".join(f"`{k}={_cell(v)}`" for k, v in a["fixed"].items()))
    if a.get("environments"):
        lines.append("The succeeded jobs ran on different code or machines (column `environment`): their numbers may "
                     "differ by that, not only by their settings. " + "; ".join(f"{k}: {v}" for k, v in a["environments"].items()))
    lines += ["", "| " + " | ".join(cols) + " |", "|" + "|".join("---:" if pd.api.types.is_numeric_dtype(frame[c]) else "---" for c in cols) + "|"]
    for _, row in frame.iterrows():
        lines.append("| " + " | ".join(_cell(row[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def seed_keys(swept: Sequence[str]) -> list[str]:
    """The swept keys whose values are seeds (``train.seed``, ``dataset.split_seed``): runs that differ only in them
    are repeats of one setting."""
    return [k for k in swept if k.rsplit(".", 1)[-1].endswith("seed")]


def over_seeds(frame: pd.DataFrame) -> pd.DataFrame | None:
    """One row per setting of the swept keys that are not seeds: ``runs`` (succeeded), then ``<metric> mean`` and
    ``<metric> sd`` (sample sd; empty for one run) of every numeric metric; ordered as the report is sorted.
    None when no seed key is swept."""
    a = frame.attrs
    seeds = seed_keys(a.get("swept", []))
    numeric = [m for m in a.get("metrics", []) if pd.api.types.is_numeric_dtype(frame[m])]
    ran = frame[~frame["status"].isin(NOT_RUN)]
    if not seeds or not numeric or not (ran["status"] == "succeeded").any():
        return None
    others = [k for k in a["swept"] if k not in seeds]
    # a setting whose every seed failed keeps its row (runs 0): it vanished, as if it had never been tried
    ok = ran["status"] == "succeeded"
    keyed = ran.assign(**{m: ran[m].where(ok) for m in numeric}, _ok=ok.astype(int))
    keyed = keyed.assign(**{k: keyed[k].astype(str) for k in others}) if others else keyed.assign(_all="")
    groups = keyed.groupby(others or ["_all"], sort=False)
    out = groups["_ok"].sum().rename("runs").to_frame()
    for m in numeric:
        out[f"{m} mean"], out[f"{m} sd"] = groups[m].mean(), groups[m].std(ddof=1)
    out = out.reset_index().drop(columns=["_all"], errors="ignore")
    sort_by = a.get("sort_by")
    if sort_by in numeric:
        out = out.sort_values(f"{sort_by} mean", ascending=bool(a.get("ascending")), na_position="last", kind="mergesort")
    out.attrs.update(seeds=seeds, others=others, metrics=numeric, sort_by=sort_by)
    return out.reset_index(drop=True)


def seeds_markdown(table: pd.DataFrame) -> str:
    """The over-seeds table for report.md: the sort metric as mean ± sd (runs); every metric is in report_seeds.csv."""
    a = table.attrs
    shown = [a["sort_by"]] if a.get("sort_by") in a["metrics"] else a["metrics"][:1]
    lines = ["", f"## Over seeds ({', '.join(f'`{k}`' for k in a['seeds'])})", "",
             "Mean ± sample sd over the succeeded runs of each setting (every metric: report_seeds.csv).", "",
             "| " + " | ".join([*a["others"], "runs", *shown]) + " |", "|" + "|".join(["---"] * len(a["others"]) + ["---:"] * (1 + len(shown))) + "|"]
    for _, row in table.iterrows():
        cells = [_cell(row[k]) for k in a["others"]] + [str(int(row["runs"]))]
        cells += ["—" if pd.isna(row[f"{m} mean"]) else f"{row[f'{m} mean']:.4g}" + ("" if pd.isna(row[f"{m} sd"]) else f" ± {row[f'{m} sd']:.2g}")
                  for m in shown]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _safe_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", key) or "key"


def plot_key(frame: pd.DataFrame, key: str, metric: str, path: Path) -> bool:
    """``metric`` vs ``key`` over succeeded runs: points plus the per-value mean; False if no data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = frame[(frame["status"] == "succeeded") & frame[metric].notna() & frame[key].notna()]
    if ok.empty:
        return False
    numeric = pd.api.types.is_numeric_dtype(ok[key]) and not pd.api.types.is_bool_dtype(ok[key])
    fig, ax = plt.subplots(figsize=(6, 4))
    try:
        if numeric:
            x = ok[key].astype(float)
            means = ok.groupby(key)[metric].mean().sort_index()
            ax.scatter(x, ok[metric], alpha=0.7, label="runs")
            ax.plot(means.index.astype(float), means.values, "-o", color="C1", label="mean")
            if (x > 0).all() and x.max() / x.min() >= 50:
                ax.set_xscale("log")
        else:
            cats = list(dict.fromkeys(ok[key].astype(str)))
            pos = {c: i for i, c in enumerate(cats)}
            xs = ok[key].astype(str).map(pos)
            means = ok.assign(_c=ok[key].astype(str)).groupby("_c")[metric].mean().reindex(cats)
            ax.scatter(xs, ok[metric], alpha=0.7, label="runs")
            ax.plot(range(len(cats)), means.values, "-o", color="C1", label="mean")
            ax.set_xticks(range(len(cats)), cats, rotation=30 if len(cats) > 4 else 0)
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} vs {key} ({len(ok)} succeeded runs)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
    return True


def write_report(sweep_dir, sort_by: str | None = None, ascending: bool | None = None,
                 sort_by_setting: str = "--sort-by") -> dict[str, Any]:
    """Write report.csv, report.md and plots/<key>.png; returns the frame and the paths written."""
    sweep_dir = Path(sweep_dir)
    frame = build_report(sweep_dir, sort_by=sort_by, ascending=ascending, sort_by_setting=sort_by_setting)
    csv_path, md_path = sweep_dir / "report.csv", sweep_dir / "report.md"
    write_text_atomic(csv_path, frame.to_csv(index=False))
    markdown = to_markdown(frame)
    seeds = over_seeds(frame)
    if seeds is not None:  # a seed sweep: each setting's mean and spread, beside the per-run table
        write_text_atomic(sweep_dir / "report_seeds.csv", seeds.to_csv(index=False))
        markdown += seeds_markdown(seeds)
    write_text_atomic(md_path, markdown)
    plots: list[Path] = []
    metric = frame.attrs.get("sort_by")
    if metric and frame.attrs["swept"] and pd.api.types.is_numeric_dtype(frame[metric]):
        (sweep_dir / "plots").mkdir(exist_ok=True)
        for key in frame.attrs["swept"]:
            path = sweep_dir / "plots" / f"{_safe_name(key)}.png"
            if plot_key(frame, key, metric, path):
                plots.append(path)
    return {"frame": frame, "markdown": markdown, "csv": csv_path, "md": md_path, "plots": plots}


def main(argv: Sequence[str] | None = None) -> int:
    """``sectune-report DIR [--sort-by M] [--ascending|--descending]``; exit 2 on a bad DIR."""
    from sectune.console import lenient_console

    lenient_console()
    p = argparse.ArgumentParser(prog="sectune-report", description="Table and plots over a sectune sweep dir.")
    p.add_argument("sweep_dir", help="a Hydra multirun dir holding 0/, 1/, ... job dirs")
    p.add_argument("--sort-by", default=None, help="metric (or column) to sort by; default: the sweep's sweep.objective, else the first of eval_loss, val_macro_f1, val_loss_end, heldout_val_verdict_macro_f1, ... present, else the first metric not measured on test, else job order")
    order = p.add_mutually_exclusive_group()
    order.add_argument("--ascending", dest="ascending", action="store_true", default=None, help="smallest first")
    order.add_argument("--descending", dest="ascending", action="store_false", help="largest first")
    args = p.parse_args(argv)
    try:
        out = write_report(args.sweep_dir, sort_by=args.sort_by, ascending=args.ascending)
    except (DataError, ConfigError) as e:
        print(f"sectune-report: error: {shown(str(e))}", file=sys.stderr)
        return 2
    try:
        print(out["markdown"])
        print(f"wrote {out['csv']}, {out['md']}" + (f" and {len(out['plots'])} plot(s) in {out['md'].parent / 'plots'}" if out["plots"] else " (no plots: nothing swept or no metric)"))
        sys.stdout.flush()
    except BrokenPipeError:  # `sectune-report DIR | head`: the reader left; the files are written
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
