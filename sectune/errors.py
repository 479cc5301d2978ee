"""Errors a user can act on.

Every error raised for bad input is a ``SectuneError``: the runner turns it into one line on
stderr (naming the file, line or key), a ``status: failed`` result.json and a non-zero exit.
"""


class SectuneError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    exit_code = 2


class ConfigError(SectuneError):
    """A config value that composes but cannot work (wrong module name, bad path, …)."""


class DataError(SectuneError):
    """A data file that is missing, malformed or inconsistent; the message names the file."""


class ModelNotAvailableError(SectuneError):
    """Model weights that are neither in the local cache nor downloadable."""


def first_line(e: BaseException) -> str:
    """An exception's message as one line for an error naming a file or key: its first line, and the line after it when
    the first only announces it (PyTorch's "Error(s) in loading state_dict for X:" then "size mismatch for ..."), or the
    exception's type when it says nothing."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    return f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]


def shown(text: str, keep: str = "") -> str:
    """Text as the console shows it: control characters (ESC, BEL, CR, newline; a BiDi override) escaped, so a file name
    or a value an attacker chose (``\\x1b]0;…\\x07``, ``\\x1b[2J``) cannot retitle or clear the terminal or forge a line
    of output; the characters in ``keep`` (a message's own newlines) pass as they are."""
    return "".join(c if c.isprintable() or c == " " or c in keep else ascii(c)[1:-1] for c in text)


#: seconds a rank other than 0 that left its error line to rank 0 stays before it exits: torchrun ends the other ranks
#: (SIGTERM) as soon as one exits, so a rank 0 a moment behind it (writing its files, starting W&B, scanning the saved
#: weights) was ended before it said the line, and the launch failed saying nothing. Cut short when rank 0 exits first.
RANK_LINGER_S = 5.0
_lingering = False
#: the lines a rank other than 0 left to rank 0, said by itself if it is still there after :data:`RANK_LINGER_S`
_left_to_rank_0: list[str] = []


def _linger_then_say() -> None:
    """At the exit of a rank other than 0 that left its error line to rank 0: wait :data:`RANK_LINGER_S`; a rank 0 that met
    the same error exits in that time and torchrun ends this rank (SIGTERM) before it says a word. Still here, rank 0 did
    not meet it (an error of this rank's alone: its disk, its GPU, its node's run dir, while rank 0 waits in a collective or
    is killed before it can name it), so this rank says it, with its rank: the line was lost (a review, session 43)."""
    import os
    import sys
    import time

    time.sleep(RANK_LINGER_S)
    for line in _left_to_rank_0:
        print(f"sectune: error: (rank {os.environ.get('RANK', '?')}) {line}", file=sys.stderr, flush=True)


def say_error(line: str) -> None:
    """``sectune: error: LINE`` on stderr, once per launch: under torchrun/accelerate every rank reads the same command,
    config and data and so meets the same error; a rank other than 0 leaves the saying to rank 0, which also names a
    failure of another rank's alone (``runner._name_the_failing_rank``), and lingers :data:`RANK_LINGER_S` at its exit
    so that rank 0 gets to say it; a rank still there after it says the line itself (:func:`_linger_then_say`). Each
    rank still exits with its code."""
    import os
    import sys

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and os.environ.get("RANK", "0") != "0":
        global _lingering
        _left_to_rank_0.append(line)
        if not _lingering:
            import atexit

            _lingering = True
            atexit.register(_linger_then_say)
        return
    print(f"sectune: error: {line}", file=sys.stderr)
