"""The console of a run: what it prints kept in result.json's warnings and the run dir's console.log
(:class:`recorded_warnings`), and a console that cannot fail a run (:func:`lenient_console`: an encoding it cannot show,
a reader that left the pipe). :mod:`sectune.run_guard` re-exports :class:`recorded_warnings`."""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import time
from pathlib import Path

from sectune.errors import shown as _escaped


_ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class _Tap:
    """A stream that writes through, keeps each distinct whole line starting ``sectune: warning`` / ``sectune: note``
    in ``into``, and copies every whole line to ``log`` (an open file; a progress bar's redraws as its last state)."""

    def __init__(self, stream, into: list, log=None):
        self._stream, self._into, self._log, self._buf = stream, into, log, ""

    def write(self, s):
        if isinstance(s, str) and s.startswith("sectune: "):
            # sectune's own line names what its inputs hold (a failed run's error quoting a file name an attacker chose, a
            # CSV's label, a model's verdict): their control characters are escaped, never played by the terminal
            s = _escaped(s, keep="\n\t")
            if self._buf.strip():
                self.write("\n")  # a progress bar's last state has no newline: sectune's line (an error, say) starts its own
        try:
            n = self._stream.write(s)
        except BrokenPipeError:  # `sectune ... | head`: the reader left; the run goes on (console.log keeps every line)
            n = len(s) if isinstance(s, str) else 0
        if isinstance(s, str) and (self._log is not None or len(self._into) < 100):
            self._buf += s
            if "\n" in self._buf:
                *lines, self._buf = self._buf.split("\n")
                for ln in lines:  # once each: a split read twice in a step said the same note twice
                    shown = _ESCAPES.sub("", ln.rstrip("\r").rsplit("\r", 1)[-1])
                    if self._log is not None:
                        try:
                            self._log.write(shown + "\n")
                        except (OSError, ValueError):  # a full disk or a closed file never stops the run
                            self._log = None
                    ln = ln.strip()[:1000]
                    if len(self._into) < 100 and ln.startswith(("sectune: warning", "sectune: note")) and ln not in self._into:
                        self._into.append(ln)
            self._buf = self._buf[-4000:]  # progress bars redraw with \r and no newline
        return n

    def flush(self):
        try:
            self._stream.flush()
        except BrokenPipeError:
            pass

    def __getattr__(self, name):
        return getattr(self._stream, name)


class recorded_warnings:
    """While entered, sectune's warnings and notes printed to stdout/stderr are also kept in ``lines`` (result.json's
    ``warnings``): a run's "N test rows repeat a training row" or "K cells filled in" was on the console only, so an
    archived run that measured memory could not be told from one that did not. With ``log``, every line printed is
    also appended to that file (the run dir's ``console.log``, a header line per command), so a run's output outlives
    the terminal it ran in."""

    def __init__(self, log: Path | None = None):
        self.lines: list[str] = []
        self._old = None
        self._path, self._log = log, None

    def __enter__(self):
        if self._path is not None:
            try:
                self._log = open(self._path, "a", encoding="utf-8", errors="replace", buffering=1)
                self._log.write(f"===== {time.strftime('%Y-%m-%d %H:%M:%S')} · {' '.join(sys.argv)}\n")
            except OSError:
                self._log = None
        self._old = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tap(sys.stdout, self.lines, self._log), _Tap(sys.stderr, self.lines, self._log)
        return self

    def __exit__(self, *exc):
        out, err = self._old
        if isinstance(sys.stdout, _Tap) and sys.stdout._into is self.lines:
            sys.stdout = out
        if isinstance(sys.stderr, _Tap) and sys.stderr._into is self.lines:
            sys.stderr = err
        if self._log is not None:
            try:
                self._log.close()
            except OSError:  # its last buffered line on a full disk: the log is a convenience, the run's records are not
                pass
        return False


def lenient_console() -> None:
    """stdout/stderr write what their encoding cannot show as escapes instead of raising: on a Latin-1 or ASCII console
    (``PYTHONIOENCODING=latin-1``, ``PYTHONUTF8=0 LC_ALL=C``) a finished SFT run failed on its closing line's arrow,
    after its adapter was saved (an audit, session 41). A console's encoding never decides a run's status."""
    import sys

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError, OSError):  # not a text stream we can reconfigure (a test's capture, say)
            pass


class NewHeadReport(logging.Filter):
    """Drops transformers' load report when all it says is that the ``score`` head is new (and the causal LM's
    ``lm_head`` unused): a base model loaded under a ``…ForSequenceClassification`` has no such head, so the report
    ("newly initialized … Consider training on your downstream task") came in every stage=reward and stage=classify run,
    the very training it asks for, and where a trained classifier's adapter restores the head next it told a user that
    the classifier was untrained. Any other missing, mismatched or unconverted weight is still reported."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if "LOAD REPORT" not in msg or "MISMATCH" in msg or "CONVERSION" in msg:
            return True
        rows = [line for line in msg.splitlines() if ("MISSING" in line or "UNEXPECTED" in line) and not line.lstrip().startswith("-")]
        return not all(("score." in line) if "MISSING" in line else ("lm_head." in line) for line in rows)


@contextlib.contextmanager
def new_head_quietly():
    """While entered, :class:`NewHeadReport` filters transformers' load reports."""
    target = logging.getLogger("transformers.modeling_utils")
    quiet = NewHeadReport()
    target.addFilter(quiet)
    try:
        yield
    finally:
        target.removeFilter(quiet)
