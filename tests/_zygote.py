"""A pre-imported Python that forks one child per ``python -m sectune ARGS`` the tests run (conftest.sectune).

Most of a tiny CLI run's time on a CPU is importing torch, transformers, peft, trl, scikit-learn and
matplotlib (~10 s per run on 2 cores, for runs whose work takes a few seconds). This server imports them once,
in a fresh interpreter that has run no test code, then serves requests on stdin, one JSON line each:
``{"argv": [...], "cwd": ..., "env": {...}, "stdout": path, "stderr": path}``. For each it forks; the child
takes that cwd, environment, argv and the two files as fd 1 and 2, runs ``sectune`` as ``python -m sectune``
would (runpy, ``__main__``), runs the exit handlers and exits with the CLI's code. The server answers
``{"pid": ...}`` at once, then ``{"returncode": ...}`` (negative: killed by that signal, as subprocess says).

A child is a separate process that starts from these imports and nothing else, as a user's command would.
What the imports read from the environment (HF_HOME, OMP_NUM_THREADS, ...) is read once, here: the caller
(conftest) runs a real subprocess instead whenever a request's environment differs from the server's.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import sys

# the protocol keeps the pipe it was given as stdout; whatever a library prints on stdout goes to stderr instead
_PROTOCOL = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)
os.environ.setdefault("MPLBACKEND", "Agg")

# this checkout's sectune, not whichever one the venv installed (an editable install of another clone): started as a
# script, the server's first import path is tests/, and a clone tested with a shared venv had its forked runs use the
# other tree's code and .cache (an audit, session 37)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# what `python -m sectune` imports on its way to a stage (the stage modules then import little of their own)
PRELOAD = ("torch", "matplotlib.pyplot", "sklearn.model_selection", "peft", "transformers.trainer", "trl.trainer.sft_trainer",
           "sectune.cli", "sectune.runner")
for _name in PRELOAD:
    importlib.import_module(_name)
# the imports' ~650k objects out of the cyclic collector's reach: every full collection in a child (accelerate's
# free_memory after each training, ~0.35 s on 2 cores) walked them all, though none of them is ever garbage
# (CPython's gc.freeze, meant for a server that forks after its imports; a child's own objects are collected as before)
gc.collect()
gc.freeze()


def _child(req: dict) -> None:
    import atexit
    import runpy

    code = 0
    try:
        os.setsid()  # its own process group: a timeout kills what it started too
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
            f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(f, fd)
            os.close(f)
        sys.stdin = open(0, closefd=False)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        sys.argv = ["sectune", *req["argv"]]
        sys.path[0] = req["cwd"]
        runpy.run_module("sectune", run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - an uncaught exception: traceback and exit 1, as the interpreter does
        import traceback

        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def main() -> None:
    out = _PROTOCOL
    print(json.dumps({"ready": os.getpid()}), file=out, flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _PROTOCOL.close()
            _child(req)
        print(json.dumps({"pid": pid}), file=out, flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), file=out, flush=True)


if __name__ == "__main__":
    main()
