"""How auth-log windows are split into train / validation / test: ``dataset.split_by``.

* ``window`` (the default, every figure before session 43): windows at random, stratified by verdict
  (:func:`sectune.data.split_windows`). The windows are consecutive chunks of two logs, so a test window often sits
  next to a training window of the same log sharing a source: the same attack session minutes apart (an audit,
  session 42: 27 of the 43 test windows).
* ``time``: each log's windows in time order, in blocks: its earliest windows train, the next ``val_fraction`` of them
  validate, its latest ``test_fraction`` test; no test window precedes a training window of its log. A log is a run of
  the folder's windows in ``X`` order whose first line number ``Y`` rises (``auth_data_X_Y.txt``: the layout the
  builder writes, one log after another); its time order is its line order. Not stratified: a class a log shows
  only late is said (warned) to be missing from training. A folder whose names have no rising ``Y`` (every window a log
  of its own: a user's ``auth_data_<k>_0.txt``) is refused, naming the files.
* ``source``: windows that share a source (an IPv4/IPv6 address anywhere in the window, or PAM's ``rhost=`` host name)
  are one group, transitively (an address's forms are one source: ``::ffff:1.2.3.4`` is ``1.2.3.4``, ``fe80::1%eth0``
  ``fe80::1``, ``2001:0db8:0:0::1`` ``2001:db8::1``) (connected components, scipy); a group goes to one split whole, so no test window shares
  a source with a training window. Groups are taken in a seeded random order (``dataset.split_seed``) into the
  held-out split further from its share (test or validation) while it stays within that share; the groups too big for
  either train. (Not
  sklearn's GroupShuffleSplit: its ``test_size`` counts groups, and the real logs' groups are one of 149 windows, one
  of 104, and a few of 1-8: one draw put half the windows in test.) A held-out split left under half its share, or
  empty, is warned about; no test window at all (one group holds nearly every window) is refused, naming the key.

Every stage reads its split through :func:`split_auth_windows` (SFT, reward, DPO, RL, infer's held-out windows,
evaluate, the pipeline's table, the injection triplets), so one run's stages agree; ``dataset.split_by`` is a dataset
key, so a resume (``trained_with.json``), a pipeline's reuse of a step and evaluate's split check see it changed.
"""

from __future__ import annotations

import re
import sys

from sectune.errors import ConfigError, DataError

SPLIT_BY = ("window", "time", "source")
#: a window's sources: IPv4 addresses anywhere, PAM's rhost= values, and what follows " from " / sits in [brackets] when
#: it has a colon (IPv6: anywhere, ``06:55:46`` of every timestamp read as one joined every window into one group)
_SOURCE = re.compile(r"(?<![\d.])(\d{1,3}(?:\.\d{1,3}){3})(?![\d.])|\brhost=(\S+)"
                     r"|(?: from |\[)([0-9a-fA-F]{0,4}(?::[0-9a-fA-F.]{0,15}){2,7}(?:%[\w.-]{1,16})?)(?=[\s\]]|$)")
_ID = re.compile(r"^(\d+)_(\d+)$")
_SAID: set[str] = set()


def check_split_by(value) -> str:
    """``dataset.split_by`` as one of :data:`SPLIT_BY`, else a ConfigError naming the key."""
    if str(value) not in SPLIT_BY:
        raise ConfigError(f"dataset.split_by={value!r}: choose one of {', '.join(SPLIT_BY)}")
    return str(value)


def _say(msg: str) -> None:
    """Print a note or warning once per process (every stage of a run splits the same windows, some several times)."""
    if msg not in _SAID:
        _SAID.add(msg)
        print(msg, file=sys.stderr if "warning" in msg else sys.stdout)


def window_sources(text: str) -> set[str]:
    """The remote sources a window names: addresses anywhere in it, PAM ``rhost=`` host names, and every source the rule
    engine's analysis names (sshd's host name under UseDNS, ``from host.example.com port 22``, which neither pattern
    reads: a review, session 43)."""
    from sectune.data.auth_rules import analyze_auth_log, canonical_source

    found = {next(g for g in m.groups() if g) for m in _SOURCE.finditer(text) if any(m.groups())}
    found |= {s["ip"] for s in analyze_auth_log(text.splitlines())["source_ips"] if s.get("ip")}
    return {canonical_source(s) for s in found}  # ::ffff:1.2.3.4 is 1.2.3.4, fe80::1%eth0 fe80::1, 2001:0db8::1 2001:db8::1


def window_logs(ids: list[str]) -> dict[str, tuple[int, int]]:
    """Window id (``X_Y``) → (log number, first line): the folder's windows in ``X`` order, a new log wherever ``Y``
    does not rise."""
    parsed = []
    for i in ids:
        m = _ID.match(str(i))
        if not m:
            raise DataError(f"window {i!r}: dataset.split_by=time orders windows by their id X_Y (auth_data_X_Y.txt: X the "
                            "running index, Y the first line number in its log); this window has none")
        parsed.append((int(m[1]), int(m[2]), str(i)))
    out, log, last = {}, -1, None
    for _, y, i in sorted(parsed):
        if last is None or y <= last:
            log += 1
        out[i], last = (log, y), y
    return out


def split_by_time(ids: list[str], val_fraction: float, test_fraction: float) -> dict[str, set[str]]:
    """Each log's windows in line order: the first train, then ``val_fraction`` of them validate, the last
    ``test_fraction`` test (per log, rounded)."""
    logs: dict[int, list[tuple[int, str]]] = {}
    for i, (log, y) in window_logs(ids).items():
        logs.setdefault(log, []).append((y, i))
    out: dict[str, set[str]] = {"train": set(), "validation": set(), "test": set()}
    for windows in logs.values():
        order = [i for _, i in sorted(windows)]
        n_test, n_val = round(len(order) * test_fraction), round(len(order) * val_fraction)
        n_train = len(order) - n_test - n_val
        out["train"].update(order[:n_train])
        out["validation"].update(order[n_train:n_train + n_val])
        out["test"].update(order[n_train + n_val:])
    return out


def source_groups(texts: dict[str, str]) -> dict[str, int]:
    """Window id → group: windows sharing a source, transitively (connected components of windows and sources); a
    window that names no source is a group of its own."""
    import numpy as np
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    ids = list(texts)
    names: dict[str, int] = {}
    edges = [(k, len(ids) + names.setdefault(s, len(names))) for k, i in enumerate(ids) for s in sorted(window_sources(texts[i]))]
    n = len(ids) + len(names)
    rows, cols = (np.array(x, dtype=int) for x in zip(*edges)) if edges else (np.zeros(0, int), np.zeros(0, int))
    _, label = connected_components(coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n)), directed=False)
    return {i: int(label[k]) for k, i in enumerate(ids)}


def split_by_source(texts: dict[str, str], val_fraction: float, test_fraction: float, seed: int) -> tuple[dict[str, set[str]], dict[int, list[str]]]:
    """Whole groups (:func:`source_groups`) in a seeded random order into the held-out split with the most windows still
    to fill (test or validation), while it stays within its share; the rest train. Returns the split and the groups."""
    import numpy as np

    groups: dict[int, list[str]] = {}
    for i, g in source_groups(texts).items():
        groups.setdefault(g, []).append(i)
    order = [list(groups)[k] for k in np.random.RandomState(seed).permutation(len(groups))]
    out: dict[str, set[str]] = {"train": set(), "validation": set(), "test": set()}
    left = {"test": round(len(texts) * test_fraction), "validation": round(len(texts) * val_fraction)}
    for g in order:
        fits = [p for p in ("test", "validation") if 0 < len(groups[g]) <= left[p]]  # the split further from its share first:
        part = max(fits, key=lambda p: left[p]) if fits else "train"  # test then validation left validation empty on the real logs
        out[part].update(groups[g])
        if part != "train":
            left[part] -= len(groups[g])
    return out, groups


def split_auth_windows(items: list[tuple[str, str, str]], d) -> dict[str, set[str]]:
    """``items``: (window id, class, log text); ``d``: the dataset node (fractions, ``split_seed``, ``split_by``).
    Window ids → split, as ``dataset.split_by`` asks (the module's doc)."""
    from sectune.data import check_split_seed, split_windows

    how = check_split_by(d.get("split_by") or "window")
    v, t, seed = float(d.val_fraction), float(d.test_fraction), check_split_seed(d.split_seed)
    if how == "window":
        return split_windows([(i, lab) for i, lab, _ in items], v, t, seed)
    if v < 0 or t < 0 or v + t >= 1:
        raise ConfigError(f"dataset.val_fraction={v} + dataset.test_fraction={t} must be in [0, 1)")
    texts = {i: text for i, _, text in items}
    if how == "time":
        logs = window_logs(list(texts))
        if len(texts) > 1 and len(set(x for x, _ in logs.values())) == len(texts):
            first, second = sorted(texts, key=lambda i: tuple(map(int, i.split("_"))))[:2]
            raise ConfigError(f"dataset.split_by=time: the {len(texts)} windows' names give no time order: a log is a run of "
                              "auth_data_X_Y.txt files in X order whose Y (the window's first line number in its log) rises, "
                              f"and no Y here rises (auth_data_{first}.txt, then auth_data_{second}.txt), so every window "
                              "would be a log of its own and none held out; name each log's windows so (X its running "
                              "index, Y its first line), or use dataset.split_by=window or source")
        where, detail = split_by_time(list(texts), v, t), f"{len(set(x for x, _ in logs.values()))} log(s) in time order"
    else:
        where, groups = split_by_source(texts, v, t, seed)
        sizes = sorted((len(g) for g in groups.values()), reverse=True)
        detail = f"{len(groups)} groups of windows sharing a source (largest {', '.join(map(str, sizes[:4]))})"
        if t > 0 and not where["test"]:
            raise ConfigError(f"dataset.split_by=source: no test window: the {len(texts)} windows' sources join them into "
                              f"{detail}, none small enough for dataset.test_fraction={t} ({round(len(texts) * t)} windows); "
                              "use dataset.split_by=time or window, or raise dataset.test_fraction")
    _check(where, {i: lab for i, lab, _ in items}, how, v, t, detail)
    return where


def _check(where: dict[str, set[str]], label: dict[str, str], how: str, v: float, t: float, detail: str) -> None:
    """Refuse a split without training or (asked for) test windows; warn of a held-out split under half its share, or
    a class one split lacks."""
    n = len(label)
    count = {s: len(ids) for s, ids in where.items()}
    if not where["train"]:
        raise ConfigError(f"dataset.split_by={how}: no training window ({detail}); lower dataset.val_fraction / test_fraction")
    if t > 0 and not where["test"]:
        raise ConfigError(f"dataset.split_by={how}: no test window ({detail}; {n} windows); raise dataset.test_fraction or add windows")
    _say(f"sectune: dataset.split_by={how}: {detail}; train {count['train']}, validation {count['validation']}, "
         f"test {count['test']} windows")
    for part, frac, key in (("validation", v, "val_fraction"), ("test", t, "test_fraction")):
        if frac > 0 and count[part] < round(n * frac) / 2:
            _say(f"sectune: warning: dataset.split_by={how}: {part} holds {count[part]} of {n} windows, under half of "
                 f"dataset.{key}={frac} ({round(n * frac)}): {detail}; its scores rest on few windows")
    classes = set(label.values())
    for part in ("train", "test"):
        missing = sorted(classes - {label[i] for i in where[part]})
        if missing and where[part]:
            _say(f"sectune: warning: dataset.split_by={how}: the {part} windows hold no {'/'.join(missing)} window "
                 f"({detail}; the split is not stratified by class)")
