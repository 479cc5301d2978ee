"""Which sessions stage=evaluate scores an HDFS run on, and against which training split: the run's own logs (its
split checked against the ``splits.json`` it saved) or other logs (the sessions it trained on dropped, the baselines
learning from the run's own training sessions)."""

from __future__ import annotations

import sys
from pathlib import Path

from sectune.errors import ConfigError, DataError


def _run_config(cfg, choice, model_dir: Path, trained: dict | None = None):
    """The trained run's own config (its data split and model), with this run's device and evaluate node. ``trained`` is
    filled with what the split checks need: the run's folder, its config as it trained (``cfg``) and whether other logs
    are scored (``other``)."""
    import copy

    from omegaconf import OmegaConf

    saved = next((d / ".hydra" / "config.yaml" for d in ([choice.path.parent] if choice.path else []) + [model_dir]
                  if (d / ".hydra" / "config.yaml").is_file()), None)
    if saved is None:
        print(f"sectune: warning: {model_dir} has no .hydra/config.yaml; using this run's dataset and model settings")
        return cfg
    from sectune.config import load_run_config

    run_cfg = load_run_config(saved)
    if OmegaConf.select(run_cfg, "dataset.name") != "hdfs":
        raise ConfigError(f"evaluate.model_dir={model_dir}: that run trained on dataset={OmegaConf.select(run_cfg, 'dataset.name')}, not hdfs")
    merged = OmegaConf.merge(cfg, OmegaConf.masked_copy(run_cfg, ["dataset", "model", "quantization", "lora"]))
    own = copy.deepcopy(merged)  # the run's logs as it trained on them: the baselines' training sessions, the split check's
    from sectune.paths import resolved

    from sectune.data.hdfs import ANOMALOUS_FILE, keys_parser, source_folder

    if str(cfg.dataset.log_parser) not in ("auto", "structured", "drain3"):  # a typo is an error, not the trained value
        raise ConfigError(f"dataset.log_parser={cfg.dataset.log_parser!r}: choose auto, structured or drain3")
    reading = ("path", "hdfs_layout", "log_parser", "skip_bad_lines")
    # other logs: the folder and layout this command reads (dataset.path, or the shipped set dataset.hdfs_layout picks)
    # against the trained run's; the shipped folder given as dataset.path is the same logs
    (theirs, their_layout, generated_now) = now = source_folder(run_cfg)
    import json

    try:
        result = json.loads((saved.parent.parent / "result.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        result = {}
    result = result if isinstance(result, dict) else {}
    if generated_now and not bool(cfg.dataset.path):  # the run trained on real sessions (its result.json names no
        # generated data), which this machine's paths do not reach: never scored on stand-ins (session 36)
        if result.get("status") and not result.get("generated_data"):
            raise DataError(f"evaluate.model_dir={model_dir}: that run trained on real HDFS sessions, and {theirs} (its "
                            "dataset.source_dir, resolved here) holds none: set SECTUNE_SHARED_DATA / paths.shared_data to "
                            "where they are, or dataset.path=<logs to score>; it is not scored on generated sessions")
    gen = next((Path(str(g["path"])) for g in result.get("generated_data") or () if isinstance(g, dict) and g.get("path")), None)
    if gen is not None and not generated_now:
        # the run trained on generated sessions and its source_dir now reaches real logs: those are other logs to it, scored
        # beside baselines that learn from the generated sessions (they were taken for its own: an audit, session 42)
        if not (gen / ANOMALOUS_FILE).is_file():  # a cleared cache: the same sessions again (seed 0, as source_folder writes)
            from sectune.data.synthetic_hdfs import write_deeplog_files

            write_deeplog_files(gen, seed=0)
        theirs, their_layout = gen, "deeplog"
        own.dataset.path, own.dataset.hdfs_layout = str(gen), "deeplog"
    # neither dataset.path nor another dataset.hdfs_layout on this command: the run's own logs (not the shipped or
    # generated set this command's defaults name); dataset.hdfs_layout=loghub alone still picks the shipped loghub set
    # (the schema's default layout is no request: a run trained on the loghub set was scored on DeepLog's sessions, exit 0)
    from sectune.config import DatasetConfig

    layout = str(cfg.dataset.hdfs_layout)
    other = bool(cfg.dataset.path) or (layout != str(run_cfg.dataset.hdfs_layout) and layout != DatasetConfig.hdfs_layout)
    (mine, my_layout, _) = source_folder(cfg) if other else now
    if (resolved(mine), my_layout) != (resolved(theirs), their_layout):
        # scored on their own split (g and the threshold chosen on its validation sessions, test reported), read as this
        # command says; the model and its key vocabulary stay the trained run's
        for k in reading if other else ():
            merged.dataset[k] = cfg.dataset[k]
        if other:  # DeepLog keys past the run's (dataset.num_log_keys of this command) are read, and scored as never seen
            merged.dataset.num_log_keys = max(int(cfg.dataset.num_log_keys), int(run_cfg.dataset.num_log_keys))
        print(f"sectune: note: scoring {mine} ({my_layout}), not the logs this run trained on ({theirs}, {their_layout}): "
              "their own validation sessions choose g and the threshold, their test sessions are reported")
        # how each side's lines got their keys, as read (log_parser=auto: the structured CSV's EventId where there is one)
        theirs_by = keys_parser(theirs, their_layout, str(run_cfg.dataset.log_parser))
        mine_by = keys_parser(mine, my_layout, str(cfg.dataset.log_parser))
        if theirs_by == "drain3" and my_layout == "loghub" and str(cfg.dataset.log_parser) in ("auto", "drain3"):
            # drain3 numbers templates in order of first appearance in each log: the run's log is clustered first, so a
            # template keeps the key the model learnt for it (a template new in these logs gets a new key)
            merged.dataset.log_parser, merged.dataset.drain3_reference, mine_by = "drain3", str(theirs), "drain3"
            print(f"sectune: note: these logs' drain3 keys are numbered as in the run's own log ({theirs})")
        elif theirs_by != mine_by or theirs_by == "drain3":
            print(f"sectune: warning: the run's log keys came from {theirs_by} ({theirs}) and these from {mine_by}: two "
                  "numberings of the log templates (DeepLog's keys, loghub's structured EventIds, drain3's clusters in order "
                  "of first appearance), so a key means another event in each and the scores measure the mismatch, not "
                  "detection; score logs parsed as the run's were", file=sys.stderr)
    else:
        kept = [f"dataset.{k}={cfg.dataset[k]} (trained: {run_cfg.dataset[k]})" for k in reading[1:] if cfg.dataset[k] != run_cfg.dataset[k]]
        if kept:
            print(f"sectune: note: the trained run's logs are read as it read them, not as {', '.join(kept)} says "
                  "(give dataset.path=<other logs> to score other logs)")
    elsewhere = other and (resolved(mine), my_layout) != (resolved(theirs), their_layout)  # num_log_keys: theirs, read above
    keys = ("max_samples", "val_fraction", "test_fraction", "split_seed") + (() if elsewhere else ("num_log_keys",))
    differ = [f"dataset.{k}={cfg.dataset[k]} (trained: {run_cfg.dataset[k]})" for k in keys if cfg.dataset[k] != run_cfg.dataset[k]]
    if differ:
        print(f"sectune: note: using the trained run's split settings, not this run's {', '.join(differ)}")
    if trained is not None:
        trained.update(dir=saved.parent.parent, cfg=own, other=(resolved(mine), my_layout) != (resolved(theirs), their_layout))
    return merged


#: when the trained tokenizer splits a key of the run's own vocabulary (a run from before sft checked it): the tokenizer
#: cannot change at evaluate, so model.tiny.extra_tokens set now changes nothing (advised here: an audit, session 42)
RETRAIN_HINT = "the trained run's tokenizer cannot change at evaluate: train the run again with its keys whole"
#: how evaluate scores keys the run never saw (sectune/evaluation/anomaly.py's docstring; README, HDFS)
PAST_RULE = ("worst rank: a position whose key is past the run's key vocabulary (a template the run never saw) is a miss "
             "of top-g at every g (rank vocabulary + 2, after every candidate; −log p = ∞) in the model and every baseline "
             "alike, so its session is flagged (DeepLog: a key never seen in training is anomalous)")
IN_VOCAB_RULE = ("scored as any key: a key in the run's vocabulary that no training session holds is a candidate each system "
                 "ranks by its own probability (the model's, the bigram's add-alpha count)")


def unseen_keys(splits: dict, vocab: int, trained: set) -> dict:
    """What hdfs_detection.json says of keys the run never saw in the sessions scored: past its vocabulary 1..``vocab``,
    and in it but in no training session (``trained``: the keys its training sessions hold)."""
    from sectune.data.hdfs import ANOMALOUS

    def count(sessions, unseen) -> dict:
        hit = [s for s in sessions if any(unseen(k) for k in s.keys)]
        return {"sessions": len(hit), "anomalous_sessions": sum(s.label == ANOMALOUS for s in hit),
                "positions": sum(unseen(k) for s in hit for k in s.keys),
                "keys": sorted({k for s in hit for k in s.keys if unseen(k)})}

    past, untrained = (lambda k: k > vocab), (lambda k: k <= vocab and k not in trained)
    return {"key_vocabulary": vocab,
            "past_vocabulary": {"rule": PAST_RULE, **{n: count(ss, past) for n, ss in splits.items()}},
            "not_in_training": {"rule": IN_VOCAB_RULE, **{n: count(ss, untrained) for n, ss in splits.items()}}}


def unseen_keys_note(unseen: dict, source: str, past_only: bool = False) -> str:
    """The console's (and, ``past_only``, the report's) sentence on the sessions ``unseen_keys`` counted; "" for none."""
    def said(part: dict) -> tuple[str, str]:
        splits = [n for n in part if isinstance(part[n], dict)]
        keys = sorted({k for n in splits for k in part[n]["keys"]})
        where = " and ".join(f"{part[n]['sessions']} {n} sessions ({part[n]['anomalous_sessions']} anomalous, "
                             f"{part[n]['positions']} positions)" for n in splits)
        return where, ", ".join(map(str, keys[:20])) + (f", … ({len(keys)} keys)" if len(keys) > 20 else "")

    vocab, out = unseen["key_vocabulary"], []
    where, keys = said(unseen["past_vocabulary"])
    if keys:
        out.append(f"{where} of {source} hold keys past the run's key vocabulary (1..{vocab}: keys {keys}), templates the run "
                   f"never saw: each such position is a miss of top-g at every g (rank {vocab + 2}, −log p = ∞) for the model "
                   "and every baseline alike, so those sessions are flagged")
    where, keys = said(unseen["not_in_training"])
    if keys and not past_only:
        out.append(f"{where} hold keys in the run's vocabulary that no training session holds ({keys}): each system ranks "
                   "them as any key")
    return "; ".join(out)


def _trained_sessions(trained: dict, data):
    """(the run's own split as it trained on it, {split: sessions dropped}). The run's own logs: their split rebuilt now
    must be the one its ``splits.json`` recorded, else a DataError (a changed folder put training sessions in test without
    a word: an audit, session 42). Other logs: their validation/test sessions the run trained on are dropped, said."""
    from sectune.data.hdfs import load_hdfs
    from sectune.data.hdfs_splits import RECORD_FILE, check_record, read_record

    if not trained:  # no saved config: this run's settings, as before
        return data, {}
    record = read_record(trained["dir"])
    # the run's key vocabulary (its model's candidates): its own logs' keys; where they cannot be read, the split record's
    trained["num_keys"] = data.num_keys if not trained["other"] else record["num_keys"] if record is not None else None
    if record is None:
        print(f"sectune: warning: {trained['dir']} has no {RECORD_FILE} (a run from before session 42): the split rebuilt now "
              "cannot be checked against the one it trained on", file=sys.stderr)
    if not trained["other"]:
        if record is not None:
            check_record(record, data, trained["dir"])
        return data, {}
    # a loghub block id names one block in any log (a larger log holds longer sessions of it); a DeepLog id is a line of
    # a file, another session in another folder, so a session there is the trained one only with the same keys too
    by_id = data.info["layout"] == "loghub"
    try:
        own = load_hdfs(trained["cfg"], need_anomalies=False)
    except DataError as e:  # its logs are not on this machine: the scored logs' own train split instead, said
        print(f"sectune: warning: the run's own logs cannot be read here ({e}): the baselines learn from {data.source}'s train "
              "split, not from the sessions the model trained on", file=sys.stderr)
        if record is None or not by_id:
            return data, {}
        own, seen = data, set(record["train_ids"])
    else:
        if record is not None:
            check_record(record, own, trained["dir"])
        seen = {s.id if by_id else (s.id, s.keys) for s in own.splits["train"]}
        trained["num_keys"] = own.num_keys
    dropped = {}
    for name in ("validation", "test"):
        kept = [s for s in data.splits[name] if (s.id if by_id else (s.id, s.keys)) not in seen]
        dropped[name], data.splits[name] = len(data.splits[name]) - len(kept), kept
        if len({s.label for s in kept}) < 2:
            raise DataError(f"{data.source}: without the sessions the run in {trained['dir']} trained on, its {name} split "
                            "lacks normal or anomalous sessions")
    if sum(dropped.values()):
        print(f"sectune: note: {dropped['validation']} validation and {dropped['test']} test sessions of {data.source} are ones the "
              f"run in {trained['dir']} trained on: dropped, not scored", file=sys.stderr)
    return own, dropped
