"""Schema-constrained decoding: every generated analysis parses and validates by construction.

xgrammar (chosen by measurement against outlines and lm-format-enforcer: bench/README.md) compiles
the JSON schema into a grammar over the tokenizer's vocabulary (compact separators, no free
whitespace); per sequence, a ``GrammarMatcher`` says which tokens keep the output a prefix of a
schema-valid document. ``SchemaLogitsProcessor`` masks the rest and adds what the grammar alone
does not give:

* ``uniqueItems`` (xgrammar ignores it): inside a ``uniqueItems`` array of strings, tokens that
  would close an item equal to an earlier one are masked;
* a token budget: an untrained model fills every string to its ``maxLength`` and writes
  100-digit integers, so a grammar alone runs out of ``max_new_tokens`` mid-object. A
  :class:`~sectune.json_cursor.JsonCursor` per sequence knows the shortest text that completes it;
  once the tokens left come within reach of that (plus the most one token can add, ``jump``), the
  processor forces it. A model that closes on its own is never touched;
* special tokens (``<|pad|>`` is literal text to the grammar, so it would be allowed inside a
  string) and tokens with control bytes (a raw tab makes a JSON string invalid) are masked;
* grounded names (``infer.grounded_fields``, off by default): each input gets its own grammar in which the listed
  string fields can only be the addresses / user names its window holds (:meth:`SchemaConstraint.grounded`), and
  ``uniqueItems`` over such an enum never starts an item that could only repeat an earlier one.

The mask is xgrammar's bitmask, edited in place; on CPU xgrammar's C++ kernel applies it, on any
other device plain torch ops do, on that device (xgrammar's CUDA kernels would want triton or a
CUDA toolchain). For a schema beyond :func:`~sectune.json_cursor.schema_supported`'s subset the
grammar still constrains every token, but the budget and ``uniqueItems`` are not enforced (the
infer stage warns).
"""

from __future__ import annotations

import copy
import json
import re
from bisect import bisect_left
from typing import Mapping, Sequence

import numpy as np
import torch
from transformers import LogitsProcessor

from sectune.errors import ConfigError
from sectune.json_cursor import JsonCursor, adds_duplicate, char_count, jump, minimal, schema_supported


def _import_xgrammar():
    try:
        import xgrammar
    except ImportError as e:  # pragma: no cover - xgrammar is a dependency
        raise ConfigError(f"infer.constrained=true needs the xgrammar package (pip install xgrammar): {e}") from None
    return xgrammar


def _has(words: np.ndarray, tok: int) -> bool:
    return bool((int(words[tok >> 5]) >> (tok & 31)) & 1)


def _set_bits(words: np.ndarray, n: int) -> np.ndarray:
    """The token ids whose bit is set in a bitmask row."""
    return np.flatnonzero(np.unpackbits(words.view(np.uint8), bitorder="little")[:n])


def _clear(words: np.ndarray, toks) -> None:
    toks = np.asarray(toks, dtype=np.int64)
    if toks.size:
        np.bitwise_and.at(words, toks >> 5, ~(np.uint32(1) << (toks & 31).astype(np.uint32)))


def apply_bitmask(scores: torch.Tensor, bitmask: torch.Tensor, vocab_size: int, xgr) -> torch.Tensor:
    """-inf where the token's bit is 0 (and past ``vocab_size``), in place. CPU: xgrammar's C++
    kernel; any other device: plain torch on that device (no triton or CUDA build needed)."""
    width = scores.shape[-1]
    if width > vocab_size:  # logits wider than the vocabulary the grammar knows: padded rows
        scores[:, vocab_size:] = float("-inf")
    n = min(width, vocab_size)
    if scores.device.type == "cpu" and scores.dtype == torch.float32:
        xgr.apply_token_bitmask_inplace(scores, bitmask, vocab_size=n)
        return scores
    shifts = torch.arange(32, dtype=torch.int32, device=scores.device)
    bits = (bitmask.to(scores.device, non_blocking=True).unsqueeze(-1) >> shifts) & 1
    allowed = bits.view(bitmask.shape[0], -1)[:, :n].bool()
    scores[:, :n].masked_fill_(~allowed, float("-inf"))
    return scores


# ----------------------------------------------------------------------------- grounding
#: what separates names in a log line: whitespace, key=value, brackets, quotes, list punctuation
_NAME_SPLIT = re.compile(r"[^\s=()\[\]<>{},;'\"]+")


def window_names(text: str) -> list[str]:
    """The names a window holds, as a grounded field may give them: its words split at whitespace, ``=``, brackets,
    quotes, commas and semicolons, a trailing ``:`` or ``.`` dropped (``sshd[24265]:`` → ``sshd``, ``24265``;
    ``rhost=10.0.0.5`` → ``rhost``, ``10.0.0.5``). A name with a space in it (an attacker's user name can have one) is
    not one of them."""
    names = {w.rstrip(":.") for w in _NAME_SPLIT.findall(text)}
    names.discard("")
    return sorted(names)


_IPV4 = re.compile(r"^\d{1,3}(?:\.\d{1,3}){3}$")
_IPV6 = re.compile(r"^(?=.*::|(?:[^:]*:){4})[0-9A-Fa-f:.]+$")  # "::" or 4+ colons: not a time of day
_HOST = re.compile(r"^(?=.*[A-Za-z])[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+$")  # a dotted name with a letter in it


def window_addresses(text: str) -> list[str]:
    """The network addresses and host names among :func:`window_names`: IPv4, IPv6, and dotted DNS names with a letter
    (``220-135-151-1.hinet-ip.hinet.net``). Every source the rule engine names in the real auth windows is one of them."""
    return [n for n in window_names(text) if _IPV4.match(n) or _IPV6.match(n) or _HOST.match(n)]


#: a user name in sshd / PAM wording: the word after "user", "user=", "for" or "for invalid user"
_USER = re.compile(r"(?:\buser(?:=|\s+)|\bfor (?:invalid user\s+)?)([^\s=()\[\]<>{},;'\"]+)")


def window_users(text: str) -> list[str]:
    """The user names a window holds: the word after ``user``, ``user=``, ``for`` or ``for invalid user`` (sshd and PAM
    lines). Every user the rule engine names in the real auth windows is one of them; an attacker's name with a space
    in it gives its first word only."""
    names = {m.rstrip(":.") for m in _USER.findall(text)}
    names.discard("")
    return sorted(names)


#: the kinds of name a grounded field can take, and where each comes from in a window
GROUND_KINDS = {"address": window_addresses, "user": window_users}
#: infer.grounded_fields for the auth-log analysis schema (its sources and both user lists)
AUTH_GROUNDING = ["source_ips.ip:address", "invalid_users:user", "targeted_users:user"]


def grounded_fields(cfg) -> dict[str, str]:
    """``infer.grounded_fields`` as path → kind (its items are ``path:kind``). An item without a known kind is a
    ConfigError naming it."""
    out = {}
    for item in map(str, cfg.infer.get("grounded_fields") or ()):
        path, _, kind = item.rpartition(":")
        if not path or kind not in GROUND_KINDS:
            raise ConfigError(f"infer.grounded_fields: {item!r}: write path:kind, the kind one of {', '.join(GROUND_KINDS)} "
                              "(source_ips.ip:address)")
        out[path] = kind
    return out


def check_grounding(schema: dict, ground: Mapping[str, str]) -> None:
    """A kind sectune does not know, or a path the schema does not have, is a ConfigError naming it."""
    for path, kind in ground.items():
        if kind not in GROUND_KINDS:
            raise ConfigError(f"infer.grounded_fields: {path}:{kind}: the kind is one of {', '.join(GROUND_KINDS)}")
    ground_schema(schema, list(ground), ["x"])


def ground_schema(schema: dict, paths: Sequence[str], names: Sequence[str]) -> dict:
    """``schema`` with the strings at each dotted path (``source_ips.ip``: through an array's items to a property)
    limited to ``names`` (cut to the string's maxLength, as the rules cut them). A path to nowhere, or to no string, is a
    ConfigError naming it. With no name that fits, the array the field sits in can hold no item."""
    out = copy.deepcopy(schema)
    for path in paths:
        node, array = out, None
        for part in path.split("."):
            props = node.get("properties") if isinstance(node, dict) else None
            if not isinstance(props, dict) or part not in props:
                raise ConfigError(f"infer.grounded_fields: {path!r}: the schema has no property {part!r} there")
            node = props[part]
            while isinstance(node, dict) and node.get("type") == "array" and isinstance(node.get("items"), dict):
                array, node = node, node["items"]
        if not isinstance(node, dict) or node.get("type") != "string" or "enum" in node or "const" in node:
            raise ConfigError(f"infer.grounded_fields: {path!r} is not a free string field of the schema")
        # a window may hold no name of the kind: the field's array must be able to stay empty (a lone string field stayed
        # free then, and minItems >= 1 met maxItems 0: xgrammar refused the schema mid-run)
        if array is None or int(array.get("minItems", 0) or 0) > 0:
            raise ConfigError(f"infer.grounded_fields: {path!r} must sit in an array that may be empty (a window may hold no "
                              "name of its kind" + ("" if array is None else f"; this one has minItems={array['minItems']}") + ")")
        lo, hi = int(node.get("minLength", 0)), node.get("maxLength")
        fit = sorted({n[:hi] if hi is not None else n for n in names if len(n) >= lo})
        if fit:
            node["enum"] = fit
        elif array is not None:
            array["maxItems"] = 0
    return out


# ----------------------------------------------------------------------------- the constraint
class SchemaConstraint:
    """A JSON schema compiled for one tokenizer; hands out a fresh logits processor per ``generate``."""

    @classmethod
    def for_model(cls, tokenizer, model, schema: dict, ground: Mapping[str, str] | None = None) -> "SchemaConstraint":
        """For generation with ``model``: the mask spans its logits (an embedding padded past the tokenizer's
        length included)."""
        return cls(tokenizer, schema, vocab_size=max(len(tokenizer), int(getattr(model.config, "vocab_size", 0) or 0)), ground=ground)

    @classmethod
    def from_config(cls, cfg, tokenizer, model) -> "SchemaConstraint":
        """``infer.constrained=true`` as a run configures it: ``infer.schema`` (null: the auth-log analysis schema),
        its addresses and user names grounded in each window (:func:`grounded_fields`)."""
        from sectune.data import auth_logs

        return cls.for_model(tokenizer, model, auth_logs._validator(cfg.infer.schema).schema, ground=grounded_fields(cfg))

    def __init__(self, tokenizer, schema: dict, vocab_size: int | None = None, ground: Mapping[str, str] | None = None):
        xgr = _import_xgrammar()
        self.vocab_size = vocab_size or len(tokenizer)
        self.eos_id = tokenizer.eos_token_id
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=self.vocab_size, stop_token_ids=[self.eos_id])
        self._compiler = xgr.GrammarCompiler(info)
        self._xgr = xgr
        #: path → kind of the fields whose strings must be names the input holds (``infer.grounded_fields``; :meth:`grounded`)
        self.ground = dict(ground or {})
        check_grounding(schema, self.ground)  # named now, not per input
        self._grounded: dict[str, SchemaConstraint] = {}
        # Token bytes as the grammar sees them; special tokens and control bytes are never generated.
        self.token_bytes: list[bytes] = list(info.decoded_vocab) + [b""] * (self.vocab_size - len(info.decoded_vocab))
        # every special token, not only those the tokenizer names (all_special_ids): a chat template's turn tokens
        # (<|im_start|>, <|start_header_id|>) and the EOS a chat frame replaced by its end-of-turn token are special
        # tokens outside that list, whose spelling the grammar would take as text inside a string
        special = (set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}) - {self.eos_id}
        banned = [i for i, b in enumerate(self.token_bytes) if i in special or i >= len(tokenizer) or any(x < 0x20 or x == 0x7F for x in b)]
        self.static_ban = np.zeros(self.vocab_size, dtype=bool)
        self.static_ban[banned] = True
        self.static_ban[self.eos_id] = False
        # xgrammar 0.2's token mask leaves out added (non-special) tokens, such as the tiny analyst's whole
        # JSON keys, although its matcher accepts them: those few are checked one by one at each step
        added = getattr(tokenizer, "added_tokens_encoder", None) or {}
        self.added_ids = sorted(i for i in added.values() if i < self.vocab_size and i not in special and not self.static_ban[i] and i != self.eos_id)
        words = -(-self.vocab_size // 32)
        keep = np.zeros(words * 32, dtype=bool)
        keep[: self.vocab_size] = ~self.static_ban
        self.keep_words = np.packbits(keep, bitorder="little").view(np.uint32)
        usable = [(b, i) for i, b in enumerate(self.token_bytes) if b and not self.static_ban[i]]
        self._by_bytes: dict[bytes, int] = {}
        for b, i in sorted(usable, key=lambda t: t[1]):
            self._by_bytes.setdefault(b, i)
        self._sorted = sorted(self._by_bytes)
        self.quote_tokens = [i for b, i in usable if b'"' in b]
        # longer tokens (runs of spaces, code identifiers) never spell JSON punctuation and keys
        self._max_len = min(24, max(map(len, self._sorted)))
        self._tokenized: dict[bytes, list[int] | None] = {}
        self._set_schema(schema)

    def _set_schema(self, schema: dict) -> None:
        """Compile ``schema`` and size the token budget's forced close for it."""
        self.schema = schema
        try:
            self.grammar = self._compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(",", ":"),
                                                              strict_mode=True)
        except Exception as e:  # xgrammar's InvalidJSONError and friends
            raise ConfigError(f"infer.schema: xgrammar cannot compile the schema ({e})") from None
        self.budget_enforced = schema_supported(schema) and self.tokenize(minimal(schema)) is not None
        if self.budget_enforced:
            self.min_tokens = len(self.tokenize(minimal(schema)) or ())
            self.jump_tokens = sum(len(self.tokenize(p) or ()) for p in jump(schema)[1:]) + 2
            #: how close to the end the (cheap) closing-cost check starts
            self.watch_from = self.min_tokens + 2 * self.jump_tokens + 8

    def grounded(self, text: str) -> "SchemaConstraint":
        """This constraint with the strings of every ``ground`` field restricted to the names of its kind that ``text``
        holds (:data:`GROUND_KINDS`): an analysis can then name no address or user its window does not mention. Grammars
        are compiled once per distinct set of names (a few ms each) and kept."""
        if not self.ground:
            return self
        schema = self.schema
        for kind in sorted(set(self.ground.values())):
            schema = ground_schema(schema, [p for p, k in self.ground.items() if k == kind], GROUND_KINDS[kind](text))
        key = json.dumps(schema, sort_keys=True)
        hit = self._grounded.get(key)
        if hit is None:
            if len(self._grounded) >= 512:
                self._grounded.clear()
            hit = copy.copy(self)  # shares the tokenizer's tables; only the grammar and its budget differ
            hit.ground, hit._grounded = {}, {}
            hit._set_schema(schema)
            self._grounded[key] = hit
        return hit

    def tokenize(self, data: bytes) -> list[int] | None:
        """Greedy longest-match token ids whose bytes concatenate to ``data`` (None if impossible).
        Not the tokenizer's own split, but exact bytes: a count the forced close can keep."""
        if data in self._tokenized:
            return self._tokenized[data]
        if len(self._tokenized) > 4096:
            self._tokenized.clear()
        ids, i = [], 0
        while i < len(data):
            for n in range(min(self._max_len, len(data) - i), 0, -1):
                tok = self._by_bytes.get(data[i : i + n])
                if tok is not None:
                    ids.append(tok)
                    i += n
                    break
            else:
                ids = None
                break
        self._tokenized[data] = ids
        return ids

    def tokens_with_prefix(self, prefix: bytes) -> list[int]:
        lo = bisect_left(self._sorted, prefix)
        out = []
        while lo < len(self._sorted) and self._sorted[lo].startswith(prefix):
            out.append(self._by_bytes[self._sorted[lo]])
            lo += 1
        return out

    def decode(self, ids) -> str:
        """The text the grammar saw: token bytes joined, special tokens dropped."""
        data = b"".join(self.token_bytes[i] for i in ids if not self.static_ban[i] and i != self.eos_id)
        return data.decode("utf-8", "replace")

    def processor(self, max_new_tokens: int, contexts: Sequence[str] | None = None) -> SchemaLogitsProcessor:
        """A logits processor for one ``generate`` call; ``contexts``: each row's input text, which the ``ground``
        fields' names must come from (without it, or without ``ground``, every row gets the schema as it is)."""
        rows = [self.grounded(t) for t in contexts] if self.ground and contexts is not None else None
        for c in rows or [self]:
            if c.budget_enforced and max_new_tokens < c.min_tokens:
                raise ConfigError(
                    f"generation.max_new_tokens={max_new_tokens} is below the {c.min_tokens} tokens of the shortest "
                    "schema-valid output; raise it for infer.constrained=true"
                )
        return SchemaLogitsProcessor(self, max_new_tokens, rows)


class SchemaLogitsProcessor(LogitsProcessor):
    """Masks, per sequence, the tokens that would leave the schema; forces the close near the budget.

    One per ``generate`` call (matchers are per sequence and stateful). ``forced_rows`` holds the
    sequences whose end was forced by the budget (``forced``: how many).
    """

    def __init__(self, constraint: SchemaConstraint, max_new_tokens: int, rows: Sequence[SchemaConstraint] | None = None):
        self.c = constraint
        #: each sequence's constraint (grounded to its own input), or None: ``constraint`` for every one
        self.row_constraints = list(rows) if rows is not None else None
        self.max_new_tokens = max_new_tokens
        self.step = 0
        self.matchers: list = []
        self.cursors: list[JsonCursor] = []
        self.queues: list[list[int] | None] = []
        self.forced_rows: set[int] = set()  # which sequences of the batch (a resumed infer keeps them per record)
        #: what each forced sequence had written itself when its close was forced (the close may write a verdict for it)
        self.forced_prefix: dict[int, bytes] = {}
        self.written: list[bytearray] = []
        self.force_failures = 0

    @property
    def forced(self) -> int:
        return len(self.forced_rows)

    def _start(self, batch: int) -> None:
        xgr = self.c._xgr
        if self.row_constraints is None:
            self.row_constraints = [self.c] * batch
        elif len(self.row_constraints) != batch:
            raise ValueError(f"constrained decoding: {len(self.row_constraints)} grounded inputs for a batch of {batch}")
        self.matchers = [xgr.GrammarMatcher(c.grammar) for c in self.row_constraints]
        self.cursors = [JsonCursor(c.schema) for c in self.row_constraints]
        self.queues = [None] * batch
        self.written = [bytearray() for _ in range(batch)]
        self.bitmask = xgr.allocate_token_bitmask(batch, self.c.vocab_size)
        self.finished = [False] * batch

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        batch = input_ids.shape[0]
        if self.step == 0:
            self._start(batch)
        else:
            last = input_ids[:, -1].tolist()
            for i, tok in enumerate(last):
                if self.finished[i]:
                    continue
                if not self.matchers[i].accept_token(tok):
                    raise RuntimeError(f"constrained decoding: sequence {i} got token {tok} the grammar does not allow")
                if self.matchers[i].is_terminated():
                    self.finished[i] = True
                else:
                    self.cursors[i].feed(self.c.token_bytes[tok])
                    if self.queues[i] is None:  # the model's own token, not the forced close's
                        self.written[i] += self.c.token_bytes[tok]
        remaining = self.max_new_tokens - self.step
        self.step += 1

        # xgrammar's bitmask: one bit per token in int32 words; sectune's bans edit the same words
        words = self.bitmask.numpy().view(np.uint32)
        for i in range(batch):
            if self.finished[i]:
                words[i] = 0xFFFFFFFF  # transformers pads a finished sequence; anything goes
                continue
            self.matchers[i].fill_next_token_bitmask(self.bitmask, i)
            row = words[i]
            self._allow_added(i, row)
            row &= self.c.keep_words
            self._ban_duplicates(i, row)
            forced = self._forced_token(i, row, remaining)
            if forced is not None:
                row[:] = 0
                row[forced >> 5] = np.uint32(1) << np.uint32(forced & 31)
        if not (words != 0).any(axis=1).all():
            raise RuntimeError("constrained decoding: a sequence has no token left that the schema allows")
        return apply_bitmask(scores, self.bitmask, self.c.vocab_size, self.c._xgr)

    def _allow_added(self, i: int, row: np.ndarray) -> None:
        """Set the bit of each added token the matcher accepts here (tried, then rolled back)."""
        m = self.matchers[i]
        for tok in self.c.added_ids:
            if not _has(row, tok) and m.accept_token(tok):
                m.rollback(1)
                row[tok >> 5] |= np.uint32(1) << np.uint32(tok & 31)

    def _ban_duplicates(self, i: int, row: np.ndarray) -> None:
        """uniqueItems: mask every token that would close a string item equal to an earlier one,
        or spell out again an earlier item already at maxLength (it could then only close)."""
        ctx = self.row_constraints[i].budget_enforced and self.cursors[i].unique_array_context()
        if not ctx:
            return
        items, buf, max_len, choices = ctx
        if buf is not None and max_len is not None:
            for item in items:
                if item.startswith(buf) and item != buf and char_count(item) >= max_len:
                    _clear(row, self.c.tokens_with_prefix(item[len(buf):]))
        # only a quote can close an item; inside an enum item any token can leave it only members written before to become,
        # and between items a comma can promise one that no member is left to be
        tokens = self.c.quote_tokens if choices is None else _set_bits(row, self.c.vocab_size)
        for tok in tokens:
            if _has(row, tok) and adds_duplicate(self.c.token_bytes[tok], items, buf, max_len, choices):
                _clear(row, [tok])

    def _forced_token(self, i: int, row: np.ndarray, remaining: int) -> int | None:
        c = self.row_constraints[i]
        if not c.budget_enforced:
            return None
        queue = self.queues[i]
        if queue is None:
            if remaining > c.watch_from:
                return None
            if self.matchers[i].is_completed():
                return None  # only the stop token is left
            closing = c.tokenize(self.cursors[i].closing_bytes())
            if closing is None or remaining > len(closing) + c.jump_tokens:
                return None
            self.queues[i] = queue = list(closing)  # tokenize() caches its lists
            self.forced_rows.add(i)  # once per sequence: its queue is set once
            self.forced_prefix[i] = bytes(self.written[i])
        if not queue:
            return None
        tok = queue.pop(0)
        if _has(row, tok):
            return tok
        # The planned text and the grammar disagree (a schema corner the cursor misreads): let the
        # grammar alone decide from here; the output stays valid, the budget is no longer assured.
        self.force_failures += 1
        self.queues[i] = []
        return None
