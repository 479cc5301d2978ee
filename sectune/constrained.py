"""Schema-constrained decoding: every generated analysis parses and validates by construction.

xgrammar (chosen by measurement against outlines and lm-format-enforcer: bench/README.md) compiles
the JSON schema into a grammar over the tokenizer's vocabulary; per sequence, a ``GrammarMatcher``
says which tokens keep the output a prefix of a schema-valid document. ``SchemaLogitsProcessor``
masks the rest and adds what the grammar alone does not give:

* ``uniqueItems`` (xgrammar ignores it): inside a string item of a ``uniqueItems`` array, tokens
  that would close a duplicate of an earlier item are masked;
* a token budget: an untrained model fills every string to its ``maxLength`` and writes
  100-digit integers, so a grammar alone runs out of ``max_new_tokens`` mid-object. A
  :class:`JsonCursor` follows where in the schema each sequence is and knows the shortest text
  that completes it (``closing_bytes``); once the tokens left come within reach of that (plus the
  most one token can add, ``jump``), the processor forces it. A model that closes on its own is
  never touched;
* special tokens (``<|pad|>`` decodes to literal text the grammar would accept inside a string)
  and tokens with control bytes (raw tabs/newlines make a JSON string invalid) are masked.

The mask is applied with plain torch ops on the logits' device, so the same code runs on CPU and
CUDA (xgrammar's own ``apply_token_bitmask_inplace`` wants triton on CUDA). The completion logic
covers the JSON Schema subset sectune's schemas use (object/properties/required, array/items/
minItems/maxItems/uniqueItems, string/minLength/maxLength/enum, integer/number/minimum, boolean,
null, enum, const); for a schema beyond it the grammar still constrains every token, but the
budget and ``uniqueItems`` are not enforced and a warning says so.
"""

from __future__ import annotations

import json
import math
from bisect import bisect_left
from dataclasses import dataclass, field, replace

import torch
from transformers import LogitsProcessor

from sectune.errors import ConfigError

_QUOTE, _BACKSLASH = ord('"'), ord("\\")
_NUMBER_BYTES = frozenset(b"-+.eE0123456789")
_SUPPORTED_KEYS = {
    "type", "properties", "required", "additionalProperties", "items", "minItems", "maxItems", "uniqueItems",
    "minLength", "maxLength", "enum", "const", "minimum", "maximum", "title", "description", "$schema", "$id",
    "default", "examples",
}


def _import_xgrammar():
    try:
        import xgrammar
    except ImportError as e:  # pragma: no cover - xgrammar is a dependency
        raise ConfigError(f"infer.constrained=true needs the xgrammar package (pip install xgrammar): {e}") from None
    return xgrammar


def schema_supported(node, _root: bool = True) -> bool:
    """Whether the budget/uniqueItems logic understands every keyword of ``node``."""
    if not isinstance(node, dict) or set(node) - _SUPPORTED_KEYS:
        return False
    if not isinstance(node.get("type", "x"), str):
        return False
    children = list((node.get("properties") or {}).values())
    if isinstance(node.get("items"), dict):
        children.append(node["items"])
    elif "items" in node:
        return False
    return all(schema_supported(c, False) for c in children)


# ----------------------------------------------------------------------------- the cursor
@dataclass
class _Frame:
    kind: str  # object | array
    schema: dict
    #: object: first | key (after a comma) | colon | value | next (after a value); array: first | value | next
    expect: str = "first"
    key: str | None = None
    keys: list = field(default_factory=list)
    count: int = 0
    items: list = field(default_factory=list)  # string items (bytes), for uniqueItems


@dataclass
class _Scalar:
    kind: str  # string | number | literal
    schema: dict
    is_key: bool = False
    buf: bytearray = field(default_factory=bytearray)
    esc: bool = False


class JsonCursor:
    """Where in the schema a compact JSON prefix stands, fed byte by byte (the grammar keeps it valid)."""

    def __init__(self, schema: dict):
        self.root = schema
        self.stack: list[_Frame] = []
        self.scalar: _Scalar | None = None
        self.done = False

    def copy(self) -> JsonCursor:
        """An independent cursor (schema nodes shared, not copied)."""
        new = JsonCursor(self.root)
        new.stack = [replace(f, keys=list(f.keys), items=list(f.items)) for f in self.stack]
        new.scalar = replace(self.scalar, buf=bytearray(self.scalar.buf)) if self.scalar else None
        new.done = self.done
        return new

    # -- feeding
    def feed(self, data: bytes) -> None:
        for c in data:
            self._feed_byte(c)

    def _value_schema(self) -> dict:
        if not self.stack:
            return self.root
        top = self.stack[-1]
        if top.kind == "object":
            return (top.schema.get("properties") or {}).get(top.key, {})
        return top.schema.get("items") or {}

    def _feed_byte(self, c: int) -> None:
        if self.done:
            return
        sc = self.scalar
        if sc is not None:
            if sc.kind == "string":
                if sc.esc:
                    sc.esc = False
                elif c == _BACKSLASH:
                    sc.esc = True
                elif c == _QUOTE:
                    self.scalar = None
                    self._string_done(sc)
                    return
                sc.buf.append(c)
                return
            if sc.kind == "literal":
                sc.buf.append(c)
                if bytes(sc.buf) in (b"true", b"false", b"null"):
                    self.scalar = None
                    self._value_done(None)
                return
            if c in _NUMBER_BYTES:
                sc.buf.append(c)
                return
            self.scalar = None  # a number ends at the first byte that is not part of it
            self._value_done(None)
        top = self.stack[-1] if self.stack else None
        if c in b"{[":
            self.stack.append(_Frame("object" if c == ord("{") else "array", self._value_schema()))
        elif c == _QUOTE:
            is_key = top is not None and top.kind == "object" and top.expect in ("first", "key")
            self.scalar = _Scalar("string", {} if is_key else self._value_schema(), is_key=is_key)
        elif c in b"-0123456789":
            self.scalar = _Scalar("number", self._value_schema(), buf=bytearray([c]))
        elif c in b"tfn":
            self.scalar = _Scalar("literal", self._value_schema(), buf=bytearray([c]))
        elif c == ord(":") and top is not None:
            top.expect = "value"
        elif c == ord(",") and top is not None:
            top.expect = "key" if top.kind == "object" else "value"
        elif c in b"}]" and top is not None:
            self.stack.pop()
            self._value_done(None)

    def _string_done(self, sc: _Scalar) -> None:
        if sc.is_key:
            top = self.stack[-1]
            top.key, top.expect = sc.buf.decode("utf-8", "replace"), "colon"
        else:
            self._value_done(bytes(sc.buf))

    def _value_done(self, string_value: bytes | None) -> None:
        if not self.stack:
            self.done = True
            return
        top = self.stack[-1]
        if top.kind == "object":
            top.keys.append(top.key)
        else:
            top.count += 1
            if string_value is not None:
                top.items.append(string_value)
        top.expect = "next"

    # -- uniqueItems
    def unique_array_context(self) -> tuple[list[bytes], bytes | None, int | None] | None:
        """In (or inside a string item of) a ``uniqueItems`` array of strings: (earlier items, the
        item being written or None between items, its maxLength); else None."""
        sc = self.scalar
        if sc is not None and (sc.kind != "string" or sc.is_key):
            return None
        top = self.stack[-1] if self.stack else None
        if top is None or top.kind != "array" or not top.schema.get("uniqueItems"):
            return None
        items = top.schema.get("items") or {}
        if items.get("type") != "string" and not all(isinstance(v, str) for v in items.get("enum", [0])):
            return None
        return top.items, (bytes(sc.buf) if sc is not None else None), items.get("maxLength")

    # -- the shortest completion
    def closing_bytes(self) -> bytes:
        """The shortest bytes that turn the prefix fed so far into a schema-valid document."""
        sim = self.copy()
        out = bytearray()
        for _ in range(10_000):
            sc = sim.scalar
            if sc is not None and sc.kind == "number" and sc.buf[-1:].isdigit():
                sim.scalar = None  # a complete number: what follows ends it
                sim._value_done(None)
            if sim.done:
                return bytes(out)
            piece = sim._next_piece()
            if not piece:  # a finished top-level scalar: nothing more to write
                return bytes(out)
            sim.feed(piece)
            out += piece
        raise RuntimeError("JsonCursor.closing_bytes did not terminate")

    def _next_piece(self) -> bytes:
        sc = self.scalar
        if sc is not None:
            if sc.kind == "string":
                if sc.is_key:
                    top = self.stack[-1]
                    key = _next_key(top, prefix=sc.buf.decode("utf-8", "replace"))
                    return key.encode()[len(sc.buf):] + b'"'
                return _finish_string(sc, self._unique_items()) + b'"'
            if sc.kind == "literal":
                for lit in (b"false", b"true", b"null"):
                    if lit.startswith(bytes(sc.buf)):
                        return lit[len(sc.buf):]
            if sc.kind == "number":  # "-", "1." or "1e": one digit completes it
                return b"0"
        if not self.stack:
            return minimal(self.root)
        top = self.stack[-1]
        if top.kind == "object":
            if top.expect == "colon":
                return b":" + minimal(_prop(top, top.key))
            if top.expect == "value":
                return minimal(_prop(top, top.key))
            if top.expect == "key":
                key = _next_key(top)
                return b'"' + key.encode() + b'":' + minimal(_prop(top, key))
            key = _next_key(top, required_only=True)  # first | next
            if key is None:
                return b"}"
            sep = b"," if top.expect == "next" else b""
            return sep + b'"' + key.encode() + b'":' + minimal(_prop(top, key))
        items = top.schema.get("items") or {}
        unique = top.items if top.schema.get("uniqueItems") else []
        if top.expect == "value":
            return minimal(items, avoid=unique)
        if top.count < int(top.schema.get("minItems", 0)):
            return (b"," if top.expect == "next" else b"") + minimal(items, avoid=unique)
        return b"]"

    def _unique_items(self) -> list[bytes]:
        top = self.stack[-1] if self.stack else None
        if top is not None and top.kind == "array" and top.schema.get("uniqueItems"):
            return top.items
        return []


def _prop(frame: _Frame, key: str | None) -> dict:
    return (frame.schema.get("properties") or {}).get(key, {})


def _next_key(frame: _Frame, prefix: str = "", required_only: bool = False) -> str | None:
    """The next property in schema order (xgrammar writes properties in that order)."""
    props = list((frame.schema.get("properties") or {}).keys())
    required = set(frame.schema.get("required") or ())
    done = [props.index(k) for k in frame.keys if k in props]
    after = [p for p in props[(max(done) + 1 if done else 0):] if p.startswith(prefix) and p not in frame.keys]
    for p in after:
        if p in required:
            return p
    if required_only:
        return None
    if not after:
        raise RuntimeError(f"no property left to complete {prefix!r} in {props}")
    return after[0]


def _finish_string(sc: _Scalar, avoid: list[bytes]) -> bytes:
    """Bytes that end the string ``sc`` (before its closing quote) validly and shortest."""
    node, buf = sc.schema, bytes(sc.buf)
    choices = node.get("enum") if "enum" in node else ([node["const"]] if "const" in node else None)
    if choices is not None:
        fits = [json.dumps(v, ensure_ascii=False)[1:-1].encode() for v in choices if isinstance(v, str)]
        fits = sorted((v for v in fits if v.startswith(buf)), key=len)
        return fits[0][len(buf):] if fits else b""
    have = len(buf.decode("utf-8", "replace"))
    need = max(0, int(node.get("minLength", 0)) - have)
    max_len = node.get("maxLength")
    # uniqueItems: the shortest suffix that is not an earlier item (at most maxItems of them)
    for suffix in [b"x" * need] + [b"x" * need + bytes([ch]) for ch in b"xyzabcdefghijklmnopqrstuvw0123456789"]:
        if max_len is not None and have + len(suffix) > max_len:
            break
        if buf + suffix not in avoid:
            return suffix
    return b"x" * need


def minimal(node: dict, avoid: list[bytes] = ()) -> bytes:
    """The shortest compact JSON instance of ``node`` (``avoid``: string values already used)."""
    if "const" in node:
        return json.dumps(node["const"], separators=(",", ":")).encode()
    if "enum" in node:
        return min((json.dumps(v, separators=(",", ":"), ensure_ascii=False).encode() for v in node["enum"]), key=len)
    kind = node.get("type")
    if kind == "object" or (kind is None and "properties" in node):
        required = set(node.get("required") or ())
        parts = [b'"' + k.encode() + b'":' + minimal(v) for k, v in (node.get("properties") or {}).items() if k in required]
        return b"{" + b",".join(parts) + b"}"
    if kind == "array":
        items, used, out = node.get("items") or {}, [], []
        for _ in range(int(node.get("minItems", 0))):
            v = minimal(items, avoid=used if node.get("uniqueItems") else [])
            used.append(v[1:-1] if v[:1] == b'"' else v)
            out.append(v)
        return b"[" + b",".join(out) + b"]"
    if kind == "string":
        sc = _Scalar("string", node)
        return b'"' + _finish_string(sc, list(avoid)) + b'"'
    if kind in ("integer", "number"):
        lo = node.get("minimum")
        value = 0 if lo is None or lo <= 0 <= node.get("maximum", math.inf) else math.ceil(lo)
        return str(int(value)).encode()
    if kind == "boolean":
        return b"false"
    if kind == "null":
        return b"null"
    return b"null"


def jump(node: dict) -> list[bytes]:
    """The closing text one token can add at most: a fresh ``node`` and, nested in it, the
    heaviest path of fresh children (a token like ``[{"`` opens three structures at once)."""
    children = list((node.get("properties") or {}).values())
    if isinstance(node.get("items"), dict):
        children.append(node["items"])
    deepest = max((jump(c) for c in children), key=lambda parts: sum(map(len, parts)), default=[])
    return [minimal(node), *deepest]


def _chars(data: bytes) -> int:
    return len(data.decode("utf-8", "replace"))


def _adds_duplicate(data: bytes, items: list[bytes], buf: bytes | None, max_len: int | None) -> bool:
    """Whether ``data``, written inside a uniqueItems array of strings (``buf``: the open item, or
    None between items), closes an item equal to an earlier one (or to one it wrote itself)."""
    items, cur, esc = list(items), (bytearray(buf) if buf is not None else None), False
    for ch in data:
        if cur is None:
            if ch == _QUOTE:
                cur = bytearray()
            elif ch != ord(","):
                return False  # the array ends (or something else follows): no more items
        elif esc:
            esc = False
            cur.append(ch)
        elif ch == _BACKSLASH:
            esc = True
            cur.append(ch)
        elif ch == _QUOTE:
            if bytes(cur) in items:
                return True
            items.append(bytes(cur))
            cur = None
        else:
            cur.append(ch)
    return cur is not None and max_len is not None and bytes(cur) in items and _chars(bytes(cur)) >= max_len


# ----------------------------------------------------------------------------- the constraint
class SchemaConstraint:
    """A JSON schema compiled for one tokenizer; hands out a fresh logits processor per ``generate``."""

    def __init__(self, tokenizer, schema: dict, vocab_size: int | None = None):
        xgr = _import_xgrammar()
        self.schema = schema
        self.vocab_size = vocab_size or len(tokenizer)
        self.eos_id = tokenizer.eos_token_id
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=self.vocab_size, stop_token_ids=[self.eos_id])
        compiler = xgr.GrammarCompiler(info)
        try:
            self.grammar = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(",", ":"), strict_mode=True)
        except Exception as e:  # xgrammar's InvalidJSONError and friends
            raise ConfigError(f"infer.schema: xgrammar cannot compile the schema ({e})") from None
        self._xgr = xgr
        # Token bytes as the grammar sees them; special tokens and control bytes are never generated.
        self.token_bytes: list[bytes] = list(info.decoded_vocab) + [b""] * (self.vocab_size - len(info.decoded_vocab))
        special = set(tokenizer.all_special_ids) - {self.eos_id}
        banned = [i for i, b in enumerate(self.token_bytes) if i in special or i >= len(tokenizer) or any(x < 0x20 or x == 0x7F for x in b)]
        self.static_ban = torch.zeros(self.vocab_size, dtype=torch.bool)
        self.static_ban[banned] = True
        self.static_ban[self.eos_id] = False
        usable = [(b, i) for i, b in enumerate(self.token_bytes) if b and not self.static_ban[i]]
        self._by_bytes: dict[bytes, int] = {}
        for b, i in sorted(usable, key=lambda t: t[1]):
            self._by_bytes.setdefault(b, i)
        self._sorted = sorted(self._by_bytes)
        self.quote_tokens = [i for b, i in usable if b'"' in b]
        self._max_len = max(map(len, self._sorted))
        self.budget_enforced = schema_supported(schema) and self.tokenize(minimal(schema)) is not None
        if self.budget_enforced:
            self.min_tokens = len(self.tokenize(minimal(schema)) or ())
            self.jump_tokens = sum(len(self.tokenize(p) or ()) for p in jump(schema)[1:]) + 2
            #: how close to the end the (cheap) closing-cost check starts
            self.watch_from = self.min_tokens + 2 * self.jump_tokens + 8

    def tokenize(self, data: bytes) -> list[int] | None:
        """Greedy longest-match token ids whose bytes concatenate to ``data`` (None if impossible)."""
        ids, i = [], 0
        while i < len(data):
            for n in range(min(self._max_len, len(data) - i), 0, -1):
                tok = self._by_bytes.get(data[i : i + n])
                if tok is not None:
                    ids.append(tok)
                    i += n
                    break
            else:
                return None
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

    def processor(self, max_new_tokens: int) -> SchemaLogitsProcessor:
        if self.budget_enforced and max_new_tokens < self.min_tokens:
            raise ConfigError(
                f"generation.max_new_tokens={max_new_tokens} is below the {self.min_tokens} tokens of the shortest "
                "schema-valid output; raise it for infer.constrained=true"
            )
        return SchemaLogitsProcessor(self, max_new_tokens)


class SchemaLogitsProcessor(LogitsProcessor):
    """Masks, per sequence, the tokens that would leave the schema; forces the close near the budget.

    One per ``generate`` call (matchers are per sequence and stateful). ``forced`` counts the
    sequences whose end was forced by the budget.
    """

    def __init__(self, constraint: SchemaConstraint, max_new_tokens: int):
        self.c = constraint
        self.max_new_tokens = max_new_tokens
        self.step = 0
        self.matchers: list = []
        self.cursors: list[JsonCursor] = []
        self.queues: list[list[int] | None] = []
        self.forced = 0
        self.force_failures = 0

    def _start(self, batch: int) -> None:
        xgr = self.c._xgr
        self.matchers = [xgr.GrammarMatcher(self.c.grammar) for _ in range(batch)]
        self.cursors = [JsonCursor(self.c.schema) for _ in range(batch)]
        self.queues = [None] * batch
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
        remaining = self.max_new_tokens - self.step
        self.step += 1

        allowed = torch.ones(batch, self.c.vocab_size, dtype=torch.bool)
        for i in range(batch):
            if self.finished[i]:
                continue  # transformers pads it; anything goes
            self.matchers[i].fill_next_token_bitmask(self.bitmask, i)
        bits = self.bitmask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)
        grammar_ok = (bits & 1).bool().view(batch, -1)[:, : self.c.vocab_size]
        for i in range(batch):
            if self.finished[i]:
                continue
            row = grammar_ok[i] & ~self.c.static_ban
            self._ban_duplicates(i, row)
            forced = self._forced_token(i, row, remaining)
            if forced is not None:
                row = torch.zeros_like(row)
                row[forced] = True
            if not row.any():
                raise RuntimeError(f"constrained decoding: no token can continue sequence {i}")
            allowed[i] = row

        width = scores.shape[-1]
        if width != self.c.vocab_size:  # logits wider than the tokenizer: padded embedding rows
            pad = torch.zeros(batch, max(0, width - self.c.vocab_size), dtype=torch.bool)
            allowed = torch.cat([allowed, pad], dim=1)[:, :width]
        return scores.masked_fill(~allowed.to(scores.device, non_blocking=True), float("-inf"))

    def _ban_duplicates(self, i: int, row: torch.Tensor) -> None:
        """uniqueItems: mask every token that would close a string item equal to an earlier one,
        or spell out again an earlier item already at maxLength (it could then only close)."""
        ctx = self.c.budget_enforced and self.cursors[i].unique_array_context()
        if not ctx:
            return
        items, buf, max_len = ctx
        if buf is not None and max_len is not None:
            for item in items:
                if item.startswith(buf) and item != buf and _chars(item) >= max_len:
                    row[self.c.tokens_with_prefix(item[len(buf):])] = False
        for tok in self.c.quote_tokens:  # only a quote can close an item
            if row[tok] and _adds_duplicate(self.c.token_bytes[tok], items, buf, max_len):
                row[tok] = False

    def _forced_token(self, i: int, row: torch.Tensor, remaining: int) -> int | None:
        if not self.c.budget_enforced:
            return None
        queue = self.queues[i]
        if queue is None:
            if remaining > self.c.watch_from:
                return None
            if self.matchers[i].is_completed():
                return None  # only the stop token is left
            closing = self.c.tokenize(self.cursors[i].closing_bytes())
            if closing is None or remaining > len(closing) + self.c.jump_tokens:
                return None
            self.queues[i] = queue = closing
            self.forced += 1
        if not queue:
            return None
        tok = queue.pop(0)
        if row[tok]:
            return tok
        # The planned text and the grammar disagree (a schema corner the cursor misreads): let the
        # grammar alone decide from here; the output stays valid, the budget is no longer assured.
        self.force_failures += 1
        self.queues[i] = []
        return None
