"""Data families: one module per family, each turning files into plain records.

``sft_records(cfg)`` is the single place a training stage asks for prompt/completion pairs.
"""

from __future__ import annotations

import hashlib
import json
import numbers
from pathlib import Path

from omegaconf import DictConfig

from sectune.errors import ConfigError, DataError

SPLITS = ("train", "validation", "test")

#: the generated stand-ins this process has used for missing real data, in order: (dataset, path) pairs.
#: The runner records a run's share of them in result.json (``generated_data``), so a number computed on
#: generated data can never be read as a real-data result; the notice itself is printed once per path.
_GENERATED: list[tuple[str, str]] = []


def note_generated(dataset: str, path, notice: str) -> None:
    """A stand-in for missing real data was used: say so (once per path and process) and remember it."""
    key = (str(dataset), str(path))
    if key not in _GENERATED:
        print(notice)
    _GENERATED.append(key)


#: a folder of windows cut from generated stand-ins names them in this hidden file (the pipeline's held-out windows), so a
#: run that reads the folder (its infer step, or stage=infer on it alone) records them in its result.json too
GENERATED_NOTE = ".generated.json"


def write_generated_note(folder, generated: list[dict]) -> None:
    """:func:`generated_since`'s entries into ``folder``'s :data:`GENERATED_NOTE`; nothing for windows of real logs."""
    if generated:
        (Path(folder) / GENERATED_NOTE).write_text(json.dumps(generated, indent=1) + "\n", encoding="utf-8")


def note_generated_folder(folder) -> None:
    """Record (and say, once) the stand-ins ``folder``'s :data:`GENERATED_NOTE` names; a folder without one, nothing."""
    note = Path(folder) / GENERATED_NOTE
    if not note.is_file():
        return
    try:
        entries = [(str(e["dataset"]), str(e["path"])) for e in json.loads(note.read_text(encoding="utf-8"))]
    except (ValueError, TypeError, KeyError) as e:
        raise DataError(f"{note}: not a list of {{dataset, path}} objects ({type(e).__name__}: {e})") from None
    for dataset, path in entries:
        note_generated(dataset, path, f"sectune: {folder} holds windows cut from generated logs ({path}), not real ones")


def is_generated(path) -> bool:
    """Whether ``path`` is a stand-in this process generated for missing real data (:func:`note_generated`)."""
    return any(p == str(path) for _, p in _GENERATED)


def generated_mark() -> int:
    """A position in the record of generated stand-ins; :func:`generated_since` reads what came after it."""
    return len(_GENERATED)


def generated_since(mark: int) -> list[dict]:
    """The distinct generated stand-ins used since ``mark`` (a run's, its pipeline steps' included)."""
    seen = dict.fromkeys(_GENERATED[mark:])
    return [{"dataset": d, "path": p} for d, p in seen]


#: lines a reader skipped (dataset.skip_bad_lines), one entry per read: the runner records the count in result.json's
#: metrics for every stage (sft and dpo on injection files only said it: an audit, session 36)
_SKIPPED: list[int] = []


def note_skipped(n: int) -> None:
    _SKIPPED.append(int(n))


def skipped_mark() -> int:
    return len(_SKIPPED)


def skipped_since(mark: int) -> int:
    """The most lines one read skipped since ``mark`` (a file read twice in a run is not counted twice)."""
    return max(_SKIPPED[mark:], default=0)


def check_split_seed(seed) -> int:
    """``dataset.split_seed`` as an int numpy and scikit-learn accept (0 .. 2**32 - 1), else a ConfigError naming the key."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**32:
        raise ConfigError(f"dataset.split_seed={seed!r}: must be an integer in 0..{2**32 - 1} (it seeds numpy and scikit-learn)")
    return int(seed)


def check_count(value, key: str, what: str, error: type = ConfigError, optional: bool = True) -> None:
    """``value`` an integer >= 1 (or None when ``optional``), else ``error``: "<key>=<value>: must be a positive number of <what>"."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise error(f"{key}={value!r}: must be a positive number of {what}")


def source_tag(source_dir) -> str:
    """A short hash of ``source_dir``'s resolved path, for cache names built from it: another source, another folder."""
    return hashlib.sha256(str(Path(str(source_dir)).expanduser().resolve()).encode()).hexdigest()[:8]


def auth_logs_folder(cfg: DictConfig) -> Path:
    """``dataset.path`` as given, or the folder built from the real (or generated) logs."""
    from sectune.data import auth_logs

    d = cfg.dataset
    if d.path:
        return Path(d.path)
    # the source folder's hash in the name: two runs reading different source_dir never share a build
    out = Path(cfg.paths.cache_dir) / "datasets" / f"auth_logs-s{d.split_seed}-l{d.min_lines}-{d.max_lines}-src{source_tag(d.source_dir)}"
    info = auth_logs.ensure_auth_folder(out, Path(d.source_dir), seed=d.split_seed, min_lines=d.min_lines, max_lines=d.max_lines)
    if info.get("source") == "synthetic":
        note_generated(d.name, out, f"sectune: {d.source_dir} has no real auth logs; using generated logs in the same format ({out})")
    return out


def generated_auth_folder(cfg: DictConfig) -> Path:
    """``sft.warmup_lines`` generated auth-log lines cut into rule-annotated windows (``dataset.min_lines`` ..
    ``max_lines`` lines each), built once into the cache; no real log line is used."""
    from sectune.data import auth_logs
    from sectune.data.synthetic_auth import GENERATOR_VERSION

    d, w = cfg.dataset, cfg.sft
    # the generator's version in the name: a run's config (hence a warm-up's reuse digest) then changes with the lines
    fresh = bool(w.warmup_fresh_names)
    name = f"auth_logs-generated-n{w.warmup_lines}-s{w.warmup_seed}-l{d.min_lines}-{d.max_lines}-{GENERATOR_VERSION}{'-fresh' if fresh else ''}"
    out = Path(cfg.paths.cache_dir) / "datasets" / name
    # Every rank builds it, as auth_logs_folder's windows are: the build is seeded (the same folder on every rank), written
    # aside and renamed. Rank 0 alone building while the others waited at a barrier left them reading a folder not built
    # yet: the warm-up runs before Trainer starts the process group, so the barrier was a no-op (torchrun, cold cache).
    auth_logs.ensure_auth_folder(out, seed=int(w.warmup_seed), min_lines=d.min_lines, max_lines=d.max_lines,
                                 generated_lines=int(w.warmup_lines), fresh_names=fresh)
    return out


def sft_records(cfg: DictConfig) -> list[dict]:
    """Prompt/completion records (plus ``label`` for stratified splits) for ``dataset.name``."""
    name = cfg.dataset.name
    if name == "auth_logs":
        from sectune.data import auth_logs

        samples = auth_logs.load_auth_folder(auth_logs_folder(cfg), max_samples=cfg.dataset.max_samples)
        return [
            {"prompt": auth_logs.render_prompt(s.log_text), "completion": auth_logs.render_completion(s.analysis), "label": s.label, "id": s.id}
            for s in samples
        ]
    raise ConfigError(f"dataset={name} has no prompt/completion form for stage={cfg.stage.name}")


def preference_pairs(cfg: DictConfig) -> dict[str, list[dict]]:
    """train / validation / test chosen/rejected pairs: ``auth_preferences`` (corrupted analyses) or
    ``injection_preferences`` (SecAlign pairs on injected windows, :mod:`sectune.data.injection`)."""
    if cfg.dataset.name == "injection_preferences":
        from sectune.data.injection_pairs import injection_preference_splits

        return injection_preference_splits(cfg)
    from sectune.data.auth_preferences import preference_splits

    return preference_splits(cfg)


def warn_duplicates_across_splits(splits: dict, source: str, key=lambda r: r["raw_text"], what: str = "text") -> int:
    """Say how many validation/test rows repeat a training row exactly (its text; a flow's raw feature values; a log
    window; an injection triplet's input): a file of repeated rows reported test macro-F1 1.0 without a word, and those
    scores measure memory. Returns the count."""
    seen = {key(r) for r in splits["train"]}
    n = {s: sum(key(r) in seen for r in splits[s]) for s in ("validation", "test")}
    if n["validation"] or n["test"]:
        print(f"sectune: warning: {source}: {n['test']} of {len(splits['test'])} test and {n['validation']} of "
              f"{len(splits['validation'])} validation rows repeat a training row's {what} exactly; their scores measure "
              "memory (deduplicate the file to measure generalisation)")
    return n["validation"] + n["test"]


def warn_case_variants(labels, source: str) -> list[list[str]]:
    """Labels that differ only in case or surrounding space (``BENIGN`` and ``benign``) are separate classes to a
    classifier; say so, naming them (a file half upper-cased trained 6 classes for 3). Returns the groups."""
    by: dict[str, set] = {}
    for lab in set(map(str, labels)):
        by.setdefault(lab.strip().casefold(), set()).add(lab)
    clash = sorted(sorted(v) for v in by.values() if len(v) > 1)
    if clash:
        print(f"sectune: warning: {source}: labels that differ only in case are separate classes: "
              f"{'; '.join(' / '.join(map(repr, c)) for c in clash)} (write each class one way if they are one class)")
    return clash


def split_windows(ids_labels: list[tuple[str, str]], val_fraction: float, test_fraction: float, seed: int) -> dict[str, set[str]]:
    """Window ids → split, stratified by label where every class has enough windows; deterministic."""
    from sklearn.model_selection import train_test_split

    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise ConfigError(f"dataset.val_fraction={val_fraction} + dataset.test_fraction={test_fraction} must be in [0, 1)")
    check_split_seed(seed)
    ids = [i for i, _ in ids_labels]
    labels = [lab for _, lab in ids_labels]
    classes = {lab: labels.count(lab) for lab in dict.fromkeys(labels)}

    def too_few(left: int, part: str):
        # every class needs a training window; found here, not as a scikit-learn or trainer traceback later
        raise ConfigError(f"dataset.val_fraction={val_fraction}, dataset.test_fraction={test_fraction}: leave {left} of {len(ids)} "
                          f"windows for {part}, fewer than the {len(classes)} classes (windows per class: {classes}); "
                          "lower the fractions or add windows")

    def cut(items, labs, frac, part):
        if frac <= 0 or not items:
            return items, [], labs
        n = max(1, round(len(items) * frac))
        if n >= len(items):
            raise ConfigError(f"dataset: {len(items)} windows are too few for dataset.val_fraction={val_fraction}, "
                              f"dataset.test_fraction={test_fraction}; raise dataset.max_samples (or add windows) or lower the fractions")
        counts = {lab: labs.count(lab) for lab in set(labs)}
        strat = labs if min(counts.values()) >= 2 and len(counts) > 1 and n >= len(counts) else None
        if strat is not None and len(items) - n < len(counts):
            too_few(len(items) - n, part)
        rest, out, rest_l, _ = train_test_split(items, labs, test_size=n, random_state=seed, stratify=strat)
        return rest, out, rest_l

    rest, test, rest_l = cut(ids, labels, test_fraction, "training and validation" if val_fraction > 0 else "training")
    train, val, _ = cut(rest, rest_l, val_fraction / (1 - test_fraction) if test_fraction else val_fraction, "training")
    if len(train) < len(classes):
        too_few(len(train), "training")
    return {"train": set(train), "validation": set(val), "test": set(test)}


def sft_splits(cfg: DictConfig) -> dict[str, list[dict]]:
    """train / validation / test prompt-completion records. ``auth_logs`` is split by window with
    :func:`split_windows`, exactly as ``auth_preferences`` splits its pairs (same folder, fractions
    and ``dataset.split_seed`` → same windows), so a pipeline's SFT, reward, DPO and RL steps never
    train on the windows its held-out table is computed on."""
    spans, renamed = int(cfg.dataset.get("subwindows") or 0), int(cfg.dataset.get("counterfactuals") or 0)
    for key, n in (("subwindows", spans), ("counterfactuals", renamed)):
        if n and cfg.dataset.name != "auth_logs":
            raise ConfigError(f"dataset.{key}: only dataset=auth_logs makes extra windows, not dataset={cfg.dataset.name}")
        if n < 0:
            raise ConfigError(f"dataset.{key}={n}: must be >= 0")
    if cfg.dataset.name == "hdfs":  # split by session, anomalous sessions never trained on (sectune/data/hdfs.py)
        from sectune.data import hdfs

        return hdfs.sft_splits(cfg)
    if cfg.dataset.name == "injection_triplets":  # benign and (include_injected) injected windows, StruQ's adversarial SFT
        from sectune.data.injection_pairs import adversarial_sft_splits

        return adversarial_sft_splits(cfg)
    records = sft_records(cfg)
    d = cfg.dataset
    where = split_auth_windows([(r["id"], r["label"], text) for r, text in zip(records, window_texts(cfg, records))], d)
    splits = {s: [r for r in records if r["id"] in where[s]] for s in SPLITS}
    warn_duplicates_across_splits(splits, f"dataset={d.name} ({d.path or auth_logs_folder(cfg)})", key=lambda r: r["prompt"], what="log window")
    if spans > 0:
        splits["train"] = splits["train"] + _subwindow_records(splits["train"], spans, cfg)
    if renamed > 0:
        splits["train"] = splits["train"] + _counterfactual_records(splits["train"], renamed, cfg)
    return splits


def split_auth_windows(items: list[tuple[str, str, str]], d) -> dict[str, set[str]]:
    """Window ids → split as ``dataset.split_by`` asks (window | time | source): :mod:`sectune.data.window_splits`."""
    from sectune.data.window_splits import split_auth_windows as split

    return split(items, d)


def window_texts(cfg: DictConfig, records: list[dict]) -> list[str]:
    """Each record's log window, for ``dataset.split_by`` time or source (the window split needs none: empty strings)."""
    if (cfg.dataset.get("split_by") or "window") == "window":
        return [""] * len(records)
    from sectune.data import auth_logs

    text = {s.id: s.log_text for s in auth_logs.load_auth_folder(auth_logs_folder(cfg), max_samples=cfg.dataset.max_samples)}
    return [text[r["id"]] for r in records]


def _counterfactual_records(train: list[dict], k: int, cfg: DictConfig) -> list[dict]:
    """``k`` (``dataset.counterfactuals``) renamed copies of each training record's window (users, IPs, hosts, ports,
    pids, timestamps renamed one-to-one: :func:`sectune.data.log_edits.counterfactual_window`), annotated by the rule
    engine: the same evidence under names the model has not seen, so that copying a name out of the window pays and
    remembering the training logs' names does not (every benign window's host is Linux_2k's). Train split only."""
    import random

    from sectune.data.log_edits import counterfactual_window
    from sectune.models.reward_model import window_from_prompt

    rng = random.Random(f"{cfg.dataset.split_seed}:counterfactuals")
    return [_rules_record(counterfactual_window(window_from_prompt(r["prompt"]), rng), f"{r['id']}^{j}")
            for r in train for j in range(k)]


def _subwindow_records(train: list[dict], k: int, cfg: DictConfig) -> list[dict]:
    """``k`` (``dataset.subwindows``) extra training records per training window: spans of its lines,
    annotated by the rule engine (:func:`sectune.data.auth_logs.subwindows`). Train split only, so
    the validation and test windows stay exactly the windows every other stage holds out."""
    import random

    from sectune.data import auth_logs
    from sectune.models.reward_model import window_from_prompt

    rng = random.Random(int(cfg.dataset.split_seed))
    return [_rules_record(text, f"{r['id']}~{j}") for r in train
            for j, text in enumerate(auth_logs.subwindows(window_from_prompt(r["prompt"]), k, rng, int(cfg.dataset.min_lines)))]


def _rules_record(text: str, record_id: str) -> dict:
    """An extra SFT record made from a window's text: its prompt and the rule engine's analysis of it."""
    from sectune.data import auth_logs

    a = auth_logs.analyze_auth_log(text.splitlines())
    return {"prompt": auth_logs.render_prompt(text), "completion": auth_logs.render_completion(a), "label": a["verdict"], "id": record_id}


def held_out_windows(records: list[dict]) -> int:
    """Windows behind a split's records: adversarial SFT (``dataset=injection_triplets``) has a benign and an
    injected record per window; only the benign one (``kind``, absent elsewhere) is the window."""
    return len({r["id"] for r in records if r.get("kind", "benign") == "benign"})
