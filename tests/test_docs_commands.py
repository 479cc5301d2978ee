"""Every command line the docs show still composes and passes sectune's checks, without training (an audit, session
44): README.md, experiments/*/README.md, bench/README.md, and the commands experiments/*.sh run. A renamed key, a
removed preset or a value the checks now refuse fails here, naming the doc's file and line; so does a
``python <path>`` / ``bash <path>`` whose file is gone, or a ``--flag`` the script no longer takes.
How the commands are read: tests/_doc_commands.py."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

import _doc_commands as docs
from _doc_commands import Command, ScriptCall

#: commands the docs show on purpose as ones sectune refuses, each with why (matched by file and the command's text)
NOT_COMPOSABLE = {
    ("README.md", "lora.rr=3"): "the README's example of a typo'd key and the error sectune gives",
}
#: paths the docs name that are not in a checkout on purpose, each with why
NOT_IN_CHECKOUT = {
    "sectune/flower_app_project": "the installed wheel's copy of experiments/hdfs_federated/flower_app (setup.py)",
}
#: scripts the docs run that are run here with `python` recorded instead of run (their sectune commands checked)
RUN_SCRIPTS = ("experiments/injection_contrastive/run.sh", "experiments/injection_contrastive/similar_texts_rerun.sh")


def _refused_on_purpose(c: Command) -> bool:
    return any(c.where.split(":")[0] == f and text in " ".join(c.argv) for f, text in NOT_COMPOSABLE)


def _recorded_runs(script: str, env: dict[str, str], tmp: Path) -> list[list[str]]:
    """The argv of every `python …` ``script`` runs under ``env``: bash runs it whole, with ``python`` (and $PY) a
    recorder, over fake succeeded SFT runs (SFT_ROOT/<i>/sft) and a fresh OUT; one seed (the loops' bodies differ only
    in it)."""
    calls, bin_dir, sft = tmp / "calls", tmp / "bin", tmp / "sft"
    for d in (calls, bin_dir):
        d.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        (sft / str(i) / "sft").mkdir(parents=True, exist_ok=True)
        (sft / str(i) / "sft" / "result.json").write_text('{"status": "succeeded"}')
    rec = bin_dir / "python"
    rec.write_text('#!/bin/bash\nprintf \'%s\\0\' "$@" > "$(mktemp "$DOC_CALLS/$(date +%s%N).XXXX")"\n')
    rec.chmod(0o755)
    (bin_dir / "python3").symlink_to(rec) if not (bin_dir / "python3").exists() else None
    out = tmp / "out"
    shutil_env = {**os.environ, **env, "PY": str(rec), "SFT_ROOT": str(sft), "OUT": str(out), "SEEDS": "1",
                  "DOC_CALLS": str(calls), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    for f in calls.iterdir():
        f.unlink()
    done = subprocess.run(["bash", str(docs.ROOT / script)], cwd=docs.ROOT, env=shutil_env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, f"{script} under {env}: {done.stderr[-2000:]}"
    return [f.read_bytes().decode().split("\0")[:-1] for f in sorted(calls.iterdir())]


@pytest.fixture(scope="module")
def documented():
    """(commands, script calls) of every doc, and the sectune commands the run scripts make."""
    found = docs.all_commands()
    return [c for c in found if isinstance(c, Command)], [c for c in found if isinstance(c, ScriptCall)]


def _check_all(commands: list[Command], config_dirs=None) -> list[str]:
    failures, verdicts = [], {}
    for c in commands:
        # a run dir's path is any path to the checks (none reads it): one check for the commands that differ only there
        key = tuple(re.sub(r"^([\w+~]+\.[\w.]+)=(/|__PLACEHOLDER__)\S*$", r"\1=/run/dir", a) for a in c.argv
                    if not a.startswith(("hydra.run.dir=", "hydra.sweep.dir=")))
        if key not in verdicts:
            verdicts[key] = docs.check(list(key), config_dirs=config_dirs)
        if verdicts[key] and not _refused_on_purpose(c):
            failures.append(f"{c.where}: sectune {' '.join(c.argv)}\n    -> {verdicts[key]}")
    return failures


def test_every_documented_sectune_command_composes_and_passes_the_checks(documented, tmp_path):
    commands, _ = documented
    assert len(commands) > 100, "the docs' commands were not found: has the extraction broken?"
    my_conf = docs.user_config_dir(docs.ROOT / "README.md", "my_conf", tmp_path)
    assert my_conf is not None, "README's my_conf/ example (its ```yaml blocks) was not found"
    failures = _check_all(commands, config_dirs={"my_conf": my_conf})
    assert not failures, "documented commands that no longer compose or pass the checks:\n" + "\n".join(failures)


def test_the_commands_the_run_scripts_make_compose_and_pass_the_checks(documented, tmp_path):
    """run.sh under its defaults and under each NAME=value prefix the docs run it with (ROWS=adv, EXTRA=0, RP=1.0…)."""
    _, calls = documented
    envs = {script: [{}] for script in RUN_SCRIPTS}
    for c in calls:
        if c.interpreter == "bash" and c.path in envs:
            envs[c.path].append({k: v for k, v in c.env.items() if k not in ("SFT_ROOT", "OUT")})
    commands, scripts = [], []
    for script, variants in envs.items():
        for env in {tuple(sorted(e.items())): e for e in variants}.values():
            for argv in _recorded_runs(script, env, tmp_path):
                where = f"{script} ({' '.join(f'{k}={v}' for k, v in env.items()) or 'defaults'})"
                if argv[:2] == ["-m", "sectune"]:
                    commands.append(Command(where, argv[2:], ""))
                else:
                    scripts.append((where, argv[0]))
    assert len(commands) > 10
    failures = _check_all(commands)
    failures += [f"{where}: python {path}: no such file" for where, path in scripts if not (docs.ROOT / path).is_file()]
    assert not failures, "\n".join(failures)


def test_every_script_the_docs_run_exists_and_takes_the_flags_shown(documented):
    _, calls = documented
    for f in docs.script_files():  # the scripts' own `python bench/x.py --flag` lines too
        calls = calls + [c for c in docs.shell_text(list(enumerate(f.read_text().splitlines(), 1)), docs.rel(f))
                         if isinstance(c, ScriptCall)]
    assert len(calls) > 30
    failures = []
    for c in calls:
        path = docs.ROOT / c.path
        if not path.is_file():
            failures.append(f"{c.where}: {c.interpreter} {c.path}: no such file")
            continue
        source = path.read_text(encoding="utf-8")
        for flag in {m for a in c.args for m in re.findall(r"^\[?(--[\w-]+)", a)}:
            if f'"{flag}"' not in source and f"'{flag}'" not in source:
                failures.append(f"{c.where}: {c.path} has no {flag} option")
    assert not failures, "\n".join(failures)


def test_every_repository_path_the_docs_name_exists():
    """`sectune/stages/rl.py`, `bench/gpu_memory.py`, `tests/test_hdfs.py`… in the docs' inline code and code blocks."""
    missing = [f"{where}: {p}" for f in docs.doc_files() for where, p in docs.repo_paths(f)
               if not (docs.ROOT / p).exists() and p not in NOT_IN_CHECKOUT]
    assert not missing, "paths the docs name that are not in the repository:\n" + "\n".join(missing)


def test_a_broken_doc_line_fails_the_check(tmp_path):
    """The extraction and the checks catch what they are for: a renamed key, a removed preset, a refused value, a
    missing script, each from a doc's code block (with a variable of the block), and a removed flag."""
    doc = tmp_path / "README.md"
    doc.write_text("x\n```bash\nC=\"+experiment=auth_grpo_tiny logger=none\"\n"
                   "sectune $C train.learning_rat=1e-3\n"
                   "sectune $C lora=r4_atention \\\n  train.max_steps=2\n"
                   "sectune stage=dpo loss=dpo dataset=auth_logs\n"
                   "sectune -m train.learning_rate=1e-3,-1\n"
                   "python experiments/nope/table.py 1 2 3\n```\n"
                   "and `sectune $C train.seed=1` inline\n")
    found = docs.shell_text(docs._blocks(doc.read_text())[0][0], "README.md")
    commands = [c for c in found if isinstance(c, Command)]
    assert [c.where for c in commands] == ["README.md:4", "README.md:5", "README.md:7", "README.md:8"]
    assert commands[0].argv == ["+experiment=auth_grpo_tiny", "logger=none", "train.learning_rat=1e-3"]
    verdicts = [docs.check(c.argv) for c in commands]
    assert "train.learning_rat" in verdicts[0]
    assert "r4_atention" in verdicts[1]
    assert "dataset=auth_preferences" in verdicts[2]  # stage=dpo trains on preference pairs
    assert "train.learning_rate=-1" in verdicts[3]  # a sweep's second value
    (script,) = [c for c in found if isinstance(c, ScriptCall)]
    assert script.path == "experiments/nope/table.py" and not (docs.ROOT / script.path).exists()
    assert docs.check(["+experiment=auth_grpo_tiny", "train.seed=1"]) is None
    assert docs.check(["--cfgg", "job"]).startswith("--cfgg")
