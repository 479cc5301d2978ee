"""HDFS sessions into train (normal only) / validation / test, deterministic in ``dataset.split_seed``, with what the split
is (counts, id digests, how much of test repeats training); :func:`sectune.data.hdfs.load_hdfs` calls it."""

from __future__ import annotations

import hashlib
import json
import random
import sys
from pathlib import Path

from sectune.data import check_count
from sectune.data.hdfs import ANOMALOUS, NORMAL, Session
from sectune.errors import ConfigError, DataError

#: the splits whose notes this process has printed (split_sessions)
_SAID: set = set()


def split_sessions(normal: list[Session], anomalous: list[Session], val_fraction: float, test_fraction: float,
                   seed: int, max_samples: int | None = None, source: str = "", need_anomalies: bool = True,
                   ) -> tuple[dict[str, list[Session]], dict]:
    """train (normal only) / validation / test, deterministic in ``seed``; (splits, what was done). ``need_anomalies``:
    validation and test must hold anomalous sessions (detection); stage=sft trains on normal sessions alone."""
    if not (val_fraction > 0 and test_fraction > 0 and val_fraction + test_fraction < 1):
        raise ConfigError(f"dataset=hdfs needs dataset.val_fraction > 0 (the threshold is chosen there) and dataset.test_fraction > 0, "
                          f"summing below 1; got {val_fraction} and {test_fraction}")
    check_count(max_samples, "dataset.max_samples", "sessions per class, or null for all")
    rng = random.Random(seed)
    normal, anomalous = list(normal), list(anomalous)
    rng.shuffle(normal)
    rng.shuffle(anomalous)
    if max_samples:
        normal, anomalous = normal[:max_samples], anomalous[:max_samples]
    n_test, n_val = round(len(normal) * test_fraction), round(len(normal) * val_fraction)
    a_val = round(len(anomalous) * val_fraction / (val_fraction + test_fraction))
    splits = {
        "train": normal[n_test + n_val:],
        "validation": normal[n_test:n_test + n_val] + anomalous[:a_val],
        "test": normal[:n_test] + anomalous[a_val:],
    }
    for name, recs in splits.items():
        if not recs:
            raise DataError(f"{source or 'dataset=hdfs'}: the {name} split is empty ({len(normal)} normal, {len(anomalous)} anomalous "
                            f"sessions; val_fraction={val_fraction}, test_fraction={test_fraction})")
    for name, why in (("validation", "the threshold cannot be chosen"), ("test", "the test F1 and ROC-AUC are undefined")):
        if need_anomalies and not any(s.label == ANOMALOUS for s in splits[name]):  # test had none when every anomaly went to validation
            raise DataError(f"{source or 'dataset=hdfs'}: no anomalous session in the {name} split ({len(anomalous)} anomalous "
                            f"sessions in all; val_fraction={val_fraction}, test_fraction={test_fraction}); {why}")
        if need_anomalies and not any(s.label == NORMAL for s in splits[name]):  # few normal sessions: FPR 0/0, AUC NaN
            raise DataError(f"{source or 'dataset=hdfs'}: no normal session in the {name} split ({len(normal)} normal "
                            f"sessions in all; val_fraction={val_fraction}, test_fraction={test_fraction}); {why}")
    train_seqs = {s.keys for s in splits["train"]}
    info = {"split_seed": seed, "val_fraction": val_fraction, "test_fraction": test_fraction, "max_samples": max_samples}
    for name, recs in splits.items():
        info[f"{name}_normal"] = sum(s.label == NORMAL for s in recs)
        info[f"{name}_anomalous"] = sum(s.label == ANOMALOUS for s in recs)
        info[f"{name}_ids_sha256"] = hashlib.sha256("\n".join(s.id for s in recs).encode()).hexdigest()[:16]
    # how much of test is an exact copy of a training sequence (HDFS sessions repeat a lot)
    test_normal = [s for s in splits["test"] if s.label == NORMAL]
    info["test_normal_seen_in_train"] = sum(s.keys in train_seqs for s in test_normal) / max(1, len(test_normal))
    info["anomalous_equal_to_a_train_session"] = sum(s.keys in train_seqs for s in anomalous)
    both = {s.keys for s in normal} & {s.keys for s in anomalous}
    info["sequences_labelled_both"] = len(both)
    where = source or "dataset=hdfs"
    said = (where, info["test_ids_sha256"], len(both), info["test_normal_seen_in_train"])
    if said in _SAID:  # the same split read again in this process (a pipeline's sft and evaluate steps): said once
        return splits, info
    _SAID.add(said)
    if both:  # a session listed as normal and as anomalous (the labels CSV refuses a block labelled twice; these are sequences)
        print(f"sectune: warning: {where}: {len(both)} distinct key sequence(s) are labelled both normal and anomalous "
              f"({sum(s.keys in both for s in anomalous)} anomalous sessions): no detector can tell those apart, and the "
              "ones in training are learnt as normal", file=sys.stderr)
    if test_normal and info["test_normal_seen_in_train"] > 0:
        print(f"sectune: note: {where}: {info['test_normal_seen_in_train']:.0%} of the test split's normal sessions repeat a "
              "training session exactly (HDFS sessions repeat: their scores measure memory as well as the model)")
    return splits, info


# ----------------------------------------------------------------------------- the split a run trained on (an audit, session 42)
#: written by stage=sft on dataset=hdfs beside its result.json; stage=evaluate rebuilt the split from whatever the run's
#: config resolved to later, so a changed folder put training sessions into validation/test without a word
RECORD_FILE = "splits.json"


def sessions_sha256(sessions) -> str:
    """A digest of ids AND keys: the same ids over edited files are another split."""
    return hashlib.sha256("\n".join(f"{s.id} {' '.join(map(str, s.keys))}" for s in sessions).encode()).hexdigest()[:16]


def split_record(data) -> dict:
    """What stage=sft writes to ``RECORD_FILE``: the split's digests and the ids it trained on."""
    keys = ("layout", "split_seed", "num_keys", "train_ids_sha256", "validation_ids_sha256", "test_ids_sha256")
    return {"source": data.source, **{k: data.info[k] for k in keys}, "train_sha256": sessions_sha256(data.splits["train"]),
            "train_ids": [s.id for s in data.splits["train"]]}


def read_record(run_dir) -> dict | None:
    """The run's split record, or None for a run from before it was written."""
    p = Path(run_dir) / RECORD_FILE
    if not p.is_file():
        return None
    try:
        rec = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{p}: cannot read the run's split record ({type(e).__name__}: {e})") from None
    if not isinstance(rec, dict) or not isinstance(rec.get("train_ids"), list):
        raise DataError(f"{p}: not a split record (no train_ids list)")
    return rec


def check_record(record: dict, data, run_dir) -> None:
    """DataError when the split rebuilt now (``data``) is not the one the run trained on and recorded."""
    now = {"train_sha256": sessions_sha256(data.splits["train"]),
           **{f"{n}_ids_sha256": data.info[f"{n}_ids_sha256"] for n in ("train", "validation", "test")}}
    changed = [k.split("_")[0] for k, v in now.items() if record.get(k) != v]
    if changed:
        raise DataError(f"{data.source}: its {'/'.join(dict.fromkeys(changed))} split is not the one the run in {run_dir} trained "
                        f"on ({RECORD_FILE}; the files changed since): its held-out sessions may hold training ones; restore the files "
                        "the run trained on, or train it again")
