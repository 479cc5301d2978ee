"""The analyst's output path (seed 000's inference): log file(s) → one JSON analysis each, or one per window of a
long log (``infer.window_lines``, default ``dataset.max_lines``: the window length the analyst learnt from; each
record carries its ``lines``, and the console names each long file's most severe verdict and where it is).

    sectune stage=infer infer.model_dir=outputs/DATE/TIME infer.input_file=auth.log
    sectune stage=infer infer.model_dir=outputs/PIPELINE infer.input_file=logs/ infer.constrained=true

Read top to bottom: inputs (all checked before a model loads) → model (the first usable of
RL → DPO → SFT in ``infer.model_dir``, else the base model: seed 000's fallback chain) → prompts →
generation (batched, left padded, the ``generation`` node; with ``infer.constrained=true`` every
token is restricted to the schema, :mod:`sectune.models.constrained`) → parsing (``extract_json`` +
jsonschema; model output is parsed as data, never evaluated) → ``infer.output_file``, written to a
temporary name and renamed, so a file that is there is complete.

``infer.model_dir`` is a run dir (its ``result.json`` says stage sft, dpo or rl) or a pipeline dir
(one sub-dir per step: ``rl/``, ``dpo/``, ``sft/``, each a run dir). A step is usable when its
result.json says succeeded and the artifact it names is complete: ``adapter/`` with
``adapter_config.json`` and ``adapter_model.safetensors`` (loaded with plain
``PeftModel.from_pretrained`` on this run's ``model``), or full weights in ``model/``. When no step
is usable the base model answers with a warning (``infer.base_fallback=false``: an error); a
directory that is not a sectune run or pipeline is an error (the chain: :mod:`sectune.model_chain`).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from sectune import runner
from sectune.data import auth_logs
from sectune.errors import ConfigError
from sectune.inference import generate, parse_json_output, prompt_ids
from sectune.infer_inputs import (absent_names, cut_long_windows, file_lines, keep_previous, log_windows, output_path,
                                  read_inputs, resume_key, resumed, verdict_summaries, warn_unfamiliar_format)
from sectune.model_chain import ModelChoice, choose_model, load_model, run_generation
from sectune.models import modeling
from sectune.runner import RunContext, write_json_atomic
from sectune.training import distributed

#: windows generated per call: progress is said, and an interrupt keeps what was answered, this often
CHUNK = 256


def run(ctx: RunContext) -> dict:
    cfg, run_dir, ic = ctx.cfg, ctx.run_dir, ctx.cfg.infer
    if not distributed.is_main_process():  # no training to share: under torchrun (a pipeline's infer step) rank 0 answers
        return {"metrics": {}, "artifacts": {}}  # and writes alone (every rank wrote analyses.json, and moved the others')

    # 1. inputs and where the answers go: every bad input fails here, before a model loads
    if ic.model_dir is not None and Path(str(ic.model_dir)).expanduser().resolve() == run_dir.resolve():
        # (the runner's "running" result.json stood in for the model run's, which it puts back)
        raise ConfigError(f"hydra.run.dir is infer.model_dir ({run_dir}): the analyses go to a run dir of their own; "
                          "give another hydra.run.dir")
    if ic.input_file and ic.output_file:  # the next run read the answers as a log, then refused to replace them
        folder, out = (Path(str(v)).expanduser().resolve() for v in (ic.input_file, ic.output_file))
        if folder.is_dir() and out.parent == folder:
            raise ConfigError(f"infer.output_file={ic.output_file} lies in the folder infer.input_file={ic.input_file} reads: "
                              "the next run would read these answers as a log; write them elsewhere")
    files = read_inputs(ic.input_file)
    warn_unfamiliar_format(files)
    inputs = log_windows(files, cfg.dataset.max_lines if ic.window_lines is None else ic.window_lines)
    # a window far longer than the model reads is cut in its middle by characters before any tokenizer sees it: a 50 MB
    # log read whole took 9 GB tokenizing 17.8M tokens to keep 864 (input_cut marks it, as the token cut does)
    inputs, char_cut = cut_long_windows(inputs, 16 * int(cfg.model.max_seq_length))
    path = Path(str(ic.input_file)).expanduser()
    out_path = output_path(ic.output_file, run_dir, [path] if path.is_file() else [path / name for name, _ in files])
    validator = auth_logs._validator(ic.schema)
    # a pipeline's own infer step runs before its table is made (one there is an earlier run's)
    inside = ic.model_dir is not None and Path(str(ic.model_dir)).expanduser().resolve() == run_dir.resolve().parent
    choice = choose_model(ic.model_dir, base_fallback=ic.base_fallback, table=not inside)
    runner.refuse_non_analyst(choice, ic.model_dir)
    voters = [choice, *(choose_model(d, base_fallback=False, key="infer.vote_with") for d in ic.vote_with or ())]
    if len(voters) > 1:  # a vote of analysts (sectune/evaluation/vote.py): each answers in turn, the verdict most give is kept
        from sectune.evaluation import vote

        for d, c in zip(ic.vote_with, voters[1:]):
            runner.refuse_non_analyst(c, d, "infer.vote_with")
        vote.check_voters([str(ic.model_dir), *map(str, ic.vote_with)], voters, "infer")
        if "verdict" not in (validator.schema.get("properties") or {}):
            raise ConfigError(f"infer.vote_with: the analyses of infer.schema={ic.schema} have no verdict to vote on")
        if not vote.scalar_node(validator.schema["properties"]["verdict"]):  # a list verdict crashed after every voter answered
            raise ConfigError(f"infer.vote_with: the verdict of infer.schema={ic.schema} is not one value (a string, number or "
                              "boolean) that analysts could agree on")

    # 2.-4. model, prompts and generation, once per voter (one model in memory at a time)
    schema_text = json.dumps(validator.schema, separators=(",", ":")) if ic.full_schema else None
    prompts = [build_prompt(w.text, schema_text) for w in inputs]
    # (each voter's own .key: a name with an extension, also where infer.output_file has none)
    partials = [out_path.with_name(f"{out_path.stem}.partial{f'.voter{i + 1}' if i else ''}{out_path.suffix or '.json'}")
                for i in range(len(voters))]
    answered = [_answer(cfg, c, inputs, len(files), prompts, validator, char_cut, partial,
                        f" (voter {i + 1} of {len(voters)})" if len(voters) > 1 else "")
                for i, (c, partial) in enumerate(zip(voters, partials))]
    gen_s = sum(a[4] for a in answered)  # generation only, every voter's (not the models' loading)
    texts, stats, model_ref, done, _ = answered[0]
    if len(voters) > 1:
        def key(text):  # a schema-valid analysis votes for its verdict (this run's infer.schema); anything else for nothing
            rec = analyse("", "", text, validator)
            return rec["analysis"].get("verdict") if rec["schema_valid"] else None

        # each voter's, parsed once; a verdict the token budget's forced close wrote is no vote (the model never gave it)
        forced_verdicts = [set(a[1]["verdict_forced_rows"]) for a in answered]
        verdicts = [[None if i in fv else key(t) for i, t in enumerate(a[0])] for a, fv in zip(answered, forced_verdicts)]
        kept = [vote.winner(given) for given in zip(*verdicts)]
        texts = [answered[k][0][i] for i, k in enumerate(kept)]
        forced_by = [set(a[1]["forced_rows"]) for a in answered]
        # a window cut to fit for any voter (tokenizers differ) is marked and counted: before, the first voter's alone
        stats = {"truncated_rows": sorted(set().union(*(a[1]["truncated_rows"] for a in answered))),
                 "forced_rows": [i for i, k in enumerate(kept) if i in forced_by[k]],  # the kept answers'
                 "verdict_forced_rows": [i for i, k in enumerate(kept) if i in forced_verdicts[k]],
                 "forced": sum(len(a[1]["forced_rows"]) for a in answered) / len(voters),  # per voter, on average
                 "force_failures": sum(a[1].get("force_failures", 0) for a in answered),
                 "sampled": any(a[1].get("sampled") for a in answered)}
        done = sum(a[3] for a in answered) / len(voters)  # windows the vote had from interrupted runs, on average

    # 5. parse, check, write
    records = _records(inputs, texts, choice.used, validator, set(stats["truncated_rows"]), char_cut, set(stats["forced_rows"]),
                       set(stats["verdict_forced_rows"]))
    if len(voters) > 1:
        for i, rec in enumerate(records):
            rec.update(model_used=voters[kept[i]].used, kept_voter=kept[i], voter_verdicts=[v[i] for v in verdicts])
    previous = keep_previous(out_path)
    if previous is not None and (prev := runner.previous_result(run_dir, runner.PREVIOUS_RESULT_FILE)):
        if (prev.get("artifacts") or {}).get("output") == _relative(out_path, run_dir):  # it names its answers' new place
            prev["artifacts"]["output"] = _relative(previous, run_dir)
            write_json_atomic(run_dir / runner.PREVIOUS_RESULT_FILE, prev)
    write_json_atomic(out_path, runner.finite_json(records))
    stale = out_path.parent.glob(f"{out_path.stem}.partial.voter*")  # (and the voters of an earlier, larger vote's)
    for f in {*[p for partial in partials for p in (partial, partial.with_suffix(".key"))], *stale}:  # in analyses.json now
        f.unlink(missing_ok=True)
    n = len(records)
    ungrounded = sum(bool(r["absent_names"]) for r in records)
    if ungrounded:
        print(f"sectune: warning: infer: {ungrounded} of {n} analyses name an address, host or user their window does not "
              "hold (absent_names in each record): check them against the log before acting on them (infer.constrained=true "
              "with infer.grounded_fields=[source_ips.ip:address,invalid_users:user,targeted_users:user] allows only the "
              "window's own)")
    for line in verdict_summaries(records):
        print(f"sectune: infer: {line}")
    metrics = {
        "inputs": len(files),
        "windows": n,
        "json_valid_rate": sum(r["json_valid"] for r in records) / n,
        "schema_valid_rate": sum(r["schema_valid"] for r in records) / n,
        "repaired_rate": sum(r["repaired"] for r in records) / n,
        "analyses_per_s": (n - done) / gen_s if gen_s > 0 and n > done else None,  # this command's own (a vote: all voters')
        "generation_s": round(gen_s, 3),
        "constrained": int(bool(ic.constrained)),
        # whether the answers were sampled: infer decodes as the chosen run did (its generation.*), not as this command says
        "sampled": int(bool(stats.get("sampled"))),
        # windows longer than model.max_seq_length (or far longer, cut by characters first): their middle cut
        "truncated_prompts": len(set(stats["truncated_rows"]) | char_cut),
        "absent_names_rate": ungrounded / n,
        # what was read, so that an analysis can be matched with the version of the log it came from
        "input_lines": sum(len(file_lines(text)) for _, text in files),
        "input_sha256": hashlib.sha256("".join(f"{name}\0{text}\0" for name, text in files).encode("utf-8", "surrogateescape")).hexdigest(),
    }
    if len(voters) > 1:
        metrics["voters"] = len(voters)
    if ic.constrained:
        # outputs the token budget closed (the model had not closed them itself by then; forced_close in each record), the
        # windows of an interrupted run's answers too (they counted 0 before session 32); a vote: per voter, on average
        metrics["forced_close_rate"] = stats["forced"] / n if len(voters) > 1 else len(stats["forced_rows"]) / n
        # ... and of those, the answers whose verdict the close wrote (the schema's shortest: "benign"): no verdict of the
        # model's own (verdict_forced in each record; the per-file summary does not count it as a verdict)
        metrics["forced_verdict_rate"] = len(stats["verdict_forced_rows"]) / n
        if stats["verdict_forced_rows"]:
            print(f"sectune: warning: infer: {len(stats['verdict_forced_rows'])} of {n} answers ran out of generation.max_new_tokens "
                  "before their verdict: the forced close wrote one the model never gave (verdict_forced in each record); raise "
                  "generation.max_new_tokens")
        if stats.get("force_failures"):
            print(f"sectune: warning: {stats['force_failures']} forced close(s) disagreed with the grammar; those outputs "
                  "were left to the grammar alone and may have run out of generation.max_new_tokens")
    print(
        f"sectune: infer: {n} analyses ({f'a vote of {len(voters)}' if len(voters) > 1 else choice.used}"
        f"{', constrained' if ic.constrained else ''}) · "
        f"JSON {sum(r['json_valid'] for r in records)}/{n} · schema-valid {sum(r['schema_valid'] for r in records)}/{n} · "
        f"repaired {sum(r['repaired'] for r in records)} · {metrics['analyses_per_s'] or 0:.2f}/s → {out_path}"
    )
    artifacts = {"model": model_ref, "output": _relative(out_path, run_dir)}
    if len(voters) > 1:
        artifacts["voters"] = [a[2] for a in answered]
    return {"metrics": metrics, "artifacts": artifacts}


def _answer(cfg, choice: ModelChoice, inputs, n_files: int, prompts: list[str], validator, char_cut: set, partial: Path,
            who: str = ""):
    """(texts, generation stats, model reference, windows resumed, generation seconds) of one analyst: loaded, answering
    ``prompts`` in chunks (an interrupt keeps what was answered in ``partial``, and the same command resumes from it), freed."""
    ic = cfg.infer
    gen_cfg = run_generation(cfg, choice)
    model, tokenizer, model_ref = load_model(cfg, choice)
    print(f"sectune: infer: {n_files} input(s){f' in {len(inputs)} windows' if len(inputs) > n_files else ''}, "
          f"answered by {choice.describe(model_ref)}{who}")
    for why in choice.skipped:
        print(f"sectune: warning: infer: skipped {why}")
    if choice.used == "base":
        print(f"sectune: warning: {f'no usable rl/dpo/sft model in {ic.model_dir}' if ic.model_dir is not None else 'infer.model_dir is not set'}; "
              "the base model answers, untrained for this task")
    limit = cfg.model.max_seq_length
    too_long = sum(len(ids) + gen_cfg.max_new_tokens > limit for ids in prompt_ids(tokenizer, prompts))
    if too_long:
        print(f"sectune: warning: {too_long} prompt(s) plus generation.max_new_tokens exceed model.max_seq_length={limit}")
    constraint = None
    if ic.constrained:
        from sectune.models.constrained import SchemaConstraint

        constraint = SchemaConstraint.from_config(cfg, tokenizer, model)
        if not constraint.budget_enforced:
            print("sectune: warning: the schema uses keywords beyond sectune's completion logic: every token is "
                  "still constrained, but an output that runs out of generation.max_new_tokens stays unclosed "
                  "and uniqueItems is checked only afterwards")
    stats: dict = {"truncated_rows": [], "sampled": bool(gen_cfg.do_sample)}  # as decoded: the run's saved settings count
    t0 = time.perf_counter()
    key = resume_key(choice, model_ref, gen_cfg, ic, prompts, int(cfg.model.max_seq_length), validator.schema)
    done = resumed(partial, key, len(prompts))
    texts: list[str] = [r["generated"] for r in done]
    stats["truncated_rows"] = [i for i, r in enumerate(done) if r.get("input_cut")]
    stats["forced_rows"] = [i for i, r in enumerate(done) if r.get("forced_close")]
    stats["verdict_forced_rows"] = [i for i, r in enumerate(done) if r.get("verdict_forced")]
    try:  # in chunks: a long log's progress is said, and an interrupt keeps the windows answered so far
        for start in range(len(texts), len(prompts), CHUNK):
            part: dict = {}
            texts += generate(model, tokenizer, prompts[start:start + CHUNK], gen_cfg, batch_size=ic.batch_size,
                              constraint=constraint, stats=part, max_seq_length=int(cfg.model.max_seq_length),
                              contexts=[w.text for w in inputs[start:start + CHUNK]])
            stats["truncated_rows"] += [start + i for i in part.pop("truncated_rows", ())]
            stats["forced_rows"] += [start + i for i in part.pop("forced_rows", ())]
            stats["verdict_forced_rows"] += [start + i for i in part.pop("verdict_forced_rows", ())]
            for k, v in part.items():
                stats[k] = stats.get(k, 0) + v
            if len(prompts) > CHUNK:
                print(f"sectune: infer: {len(texts)}/{len(prompts)} windows answered ({time.perf_counter() - t0:.0f} s){who}")
    except KeyboardInterrupt:
        if texts:
            write_json_atomic(partial, runner.finite_json(_records(inputs[: len(texts)], texts, choice.used, validator,
                                                                   set(stats["truncated_rows"]), char_cut, set(stats["forced_rows"]),
                                                                   set(stats["verdict_forced_rows"]))))
            write_json_atomic(partial.with_suffix(".key"), {"resume_key": key})
            print(f"sectune: infer: interrupted: the {len(texts)} of {len(prompts)} windows answered so far are in {partial}; "
                  "the same command answers the rest")
        raise
    gen_s = time.perf_counter() - t0
    if who and len(done) < len(prompts):  # a voter's answers, kept until the vote is written (the next voter may be interrupted)
        write_json_atomic(partial, runner.finite_json(_records(inputs, texts, choice.used, validator, set(stats["truncated_rows"]), char_cut,
                                                               set(stats["forced_rows"]), set(stats["verdict_forced_rows"]))))
        write_json_atomic(partial.with_suffix(".key"), {"resume_key": key})
    del model, constraint
    modeling.release_memory()
    return texts, stats, model_ref, len(done), gen_s


def _records(inputs, texts, used: str, validator, cut: set, char_cut: set, forced: set = frozenset(),
             verdict_forced: set = frozenset()) -> list[dict]:
    """One record per window: the parsed answer, its lines, whether the window was cut to fit (``input_cut``), whether
    the token budget closed the answer (``forced_close``, constrained decoding) and wrote its verdict (``verdict_forced``),
    and the names it gives that the window does not hold (``absent_names``)."""
    records = []
    for i, (w, text) in enumerate(zip(inputs, texts)):
        rec = {**analyse(w.name, used, text, validator), "lines": [w.first, w.last], "input_cut": i in cut or i in char_cut,
               "forced_close": i in forced, "verdict_forced": i in verdict_forced}
        rec["absent_names"] = absent_names(rec["analysis"], w.text)
        records.append(rec)
    return records


def build_prompt(log_text: str, schema_text: str | None = None) -> str:
    """The SFT prompt (``render_prompt``); with the schema (``infer.full_schema``) before the logs."""
    prompt = auth_logs.render_prompt(log_text)
    if schema_text is None:
        return prompt
    head, sep, rest = prompt.partition("### Logs:")
    if not sep:
        return f"### Schema:\n{schema_text}\n{prompt}"
    return f"{head}### Schema:\n{schema_text}\n{sep}{rest}"


# ----------------------------------------------------------------------------- parsing
def analyse(name: str, used: str, text: str, validator) -> dict:
    """One output record. The text is parsed as JSON (repaired where possible), never evaluated."""
    rec = {"input": name, "model_used": used, "analysis": None, "json_valid": False, "schema_valid": False,
           "repaired": False, "error": None, "generated": text}
    try:
        obj, repaired = parse_json_output(text)
    except ValueError as e:
        rec["error"] = str(e)
        return rec
    rec.update(analysis=obj, json_valid=True, repaired=repaired)
    errors = sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        first = errors[0]
        where = "/".join(map(str, first.absolute_path)) or "<root>"
        more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
        rec["error"] = f"schema: {where}: {first.message}{more}"
    else:
        rec["schema_valid"] = True
    return rec


def _relative(path: Path, run_dir: Path) -> str:
    try:
        return str(path.resolve().relative_to(run_dir.resolve()))
    except ValueError:
        return str(path.resolve())
