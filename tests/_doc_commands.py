"""The command lines the docs show, as a reader would run them: every ``sectune …`` (README.md, experiments/*/README.md,
bench/README.md, and the experiments' and bench's shell scripts) and every ``python <path>`` / ``bash <path>`` they
name. tests/test_docs_commands.py composes and checks each one; ``python tests/_doc_commands.py`` lists them with what
the checks say.

Markdown: the lines of ```bash/sh code blocks (continuations joined, ``NAME="…"`` lines of the block expanded where
``$NAME`` follows, ``for v in a b c`` taking its first value) and `inline code` that starts a command. Shell scripts
are run by bash with ``python`` replaced by a recorder (tests/test_docs_commands.py), so their own variables,
functions and loops expand as they do for a user.

A placeholder (``<sft run>``, ``outputs/DATE/TIME``) stays a string value; one that names a config group's option
(``model=…``, ``logger=<TAB>``) is dropped, and ``...`` in a code block stands for the overrides of the earlier
command of that block that starts the same way (``sectune stage=reward ... reward.fallback=heuristic``)."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "experiments/*/README.md", "bench/README.md")
SCRIPTS = ("experiments/**/*.sh", "bench/**/*.sh")
#: a placeholder in angle brackets (``<sft run>``, ``<the same overrides>``): one word for the shell splitting
PLACEHOLDER = "__PLACEHOLDER__"
_ANGLE = re.compile(r"<[A-Za-z0-9_][^<>\n`]*>")
_ELLIPSIS = ("...", "…")
_PY = re.compile(r"^(.*/)?python3?(\.\d+)?$")


@dataclass
class Command:
    """``sectune ARGV`` at ``where`` (file:line)."""

    where: str
    argv: list[str]
    text: str


@dataclass
class ScriptCall:
    """``python PATH ARGS`` or ``bash PATH ARGS`` at ``where``, with the ``NAME=value`` prefix it was given."""

    where: str
    interpreter: str
    path: str
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)


def doc_files() -> list[Path]:
    return sorted({p for pattern in DOCS for p in ROOT.glob(pattern)})


def script_files() -> list[Path]:
    return sorted({p for pattern in SCRIPTS for p in ROOT.glob(pattern)})


def rel(path: Path) -> str:
    return path.resolve().relative_to(ROOT).as_posix()


def _blocks(text: str) -> tuple[list[list[tuple[int, str]]], list[tuple[int, str]]]:
    """The bash/sh code blocks (their (line number, line) pairs) and the prose lines outside every code block."""
    blocks, prose, inside, lang = [], [], False, ""
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip().startswith("```"):
            if not inside:
                lang = line.strip()[3:].strip().lower()
                if lang in ("bash", "sh", "shell", "console"):
                    blocks.append([])
            inside = not inside
            prose.append((n, ""))
            continue
        if inside:
            if lang in ("bash", "sh", "shell", "console"):
                blocks[-1].append((n, line))
        else:
            prose.append((n, line))
    return blocks, prose


def _logical_lines(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Continuation lines (a trailing ``\\``) joined, each with the number of its first line."""
    out: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for n, line in lines:
        if pending is not None:
            n, line = pending[0], pending[1] + " " + line.lstrip()
        if line.rstrip().endswith("\\") and not line.lstrip().startswith("#"):
            pending = (n, line.rstrip()[:-1])
            continue
        pending = None
        out.append((n, line))
    if pending is not None:
        out.append(pending)
    return out


def _expand(text: str, env: dict[str, str]) -> str:
    """``$NAME``, ``${NAME}`` and ``${NAME:-default}`` from ``env``; unknown names stay as they are."""
    def one(m: re.Match) -> str:
        name = m.group("braced") or m.group("bare")
        if name in env:
            return env[name]
        return m.group("default") if m.group("default") is not None else m.group(0)

    return re.sub(r"\$\{(?P<braced>[A-Za-z_]\w*)(?::-(?P<default>[^}]*))?\}|\$(?P<bare>[A-Za-z_]\w*)", one, text)


def _split(line: str) -> list[list[str]]:
    """A shell line's simple commands (split at ``;``, ``&&``, ``||``, ``|``, ``&``), comments dropped."""
    lex = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lex.whitespace_split = True
    try:
        tokens = list(lex)
    except ValueError:  # an unclosed quote: prose, not a command
        return []
    commands, cur = [], []
    for tok in tokens:
        if tok and set(tok) <= set(";&|"):
            commands.append(cur)
            cur = []
        else:
            cur.append(tok)
    commands.append(cur)
    return [c for c in commands if c]


def _parse(tokens: list[str], where: str, text: str, env: dict[str, str], out: list) -> None:
    """One simple command: a sectune command, a script call, a variable assignment (into ``env``), or nothing."""
    while tokens and tokens[0] in ("do", "then", "else", "time", "exec", "command"):
        tokens = tokens[1:]
    prefix: dict[str, str] = {}
    while tokens and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", tokens[0]):
        k, v = tokens.pop(0).split("=", 1)
        prefix[k] = v
    if not tokens:
        env.update(prefix)  # NAME="value" alone: a variable of this block
        return
    if tokens[:1] == ["nice"]:
        tokens = tokens[3:] if tokens[1:2] == ["-n"] else tokens[1:]
    if tokens[:1] == ["timeout"]:
        tokens = tokens[2:]
    if not tokens:
        return
    head = tokens[0]
    if head == "for" and len(tokens) >= 4 and tokens[2] == "in":  # for v in a b c: the first value
        env[tokens[1]] = tokens[3]
        return
    if head == "sectune" or head.endswith("/sectune"):
        out.append(Command(where, tokens[1:], text))
    elif _PY.match(head) or head in ("torchrun", "accelerate"):
        rest = tokens[1:]
        if head == "accelerate" and rest[:1] == ["launch"]:
            rest = rest[1:]
        while rest and rest[0].startswith("-") and rest[0] != "-m":  # the launcher's or Python's own flags
            rest = rest[1:]
        if rest[:2] == ["-m", "sectune"]:
            out.append(Command(where, rest[2:], text))
        elif rest and not rest[0].startswith("-") and rest[0].endswith(".py") and _PY.match(head):
            out.append(ScriptCall(where, "python", rest[0], rest[1:], prefix))
    elif head in ("bash", "sh") and len(tokens) > 1 and tokens[1].endswith(".sh"):
        out.append(ScriptCall(where, "bash", tokens[1], tokens[2:], prefix))


def shell_text(lines: list[tuple[int, str]], name: str, env: dict[str, str] | None = None) -> list:
    """The commands of shell lines (one code block, or one inline span as a one-line block)."""
    env = dict(env or {})
    out: list = []
    for n, line in _logical_lines(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        line = _ANGLE.sub(PLACEHOLDER, line)
        for var, first in re.findall(r"\bfor\s+([A-Za-z_]\w*)\s+in\s+([^\s;]+)", line):  # for s in 1 2 3: its first
            env[var] = first
        # a command substitution's own command first: eval "$(sectune -sc install=bash)"
        for inner in re.findall(r"\$\(([^()]*)\)", line):
            for tokens in _split(_expand(inner, env)):
                _parse(tokens, f"{name}:{n}", stripped, env, out)
        line = re.sub(r"\$\(([^()]*)\)", "SUBST", line)
        for tokens in _split(_expand(line, env)):
            _parse(tokens, f"{name}:{n}", stripped, env, out)
    _fill_ellipses([c for c in out if isinstance(c, Command)])
    return out


def _fill_ellipses(commands: list[Command]) -> None:
    """``...`` in a block's command: the overrides of the nearest earlier command without one that starts the same way
    (``sectune stage=reward ... reward.fallback=heuristic`` after ``sectune stage=reward loss=… dataset=…``); the
    command's own settings win. Where there is none (inline code, ``accelerate launch -m sectune …``) it is dropped."""
    for i, c in enumerate(commands):
        if not any(a in _ELLIPSIS for a in c.argv):
            continue
        first = next((a for a in c.argv if a not in _ELLIPSIS), None)
        earlier = next((e for e in reversed(commands[:i]) if e.argv[:1] == [first]
                        and not any(a in _ELLIPSIS for a in e.argv)), None)
        mine = [a for a in c.argv if a not in _ELLIPSIS]
        keys = {a.split("=", 1)[0].lstrip("+~") for a in mine if "=" in a}
        inherited = [a for a in (earlier.argv if earlier else []) if a.split("=", 1)[0].lstrip("+~") not in keys]
        c.argv = inherited + mine


def inline_spans(prose: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """`inline code` (one span may run onto the next line) outside code blocks, with its line number."""
    text = "\n".join(line for _, line in prose)
    starts = [n for n, _ in prose]
    spans = []
    for m in re.finditer(r"(?<!`)`([^`]+)`(?!`)", text):
        if m.group(1).count("\n") > 1:
            continue
        spans.append((starts[text.count("\n", 0, m.start())], m.group(1).replace("\n", " ")))
    return spans


_STARTS = re.compile(r"^(?:[A-Za-z_][A-Za-z0-9_]*=\S*\s+)*(?:eval\s+\"\$\(\s*)?"
                     r"(?:sectune\s|sectune$|(?:\S*/)?python3?\s|torchrun\s|accelerate\s+launch\s|bash\s|nice\s)")


def markdown(path: Path) -> list:
    """Every command of one markdown file: its code blocks', then its inline code's."""
    name = rel(path)
    blocks, prose = _blocks(path.read_text(encoding="utf-8"))
    out: list = []
    for block in blocks:
        out += shell_text(block, name)
    for n, span in inline_spans(prose):
        if _STARTS.match(span.strip()):
            out += shell_text([(n, span.strip())], name)
    return out


def repo_paths(path: Path) -> list[tuple[str, str]]:
    """(file:line, path) of every `inline code` (or code-block word) naming a file of this repository: one that starts
    with sectune/, tests/, bench/, experiments/ or conf/ (a ``path: Name`` suffix dropped)."""
    name = rel(path)
    blocks, prose = _blocks(path.read_text(encoding="utf-8"))
    found = []
    pattern = re.compile(r"(?<![\w./-])((?:sectune|tests|bench|experiments|conf)/[\w./-]*[\w/])")
    for n, span in inline_spans(prose) + [x for b in blocks for x in b]:
        for m in pattern.finditer(span):
            p = m.group(1).rstrip("/.")
            if PLACEHOLDER in p or "*" in p or "<" in p:
                continue
            found.append((f"{name}:{n}", p))
    return found


def user_config_dir(doc: Path, name: str, into: Path) -> Path | None:
    """sectune's conf/ with the ```yaml blocks of ``doc`` whose first comment names ``NAME/<group>/<option>.yaml`` added
    (README's my_conf/ example), as ``--config-dir NAME`` puts them beside the built-in groups; None if it shows none."""
    import shutil

    from sectune.paths import CONF_DIR

    files = {}
    for block in re.findall(r"```ya?ml\n(.*?)```", doc.read_text(encoding="utf-8"), re.S):
        m = re.search(rf"^#\s*{re.escape(name)}/(\w+)/(\w+\.yaml)", block, re.M)
        if m:
            files[(m.group(1), m.group(2))] = block
    if not files:
        return None
    conf = into / "conf"
    if not conf.is_dir():
        shutil.copytree(CONF_DIR, conf)
    for (group, option), text in files.items():
        (conf / group).mkdir(exist_ok=True)
        (conf / group / option).write_text(text, encoding="utf-8")
    return conf


def all_commands() -> list:
    out: list = []
    for f in doc_files():
        out += markdown(f)
    return out


#: Hydra's and sectune's flags (sectune/cli.py): those that take a value, and those that take none
FLAGS_WITH_VALUE = ("--cfg", "-c", "--package", "-p", "--config-dir", "-cd", "--config-path", "-cp", "--config-name", "-cn",
                    "--experimental-rerun")
FLAGS = ("--help", "-h", "--hydra-help", "--version", "--resolve", "--info", "-i", "-m", "--multirun", "--shell-completion",
         "-sc", "--run", "-r")


def _is_group(key: str, conf_dir: Path) -> bool:
    return (conf_dir / key.lstrip("+~")).is_dir()


def _sets_hydra(override: str, conf_dir: Path) -> bool:
    """A config-group choice whose file sets Hydra's own settings (hparams_search=sft_optuna: the sweeper)."""
    key, _, option = override.partition("=")
    f = conf_dir / key.lstrip("+~") / f"{option}.yaml"
    return f.is_file() and re.search(r"^\s*(hydra:|- override /?hydra/)", f.read_text(encoding="utf-8"), re.M) is not None


#: a value the reader chooses: ``train.seed=S`` (S = 0..4), ``train.seed=$s`` (a loop's variable), ``num_layers=L``
_CHOSEN = re.compile(r"^([A-Z]|\$\w+)$")


def _placeholder_override(o: str, conf_dir: Path) -> bool:
    """``model=…``, ``logger=<TAB>``: an option to choose, not one the docs name; ``...``: the reader's own overrides."""
    if o in _ELLIPSIS or o == "ARGS" or o == PLACEHOLDER:
        return True
    key, _, value = o.partition("=")
    return any(e in value for e in _ELLIPSIS + (PLACEHOLDER,)) and _is_group(key, conf_dir)


def split_argv(argv: list[str], conf_dir: Path) -> tuple[dict[str, str | bool], list[str]]:
    """(flags, overrides) of a sectune command line; a flag neither Hydra nor sectune has raises ValueError."""
    flags: dict[str, str | bool] = {}
    overrides: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in FLAGS_WITH_VALUE:
            if i + 1 >= len(argv):
                raise ValueError(f"{a} needs a value")
            flags[a], i = argv[i + 1], i + 2
            continue
        if a.startswith("-") and not a.startswith(("--cfg=", "--config-dir=", "--config-name=", "--config-path=")):
            if a not in FLAGS:
                raise ValueError(f"{a}: neither Hydra nor sectune has this flag")
            flags[a] = True
        elif a.startswith("-"):
            k, v = a.split("=", 1)
            flags[k] = v
        elif not _placeholder_override(a, conf_dir):
            key, eq, value = a.partition("=")
            overrides.append(f"{key}=1" if eq and _CHOSEN.match(value) else a)
        i += 1
    return flags, overrides


def _register() -> None:
    """sectune's schemas in Hydra's ConfigStore, once (as sectune.cli does at import)."""
    from sectune import config

    if not _BASES.get("registered"):
        config.register()
        _BASES["registered"] = True


#: the override lists that composed and passed every check
_CHECKED: set = set()
#: the config each set of config-group choices composes to (Hydra's defaults list: the slow part of composing)
_BASES: dict = {}


def composed(overrides: list[str], conf_dir: Path):
    """``hydra.compose("config", overrides)``, as Hydra does it: the defaults list from the config-group choices
    (composed once per set of them), then the other overrides applied by Hydra's own
    ``ConfigLoaderImpl._apply_overrides_to_config`` in their order (the step compose takes after the defaults list)."""
    import copy

    from hydra import compose
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.core.override_parser.overrides_parser import OverridesParser

    groups = tuple(sorted(o for o in overrides if _is_group(o.split("=", 1)[0], conf_dir)))  # their order: no matter
    values = [o for o in overrides if o not in groups]
    key = (str(conf_dir), groups)
    if key not in _BASES:
        _BASES[key] = compose("config", overrides=list(groups))
    cfg = copy.deepcopy(_BASES[key])
    ConfigLoaderImpl._apply_overrides_to_config(OverridesParser.create().parse_overrides(values), cfg)
    return cfg


def check(argv: list[str], conf_dir: Path | None = None, config_dirs: dict[str, Path] | None = None) -> str | None:
    """What stops ``sectune ARGV`` before it trains, or None: a flag Hydra lacks, an override that does not compose (a
    renamed key or group option, a removed preset), a value sectune's checks refuse (sectune.config_checks.check_keys
    and check_values, as sectune.runner.run calls them before a stage starts; an interpolation to a missing key, as
    sectune.cli's callback refuses it). A sweep (``-m``) is checked at every value of each swept key (the others at
    their first, as sectune.cli.check_sweep_jobs checks an Optuna space); an Optuna preset's space as well. Nothing is
    run and no path is read: a run dir the command names may not exist yet."""
    import contextlib
    import io
    from unittest import mock

    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from sectune.cli import _search_space_edges
    from sectune.cli_errors import refuse_node_deletions, refuse_secrets
    from sectune.cli_refusals import refuse_unresolvable
    from sectune.config_checks import check_keys, check_values
    from sectune.paths import CONF_DIR

    conf_dir = Path(conf_dir or CONF_DIR)
    try:
        flags, overrides = split_argv(argv, conf_dir)
    except ValueError as e:
        return str(e)
    given = flags.get("--config-dir") or flags.get("-cd")
    if given:  # the user's own presets beside sectune's (README: my_conf/): config_dirs holds them, merged with conf/
        if given not in (config_dirs or {}):
            return f"--config-dir {given}: the docs show no such folder"
        conf_dir = Path(config_dirs[given])
        flags, overrides = split_argv(argv, conf_dir)
    if "-sc" in flags or "--shell-completion" in flags:  # Hydra's completion script: sectune -sc install=bash
        bad = [o for o in overrides if o.split("=")[0] not in ("install", "uninstall", "query")]
        return f"-sc takes install=SHELL or uninstall=SHELL, not {bad}" if bad else None
    if "--version" in flags and argv != ["--version"]:
        return "sectune --version takes nothing else"
    _register()
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            refuse_secrets(overrides)
            refuse_node_deletions(overrides)
    except SystemExit:
        return err.getvalue().strip() or "refused"
    hydra = [o for o in overrides if o.lstrip("+~").startswith(("hydra.", "hydra/"))]
    mine = [o for o in overrides if o not in hydra]
    multirun = "-m" in flags or "--multirun" in flags
    try:
        with initialize_config_dir(str(conf_dir), version_base="1.3"):
            parsed = OverridesParser.create().parse_overrides(overrides)
            sweeps = [o.input_line for o in parsed if o.is_sweep_override()]
            if sweeps and not multirun:
                return f"{sweeps[0]}: a sweep's values without -m"
            params: list[str] = []
            own_dirs = ("hydra.run.dir=", "hydra.sweep.dir=")  # any path: nothing to compose
            if any(not h.startswith(own_dirs) for h in hydra) or any(_sets_hydra(o, conf_dir) for o in mine):  # hydra.* keys, a launcher, an Optuna space
                full = compose("config", overrides=[o for o in overrides if o not in sweeps and not o.startswith(own_dirs)],
                               return_hydra_config=True)
                space = full.hydra.sweeper.get("params") or {}
                params = [f"{k}={v}" for k, v in space.items() if not str(k).startswith("hydra.")]
            jobs = _search_space_edges(params + mine) if multirun else [mine]
            for job in jobs:
                if (str(conf_dir), tuple(job)) in _CHECKED:  # a sweep's job another command has too
                    continue
                # as on a machine with a GPU: the docs' GPU commands are for one (federated.client_num_gpus=1)
                with contextlib.redirect_stderr(err), mock.patch("torch.cuda.is_available", return_value=True):
                    cfg = composed(job, conf_dir)
                    check_keys(cfg)
                    check_values(cfg)
                    refuse_unresolvable(cfg)
                _CHECKED.add((str(conf_dir), tuple(job)))
    except SystemExit:
        return err.getvalue().strip().replace("sectune: error: ", "") or "refused"
    except Exception as e:  # noqa: BLE001 - what sectune would say is the point
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    return None


if __name__ == "__main__":
    import sys

    for c in all_commands():
        if isinstance(c, Command):
            problem = check(c.argv)
            mark = "FAIL" if problem else "ok  "
            print(f"{mark} {c.where}: sectune {' '.join(c.argv)}" + (f"\n       -> {problem}" if problem else ""))
        else:
            there = (ROOT / c.path).is_file()
            print(f"{'ok  ' if there else 'FAIL'} {c.where}: {c.interpreter} {c.path} {' '.join(c.args)}  env={c.env}")
    sys.stdout.flush()
