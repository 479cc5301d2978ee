"""Shared test helpers: compose configs in-process, run the CLI in a subprocess."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from sectune.paths import PROJECT_ROOT, shared_data_dir

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub: fail fast
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _private_tmpdir() -> None:
    """Every temporary file of the test run (torchrun's torchelastic_* folders, W&B's media and artifact folders, Ray's
    session, the fork server's sockets) goes under one folder removed at exit: each `make test` had left ~10 folders in
    /tmp, hundreds over a week. pytest-xdist's workers inherit the controller's folder (a nested one would push Ray's
    socket paths toward their 107-byte limit); the controller, last to exit, removes it."""
    global _OWN_TMPDIR
    if os.environ.get("SECTUNE_TESTS_TMPDIR"):
        return
    _OWN_TMPDIR = tempfile.mkdtemp(prefix="sectune-tests-")
    os.environ["SECTUNE_TESTS_TMPDIR"] = os.environ["TMPDIR"] = _OWN_TMPDIR
    tempfile.tempdir = None  # tempfile cached the old TMPDIR
    atexit.register(lambda: _OWN_TMPDIR and shutil.rmtree(_OWN_TMPDIR, ignore_errors=True))
    atexit.register(_drop_index_entries, _OWN_TMPDIR)


def _drop_index_entries(tmpdir: str) -> None:
    """The sweep tests' jobs indexed in the checkout's multirun/.index (sweep.index_dir's default) leave with the run:
    a user's sweep.skip_done read entries naming deleted test folders (an audit, session 41)."""
    import json

    for f in (PROJECT_ROOT / "multirun" / ".index").glob("*.json"):
        try:
            if str(json.loads(f.read_text(encoding="utf-8")).get("run_dir", "")).startswith(tmpdir + os.sep):
                f.unlink()
        except (OSError, ValueError, AttributeError):
            pass


_OWN_TMPDIR: str | None = None
_private_tmpdir()


def pytest_sessionfinish(session, exitstatus):
    """A failed run keeps the folder (pytest's tmp_path of each test is inside it, under pytest-of-<user>/) and says where."""
    global _OWN_TMPDIR
    if _OWN_TMPDIR and exitstatus not in (0, 5):  # 5: no tests collected
        print(f"\nsectune tests: temporary files kept for a look at the failures: {_OWN_TMPDIR}", file=sys.stderr)
        _OWN_TMPDIR = None

REAL_AUTH = shared_data_dir() / "loghub_openssh_2k" / "OpenSSH_2k.log"

requires_real_data = pytest.mark.skipif(
    not REAL_AUTH.exists(), reason=f"real public data not found at {shared_data_dir()} (fresh clone without ../shared: "
                                   "README's Data section names each source and how to download it; SECTUNE_SHARED_DATA=<folder>)"
)

#: small, fast settings for end-to-end runs on the tiny model
FAST = ["logger=none", "generation.preview_samples=0", "train.batch_size=4"]


def compose(overrides: list[str] | None = None):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from sectune import config

    config.register()
    with initialize_config_dir(str(PROJECT_ROOT / "conf"), version_base="1.3"):
        return hydra_compose("config", overrides=overrides or [])


def assert_one_step_whatever_the_grad_accum(train_one_step) -> None:
    """``train_one_step(batch_size, grad_accum, callback)`` trains one optimizer step on the same 4 examples with
    ``callback`` among the trainer's callbacks and returns the trainer: 4 × 1, 2 × 2 and 1 × 4 must give the same
    accumulated gradient (read just before the optimizer step) and log the same loss."""
    import torch
    from transformers import TrainerCallback

    class Grads(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            self.grads = torch.cat([q.grad.flatten().clone() for q in model.parameters() if q.grad is not None])

    def run(bs, ga):
        cb = Grads()
        trainer = train_one_step(bs, ga, cb)
        return cb.grads, next(r["loss"] for r in trainer.state.log_history if "loss" in r)

    g4, loss4 = run(4, 1)
    for bs, ga in [(2, 2), (1, 4)]:
        g, loss = run(bs, ga)
        assert ((g - g4).norm() / g4.norm()).item() < 1e-4, (bs, ga)
        assert loss == pytest.approx(loss4, rel=1e-5), (bs, ga)


class Run:
    def __init__(self, proc: subprocess.CompletedProcess, run_dir: Path):
        self.proc, self.run_dir = proc, run_dir
        self.returncode, self.stdout, self.stderr = proc.returncode, proc.stdout, proc.stderr

    @property
    def result(self) -> dict:
        return json.loads((self.run_dir / "result.json").read_text())


def sectune(args: list[str], run_dir: Path | None = None, timeout: int = 600, env: dict | None = None) -> Run:
    """``python -m sectune ARGS [hydra.run.dir=RUN_DIR]`` as a user would run it (see :func:`cli`)."""
    return Run(cli([*args, *([f"hydra.run.dir={run_dir}"] if run_dir is not None else [])], timeout=timeout, env=env), run_dir)


def cli(args: list[str], cwd: Path = PROJECT_ROOT, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m sectune ARGS`` in a process of its own: forked from a server that has imported the heavy
    libraries once (tests/_zygote.py; ~10 s less per run on 2 cores), or a plain subprocess when the environment
    differs from the server's in what the imports read (anything but the keys :func:`_comparable` leaves out) or
    when ``SECTUNE_TEST_SUBPROCESS=1``; ``SECTUNE_TEST_ZYGOTE_DEBUG=1`` prints why a run was not forked."""
    cmd = [sys.executable, "-m", "sectune", *args]
    full_env = {**os.environ, **(env or {})}
    zygote = None if os.environ.get("SECTUNE_TEST_SUBPROCESS") == "1" else _Zygote.get()
    if zygote is not None and zygote.serves(full_env):
        return zygote.run(cmd, Path(cwd), full_env, timeout)
    if zygote is not None and os.environ.get("SECTUNE_TEST_ZYGOTE_DEBUG"):
        a, b = _comparable(full_env), _comparable(zygote.env)
        print(f"conftest.cli: plain subprocess; environment differs in {sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))}", file=sys.stderr)
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)


#: what the fork server's own imports put in its environment when absent (scikit-learn's KMP_* settings, sectune.cli's
#: and sectune's defaults): a test process that imported them after the server started differs from it in nothing a
#: child would see, but compared as different, and every later run of that pytest worker was a plain subprocess
#: (~10 s of imports each: tests/test_config.py with tests/test_saved_work.py took 93 s instead of 46 s). Flower's import
#: (flwr/supercore/grpc.py) sets GRPC_VERBOSITY=error when absent: after test_federated.py's in-process tests every
#: later run of that worker was a plain subprocess (test_sft.py 87 s instead of 38 s); the server imports no gRPC, and
#: a child that does (stage=federated) imports Flower, which sets the same value; Ray's import sets RAY_CLIENT_MODE=0 alike
IMPORT_DEFAULTS = {"KMP_DUPLICATE_LIB_OK": "True", "KMP_INIT_AT_FORK": "FALSE", "TOKENIZERS_PARALLELISM": "false",
                   "HF_HUB_DISABLE_TELEMETRY": "1", "USE_HUB_KERNELS": "0", "GRPC_VERBOSITY": "error", "RAY_CLIENT_MODE": "0"}


def _comparable(env: dict) -> dict:
    # pytest sets PYTEST_CURRENT_TEST per test; W&B reads its settings when a run starts, not at import; torch sets
    # TORCHINDUCTOR_CACHE_DIR in this process the first time a test compiles something, and reads it when compiling
    return {**IMPORT_DEFAULTS, **{k: v for k, v in env.items()
                                  if not k.startswith(("PYTEST_", "WANDB_", "SECTUNE_TEST_")) and k != "TORCHINDUCTOR_CACHE_DIR"}}


def _process_state() -> dict:
    """What a test could leave changed for the tests after it in this pytest worker: the environment (as the fork server
    compares it), the working directory, signal handlers, and torch's global settings once torch is imported."""
    import signal

    # sys.path is not compared: imports extend it themselves (Ray's puts its third-party folder on it)
    state = {"environment": _comparable(dict(os.environ)), "cwd": os.getcwd(),
             **{f"handler of {sig.name}": signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}}
    torch = sys.modules.get("torch")
    if torch is not None:
        state.update({"torch default dtype": torch.get_default_dtype(), "torch threads": torch.get_num_threads(),
                      "torch grad mode": torch.is_grad_enabled(),
                      "torch deterministic algorithms": torch.are_deterministic_algorithms_enabled()})
    return state


def _put_back(before_env: dict, before: dict) -> None:
    import signal

    for k in set(before_env) | set(os.environ):
        if before_env.get(k) != os.environ.get(k):
            if k in before_env:
                os.environ[k] = before_env[k]
            else:
                os.environ.pop(k, None)
    os.chdir(before["cwd"])
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        if before[f"handler of {sig.name}"] is not None:
            signal.signal(sig, before[f"handler of {sig.name}"])
    torch = sys.modules.get("torch")
    if torch is not None and "torch default dtype" in before:
        torch.set_default_dtype(before["torch default dtype"])
        torch.set_num_threads(before["torch threads"])
        torch.set_grad_enabled(before["torch grad mode"])
        torch.use_deterministic_algorithms(before["torch deterministic algorithms"])


@pytest.fixture(autouse=True)
def _process_state_kept():
    """A test that leaves this process changed for good (os.environ[...] = ... in code it calls in-process instead of
    monkeypatch.setenv, a chdir, a signal handler, torch's thread count or default dtype) fails, and the state is put
    back: the tests after it in the same pytest-xdist worker, which depend on the order pytest-xdist hands out files,
    would otherwise run under it. CI failed on this (session 36): the federated _start_ray test left PYTHONPATH set,
    every later CLI run of that worker became a plain subprocess, not forked, and the harness's fork test failed."""
    before_env, before = dict(os.environ), _process_state()
    yield
    after = _process_state()
    changed = sorted(k for k in before.keys() | after.keys() if k in before and before.get(k) != after.get(k))
    if "environment" in changed:
        a, b = before["environment"], after["environment"]
        changed[changed.index("environment")] = f"environment {sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))}"
    if changed:
        _put_back(before_env, before)
        pytest.fail(f"the test left this process changed: {', '.join(changed)} (monkeypatch.setenv/chdir, or put it back)")


class _Zygote:
    """This test process's fork server (one per pytest-xdist worker, started on first use, gone with the process)."""

    _instance: "_Zygote | None" = None
    _failed = False

    def __init__(self) -> None:
        import atexit
        import tempfile

        self.env = dict(os.environ)
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("_zygote.py"))], cwd=PROJECT_ROOT, env=self.env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.buf = b""
        self.tmp = Path(tempfile.mkdtemp(prefix="sectune-zygote-"))
        atexit.register(self.close)
        if "ready" not in self._reply(300):
            raise RuntimeError("the fork server did not start")

    def close(self) -> None:
        import shutil

        if self.proc.poll() is None:
            self.proc.stdin.close()  # the server ends at the end of its input
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.tmp, ignore_errors=True)

    @classmethod
    def get(cls) -> "_Zygote | None":
        if cls._instance is not None and cls._instance.proc.poll() is None:
            return cls._instance
        if cls._failed:
            return None
        try:
            cls._instance = cls()
        except Exception:  # noqa: BLE001 - no server: every run is a plain subprocess
            cls._failed, cls._instance = True, None
        return cls._instance

    #: what a run may set that nothing the server imports reads at import time; a forked child reads it from its own
    #: environment when it runs: sectune's paths (sectune/paths.py reads them on each call) and the rank variables
    #: (sectune/training/distributed.py, on each call). Such a run is forked like any other: each was a plain
    #: subprocess, ~7 s of imports (test_hdfs's moved run, test_saved_work's SECTUNE_CACHE, test_distributed's sweep)
    READ_AT_RUN_TIME = frozenset({"SECTUNE_SHARED_DATA", "SECTUNE_CACHE", "WORLD_SIZE", "RANK", "LOCAL_RANK"})

    def serves(self, env: dict) -> bool:
        a, b = _comparable(env), _comparable(self.env)
        return all(a.get(k) == b.get(k) for k in (a.keys() | b.keys()) - self.READ_AT_RUN_TIME)

    def _reply(self, timeout: float | None) -> dict:
        import select
        import time

        end = None if timeout is None else time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            left = None if end is None else end - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise RuntimeError("the fork server exited")
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def run(self, cmd: list[str], cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
        import signal

        out, err = self.tmp / "stdout", self.tmp / "stderr"
        req = {"argv": cmd[3:], "cwd": str(cwd), "env": env, "stdout": str(out), "stderr": str(err)}
        self.proc.stdin.write((json.dumps(req) + "\n").encode())
        self.proc.stdin.flush()
        pid = self._reply(60)["pid"]
        try:
            rc = self._reply(timeout)["returncode"]
        except TimeoutError:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:  # it ended just now
                pass
            self._reply(60)
            raise subprocess.TimeoutExpired(cmd, timeout, out.read_text(errors="replace"), err.read_text(errors="replace")) from None
        return subprocess.CompletedProcess(cmd, rc, out.read_text(errors="replace"), err.read_text(errors="replace"))


@pytest.fixture
def run_sectune():
    return sectune


#: the files that take longest under `make test` (seconds of one worker's time on 2 cores, measured together, session 38:
#: distributed 152, rl 72, sweeps 61, classify 60, injection_data 56, pipeline 52, plan_doctor 50, contrastive 48,
#: config 47, hdfs 46, dpo 44, sft 40, resume 39, bad_input 38, federated 34, infer 31, packaging 23, saved_work 21,
#: reward 20, bad_inputs 13, then 10 s and less), longest first. pytest-xdist's loadfile hands a worker the next file when
#: it is nearly done, in collection order once `make test` turns off its own order (--no-loadscope-reorder; by default it
#: sends the files with the most tests first, which put a long file with few tests late: test_sft.py's 39-95 s ran while
#: the other worker stood idle for 17-37 s). Longest first, the two workers end within a few seconds of each other. A file
#: not listed follows these, in its usual order; a stale list costs only that balance.
LONGEST_FILES_FIRST = ("test_distributed.py", "test_rl.py", "test_sweeps.py", "test_classify.py", "test_injection_data.py",
                       "test_pipeline.py", "test_plan_doctor.py", "test_contrastive.py", "test_config.py", "test_hdfs.py",
                       "test_dpo.py", "test_sft.py", "test_resume.py", "test_bad_input.py", "test_federated.py",
                       "test_infer.py", "test_packaging.py", "test_saved_work.py", "test_export.py", "test_reward.py", "test_bad_inputs.py",
                       "test_subword.py", "test_report.py", "test_bench.py", "test_packing.py", "test_harness.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's tests keep their order


def sentencepiece_like_tokenizer():
    """A Metaspace tokenizer as Llama-2's: text that starts a string gets a leading "▁"; after a newline it does not."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", behavior="isolated"),
                                                pre_tokenizers.Metaspace(prepend_scheme="first")])
    tk.decoder = decoders.Metaspace(prepend_scheme="first")
    tk.train_from_iterator(['### Analysis:\n{"verdict":"benign"}', "line of logs", '{"verdict": "malicious"}'] * 20,
                           trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"],
                                               initial_alphabet=list('{}":,abcdefghijklmnopqrstuvwxyz#\n ▁0123456789')))
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>")
