"""A vote of analysts (``evaluate.vote_with``, ``infer.vote_with``): several analysts answer the same inputs and the
verdict most of them give wins, a defence against injected log lines measured in experiments/injection_contrastive
(analysts trained with different seeds misread different windows, and an injection rarely moves most of them at once).

The rule, on each input: an answer that is not a schema-valid analysis votes for nothing; the verdict the most members
give wins, a tie going to the one given by the earliest member (``evaluate.model_dir`` first, then ``vote_with`` in its
order: list the analyst you trust most first); the answer kept is the earliest member's that gave the winning verdict,
whole (its counts, users and IPs with it), so the kept answer always agrees with the verdict. When no member gives a
valid answer, the first member's answer is kept. A ``format=prompt`` triplet (a generic prompt/answer file) has no
verdict: its members vote on the whole answer, whitespace-normalised. Pure functions on strings: the models' answers
are parsed, never evaluated.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Callable, Hashable, Optional, Sequence


def winner(keys: Sequence[Optional[Hashable]]) -> int:
    """The index of the member whose answer is kept: the earliest member giving the key most members give (``None``, an
    invalid answer, never wins); 0 when every key is ``None``."""
    counts = Counter((type(k), k) for k in keys if k is not None)  # typed: True and 1 (or 1.0) are not one verdict
    if not counts:
        return 0
    top = max(counts.values())
    return next(i for i, k in enumerate(keys) if k is not None and counts[(type(k), k)] == top)


def scalar_node(node) -> bool:
    """Whether a schema node holds one scalar value (a verdict a vote can count): a string, number or boolean type, or an
    enum / const of such values."""
    if not isinstance(node, dict):
        return False
    if "const" in node or "enum" in node:
        values = node["enum"] if "enum" in node else [node["const"]]
        return isinstance(values, list) and bool(values) and not any(isinstance(v, (list, dict)) for v in values)
    types = node.get("type")
    return bool(types) and all(t in ("string", "integer", "number", "boolean") for t in ([types] if isinstance(types, str) else types))


def verdict_key(text: str) -> Optional[str]:
    """What an auth-log analysis votes for: its verdict, when it is a schema-valid analysis; else nothing."""
    from sectune.evaluation.injection_eval import read_answer

    answer = read_answer(text)
    return answer["verdict"] if answer["schema_valid"] else None


def text_key(text: str) -> Optional[str]:
    """What a free-text answer votes for: the whole answer, whitespace-normalised (an empty answer votes for nothing)."""
    return " ".join(str(text).split()) or None


def voted(member_texts: Sequence[Sequence[str]], key: Callable[[str], Optional[Hashable]] = verdict_key) -> tuple[list[str], list[int]]:
    """(the kept answer of each input, the index of the member it came from), given each member's answers in input order."""
    if len(member_texts) < 1 or len({len(t) for t in member_texts}) != 1:
        raise ValueError(f"every member answers every input: got {[len(t) for t in member_texts]} answers")
    kept, chosen = [], []
    for answers in zip(*member_texts):
        i = winner([key(a) for a in answers])
        kept.append(answers[i])
        chosen.append(i)
    return kept, chosen


def check_voters(members: Sequence[str], choices, stage: str) -> None:
    """A vote needs three or more different analysts (``<stage>.model_dir`` and ``<stage>.vote_with``; ``choices``: the
    model each answers with): with two, every split goes to the first."""
    from sectune.errors import ConfigError

    if len(members) == 1:
        return
    if len(members) == 2:
        raise ConfigError(f"{stage}.vote_with={list(members[1:])}: a vote of two analysts is {stage}.model_dir's answer alone "
                          "(a tie goes to the first); give two or more runs to vote with it, or none")
    seen: dict = {}
    for d, c in zip(members, choices):
        where = (c.path or Path(d)).expanduser().resolve()
        if where in seen:
            raise ConfigError(f"{stage}.vote_with: {d} answers with the same model as {seen[where]} ({where}); "
                              "each voter must be another analyst")
        seen[where] = d
