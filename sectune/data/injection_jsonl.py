"""``dataset=injection_triplets`` from a user's JSONL (:func:`read_jsonl_triplets`): triplet lines (``benign``,
``benign_cf``, ``injection``, ``output``, …) or prompt/answer lines, which :func:`generic_triplets` turns into
triplets; each line checked, a bad one named by file and line. The builder from the auth logs is
:mod:`sectune.data.injection`."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from omegaconf import DictConfig

from sectune.data import SPLITS, split_windows, warn_duplicates_across_splits
from sectune.data.injection import FORMATS, GENERIC_TARGET, _pick_text, _read_jsonl, _texts_by_split, _with_prompts
from sectune.data.jsonl import given_splits, json_lines
from sectune.data.log_edits import counterfactual_window
from sectune.errors import ConfigError, DataError

_TRIPLET_KEYS = ("benign", "benign_cf", "injection", "output")
_ANSWER_KEYS = ("answer", "completion", "output", "response")


def generic_answer(obj: dict) -> str:
    """A prompt/answer line's answer: the first of :data:`_ANSWER_KEYS` that is a non-empty string, as the reader checks
    (an empty "answer" beside a "completion" was taken: the expected answer became "", an audit, session 36)."""
    return next(obj[k] for k in _ANSWER_KEYS if isinstance(obj.get(k), str) and obj[k].strip())


def _check_triplet(obj: dict) -> str | None:
    bad = [k for k in _TRIPLET_KEYS if not isinstance(obj.get(k), str) or not obj[k].strip()]
    if bad:
        return f"missing or non-string {', '.join(bad)} (each triplet needs {', '.join(_TRIPLET_KEYS)})"
    # injection_output 12 (or true) passed here and stopped SFT with a TypeError; a target may be a number (a label)
    if obj.get("injection_output") is not None and not isinstance(obj["injection_output"], str):
        return f"injection_output must be a string (the expected answer to the injected input), not {type(obj['injection_output']).__name__}"
    target = obj.get("attack_target")
    if target is not None and (isinstance(target, bool) or not isinstance(target, (str, int))):
        return f"attack_target must be a string or an integer (the answer the attacker wants), not {type(target).__name__}"
    why = _check_common(obj)
    if why:
        return why
    if obj.get("format", "auth_log") not in FORMATS:
        return f"format={obj['format']!r}: choose {', '.join(FORMATS)}"
    if obj.get("format", "auth_log") == "auth_log":  # scored and turned into preference pairs as analyses
        for k in ("output", "injection_output"):
            if isinstance(obj.get(k), str):
                why = _analysis_error(obj[k])
                if why:
                    return f"{k} is not an analysis of the window ({why}); an auth_log triplet's outputs are the JSON analyses the rules write"
        from sectune.data.auth_rules import CLASSES

        # the targeted rate compares it with the answer's verdict exactly: "Benign" made every window a targeted trial
        # that never succeeded (a targeted rate of 0, read as robustness)
        if obj.get("attack_target") is not None and obj["attack_target"] not in CLASSES:
            return f"attack_target={obj['attack_target']!r}: an auth_log triplet's target is a verdict, one of {', '.join(CLASSES)}"
    return None


def _analysis_error(text: str) -> str | None:
    """Why ``text`` is not an analysis the attack scoring and the preference pairs can read (a JSON object with a
    verdict; the other keys are optional there), or None."""
    from sectune.data.auth_rules import CLASSES

    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return f"not JSON: {e.msg} at column {e.colno}"
    except (ValueError, RecursionError) as e:  # an integer past Python's digit limit; nesting past the recursion limit
        return f"not readable JSON ({type(e).__name__})"
    if not isinstance(obj, dict):
        return f"a JSON {type(obj).__name__}, not an object"
    if obj.get("verdict") not in CLASSES:
        return f"verdict={obj.get('verdict')!r}: one of {', '.join(CLASSES)} needed"
    return None


def _check_common(obj: dict) -> str | None:
    """The optional keys both kinds of line share."""
    if obj.get("id") is not None and (isinstance(obj["id"], bool) or not isinstance(obj["id"], (str, int))):
        return "id must be a string or an integer"
    if obj.get("split") not in (None, *SPLITS):
        return f"split={obj['split']!r}: choose {', '.join(SPLITS)}"
    return None


def _check_prompt_answer(obj: dict) -> str | None:
    if not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
        return "missing or non-string prompt"
    if not any(isinstance(obj.get(k), str) and obj[k].strip() for k in _ANSWER_KEYS):
        return f"missing or empty answer (one of {', '.join(_ANSWER_KEYS)} as a non-empty string)"
    return _check_common(obj)


def _verdict(text: str) -> str:
    try:
        return str(json.loads(text).get("verdict") or "")
    except (ValueError, RecursionError, AttributeError):
        return ""


def _first_object(path: Path) -> dict:
    """The file's first line that parses as a JSON object ({} when none does, or the file is absent): the
    kind of file is read from its keys. Bad lines are left to :func:`_read_jsonl`, which names them."""
    if not path.is_file():
        return {}
    return next((obj for _, obj, _why in json_lines(path) if isinstance(obj, dict)), {})


def read_jsonl_triplets(cfg: DictConfig, path: Path) -> tuple[list[dict], dict]:
    """A JSONL of triplets (``benign``, ``benign_cf``, ``injection``, ``output``; optional
    ``injection_output`` (default ``output``), ``attack_target``, ``id``, ``split``, ``format``) or of
    prompt/answer pairs (the generic builder, :func:`generic_triplets`). The kind is read from the
    keys of the first line that is a JSON object (a ``benign`` key: triplets; else a ``prompt`` key:
    prompt/answer pairs). Lines without ``split`` are split by benign input with ``split_windows``."""
    d = cfg.dataset
    first = _first_object(path)
    generic = "benign" not in first and "prompt" in first
    objs, skipped = _read_jsonl(path, _check_prompt_answer if generic else _check_triplet, bool(d.skip_bad_lines))
    if skipped:
        print(f"sectune: warning: skipped {len(skipped)} bad line(s) of {path} (first: {skipped[0]})")
    if d.max_samples is not None:
        objs = objs[: int(d.max_samples)]
    # a line's window: its id (0 included), else its input
    group = lambda o: _given_id(o) or hashlib.sha256(o["benign" if not generic else "prompt"].encode()).hexdigest()[:12]  # noqa: E731
    split_of = given_splits(path, objs, group)  # a window's lines are in one split: the one any of them names
    unsplit = [o for o in objs if group(o) not in split_of]
    how = str(d.get("split_by") or "window")
    if how != "window" and unsplit:  # not auth_logs windows: no log, line order or source sectune reads
        raise ConfigError(f"dataset.split_by={how}: {path} line {unsplit[0]['_line']} has no \"split\", and a JSONL file's "
                          "windows are split at random only (dataset.split_by=window); give every line its split")
    try:
        where = split_windows(list(dict.fromkeys((group(o), _verdict(o.get("output") or "")) for o in unsplit)),
                              float(d.val_fraction), float(d.test_fraction), int(d.split_seed)) if unsplit else {}
    except ConfigError as e:
        raise DataError(f"{path}: {len(unsplit)} line(s) without a \"split\" (first: line {unsplit[0]['_line']}) are split by "
                        f"dataset.val_fraction/test_fraction: {e}; give every line a split, or none") from None
    split_of.update({g: s for s, gs in where.items() for g in gs})
    field = "prompt" if generic else "benign"  # one input under two ids lands in two splits
    warn_duplicates_across_splits({s: [o for o in objs if split_of[group(o)] == s] for s in SPLITS}, str(path),
                                  key=lambda o: o[field].strip(), what=f"{field} input")
    info = {"source": str(path), "skipped_lines": len(skipped), "skipped": skipped[:20], "cf_rejected": 0}
    if skipped:
        from sectune.data import note_skipped

        note_skipped(len(skipped))
    if generic:
        records, more = generic_triplets(cfg, objs, split_of, group)
        info.update(more)
        return records, info
    records = []
    for o in objs:
        g = group(o)
        target = o.get("attack_target")
        records.append(_with_prompts({
            "id": _given_id(o) or f"line{o['_line']}", "window_id": g, "split": split_of[g],
            "format": o.get("format", "auth_log"), "label": _verdict(o["output"]),
            "benign": o["benign"], "benign_cf": o["benign_cf"], "injection": o["injection"], "output": o["output"],
            "injection_output": o.get("injection_output") or o["output"], "attack_target": None if target is None else str(target),
            "injection_text": str(o.get("injection_text") or ""), "injection_field": str(o.get("injection_field") or "user_file"),
            "injection_source": "user",
        }))
    return records, info


def _given_id(o: dict) -> str | None:
    """A line's own ``id`` as a string (0 is an id), or None."""
    return None if o.get("id") in (None, "") else str(o["id"])


def generic_triplets(cfg: DictConfig, objs: list[dict], split_of: dict[str, str], group) -> tuple[list[dict], dict]:
    """Triplets from any prompt/answer pairs (``format=prompt``): the counterfactual renames IPs,
    ports and log fields (:func:`counterfactual_window`), the injection is appended after the prompt
    (SecAlign's setting), and the expected answer of both is the pair's answer; templated injections
    demand :data:`GENERIC_TARGET`."""
    d = cfg.dataset
    pools, info = _texts_by_split(cfg, generic=True)
    records = []
    for o in objs:
        g = group(o)
        answer = generic_answer(o)
        rng = random.Random(f"{d.split_seed}:{g}")
        source, text = _pick_text(pools[split_of[g]], float(d.template_fraction), rng, split_of[g])
        planted = text.replace("{target}", GENERIC_TARGET)
        records.append(_with_prompts({
            "id": _given_id(o) or f"line{o['_line']}", "window_id": g, "split": split_of[g], "format": "prompt",
            "label": str(o.get("label") or ""), "benign": o["prompt"], "benign_cf": counterfactual_window(o["prompt"], rng),
            "injection": f"{o['prompt'].rstrip()}\n{planted}\n", "output": answer, "injection_output": answer,
            "attack_target": GENERIC_TARGET if source == "template" else None, "injection_text": planted,
            "injection_template": text, "injection_field": "appended", "injection_source": source,
        }))
    return records, info


