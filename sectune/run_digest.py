"""A run's config digest: what makes two runs the same run (sweep.skip_done, a pipeline's finished steps, an SFT
warm-up reused), from the resolved config and the data files it would read. Re-exported by :mod:`sectune.runner`."""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from sectune.training import distributed

#: Keys added to the config schema since ``tests/config_keys.txt`` was frozen (session 39), each with the value that
#: reproduces what runs made before it did. A config holding that value digests as if the key were absent, so an
#: upgrade that adds an option does not make every earlier run "another config": ``sweep.skip_done`` still reuses the
#: sweep's finished jobs, a pipeline still skips its finished steps, an SFT warm-up is still reused, a resume is not
#: refused. Where the new key's default changes what runs do, its default is not that older value and runs at the
#: default are other runs, as they should be. ``tests/test_sweeps.py`` fails on a schema key neither frozen nor listed.
ADDED_KEYS: dict[str, Any] = {"dataset.split_by": "window", "export.model_dir": None, "export.dtype": None,
                              "export.max_logit_diff": None, "lora.use_rslora": False,
                              "lora.use_dora": False,
                              "dpo.loss_type": None, "model.chat_template": False, "model.tiny.chat_template": False,
                              "model.chat_system": None}


def older_values(dataset_name) -> dict[str, Any]:
    """Dotted key → the value that reproduces what a run recorded before that key existed did: ``ADDED_KEYS``, and for
    a run trained on injection texts the split it made then (:func:`sectune.evaluation.injection_eval.older_defaults`).
    A resume's record and a pipeline step's saved config compare a key they lack at this value (else its default)."""
    from sectune.evaluation.injection_eval import older_defaults

    return {**ADDED_KEYS, **{f"dataset.{k}": v for k, v in older_defaults(dataset_name).items()}}


#: the config keys naming data files or folders: what :func:`data_fingerprint` lists
DATA_PATH_KEYS = ("paths.shared_data", "dataset.source_dir", "dataset.path", "infer.input_file", "evaluate.data_path")


def config_digest(cfg: DictConfig, root: str | os.PathLike | None = None, portable: bool = False) -> str:
    """sha256 of the resolved config, minus Hydra's own node and ``sweep`` (bookkeeping, not
    the run), plus the number of processes when several train it: equal digests, equal runs. With ``root``, every path under it counts relative to it
    (a pipeline's steps name each other's dirs: a moved or copied pipeline is the same run). ``portable``: without
    ``paths.cache_dir`` (what sectune builds, rebuilt alike anywhere) and the data paths' places, the files they name
    counting by the data fingerprint alone (names under a folder, sizes, contents): a moved or re-cloned checkout
    (``<checkout>/.cache``, ``../shared/data``) is the same run; and without ``train.resume``."""
    container = OmegaConf.to_container(cfg, resolve=True)
    container.pop("sweep", None)
    _drop_added_keys(container)
    if root is not None:
        container = relative_to_root(container, str(root).rstrip("/"))
    if portable:
        if isinstance(container.get("paths"), dict):
            container["paths"].pop("cache_dir", None)
        if isinstance(container.get("train"), dict) and "resume" in container["train"]:
            # how the job starts, not what it trains: a sweep rerun with train.resume=auto (the interrupted sweep's own
            # advice) trained every job that had finished again
            container["train"]["resume"] = None
    fp = data_fingerprint(cfg, content=portable)
    if portable:
        for key in DATA_PATH_KEYS:
            group, leaf = key.split(".")
            if isinstance(container.get(group), dict) and container[group].get(leaf) and listed(fp.get(key, [])):
                container[group][leaf] = "<data>"
    container["_data"] = fp
    if distributed.world_size() > 1:  # N processes train on N x the batch: not the run one process makes of this config
        container["_world_size"] = distributed.world_size()
    blob = json.dumps(_str_keys(container), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def listed(files) -> bool:
    """Whether a data path's :func:`data_fingerprint` says what it holds (its files, or that there are none): one that
    could not be listed ("unreadable: …", a mount's lost+found beside the data) is one string whatever it holds, so
    the digests that leave places out keep that path's place."""
    return not (isinstance(files, str) and files.startswith("unreadable"))


def _drop_added_keys(container: dict) -> None:
    """Remove each of ``ADDED_KEYS`` that holds its older value (the digest a run made before the key had)."""
    for key, older in ADDED_KEYS.items():
        *parents, leaf = key.split(".")
        path = [container]
        for p in parents:
            path.append(path[-1].get(p) if isinstance(path[-1], dict) else None)
        if isinstance(path[-1], dict) and leaf in path[-1] and path[-1][leaf] == older:
            del path[-1][leaf]
            for parent, name, node in zip(reversed(path[:-1]), reversed(parents), reversed(path[1:])):
                if node:  # a node added with its keys (all at their older values) goes as a whole
                    break
                del parent[name]


def schema_keys() -> list[str]:
    """Every leaf key of the config schema (dotted paths such as ``train.seed``; a dict- or list-valued option is one
    leaf, an optional nested spec such as ``model.tiny`` lists its fields)."""
    import dataclasses
    import typing

    from sectune.config import SectuneConfig

    def walk(cls, prefix: str) -> list[str]:
        hints = typing.get_type_hints(cls)
        out = []
        for f in dataclasses.fields(cls):
            t = hints[f.name]
            inner = [a for a in typing.get_args(t) if a is not type(None)] if typing.get_origin(t) is typing.Union else [t]
            if len(inner) == 1 and dataclasses.is_dataclass(inner[0]):
                out += walk(inner[0], f"{prefix}{f.name}.")
            else:
                out.append(prefix + f.name)
        return out

    return walk(SectuneConfig, "")


def _str_keys(obj: Any) -> Any:
    """Every mapping key as a string, as JSON writes it anyway: ``model.max_memory={0: 7GiB, cpu: 30GiB}`` mixes an
    int and a str key, which json's sort_keys cannot order (the README's own example crashed every run)."""
    if isinstance(obj, dict):
        return {str(k): _str_keys(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_str_keys(v) for v in obj]
    return obj


#: a file's sha256 by its path: ``[inode, size, modification time, change time, hash]``, valid while the four hold (one
#: pipeline or sweep digests the same files many times; later processes read it from the memo file)
_CONTENT_MEMO: dict[str, list] = {}
#: where the memo is kept between processes (``<paths.cache_dir>/file_sha256.json``), and the ones already read
MEMO_FILE = "file_sha256.json"
_MEMO_READ: set[str] = set()


#: a file changed less than this long before it is hashed is not kept in the memo: a filesystem's clock ticks coarsely
#: (FAT: 2 s; ext4/xfs before Linux 6.13: a few ms), so a rewrite of one size in the same tick keeps every time, and the
#: memo gave the old bytes' hash (an audit, session 45; git's "racily clean" index entries)
RACY_NS = 2_000_000_000


def file_sha256(f: Path) -> str:
    """The first 16 hex digits of ``f``'s sha256, read again only once its inode, size or times changed: the change
    time and inode too, which no copy keeps (``cp -p`` and unpacking an archive set the modification time)."""
    import time

    now = time.time_ns()
    st = f.stat()
    path, stamp = str(f.resolve()), [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
    known = _CONTENT_MEMO.get(path)
    if isinstance(known, list) and len(known) == 5 and known[:4] == stamp:
        return str(known[4])
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    if max(st.st_mtime_ns, st.st_ctime_ns) < now - RACY_NS:
        _CONTENT_MEMO[path] = [*stamp, h.hexdigest()[:16]]
    else:
        _CONTENT_MEMO.pop(path, None)
    return h.hexdigest()[:16]


def _memo_path(cfg: DictConfig) -> Path | None:
    cache = OmegaConf.select(cfg, "paths.cache_dir", default=None)
    return Path(str(cache)).expanduser() / MEMO_FILE if cache else None


def _read_memo(path: Path | None) -> dict:
    """The hashes earlier processes wrote (a 13 GB CIC-IoT folder in ``paths.shared_data`` read by every run, every rank,
    took ~14 s each: a review, session 44); an unreadable or damaged memo is no memo."""
    try:
        memo = json.loads(path.read_text(encoding="utf-8")) if path is not None else {}
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in memo.items() if isinstance(v, list) and len(v) == 5} if isinstance(memo, dict) else {}


def _write_memo(path: Path | None, before: dict) -> None:
    """Adds this process's new hashes to the memo file (written whole to a temporary name, then renamed); a cache that
    cannot be written costs only the reading again."""
    new = {k: v for k, v in _CONTENT_MEMO.items() if before.get(k) != v}
    if path is None or not new:
        return
    import os
    import tempfile

    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{MEMO_FILE}.")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump({**_read_memo(path), **new}, fh)
        os.replace(tmp, path)
    except OSError:
        if tmp is not None:  # a full disk: no half-written memo left beside it at every run (an audit, session 45)
            Path(tmp).unlink(missing_ok=True)


#: how many folders deep :func:`data_fingerprint` lists: an auth_logs folder's windows sit at
#: ``auth_data/<class>/auth_data_X_Y.txt`` (3 under ``dataset.path``, 4 with the folder inside ``paths.shared_data``); at
#: two, none of them counted (a window edited or moved to another class folder was the same data: an audit, session 45)
LISTING_DEPTH = 4


def data_fingerprint(cfg: DictConfig, content: bool = False) -> dict:
    """What data a run would read, beyond its config: the files (name, size and modification time, ``LISTING_DEPTH`` folders deep)
    under ``paths.shared_data``, ``dataset.source_dir`` (where it is not that), ``dataset.path``, ``infer.input_file`` and
    ``evaluate.data_path``. Real logs downloaded after a run on generated ones, or a
    user's file edited (the same size too: a word replaced by another as long), change the digest, so a pipeline or a
    sweep does not reuse a run made on other data. Touching a file unchanged reruns once: the safe side.
    ``content``: each file's sha256 instead of its time, for the digests that leave out where the data is
    (:func:`config_digest`'s ``portable``, a resume record's ``place.<key>``): without its place, two other files of one
    size and time (unpacked from one archive) counted as the same data, and data copied without its times (``cp -r``, a
    download again) as other data. Hashing reads a file once (~1 GB/s; the real data: 7 MB, ~0.02 s) while its inode, size
    and times hold, kept in ``<paths.cache_dir>/file_sha256.json`` for later runs."""

    def entry(name: str, f: Path) -> list:
        st = f.stat()
        if content:
            try:
                return [name, st.st_size, "sha256:" + file_sha256(f)]
            except OSError:  # another user's 0600 file: its time, and the files beside it still by their bytes (the
                pass  # whole folder "unreadable" was one string whatever it held: a review, session 44)
        return [name, st.st_size, st.st_mtime_ns]

    def listing(path) -> list | str:
        p = Path(str(path)).expanduser()
        if p.is_file():
            return [entry("", p)]
        if not p.is_dir():
            return "absent"
        out = []

        def walk(d: Path, depth: int) -> None:
            for b in sorted(d.iterdir()):
                if b.is_dir():
                    # below the first level a hidden folder (.git, .ipynb_checkpoints) is no data (the first level's
                    # files were always listed: the digests of runs before the deeper listing stand)
                    if depth < LISTING_DEPTH and (depth == 1 or not b.name.startswith(".")):
                        walk(b, depth + 1)
                elif b.is_file() and not b.name.startswith("."):
                    out.append(entry(str(b.relative_to(p)), b))

        walk(p, 1)
        if len(out) > 1000:  # a user's folder of logs: its digest, not a result.json that lists every file
            return ["sha256", len(out), hashlib.sha256(json.dumps(out).encode()).hexdigest()]
        return out

    memo = _memo_path(cfg) if content else None
    if memo is not None and str(memo) not in _MEMO_READ:
        _MEMO_READ.add(str(memo))
        _CONTENT_MEMO.update({k: v for k, v in _read_memo(memo).items() if k not in _CONTENT_MEMO})
    before = {k: list(v) for k, v in _CONTENT_MEMO.items()}
    fp = {}
    changed = _auth_versions_since(cfg)
    if changed:  # other labels (the rules) or other generated lines than a run made before them read
        fp["auth_versions"] = changed
    for key in DATA_PATH_KEYS:
        value = OmegaConf.select(cfg, key, default=None)
        if key == "dataset.source_dir" and _same_path(value, OmegaConf.select(cfg, "paths.shared_data", default=None)):
            continue  # its default, paths.shared_data: listed already (and the digests of runs before it was listed kept)
        if value:
            try:
                fp[key] = listing(value)
            except OSError as e:  # unreadable: the run itself will say so
                fp[key] = f"unreadable: {e.strerror}"
    _write_memo(memo, before)
    return fp


#: the auth-log rule engine's and log generator's versions when digests began to count them (session 39). A newer one
#: enters the data fingerprint of every run that reads rule-annotated auth windows, so a pipeline or a sweep does not
#: reuse a policy trained on the older labels; at these versions the key is absent (the digests of earlier runs stand).
AUTH_VERSIONS_BASE = {"rules": "auth-rules-3", "generator": "auth-gen-2"}
#: the datasets built from auth windows annotated by the rules
AUTH_DATASETS = ("auth_logs", "auth_preferences", "injection_triplets", "injection_preferences")


def _auth_versions_since(cfg: DictConfig) -> dict:
    if OmegaConf.select(cfg, "dataset.name", default=None) not in AUTH_DATASETS:
        return {}
    from sectune.data import auth_rules, synthetic_auth

    now = {"rules": auth_rules.RULES_VERSION, "generator": synthetic_auth.GENERATOR_VERSION}
    return {k: v for k, v in now.items() if v != AUTH_VERSIONS_BASE[k]}


def _same_path(a, b) -> bool:
    try:
        return bool(a) and bool(b) and Path(str(a)).expanduser().resolve() == Path(str(b)).expanduser().resolve()
    except (OSError, RuntimeError):
        return False


def relative_to_root(obj: Any, root: str) -> Any:
    """``obj`` (a config container) with every string path under ``root`` written as ``<root>/…``."""
    if isinstance(obj, dict):
        return {k: relative_to_root(v, root) for k, v in obj.items()}
    if isinstance(obj, list):
        return [relative_to_root(v, root) for v in obj]
    if isinstance(obj, str) and (obj == root or obj.startswith(root + "/")):
        return "<root>" + obj[len(root):]
    return obj


def skip_digest(cfg: DictConfig, run_dir: Path | None = None) -> str:
    """The config digest a finished run is reused by (a pipeline step, an SFT warm-up): without ``train.resume``
    and ``debug``'s fault injection (how to run, not what; ``debug.enabled`` of a contrastive step counts), and with ``run_dir`` as ``<root>`` in the paths under it
    (``rl.init_from=<root>/sft``), so a pipeline dir that was moved or copied still skips what it finished; and
    ``portable`` (:func:`config_digest`): a checkout moved or cloned again did not (its ``.cache`` path differed)."""
    from sectune.config import DebugConfig

    c = copy.deepcopy(cfg)
    with open_dict(c):
        c.train.resume = None
        c.debug = OmegaConf.structured(DebugConfig)
        if debug_trains(cfg):  # a quick check run: 4 steps on 16 triplets, not the step a run without it trains
            c.debug.update(enabled=True, max_steps=cfg.debug.max_steps, max_samples=cfg.debug.max_samples)
    return config_digest(c, run_dir, portable=True)


def debug_trains(cfg) -> bool:
    """Whether ``debug.enabled`` changes what the run trains (stage=contrastive's quick check), not only how it runs."""
    return bool(OmegaConf.select(cfg, "debug.enabled", default=False)) and OmegaConf.select(cfg, "stage.name") == "contrastive"
