"""Where a compact JSON document being generated stands against its schema, and the shortest
text that finishes it validly.

:class:`JsonCursor` is fed the bytes a constrained decoder emits (a grammar keeps them a valid
prefix) and tracks the open objects/arrays, the key or item being written and the schema node of
each. ``closing_bytes()`` is the shortest completion (remaining required properties with minimal
values, the open string finished, containers closed), which ``sectune.models.constrained`` forces when the
token budget runs short; ``unique_array_context()`` is what ``uniqueItems`` needs. Pure Python, no
torch: covers the JSON Schema subset ``schema_supported`` accepts (object/properties/required,
array/items/minItems/maxItems/uniqueItems, string/minLength/maxLength/enum, integer/number/
minimum/maximum, boolean, null, enum, const), and assumes properties in schema order, as
xgrammar writes them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace

_QUOTE, _BACKSLASH = ord('"'), ord("\\")
_NUMBER_BYTES = frozenset(b"-+.eE0123456789")
_SUPPORTED_KEYS = {
    "type", "properties", "required", "additionalProperties", "items", "minItems", "maxItems", "uniqueItems",
    "minLength", "maxLength", "enum", "const", "minimum", "maximum", "title", "description", "$schema", "$id",
    "default", "examples",
}


def schema_supported(node) -> bool:
    """Whether the completion logic understands every keyword of ``node``: each node typed (or an
    enum/const), objects closed to other properties (xgrammar's strict mode, the default)."""
    if not isinstance(node, dict) or set(node) - _SUPPORTED_KEYS:
        return False
    if not isinstance(node.get("type"), str) and "enum" not in node and "const" not in node:
        return False
    if node.get("additionalProperties", False) is not False:
        return False
    children = list((node.get("properties") or {}).values())
    if isinstance(node.get("items"), dict):
        children.append(node["items"])
    elif "items" in node:
        return False
    return all(schema_supported(c) for c in children)


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
    def unique_array_context(self) -> tuple[list[bytes], bytes | None, int | None, list[bytes] | None] | None:
        """In (or inside a string item of) a ``uniqueItems`` array of strings: (earlier items, the
        item being written or None between items, its maxLength, its ``enum`` as JSON-escaped bytes or None); else None."""
        sc = self.scalar
        if sc is not None and (sc.kind != "string" or sc.is_key):
            return None
        top = self.stack[-1] if self.stack else None
        if top is None or top.kind != "array" or not top.schema.get("uniqueItems"):
            return None
        items = top.schema.get("items") or {}
        if items.get("type") != "string" and not all(isinstance(v, str) for v in items.get("enum", [0])):
            return None
        choices = [_escaped(v) for v in items["enum"]] if "enum" in items else None
        return top.items, (bytes(sc.buf) if sc is not None else None), items.get("maxLength"), choices

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


def utf8_completion(buf: bytes) -> bytes:
    """The continuation bytes that finish a UTF-8 character ``buf`` ends in the middle of (byte-level tokens can split
    one), chosen valid for its lead byte; b"" when ``buf`` ends on a character boundary. A grammar refuses the closing
    quote until the character is whole."""
    for back in range(1, min(4, len(buf)) + 1):
        lead = buf[-back]
        if lead & 0xC0 == 0x80:  # a continuation byte: the lead is further back
            continue
        size = 2 if lead & 0xE0 == 0xC0 else 3 if lead & 0xF0 == 0xE0 else 4 if lead & 0xF8 == 0xF0 else 1
        if back >= size:
            return b""
        first = {0xE0: 0xA0, 0xF0: 0x90}.get(lead, 0x80) if back == 1 else 0x80  # no overlong forms
        return bytes([first] + [0x80] * (size - back - 1))
    return b""


def _finish_string(sc: _Scalar, avoid: list[bytes]) -> bytes:
    """Bytes that end the string ``sc`` (before its closing quote) validly and shortest."""
    fix = utf8_completion(bytes(sc.buf))
    return fix + _finish_whole_string(replace(sc, buf=bytearray(sc.buf + fix)) if fix else sc, avoid)


def _finish_whole_string(sc: _Scalar, avoid: list[bytes]) -> bytes:
    node, buf = sc.schema, bytes(sc.buf)
    choices = node.get("enum") if "enum" in node else ([node["const"]] if "const" in node else None)
    if choices is not None:  # the shortest member this prefix can still become, one not written before if there is one
        fits = sorted((v for v in (_escaped(c) for c in choices if isinstance(c, str)) if v.startswith(buf)), key=len)
        fits = [v for v in fits if v not in avoid] or fits
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
        lo, hi = node.get("minimum", -math.inf), node.get("maximum", math.inf)
        value = 0 if lo <= 0 <= hi else (math.ceil(lo) if lo > 0 else math.floor(hi))
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


def char_count(data: bytes) -> int:
    return len(data.decode("utf-8", "replace"))


def _escaped(value: str) -> bytes:
    """A string as its bytes between the quotes of compact JSON (what a decoder writes and the cursor buffers)."""
    return json.dumps(value, ensure_ascii=False)[1:-1].encode()


def adds_duplicate(data: bytes, items: list[bytes], buf: bytes | None, max_len: int | None,
                   choices: list[bytes] | None = None) -> bool:
    """Whether ``data``, written inside a uniqueItems array of strings (``buf``: the open item, or
    None between items), closes an item equal to an earlier one (or to one it wrote itself). With ``choices``
    (the items' ``enum``), also whether it leaves the open item no member that was not written before to become:
    a dead end, where only a duplicate could close it."""
    items, cur, esc, comma = list(items), (bytearray(buf) if buf is not None else None), False, False

    def dead_end() -> bool:
        return choices is not None and not any(c.startswith(bytes(cur or b"")) for c in choices if c not in items)

    for ch in data:
        if cur is None:
            comma = ch == ord(",")
            if ch == _QUOTE:
                cur = bytearray()
                if dead_end():
                    return True
            elif not comma:
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
            if dead_end():
                return True
    if (cur is not None or comma) and dead_end():  # a comma promises an item that no unused member is left to be
        return True
    return cur is not None and max_len is not None and bytes(cur) in items and char_count(bytes(cur)) >= max_len
