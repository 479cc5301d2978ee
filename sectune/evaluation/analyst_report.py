"""The analyst's held-out table as Markdown (``report.md``): the overall table, the per-source table
and the host-name check; the numbers come from :mod:`sectune.evaluation.analyst_eval`."""

from __future__ import annotations


#: what a held-out test window is under each ``dataset.split_by`` other than window (sectune/data/window_splits.py)
SPLIT_NOTE = {"time": "the test windows are each log's latest, later than every window of that log a step trained on.",
              "source": "no test window shares a source (address or host name) with a training window."}


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def _f(x) -> str:
    return "—" if x is None else f"{x:.3f}"


def _rate(x) -> str:
    return "—" if x is None else f"{x:,.0f}" if x >= 100 else f"{x:.2f}"


def counts(items) -> list[tuple[str, int]]:
    out: dict[str, int] = {}
    for it in items:
        out[it] = out.get(it, 0) + 1
    return sorted(out.items())


def brief(s: dict) -> str:
    return (f"JSON {_pct(s['json_valid_rate'])}% · schema {_pct(s['schema_valid_rate'])}% · verdict macro-F1 "
            f"{_f(s['verdict_macro_f1'])} · field F1 {_f(s['field_f1'])} · {_rate(s['analyses_per_s'])} analyses/s")


def render_markdown(table: dict) -> str:
    rows, by_source = table["rows"], table["by_source"]
    n = len(table["windows"])
    srcs = counts(w["source"] for w in table["windows"])
    labels = counts(w["verdict"] for w in table["windows"])
    split = table.get("split") or {}
    by = split.get("by") or "window"  # a table from before the key: the window split, the only one then
    out = [
        "# Held-out analyst table" + ("" if by == "window" else f" (dataset.split_by={by})"),
        "",
        *([f"Split by {by} (dataset.split_by={by}, dataset.split_seed={split.get('seed')}): {SPLIT_NOTE.get(by, '')} Not "
           "comparable with a table of the default split (dataset.split_by=window: windows at random, stratified by verdict).", ""]
          if by != "window" else []),
        f"{n} test windows ({', '.join(f'{k} {v}' for k, v in srcs)}; verdicts {', '.join(f'{k} {v}' for k, v in labels)}), "
        "held out of every training step. Policies decode greedily; JSON-valid counts repaired output as valid "
        "(as stage=infer does); an unparseable output is a wrong verdict and scores field F1 0. Invented names: the analyses "
        "that name an address, host or user their window does not hold."
        + (f" The best policy was chosen by {table['best_policy_chosen_on']}, never on these test windows."
           if table.get("best_policy_chosen_on") else ""),
        "",
        *(["**These windows are generated** (sectune's synthetic logs in the real logs' format: the real ones were not "
           "found), so the numbers describe the pipeline, not an analyst of real logs.", ""]
          if srcs and all(k == "synthetic" for k, _ in srcs) else []),
        "| system | JSON-valid % | schema-valid % | verdict acc | verdict macro-F1 | field F1 | invented names % | analyses/s | vs TF-IDF + LR |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        vs = r.get("vs_tfidf_lr")
        vs_cell = "—" if vs is None else f"**loses** ({r['vs_tfidf_lr_diff']:+.3f})" if vs == "loses" else f"{vs} ({r['vs_tfidf_lr_diff']:+.3f})"
        if r.get("vs_tfidf_lr_ci95"):
            lo, hi = r["vs_tfidf_lr_ci95"]
            vs_cell = vs_cell[:-1] + f"; 95% CI {lo:+.3f} … {hi:+.3f})"
        if r["kind"] == "baseline" and r["name"].startswith("TF-IDF") and vs is None:  # the bar (not the row given generated windows too)
            vs_cell = "(the bar)"
        name = r["name"] + (" ← best policy" if r["name"] == table["best_policy"] else "")
        out.append(f"| {name} | {_pct(r['json_valid_rate'])} | {_pct(r['schema_valid_rate'])} | {_f(r['verdict_accuracy'])} | "
                   f"{_f(r['verdict_macro_f1'])} | {_f(r['field_f1'])} | {_pct(r.get('invented_names_rate'))} | {_rate(r['analyses_per_s'])} | "
                   f"{vs_cell} |")
    losers = [r["name"] for r in rows if r.get("vs_tfidf_lr") == "loses"]
    out += [""]
    sure = [r for r in rows if r.get("vs_tfidf_lr_ci95")]
    if sure:
        r = sure[0]
        lo, hi = r["vs_tfidf_lr_ci95"]
        out.append(f"{r['name']} against TF-IDF + LR: {r['vs_tfidf_lr_diff']:+.3f} verdict macro-F1, 95% CI {lo:+.3f} … {hi:+.3f} "
                   f"(paired bootstrap over these {n} windows; {100 * r['vs_tfidf_lr_share_not_above']:.0f}% of resamples not above "
                   "the bar): " + ("above it beyond the noise." if lo > 0 else "below it beyond the noise." if hi < 0
                                   else "within the noise of this many windows."))
    for r in rows:
        if r.get("vs_sft_ci95"):
            lo, hi = r["vs_sft_ci95"]
            out.append(f"{r['name']} against SFT: {r['vs_sft_diff']:+.3f} verdict macro-F1, 95% CI {lo:+.3f} … {hi:+.3f}.")
    if losers:
        out.append(f"Rows that lose to TF-IDF + LR on verdict macro-F1: {', '.join(losers)}.")
    else:
        out.append("No row loses to TF-IDF + LR on verdict macro-F1.")
    out.append("Verdict macro-F1 averages the F1 of the verdicts these windows hold; answering a verdict no window holds "
               "counts as a wrong answer, not as an extra class F1 of 0 (accuracy beside it counts every window).")
    rules = next((r for r in rows if r["kind"] == "rules"), None)
    if rules is not None and "ceiling" in rules["name"]:
        out.append("The rule engine wrote the annotations, so it matches them by construction: it is the ceiling, not a competitor.")
    elif rules is not None:
        out.append("These annotations are not all the rule engine's own (it agrees on the verdict of "
                   f"{_pct(rules['verdict_accuracy'])}% of the windows): its row is a baseline here, not the ceiling.")
    first = by_source[rows[0]["name"]] if rows else {}
    benign_in = {src for src, d in first.items() if d["true_benign_rate"]}
    out += ["", "## Per source (does a model read the host name?)", ""]
    if benign_in == {"Linux"} and "OpenSSH" in first:
        out += ["Every benign window comes from Linux_2k; OpenSSH_2k has none. A model that learned \"Linux host → benign\" "
                "calls many non-benign Linux windows benign (last column).", ""]
    else:
        out += [f"Benign windows come from: {', '.join(sorted(benign_in)) or 'no source'} (sources here: {', '.join(first) or 'none'}).", ""]
    out += [
        "| system | source | windows | verdict acc | verdict macro-F1 | field F1 | truly benign % | predicted benign % | non-benign called benign % |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        for src, d in by_source[r["name"]].items():
            out.append(f"| {r['name']} | {src} | {d['windows']} | {_f(d['verdict_accuracy'])} | {_f(d['verdict_macro_f1'])} | "
                       f"{_f(d.get('field_f1'))} | {_pct(d['true_benign_rate'])} | {_pct(d['pred_benign_rate'])} | "
                       f"{_pct(d['non_benign_called_benign_rate'])} |")
    shortcut = []
    for r in rows:
        lin = by_source[r["name"]].get("Linux")
        ssh = by_source[r["name"]].get("OpenSSH")
        if r["kind"] != "policy" or not lin or lin["non_benign_called_benign_rate"] is None:
            continue
        rate = lin["non_benign_called_benign_rate"]
        ssh_rate = ssh["pred_benign_rate"] if ssh else None
        if rate >= 0.5 and (ssh_rate is None or ssh_rate <= 0.1):
            shortcut.append(f"{r['name']} calls {_pct(rate)}% of non-benign Linux windows benign but {_pct(ssh_rate)}% of OpenSSH "
                            "windows: it looks like it learned the host name")
        else:
            shortcut.append(f"{r['name']}: {_pct(rate)}% of non-benign Linux windows called benign (OpenSSH windows called benign: "
                            f"{_pct(ssh_rate)}%)")
    if shortcut:
        out += ["", *[f"- {s}." for s in shortcut]]
    return "\n".join(out) + "\n"
