"""The analyst's held-out table: every policy a pipeline trained, beside the rule engine and the
classic baselines, on the test windows no training stage saw.

Rows: the untrained base model, each trained policy (SFT, SFT+GRPO, SFT+DPO, …), the best policy
again under schema-constrained decoding (:mod:`sectune.models.constrained`), the rule engine
(``auth_rules.analyze_auth_log``; it wrote the annotations, so it scores 100% by construction and
is the ceiling, not a competitor), TF-IDF + logistic regression on the window text (verdict only,
fitted on the train windows, ``C`` picked on validation: :func:`sectune.evaluation.baselines.tfidf_logreg_baseline`)
and the majority class. Columns: JSON-valid % (an object recovered, repair allowed, as
``stage=infer`` counts it), schema-valid %, verdict accuracy and macro-F1 over the three verdicts
(an unparseable output is a wrong verdict), field-level F1 (``auth_rewards.field_f1`` against the
annotation; 0 when unparseable), analyses/s (generation only, model loading excluded), and how
the row's verdict macro-F1 compares with TF-IDF + LR's; for the best policy (and its constrained row) with a 95%
paired bootstrap interval over the windows (:mod:`sectune.evaluation.uncertainty`: 43 windows move a macro-F1 by ~0.02 each).
The numbers (scores, the best policy, the comparisons, result.json's metrics) are :mod:`sectune.evaluation.analyst_scoring`'s.

Per source: every benign window comes from Linux_2k (the OpenSSH log holds no benign window), and
the host name (``combo`` vs ``LabSZ``) sits in every line, so "Linux → benign" is a shortcut a model
can learn. The per-source table shows, for each row and source, the share of windows truly benign,
the share predicted benign, and the share of the *non-benign* windows called benign; a model that
learned the host name calls most non-benign Linux windows benign. Sources are read from the
folder's ``BUILD_INFO.json`` (each window's first line is line ``Y`` of one source file).

Policies generate greedily with the ``generation`` settings (``do_sample`` forced off), batched.
Outputs are parsed as data (``extract_json``), never evaluated.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from omegaconf import DictConfig, OmegaConf

from sectune.errors import ConfigError
from sectune.evaluation.analyst_report import brief, counts, render_markdown
from sectune.evaluation.analyst_scoring import best_policy, compare, score, score_by_source, table_metrics

NONE = "<none>"  # the verdict of an output with no parseable verdict


# ------------------------------------------------------------------------------ windows
#: how the table is computed; 2: the best policy chosen on the validation windows (1: on the test windows);
#: 3: paired bootstrap intervals of the best policy vs TF-IDF + LR and of each trained policy vs SFT; 4: invented names
TABLE_PROTOCOL = 4


@dataclass(frozen=True)
class Window:
    id: str
    source: str
    prompt: str
    log_text: str
    annotation: dict

    @property
    def label(self) -> str:
        return self.annotation["verdict"]


def load_windows(cfg: DictConfig) -> dict[str, list[Window]]:
    """train / validation / test windows of ``dataset=auth_logs`` exactly as the training stages
    split them (:func:`sectune.data.sft_splits`), each with its source log."""
    from sectune import data
    from sectune.data import auth_logs
    from sectune.models.reward_model import window_from_prompt

    splits = data.sft_splits(cfg)
    folder = data.auth_logs_folder(cfg)
    samples = {s.id: s for s in auth_logs.load_auth_folder(folder, max_samples=cfg.dataset.max_samples)}
    sources = window_sources(folder, list(samples.values()))

    def window(r: dict) -> Window:
        if r["id"] in samples:
            return Window(r["id"], sources.get(r["id"], "unknown"), r["prompt"], samples[r["id"]].log_text, samples[r["id"]].analysis)
        # a span cut from a training window (dataset.subwindows, "<id>~j") or a renamed copy (dataset.counterfactuals,
        # "<id>^j", "<id>~j^k"): its parent's source; its completion is the rules' analysis
        return Window(r["id"], sources.get(re.split(r"[~^]", r["id"])[0], "unknown"), r["prompt"], window_from_prompt(r["prompt"]),
                      json.loads(r["completion"]))

    return {name: [window(r) for r in recs] for name, recs in splits.items()}


def window_sources(folder: Path, samples) -> dict[str, str]:
    """Window id → source name (``OpenSSH``, ``Linux``, ``synthetic``, ``unknown``): the source
    file (BUILD_INFO.json's ``source_files``) whose line ``Y`` is the window's first line."""
    try:
        info = json.loads((Path(folder) / "BUILD_INFO.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if info.get("source") == "synthetic":
        return {s.id: "synthetic" for s in samples}
    files = []
    for f in info.get("source_files") or []:
        try:
            lines = Path(f["path"]).read_text(encoding="utf-8", errors="replace").splitlines()
        except (OSError, KeyError, TypeError):
            continue
        files.append((Path(f["path"]).stem.split("_")[0], lines))
    out = {}
    for s in samples:
        first_line = int(s.id.split("_")[1])
        head = s.log_text.splitlines()[0].rstrip() if s.log_text.strip() else ""
        hits = [name for name, lines in files if 0 < first_line <= len(lines) and lines[first_line - 1].rstrip() == head]
        out[s.id] = hits[0] if len(hits) == 1 else "unknown"
    return out


def pick_windows(windows: list[Window], limit: int | None) -> list[Window]:
    """The first ``limit`` windows taken round-robin over sources (all when ``limit`` is None)."""
    if limit is None or limit >= len(windows):
        return list(windows)
    by: dict[str, list[Window]] = {}
    for w in windows:
        by.setdefault(w.source, []).append(w)
    queues, out, depth = [by[k] for k in sorted(by)], [], 0
    while len(out) < limit:
        out.extend(q[depth] for q in queues if depth < len(q))
        depth += 1
    keep = {w.id for w in out[:limit]}
    return [w for w in windows if w.id in keep]


# ------------------------------------------------------------------------------ rows
@dataclass
class Row:
    """One system's answers on the test windows."""

    name: str
    #: policy | rules | baseline
    kind: str
    verdicts: list[str]
    #: per window: parsed object (None = unparseable); None for verdict-only rows
    analyses: list[dict | None] | None = None
    schema_valid: list[bool] | None = None
    seconds: float | None = None
    #: the pipeline step a policy came from (sft, rl, dpo) or None
    step: str | None = None
    constrained: bool = False
    #: constrained decoding with names grounded in the window (infer.grounded_fields)
    grounded: bool = False
    note: str = ""
    texts: list[str] | None = field(default=None, repr=False)


def analyses_row(name: str, texts: Sequence[str], seconds: float | None, *, step: str | None = None, constrained: bool = False,
                 grounded: bool = False, note: str = "") -> Row:
    """A policy's generated texts → parsed analyses, schema validity and verdicts (parsed, never evaluated)."""
    from sectune.data.auth_logs import validate_analysis
    from sectune.inference import parse_json_output

    analyses, valid, verdicts = [], [], []
    for text in texts:
        try:
            obj, _ = parse_json_output(text)
        except ValueError:
            obj = None
        analyses.append(obj)
        valid.append(obj is not None and not validate_analysis(obj))
        v = obj.get("verdict") if obj is not None else None
        verdicts.append(v if isinstance(v, str) else NONE)
    return Row(name, "policy", verdicts, analyses, valid, seconds, step=step, constrained=constrained, grounded=grounded, note=note,
               texts=list(texts))


def rule_engine_row(windows: list[Window]) -> Row:
    from sectune.data.auth_logs import validate_analysis
    from sectune.data.auth_rules import analyze_auth_log

    t0 = time.perf_counter()
    out = [analyze_auth_log(w.log_text.splitlines()) for w in windows]
    seconds = time.perf_counter() - t0
    # on sectune's own windows the rule engine wrote the annotations; a user's folder may be annotated otherwise
    own = all(a == w.annotation for a, w in zip(out, windows))
    return Row("rule engine (wrote the annotations: the ceiling)" if own else "rule engine", "rules", [a["verdict"] for a in out], out,
               [not validate_analysis(a) for a in out], seconds)


def tfidf_row(train: list[Window], val: list[Window], test: list[Window], seed: int, *, extra: list[tuple[str, str]] = (),
              name: str = "TF-IDF + LR (verdict only)") -> Row:
    """TF-IDF + logistic regression on the window text, C chosen on ``val``; ``extra``: more (text, verdict) training pairs."""
    from sectune.evaluation.baselines import tfidf_logreg_baseline

    labels = {w.label for w in train} | {y for _, y in extra}
    if len(labels) < 2:  # a one-verdict folder (an attack-only capture): the table died after every step had trained
        only = next(iter(labels), "none")  # (LogisticRegression refuses one class; an audit, session 42)
        return Row(name, "baseline", [only] * len(test), note=f"the training windows hold one verdict only ({only}): "
                   "no classifier can be fitted, so it answers that verdict")
    res = tfidf_logreg_baseline([w.log_text for w in train] + [t for t, _ in extra], [w.label for w in train] + [y for _, y in extra],
                                [w.log_text for w in test], seed,
                                val_texts=[w.log_text for w in val] or None, val_y=[w.label for w in val] or None)
    return Row(name, "baseline", res.predictions, seconds=res.predict_s, note=f"C={res.params['C']}")


def generated_tfidf_row(sft_cfg: DictConfig | None, splits: dict[str, list[Window]], test: list[Window], seed: int) -> Row | None:
    """When the SFT step warmed up on generated windows (``sft.warmup_lines``): TF-IDF + LR given those windows too,
    so the baseline is offered the same data. A row beside the bar, not the bar: on the real test windows it scored
    below the baseline trained on the real windows only (experiments/auth_grpo, round six)."""
    if sft_cfg is None or not int(sft_cfg.sft.get("warmup_lines") or 0):
        return None
    from sectune import data
    from sectune.data import auth_logs

    gen = auth_logs.load_auth_folder(data.generated_auth_folder(sft_cfg))
    return tfidf_row(splits["train"], splits["validation"], test, seed, extra=[(s.log_text, s.label) for s in gen],
                     name=f"TF-IDF + LR + the {len(gen)} generated warm-up windows")


def majority_row(train: list[Window], test: list[Window]) -> Row:
    from sectune.evaluation.baselines import majority_baseline

    res = majority_baseline([w.label for w in train], [w.label for w in test])
    return Row(f"majority class ({res.params['label']})", "baseline", res.predictions)


def generate_row(name: str, model, tokenizer, windows: list[Window], cfg: DictConfig, batch_size: int, *, step: str | None = None,
                 constraint=None) -> Row:
    """Greedy generation (the step's ``generation`` settings, ``do_sample`` off) for every window, batched; a prompt longer
    than its ``model.max_seq_length`` loses its middle as in stage=infer (the table fed such windows whole, up to the
    model's position limit: inputs infer never gives the analyst; an audit, session 41)."""
    from sectune.inference import generate

    greedy = OmegaConf.merge(cfg.generation, {"do_sample": False})
    t0 = time.perf_counter()
    stats: dict = {}
    texts = generate(model, tokenizer, [w.prompt for w in windows], greedy, batch_size=batch_size, constraint=constraint,
                     contexts=[w.log_text for w in windows], max_seq_length=int(cfg.model.max_seq_length), stats=stats)
    row = analyses_row(name, texts, time.perf_counter() - t0, step=step, constrained=constraint is not None,
                       grounded=bool(constraint is not None and constraint.ground))
    forced = stats.get("verdict_forced_rows") or []
    for i in forced:  # a verdict the token budget's close wrote (the schema's shortest, "benign") is none of the model's
        row.verdicts[i] = NONE
    if forced:
        row.note = f"{len(forced)} answer(s) ran out of tokens before the verdict: the forced close's verdict counted as none"
    return row


def load_policy(cfg: DictConfig, kind: str, path: Path | None):
    """(model in eval mode on the run's device, tokenizer) for ``base`` (path None), an ``adapter``
    folder (``PeftModel.from_pretrained`` on ``cfg.model``, or on the SFT weights it was trained on:
    ``modeling.adapter_base``) or full ``model`` weights."""
    from sectune.models import modeling

    base = modeling.adapter_base(path, cfg) if kind == "adapter" else modeling.model_path(cfg)
    if kind == "model":
        model = modeling.load_model(cfg, path=str(path))
    else:
        model = modeling.load_model(cfg, path=base)
        if kind == "adapter":
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(path))
    tokenizer = modeling.tokenizer_for(cfg, path, base)
    model = modeling.to_run_device(model, cfg)
    model.eval()
    return model, tokenizer


# ------------------------------------------------------------------------------ the table
def build_table(
    eval_cfg: DictConfig,
    policies: list[tuple[str, str, DictConfig, str, Path | None]],
    out_dir: Path,
    *,
    max_windows: int | None = None,
    batch_size: int = 16,
    constrained: bool = True,
    reuse: dict[str, tuple[list[str], float | None]] | None = None,
    extra: dict | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Score every system on the held-out windows; write ``heldout.json`` and ``report.md`` into
    ``out_dir`` and return the table (``rows``, ``by_source``, ``metrics``, ``markdown``).

    ``policies``: ``(row name, step, step cfg, kind, path)`` with kind ``base`` | ``adapter`` |
    ``model`` (path None for base). ``reuse``: ``{step: (texts, seconds)}`` generated already by an
    identical greedy pass over the same windows (the pipeline's infer step), in window order.
    """
    from sectune.runner import write_json_atomic, write_text_atomic

    splits = load_windows(eval_cfg)
    test = pick_windows(splits["test"], max_windows)
    if not test:
        raise ValueError("the held-out table needs test windows: dataset.test_fraction is 0")
    log(f"sectune: held-out table: {len(test)} test windows ({', '.join(f'{n} {s}' for s, n in counts(w.source for w in test))}), "
        f"none seen by any training step")
    rows: list[Row] = []
    reuse = dict(reuse or {})
    val = pick_windows(splits["validation"], max_windows)
    val_scores: dict[str, dict] = {}  # the trained policies on the validation windows: the best policy is chosen there
    for name, step, cfg, kind, path in policies:
        trained = kind != "base" and step not in (None, "base")
        model = None
        if step in reuse:
            texts, seconds = reuse[step]
            rows.append(analyses_row(name, texts, seconds, step=step, note="answers of the pipeline's infer step"))
        else:
            model, tok = load_policy(cfg, kind, path)
            rows.append(generate_row(name, model, tok, test, cfg, batch_size, step=step))
        if trained and val:
            if model is None:
                model, tok = load_policy(cfg, kind, path)
            val_scores[name] = score(generate_row(name, model, tok, val, cfg, batch_size, step=step), val)
        del model
        log(f"sectune: held-out table: {name}: {brief(score(rows[-1], test))}"
            + (f" (validation: verdict macro-F1 {val_scores[name]['verdict_macro_f1']:.3f})" if name in val_scores else ""))
    scores = {r.name: score(r, test) for r in rows}
    best = best_policy(rows, val_scores)
    chosen_on = (f"verdict macro-F1 on the {len(val)} validation windows" if val and best is not None and best.name in val_scores
                 else "the last trained step (no validation windows)")
    if best is not None and constrained:
        for row in constrained_rows(best, policies, test, batch_size, log):
            rows.append(row)
            scores[row.name] = score(row, test)
            log(f"sectune: held-out table: {row.name}: {brief(scores[row.name])}")
    for row in (rule_engine_row(test), tfidf_row(splits["train"], splits["validation"], test, int(eval_cfg.train.seed)),
                majority_row(splits["train"], test)):
        rows.append(row)
        scores[row.name] = score(row, test)
    baseline = next(r for r in rows if r.name.startswith("TF-IDF"))  # the bar: trained on the real windows
    sft_cfg = next((c for _, st, c, _, _ in policies if st == "sft"), None)
    gen_row = generated_tfidf_row(sft_cfg, splits, test, int(eval_cfg.train.seed))
    if gen_row is not None:
        rows.insert(rows.index(baseline) + 1, gen_row)
        scores[gen_row.name] = score(gen_row, test)
    compare(rows, scores, [w.label for w in test], baseline, best, int(eval_cfg.train.seed))
    by_source = {r.name: score_by_source(r, test) for r in rows}

    metrics = table_metrics(rows, scores, best, baseline, val_scores)
    table = {
        **(extra or {}),
        "split": split_info(eval_cfg),
        "windows": [{"id": w.id, "source": w.source, "verdict": w.label} for w in test],
        "rows": [{"name": r.name, "kind": r.kind, "step": r.step, "constrained": r.constrained, "grounded": r.grounded, "note": r.note,
                  **scores[r.name]} for r in rows],
        "by_source": by_source,
        "best_policy": best.name if best else None,
        "best_policy_chosen_on": chosen_on if best else None,
        "validation_scores": val_scores,
        "predictions": {r.name: r.verdicts for r in rows},
        "metrics": metrics,
        "generation": {**OmegaConf.to_container(eval_cfg.generation, resolve=True), "do_sample": False, "batch_size": batch_size},
    }
    table["markdown"] = render_markdown(table)
    out_dir.mkdir(parents=True, exist_ok=True)
    gens = {r.name: [{"id": w.id, "text": t} for w, t in zip(test, r.texts)] for r in rows if r.texts is not None}
    write_json_atomic(out_dir / "heldout_generations.json", gens)
    write_text_atomic(out_dir / "report.md", table["markdown"])
    # last: heldout.json holds the key a rerun reuses the table by, so it never stands beside an older report
    write_json_atomic(out_dir / "heldout.json", {k: v for k, v in table.items() if k != "markdown"})
    return table


def split_info(cfg: DictConfig) -> dict:
    """How the table's windows were split (``dataset.split_by``, ``split_seed``): report.md names it, so a time- or
    source-split table is not read as the default window split's."""
    return {"by": str(cfg.dataset.get("split_by") or "window"), "seed": int(cfg.dataset.split_seed)}


def constrained_rows(best: Row, policies, test: list[Window], batch_size: int, log) -> list[Row]:
    """The best policy again with schema-constrained decoding as ``infer`` configures it, and, when that grounds no names
    and the schema is the auth analysis's, once more with its names grounded in each window (:data:`AUTH_GROUNDING`):
    the table shows what grounding costs and buys. [] (with why) when unavailable."""
    try:
        from sectune.models.constrained import AUTH_GROUNDING, SchemaConstraint
    except ImportError as e:  # the module, or xgrammar inside it
        log(f"sectune: held-out table: no constrained row ({e})")
        return []
    name, step, cfg, kind, path = next(p for p in policies if p[1] == best.step)
    model, tok = load_policy(cfg, kind, path)
    variants = [(f"{name} + constrained decoding", cfg)]
    if not cfg.infer.get("grounded_fields") and not cfg.infer.get("schema"):
        variants.append((f"{name} + constrained decoding, names grounded", OmegaConf.merge(cfg, {"infer": {"grounded_fields": AUTH_GROUNDING}})))
    rows = []
    for row_name, c in variants:
        try:
            constraint = SchemaConstraint.from_config(c, tok, model)
        except Exception as e:  # xgrammar missing or the schema beyond it: the table still stands
            log(f"sectune: held-out table: no {row_name!r} row ({type(e).__name__}: {e})")
            continue
        try:  # a failure while generating is a bug, not a missing row: only a setting the schema cannot meet is skipped
            rows.append(generate_row(row_name, model, tok, test, c, batch_size, step=step, constraint=constraint))
        except ConfigError as e:  # e.g. generation.max_new_tokens below the shortest schema-valid output
            log(f"sectune: held-out table: no {row_name!r} row ({e})")
    return rows
