"""The analyst's output path (seed 000's inference): log file(s) → one JSON analysis each, or one per window of a
long log (``infer.window_lines``, default ``dataset.max_lines``: the window length the analyst learnt from; each
record carries its ``lines``, and the console names each long file's most severe verdict and where it is).

    sectune stage=infer infer.model_dir=outputs/DATE/TIME infer.input_file=auth.log
    sectune stage=infer infer.model_dir=outputs/PIPELINE infer.input_file=logs/ infer.constrained=true

Read top to bottom: inputs (all checked before a model loads) → model (the first usable of
RL → DPO → SFT in ``infer.model_dir``, else the base model: seed 000's fallback chain) → prompts →
generation (batched, left padded, the ``generation`` node; with ``infer.constrained=true`` every
token is restricted to the schema, :mod:`sectune.constrained`) → parsing (``extract_json`` +
jsonschema; model output is parsed as data, never evaluated) → ``infer.output_file``, written to a
temporary name and renamed, so a file that is there is complete.

``infer.model_dir`` is a run dir (its ``result.json`` says stage sft, dpo or rl) or a pipeline dir
(one sub-dir per step: ``rl/``, ``dpo/``, ``sft/``, each a run dir). A step is usable when its
result.json says succeeded and the artifact it names is complete: ``adapter/`` with
``adapter_config.json`` and ``adapter_model.safetensors`` (loaded with plain
``PeftModel.from_pretrained`` on this run's ``model``), or full weights in ``model/``. When no step
is usable the base model answers with a warning (``infer.base_fallback=false``: an error); a
directory that is not a sectune run or pipeline is an error.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from sectune import checkpoints, modeling
from sectune.data import auth_logs
from sectune.errors import ConfigError, DataError, first_line
from sectune.inference import generate, parse_json_output
from sectune.runner import RESULT_FILE, RunContext, write_json_atomic

#: the steps whose models can answer, in order of preference (the newest stage of a pipeline first)
CHAIN = ("rl", "dpo", "sft")
DEFAULT_OUTPUT = "analyses.json"


def run(ctx: RunContext) -> dict:
    cfg, run_dir, ic = ctx.cfg, ctx.run_dir, ctx.cfg.infer

    # 1. inputs and where the answers go: every bad input fails here, before a model loads
    files = read_inputs(ic.input_file)
    inputs = log_windows(files, cfg.dataset.max_lines if ic.window_lines is None else ic.window_lines)
    out_path = output_path(ic.output_file, run_dir)
    validator = auth_logs._validator(ic.schema)
    choice = choose_model(ic.model_dir, base_fallback=ic.base_fallback)

    # 2. model
    model, tokenizer, model_ref = load_model(cfg, choice)
    split = len(inputs) - len(files)
    print(f"sectune: infer: {len(files)} input(s){f' in {len(inputs)} windows' if split else ''}, answered by {choice.describe(model_ref)}")
    for why in choice.skipped:
        print(f"sectune: infer: skipped {why}")
    if choice.used == "base":
        print(f"sectune: warning: {f'no usable rl/dpo/sft model in {ic.model_dir}' if ic.model_dir is not None else 'infer.model_dir is not set'}; "
              "the base model answers, untrained for this task")

    # 3. prompts
    schema_text = json.dumps(validator.schema, separators=(",", ":")) if ic.full_schema else None
    prompts = [build_prompt(w.text, schema_text) for w in inputs]
    limit = cfg.model.max_seq_length
    too_long = sum(len(ids) + cfg.generation.max_new_tokens > limit for ids in tokenizer(prompts)["input_ids"])
    if too_long:
        print(f"sectune: warning: {too_long} prompt(s) plus generation.max_new_tokens exceed model.max_seq_length={limit}")

    # 4. generation
    constraint = None
    if ic.constrained:
        from sectune.constrained import SchemaConstraint

        constraint = SchemaConstraint.for_model(tokenizer, model, validator.schema)
        if not constraint.budget_enforced:
            print("sectune: warning: the schema uses keywords beyond sectune's completion logic: every token is "
                  "still constrained, but an output that runs out of generation.max_new_tokens stays unclosed "
                  "and uniqueItems is checked only afterwards")
    stats: dict = {}
    t0 = time.perf_counter()
    texts = generate(model, tokenizer, prompts, cfg.generation, batch_size=ic.batch_size, constraint=constraint, stats=stats,
                     max_seq_length=int(cfg.model.max_seq_length))
    gen_s = time.perf_counter() - t0

    # 5. parse, check, write
    records = [{**analyse(w.name, choice.used, text, validator), "lines": [w.first, w.last]} for w, text in zip(inputs, texts)]
    write_json_atomic(out_path, records)
    n = len(records)
    for line in verdict_summaries(records):
        print(f"sectune: infer: {line}")
    metrics = {
        "inputs": len(files),
        "windows": n,
        "json_valid_rate": sum(r["json_valid"] for r in records) / n,
        "schema_valid_rate": sum(r["schema_valid"] for r in records) / n,
        "repaired_rate": sum(r["repaired"] for r in records) / n,
        "analyses_per_s": n / gen_s if gen_s > 0 else None,
        "generation_s": round(gen_s, 3),
        "constrained": int(bool(ic.constrained)),
        "truncated_prompts": stats.get("truncated", 0),  # windows longer than model.max_seq_length: their middle cut
    }
    if constraint is not None:
        # outputs the token budget closed (the model had not closed them itself by then)
        metrics["forced_close_rate"] = stats.get("forced", 0) / n
        if stats.get("force_failures"):
            print(f"sectune: warning: {stats['force_failures']} forced close(s) disagreed with the grammar; those outputs "
                  "were left to the grammar alone and may have run out of generation.max_new_tokens")
    print(
        f"sectune: infer: {n} analyses ({choice.used}{', constrained' if ic.constrained else ''}) · "
        f"JSON {sum(r['json_valid'] for r in records)}/{n} · schema-valid {sum(r['schema_valid'] for r in records)}/{n} · "
        f"repaired {sum(r['repaired'] for r in records)} · {metrics['analyses_per_s'] or 0:.2f}/s → {out_path}"
    )
    return {"metrics": metrics, "artifacts": {"model": model_ref, "output": _relative(out_path, run_dir)}}


# ----------------------------------------------------------------------------- inputs
def read_inputs(input_file) -> list[tuple[str, str]]:
    """(file name, text) for one log file or each regular file of a folder (sorted, not recursive,
    hidden files skipped); every unusable input is a DataError naming it."""
    if not input_file:
        raise ConfigError("stage=infer needs infer.input_file=<a log file or a folder of log files>")
    path = Path(str(input_file)).expanduser()
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.is_file() and not f.name.startswith("."))
        if not files:
            raise DataError(f"infer.input_file={input_file}: the folder holds no log files")
        # a folder such as /var/log holds rotated, compressed logs beside the text ones: those are skipped, named
        texts, skipped = [], []
        for f in files:
            try:
                texts.append((f.name, read_log(f)))
            except DataError as e:
                if "binary file" not in str(e):
                    raise
                skipped.append(f.name)
        if skipped:
            print(f"sectune: infer: skipped {len(skipped)} binary file(s) in {path} (compressed or not text): "
                  f"{', '.join(skipped[:5])}{' …' if len(skipped) > 5 else ''}")
        if not texts:
            raise DataError(f"infer.input_file={input_file}: the folder holds no text log files (every file is binary)")
        return texts
    if path.is_file():
        return [(path.name, read_log(path))]
    if path.exists():
        raise DataError(f"infer.input_file={input_file}: not a regular file or a folder")
    raise DataError(f"infer.input_file={input_file}: no such file or folder")


@dataclass(frozen=True)
class LogWindow:
    name: str  # the file's name
    text: str
    first: int  # 1-based line numbers in the file, blank lines counted
    last: int


def log_windows(files: list[tuple[str, str]], window_lines: int) -> list[LogWindow]:
    """Each file whole, or, past ``window_lines`` non-blank lines (> 0), cut into the fewest consecutive windows
    of at most that many lines, of near-equal length (2,000 lines by 20: 100 windows of 20; 45 by 20: 3 of 15),
    so that no window is much shorter than the ones the analyst learnt from."""
    out = []
    for name, text in files:
        lines = [(i, line) for i, line in enumerate(text.splitlines(), 1) if line.strip()]
        if window_lines <= 0 or len(lines) <= window_lines:
            out.append(LogWindow(name, text, lines[0][0], lines[-1][0]))
            continue
        k = -(-len(lines) // window_lines)
        bounds = [round(j * len(lines) / k) for j in range(k + 1)]
        for a, b in zip(bounds, bounds[1:]):
            chunk = lines[a:b]
            out.append(LogWindow(name, "\n".join(line for _, line in chunk) + "\n", chunk[0][0], chunk[-1][0]))
    return out


def verdict_summaries(records: list[dict]) -> list[str]:
    """One line per file cut into windows: its windows' verdicts, and where the most severe one is."""
    by_file: dict[str, list[dict]] = {}
    for r in records:
        by_file.setdefault(r["input"], []).append(r)
    out = []
    for name, recs in by_file.items():
        if len(recs) < 2:
            continue
        verdicts = [r["analysis"].get("verdict") if r["schema_valid"] else None for r in recs]
        counts = {v: verdicts.count(v) for v in auth_logs.CLASSES[::-1] if v in verdicts}
        worst = next(iter(counts), None)
        where = [f"{r['lines'][0]}-{r['lines'][1]}" for r, v in zip(recs, verdicts) if v == worst]
        unread = verdicts.count(None)
        parts = [f"{v} {c}" for v, c in counts.items()] + ([f"no schema-valid verdict {unread}"] if unread else [])
        out.append(f"{name}: {len(recs)} windows · " + ", ".join(parts)
                   + (f" · {worst} at lines {', '.join(where[:5])}{' …' if len(where) > 5 else ''}" if worst else ""))
    return out


def read_log(path: Path) -> str:
    """A log file's text. Bytes that are not UTF-8 (a user name an attacker typed in Latin-1, say) become U+FFFD
    with a warning naming their lines: one such byte must not keep a whole log from being analysed."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    if b"\x00" in data:
        raise DataError(f"{path}: binary file (NUL bytes); infer reads text log files")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        lines = [n for n, raw in enumerate(data.splitlines(), 1) if not _utf8(raw)]
        print(f"sectune: infer: warning: {path.name}: {len(lines)} line(s) not UTF-8 (line {', '.join(map(str, lines[:5]))}"
              f"{' …' if len(lines) > 5 else ''}); their bad bytes read as U+FFFD")
        text = data.decode("utf-8-sig", errors="replace")
    if not text.strip():
        raise DataError(f"{path}: empty log file")
    return text


def _utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def output_path(output_file, run_dir: Path) -> Path:
    if output_file:
        path = Path(str(output_file)).expanduser()
        if path.is_dir():
            raise ConfigError(f"infer.output_file={output_file}: is a folder; give a file name (e.g. {path / DEFAULT_OUTPUT})")
        parent = next(p for p in path.absolute().parents if p.exists())  # the folders below it are created
        if not parent.is_dir():
            raise ConfigError(f"infer.output_file={output_file}: {parent} is a file, not a folder")
        return path
    # a rerun in this dir replaces an earlier run's answers only when it has new ones (written atomically at the end);
    # if it fails first, the earlier answers and result.json stay (runner.run)
    return run_dir / DEFAULT_OUTPUT


def build_prompt(log_text: str, schema_text: str | None = None) -> str:
    """The SFT prompt (``render_prompt``); with the schema (``infer.full_schema``) before the logs."""
    prompt = auth_logs.render_prompt(log_text)
    if schema_text is None:
        return prompt
    head, sep, rest = prompt.partition("### Logs:")
    if not sep:
        return f"### Schema:\n{schema_text}\n{prompt}"
    return f"{head}### Schema:\n{schema_text}\n{sep}{rest}"


# ----------------------------------------------------------------------------- the model chain
@dataclass
class ModelChoice:
    #: rl | dpo | sft | base
    used: str
    #: the adapter or full-model folder; None for the base model
    path: Path | None = None
    #: adapter | model | base
    kind: str = "base"
    #: "<step>: why it was not used", for each preferred step passed over
    skipped: list[str] = field(default_factory=list)

    def describe(self, model_ref: str) -> str:
        if self.kind == "base":
            return f"the base model ({model_ref})"
        return f"the {self.used} {'adapter' if self.kind == 'adapter' else 'model'} at {self.path}"


def choose_model(model_dir, base_fallback: bool = True, key: str = "infer.model_dir") -> ModelChoice:
    """The first usable of RL → DPO → SFT in ``model_dir`` (a run or pipeline dir), else the base.
    ``key``: the setting ``model_dir`` came from, as errors name it."""
    if model_dir is None:  # nothing trained was named: the configured base model, untrained for this task
        if not base_fallback:
            raise ConfigError(f"{key} is not set and infer.base_fallback=false: only the base model could answer; give "
                              f"{key}=<an sft, dpo or rl run dir or a pipeline dir>")
        return ModelChoice("base")
    root = Path(str(model_dir)).expanduser()
    if not root.is_dir():
        raise ConfigError(f"{key}={model_dir}: " + ("a file, not a run directory" if root.exists() else "no such directory"))
    result = _read_result(root)
    stage = (result or {}).get("stage")
    if stage in CHAIN:
        candidates = [(stage, root)]
    elif stage == "pipeline" or (result is None and any((root / s / RESULT_FILE).is_file() for s in CHAIN)):
        candidates = [(s, root / s) for s in CHAIN]
    elif result is None:
        raise ConfigError(f"{key}={model_dir}: no {RESULT_FILE} there; point it at an sft, dpo or rl run dir or a pipeline dir")
    else:
        raise ConfigError(f"{key}={model_dir}: a stage={stage} run holds no model to answer with; point it at an sft, dpo or rl run dir or a pipeline dir")
    skipped = []
    for step, step_dir in candidates:
        why, path, kind = _usable(step, step_dir)
        if why is None:
            return ModelChoice(step, path, kind, skipped)
        skipped.append(f"{step}: {why}")
    if not base_fallback:
        raise ConfigError(f"{key}={model_dir}: no usable model ({'; '.join(skipped)}) and infer.base_fallback=false")
    return ModelChoice("base", skipped=skipped)


def _read_result(run_dir: Path) -> dict | None:
    path = run_dir / RESULT_FILE
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(result, dict):
        raise ConfigError(f"{path}: not a sectune result (a JSON {type(result).__name__}, not an object)")
    return result


def _usable(step: str, run_dir: Path) -> tuple[str | None, Path | None, str]:
    """(why not, or None; the model folder; adapter | model) for one step's run dir."""
    if not run_dir.is_dir():
        return f"no {run_dir.name}/ step", None, ""
    result = _read_result(run_dir)
    if result is None:
        return f"no {RESULT_FILE}", None, ""
    if result.get("stage") != step:
        return f"{RESULT_FILE} says stage={result.get('stage')!r}", None, ""
    if result.get("status") != "succeeded":
        error = f": {result['error']}" if result.get("error") else ""
        return f"the run did not succeed (status {result.get('status')!r}{error})", None, ""
    if result.get("reused_from"):  # a sweep job that reused another run (sweep.skip_done): that run must still be it
        source = _read_result(Path(str(result["reused_from"])))
        if not source or source.get("status") != "succeeded" or source.get("config_digest") != result.get("config_digest"):
            return f"it reused {result['reused_from']}, which now holds another run (or none)", None, ""
    artifacts = result.get("artifacts") or {}
    if not isinstance(artifacts, dict):
        return f"{RESULT_FILE}'s artifacts is not an object", None, ""
    if artifacts.get("adapter"):
        rel = artifacts["adapter"]
        folder = run_dir / rel
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            if not (folder / name).is_file():
                return f"{rel}/{name} missing", None, ""
        if (damage := checkpoints.damaged_safetensors(folder)) is not None:
            return f"{rel}/{damage[0]} is damaged ({damage[1]})", None, ""
        try:
            if not isinstance(json.loads((folder / "adapter_config.json").read_text()), dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:  # was a JSONDecodeError traceback naming no file
            return f"{rel}/adapter_config.json is damaged ({type(e).__name__}: {e})", None, ""
        if isinstance(base := artifacts.get("base_model"), str) and base:  # the weights the adapter sits on (an SFT's)
            if not (run_dir / base / "config.json").is_file():
                return f"its base model {base}/config.json is missing", None, ""
            if (damage := checkpoints.damaged_safetensors(run_dir / base)) is not None:
                return f"its base model {base}/{damage[0]} is damaged ({damage[1]})", None, ""
        return None, folder, "adapter"
    if artifacts.get("model"):
        rel = artifacts["model"]
        folder = run_dir / rel
        if not (folder / "config.json").is_file():
            return f"{rel}/config.json missing", None, ""
        if not any(folder.glob("*.safetensors")):
            return f"{rel}/*.safetensors missing", None, ""
        if (damage := checkpoints.damaged_safetensors(folder)) is not None:
            return f"{rel}/{damage[0]} is damaged ({damage[1]})", None, ""
        return None, folder, "model"
    return f"{RESULT_FILE} names no adapter or model artifact", None, ""


def load_model(cfg, choice: ModelChoice):
    """(model on the run's device in eval mode, tokenizer, the adapter/model folder or base path)."""
    base = modeling.adapter_base(choice.path, cfg) if choice.kind == "adapter" else modeling.model_path(cfg)
    if choice.kind == "model":
        model = modeling.load_model(cfg, path=str(choice.path))
        ref = str(choice.path)
    else:
        model = modeling.load_model(cfg, path=base)
        ref = base
        if choice.kind == "adapter":
            from peft import PeftModel

            trained_on = json.loads((choice.path / "adapter_config.json").read_text()).get("base_model_name_or_path")
            if trained_on and not _same_model(trained_on, base):
                print(f"sectune: warning: the {choice.used} adapter was trained on {trained_on}; loading it on "
                      f"model={cfg.model.name} ({base})")
            try:
                model = PeftModel.from_pretrained(model, str(choice.path))
            except Exception as e:  # noqa: BLE001 - any load failure is the same user error: this adapter, this model
                first = first_line(e)
                raise ConfigError(f"cannot load the {choice.used} adapter in {choice.path} onto model={cfg.model.name} "
                                  f"({type(e).__name__}: {first})") from None
            ref = str(choice.path)
    tokenizer = modeling.tokenizer_for(cfg, choice.path, base)
    model = modeling.to_run_device(model, cfg)
    model.eval()
    return model, tokenizer, ref


def _same_model(a: str, b: str) -> bool:
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return a == b


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
