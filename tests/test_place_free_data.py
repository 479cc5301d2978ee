"""The place-free digests (a pipeline step's skip_digest, a sweep job's place_free_digest, a resume record's
place.<key>) count data by its files' bytes instead of its place (session 44). A review of that change (session 44,
helper R): where the files could not be read, the data counted as one string whatever it held, and a pipeline step's
recorded data (names, sizes, times) still told a copy of the same bytes apart."""

from __future__ import annotations

import json
import os
import shutil

from conftest import compose


def _cfg(root, *extra):
    return compose(["stage=reward", "dataset=auth_preferences", f"paths.cache_dir={root}/.cache", f"paths.shared_data={root}/shared",
                    f"dataset.path={root}/shared/pairs.jsonl", *extra])


def _two_places(tmp_path):
    """a/ and b/ with one private (unreadable) file beside other pairs: the same size and time, other bytes."""
    rows = {"a": '{"prompt": "p", "chosen": "a", "rejected": "b"}\n', "b": '{"prompt": "p", "chosen": "b", "rejected": "a"}\n'}
    for place, text in rows.items():
        (tmp_path / place / "shared").mkdir(parents=True)
        for name, body in (("pairs.jsonl", text), ("private.txt", "mine\n")):
            (tmp_path / place / "shared" / name).write_text(body)
            os.utime(tmp_path / place / "shared" / name, ns=(10**18, 10**18))


def test_a_data_folder_holding_one_unreadable_file_still_counts_the_others_by_their_bytes(tmp_path, monkeypatch):
    """One file this user may not read (another user's 0600 file in a shared data folder) made the whole folder
    'unreadable: Permission denied' in the content fingerprint: every data folder holding such a file was the same data,
    so a sweep reused a job trained on other data, and a resume at another place went on with other data."""
    from sectune import run_digest
    from sectune.training.checkpoints import data_places

    _two_places(tmp_path)
    real = run_digest.file_sha256

    def sha256(f):
        if f.name == "private.txt":  # (tests run as root, who reads anything: the refusal a user gets, simulated)
            raise PermissionError(13, "Permission denied", str(f))
        return real(f)

    monkeypatch.setattr(run_digest, "file_sha256", sha256)
    a, b = _cfg(tmp_path / "a"), _cfg(tmp_path / "b")
    assert run_digest.config_digest(a, portable=True) != run_digest.config_digest(b, portable=True)
    # the shared folder alone (dataset.path unset): its readable files tell the two apart
    shared = [compose(["stage=reward", "dataset=auth_preferences", f"paths.shared_data={tmp_path / p / 'shared'}"]) for p in "ab"]
    assert run_digest.config_digest(shared[0], portable=True) != run_digest.config_digest(shared[1], portable=True)
    flat = {"dataset.path": "x", "dataset.source_dir": "y"}
    assert data_places(a, flat)["place.dataset.source_dir"] != data_places(b, flat)["place.dataset.source_dir"]
    # the same bytes at the other place: the same data, the unreadable file counting by its size and time
    shutil.copy2(tmp_path / "a" / "shared" / "pairs.jsonl", tmp_path / "b" / "shared" / "pairs.jsonl")
    assert run_digest.config_digest(a, portable=True) == run_digest.config_digest(b, portable=True)


def test_a_data_path_that_cannot_be_listed_keeps_its_place_in_the_place_free_digests(tmp_path, monkeypatch):
    """A folder that cannot be listed at all (a mount's lost+found beside the data) fingerprints as one string, which
    says nothing of its files: its place counts, as before the place-free digests."""
    from sectune import run_digest
    from sectune.training.checkpoints import data_places

    _two_places(tmp_path)
    real = run_digest.data_fingerprint

    def fingerprint(cfg, content=False):
        return {k: ("unreadable: Permission denied" if k == "paths.shared_data" else v) for k, v in real(cfg, content).items()}

    monkeypatch.setattr(run_digest, "data_fingerprint", fingerprint)
    shutil.copy2(tmp_path / "a" / "shared" / "pairs.jsonl", tmp_path / "b" / "shared" / "pairs.jsonl")
    a, b = _cfg(tmp_path / "a"), _cfg(tmp_path / "b")
    assert run_digest.config_digest(a, portable=True) != run_digest.config_digest(b, portable=True)
    assert "place.dataset.source_dir" not in data_places(a, {"dataset.source_dir": "y"})  # the path alone counts


def test_a_pipeline_step_on_a_copy_of_its_data_without_the_times_is_done(tmp_path):
    """A step's recorded data (names, sizes, times) was compared after its skip_digest had matched the files' bytes: a
    copy of the data without its times (cp -r, a download again) trained the step again. Other bytes still do."""
    from sectune import pipeline_record
    from sectune.runner import config_digest
    from sectune.stages.pipeline import Step

    for place in ("a", "b"):
        (tmp_path / place / "shared").mkdir(parents=True)
    (tmp_path / "a" / "shared" / "pairs.jsonl").write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    os.utime(tmp_path / "a" / "shared" / "pairs.jsonl", ns=(10**18, 10**18))
    shutil.copyfile(tmp_path / "a" / "shared" / "pairs.jsonl", tmp_path / "b" / "shared" / "pairs.jsonl")  # times not kept

    def step(place):
        return Step("reward", tmp_path / "pipe" / "reward", _cfg(tmp_path / place), [])

    done = step("a")
    pipeline_record.record_step(done)
    (done.dir / "result.json").write_text(json.dumps({"stage": "reward", "status": "succeeded", "artifacts": {},
                                                      "config_digest": config_digest(done.cfg), "started": "2026-01-01T00:00:00"}))
    assert pipeline_record.already_done(done) is not None
    assert pipeline_record.already_done(step("b")) is not None
    (tmp_path / "b" / "shared" / "pairs.jsonl").write_text('{"prompt": "p", "chosen": "b", "rejected": "a"}\n')
    assert pipeline_record.already_done(step("b")) is None


def test_a_file_replaced_by_one_of_its_size_and_time_is_hashed_again_in_the_same_process(tmp_path):
    """The per-process memo of file hashes was keyed by path, size and modification time: a file replaced in the same
    process (a sweep, a pipeline) by another of one size and time (cp -p, an archive unpacked) kept the old hash."""
    from sectune.run_digest import file_sha256

    f, other = tmp_path / "pairs.jsonl", tmp_path / "other.jsonl"
    f.write_text("aaaa\n")
    other.write_text("bbbb\n")
    for p in (f, other):
        os.utime(p, ns=(10**18, 10**18))
    before = file_sha256(f)
    shutil.copy2(other, f)  # the same size and modification time, other bytes
    assert file_sha256(f) != before


def test_a_files_hash_is_kept_for_later_processes_until_the_file_changes(tmp_path, monkeypatch):
    """Session 44 (review R): the place-free digests read every data file in full in every run and rank (a 13 GB
    CIC-IoT folder in paths.shared_data: ~14 s each). The hashes are kept in <paths.cache_dir>/file_sha256.json: a later
    process reads a file again only once it changed; a file rewritten gets its new hash, and the memo keeps one entry."""
    import hashlib

    from sectune import run_digest

    data = tmp_path / "data"
    data.mkdir()
    (data / "a.log").write_text("one\n")
    cfg = compose([f"paths.cache_dir={tmp_path / 'cache'}", f"paths.shared_data={data}"])
    monkeypatch.setattr(run_digest, "RACY_NS", 0)  # a file written just now is kept too (not on a coarse clock: the test below)

    def fresh_process():
        monkeypatch.setattr(run_digest, "_CONTENT_MEMO", {})
        monkeypatch.setattr(run_digest, "_MEMO_READ", set())

    first = run_digest.data_fingerprint(cfg, content=True)
    fresh_process()

    def no_reading(*a, **k):
        raise AssertionError("a file read again though unchanged")

    with monkeypatch.context() as m:
        m.setattr(run_digest.hashlib, "sha256", no_reading)
        assert run_digest.data_fingerprint(cfg, content=True) == first
    fresh_process()
    (data / "a.log").write_text("two\n")  # the same size, other bytes
    second = run_digest.data_fingerprint(cfg, content=True)
    assert second != first and second["paths.shared_data"][0][2] == "sha256:" + hashlib.sha256(b"two\n").hexdigest()[:16]
    memo = json.loads((tmp_path / "cache" / run_digest.MEMO_FILE).read_text())
    assert len(memo) == 1, memo


def test_an_auth_logs_folders_windows_count_in_the_data_digests(tmp_path):
    """Audit, session 45: data_fingerprint listed two folders deep, and an auth_logs folder (dataset.path, seed 000's
    layout) holds its windows three deep (auth_data/<class>/auth_data_X_Y.txt): only Auth_bin/*.json counted. A window
    moved to another class folder (its label) or edited left every digest alone, so a pipeline skipped, or a sweep reused,
    a step trained on the old labels; and the place-free digests took another folder with the same Auth_bin for the same data."""
    from sectune import run_digest

    def folder(place):
        root = tmp_path / place / "auth"
        for cls, name in (("benign", "auth_data_1_0.txt"), ("malicious", "auth_data_2_0.txt")):
            (root / "auth_data" / cls).mkdir(parents=True, exist_ok=True)
            (root / "auth_data" / cls / name).write_text(f"sshd[1]: window {name}\n")
            (root / "Auth_bin").mkdir(exist_ok=True)
            (root / "Auth_bin" / name.replace("auth_data", "auth_text").replace(".txt", ".json")).write_text("{}\n")
        return compose(["stage=sft", "dataset=auth_logs", f"dataset.path={root}", f"paths.cache_dir={tmp_path / 'cache'}",
                        f"paths.shared_data={tmp_path / 'none'}"])

    a, b = folder("a"), folder("b")
    (tmp_path / "b" / "auth" / "auth_data" / ".git" / "objects").mkdir(parents=True)  # a hidden folder is no data
    (tmp_path / "b" / "auth" / "auth_data" / ".git" / "objects" / "ab").write_text("x\n")
    assert run_digest.config_digest(a, portable=True) == run_digest.config_digest(b, portable=True)  # the same files
    plain = run_digest.config_digest(b)
    relabelled = tmp_path / "b" / "auth" / "auth_data"
    shutil.move(relabelled / "benign" / "auth_data_1_0.txt", relabelled / "malicious" / "auth_data_1_0.txt")
    assert run_digest.config_digest(b) != plain
    assert run_digest.config_digest(a, portable=True) != run_digest.config_digest(b, portable=True)
    assert run_digest.skip_digest(a) != run_digest.skip_digest(b)
    edited = tmp_path / "a" / "auth" / "auth_data" / "benign" / "auth_data_1_0.txt"
    before = run_digest.config_digest(a, portable=True)
    edited.write_text(edited.read_text().replace("sshd", "SSHD"))  # the same size, other bytes
    assert run_digest.config_digest(a, portable=True) != before


def test_a_file_rewritten_within_its_filesystems_clock_tick_is_hashed_again(tmp_path, monkeypatch):
    """Audit, session 45: a filesystem's times tick coarsely (FAT: 2 s; ext4/xfs before Linux 6.13: a few ms), so a file
    rewritten with other bytes of one size in the tick it was hashed in keeps its inode, size and both times, and the memo
    (in the process, then in file_sha256.json for later runs) gave the old bytes' hash: a sweep or pipeline reused a run
    made on the old data. A file changed within RACY_NS of its hashing is not kept (git's racily clean entries)."""
    import hashlib
    import pathlib
    import types

    from sectune import run_digest

    real_stat = pathlib.Path.stat
    tick = 2_000_000_000

    def coarse_stat(self, *a, **k):  # this kernel's multigrain times never repeat: FAT's 2-second ones, simulated
        st = real_stat(self, *a, **k)
        return types.SimpleNamespace(st_ino=st.st_ino, st_size=st.st_size, st_mode=st.st_mode,
                                     st_mtime_ns=st.st_mtime_ns // tick * tick, st_ctime_ns=st.st_ctime_ns // tick * tick)

    monkeypatch.setattr(run_digest, "_CONTENT_MEMO", {})
    monkeypatch.setattr(pathlib.Path, "stat", coarse_stat)
    f = tmp_path / "pairs.jsonl"
    f.write_text("aaaa\n")
    assert run_digest.file_sha256(f) == hashlib.sha256(b"aaaa\n").hexdigest()[:16]
    f.write_text("bbbb\n")  # the same size, in the same tick: every stamp the memo keys by is unchanged
    assert run_digest.file_sha256(f) == hashlib.sha256(b"bbbb\n").hexdigest()[:16]


def test_a_resume_on_a_copy_of_its_data_without_the_times_goes_on(tmp_path):
    """Audit, session 45: at a new place a resume excused dataset.path when place.dataset.path (the files' bytes) matched,
    but not data.dataset.path (names, sizes, times), so a checkout copied with its data by cp -r (the bytes, not the
    times) was refused, where a pipeline step and a sweep job take such a copy for the same data. Other bytes are refused."""
    import pytest

    from sectune.errors import ConfigError
    from sectune.training import checkpoints

    a, b = tmp_path / "a", tmp_path / "b"
    (a / "shared").mkdir(parents=True)
    (a / "shared" / "pairs.jsonl").write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    os.utime(a / "shared" / "pairs.jsonl", ns=(10**18, 10**18))

    def cfg(root):
        return compose(["logger=none", "stage=reward", "dataset=auth_preferences", f"paths.shared_data={root / 'shared'}",
                        f"dataset.path={root / 'shared' / 'pairs.jsonl'}"])

    assert checkpoints.resolve_resume(cfg(a), a / "checkout" / "outputs" / "day" / "user" / "checkpoints") is None
    shutil.copytree(a, b, copy_function=shutil.copyfile)  # cp -r: the bytes, not the times
    ckpt = b / "checkout" / "outputs" / "day" / "user" / "checkpoints" / "checkpoint-2"
    checkpoints._check_same_training(cfg(b), ckpt, "train.resume=auto")
    (b / "shared" / "pairs.jsonl").write_text('{"prompt": "p", "chosen": "b", "rejected": "a"}\n')  # other bytes, one size
    with pytest.raises(ConfigError, match=r"data.dataset.path: .*dataset.path: '.*/a/shared/pairs.jsonl' there"):
        checkpoints._check_same_training(cfg(b), ckpt, "train.resume=auto")


def test_a_memo_that_cannot_be_written_leaves_no_temporary_file(tmp_path, monkeypatch):
    """Audit, session 45: a write of file_sha256.json that failed (a full disk: ENOSPC while writing) left its temporary
    .file_sha256.json.* in paths.cache_dir, one more at every run, each as large as the memo got before the disk filled."""
    import errno

    from sectune import run_digest

    monkeypatch.setattr(run_digest, "_CONTENT_MEMO", {"/x": [1, 2, 3, 4, "h"]})

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(run_digest.json, "dump", full_disk)
    run_digest._write_memo(tmp_path / "cache" / run_digest.MEMO_FILE, {})
    assert list((tmp_path / "cache").iterdir()) == []
