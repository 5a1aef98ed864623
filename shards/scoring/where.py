"""`croupier shards select --where EXPR`: a small, safe filter language over a dataset's kept fields.

The language (no `eval`: a hand-written tokenizer and a recursive-descent parser build a tree
that is evaluated over whole columns):

    expr    := or_expr
    or_expr := and_expr ("or" and_expr)*
    and_expr:= not_expr ("and" not_expr)*
    not_expr:= "not" not_expr | test
    test    := operand [("==" | "!=" | "<" | "<=" | ">" | ">=") operand
                        | ["not"] "in" "[" [literal ("," literal)*] "]"]
    operand := FIELD | literal | "(" expr ")"
    literal := NUMBER | STRING | "true" | "false" | "null"

FIELD is a column name (letters, digits, `_`, starting with a letter or `_`); NUMBER an
integer or decimal with an optional sign and exponent; STRING single- or double-quoted, with
backslash escaping the quote or a backslash. `and` binds tighter than `or`; keywords are
lower-case. A bare field is a test only when it holds booleans; comparing a field of numbers
with a string (or the reverse) is refused, naming the field, the literal and its position.
Every refusal is a `ConfigError` naming the expression and the 0-based character position.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from croupier.errors import ConfigError

COMPARISONS = ("==", "!=", "<=", ">=", "<", ">")
KEYWORDS = ("and", "or", "not", "in", "true", "false", "null")
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class Token:
    kind: str
    """`num`, `str`, `name`, `kw`, `op` (comparison), `(`, `)`, `[`, `]`, `,` or `end`."""
    value: Any
    pos: int


class WhereError(ConfigError):
    """An expression outside the language, or one that does not fit the dataset's fields."""


def _fail(expr: str, pos: int, why: str) -> WhereError:
    return WhereError(f"--where {expr!r}: {why} at position {pos}")


def tokenize(expr: str) -> list[Token]:
    """The tokens of `expr`, ending with an `end` token; refuses any other character."""
    out: list[Token] = []
    i, n = 0, len(expr)
    while i < n:
        c = expr[i]
        if c.isspace():
            i += 1
            continue
        if c in "()[],":
            out.append(Token(c, c, i))
            i += 1
            continue
        two = expr[i:i + 2]
        if two in ("==", "!=", "<=", ">="):
            out.append(Token("op", two, i))
            i += 2
            continue
        if c in "<>":
            out.append(Token("op", c, i))
            i += 1
            continue
        if c in "'\"":
            j, chars = i + 1, []
            while j < n and expr[j] != c:
                if expr[j] == "\\" and j + 1 < n and expr[j + 1] in (c, "\\"):
                    j += 1
                chars.append(expr[j])
                j += 1
            if j >= n:
                raise _fail(expr, i, "unterminated string")
            out.append(Token("str", "".join(chars), i))
            i = j + 1
            continue
        m = _NUMBER.match(expr, i)
        if m and (c.isdigit() or c == "." or (c in "+-" and m.end() > i + 1)):
            text = m.group()
            value: Any = float(text) if any(ch in text for ch in ".eE") else int(text)
            out.append(Token("num", value, i))
            i = m.end()
            continue
        m = _IDENT.match(expr, i)
        if m:
            word = m.group()
            out.append(Token("kw" if word in KEYWORDS else "name", word, i))
            i = m.end()
            continue
        if c == "=":
            raise _fail(expr, i, "unexpected '=' (equality is '==')")
        raise _fail(expr, i, f"unexpected character {c!r}")
    out.append(Token("end", None, n))
    return out


# -- the tree -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Field:
    name: str
    pos: int


@dataclass(frozen=True)
class Literal:
    value: Any
    pos: int


@dataclass(frozen=True)
class Compare:
    op: str
    left: Any
    right: Any
    pos: int


@dataclass(frozen=True)
class InList:
    operand: Any
    values: tuple[Any, ...]
    negate: bool
    pos: int


@dataclass(frozen=True)
class BoolOp:
    op: str
    """`and`, `or` or `not` (one argument)."""
    args: tuple[Any, ...]
    pos: int


class _Parser:
    def __init__(self, expr: str) -> None:
        self.expr = expr
        self.tokens = tokenize(expr)
        self.i = 0

    @property
    def tok(self) -> Token:
        return self.tokens[self.i]

    def take(self) -> Token:
        t = self.tokens[self.i]
        self.i += 1
        return t

    def is_kw(self, word: str) -> bool:
        return self.tok.kind == "kw" and self.tok.value == word

    def expect(self, kind: str, what: str) -> Token:
        if self.tok.kind != kind:
            raise self.unexpected(what)
        return self.take()

    def unexpected(self, wanted: str) -> WhereError:
        t = self.tok
        got = "the end of the expression" if t.kind == "end" else repr(self.expr[t.pos:].split()[0][:20])
        return _fail(self.expr, t.pos, f"expected {wanted}, got {got}")

    def parse(self) -> Any:
        if self.tok.kind == "end":
            raise _fail(self.expr, 0, "empty expression")
        node = self.or_expr()
        if self.tok.kind != "end":
            raise self.unexpected("'and', 'or' or the end of the expression")
        return node

    def or_expr(self) -> Any:
        pos = self.tok.pos
        args = [self.and_expr()]
        while self.is_kw("or"):
            self.take()
            args.append(self.and_expr())
        return args[0] if len(args) == 1 else BoolOp("or", tuple(args), pos)

    def and_expr(self) -> Any:
        pos = self.tok.pos
        args = [self.not_expr()]
        while self.is_kw("and"):
            self.take()
            args.append(self.not_expr())
        return args[0] if len(args) == 1 else BoolOp("and", tuple(args), pos)

    def not_expr(self) -> Any:
        if self.is_kw("not"):
            pos = self.take().pos
            return BoolOp("not", (self.not_expr(),), pos)
        return self.test()

    def test(self) -> Any:
        left = self.operand()
        t = self.tok
        if t.kind == "op":
            self.take()
            return Compare(t.value, left, self.operand(), t.pos)
        if self.is_kw("in") or (self.is_kw("not") and self.tokens[self.i + 1].kind == "kw"
                                and self.tokens[self.i + 1].value == "in"):
            negate = self.is_kw("not")
            if negate:
                self.take()
            self.take()
            return InList(left, self.literal_list(), negate, t.pos)
        if isinstance(left, Literal):
            raise self.unexpected("a comparison (==, !=, <, <=, >, >=, in) after a literal")
        return left

    def operand(self) -> Any:
        t = self.tok
        if t.kind == "(":
            self.take()
            node = self.or_expr()
            self.expect(")", "')'")
            return node
        if t.kind == "name":
            self.take()
            return Field(t.value, t.pos)
        return self.literal()

    def literal(self) -> Literal:
        t = self.tok
        if t.kind in ("num", "str"):
            self.take()
            return Literal(t.value, t.pos)
        if t.kind == "kw" and t.value in ("true", "false", "null"):
            self.take()
            return Literal({"true": True, "false": False, "null": None}[t.value], t.pos)
        raise self.unexpected("a field, a number, a quoted string, true, false, null or '('")

    def literal_list(self) -> tuple[Any, ...]:
        self.expect("[", "'[' after 'in'")
        values: list[Any] = []
        if self.tok.kind == "]":
            self.take()
            return ()
        while True:
            values.append(self.literal().value)
            if self.tok.kind == "]":
                self.take()
                return tuple(values)
            self.expect(",", "',' or ']'")


def parse(expr: str) -> Any:
    """The tree of `expr`, or a `WhereError` naming the position of the first thing outside the language."""
    return _Parser(expr).parse()


def fields_of(node: Any) -> dict[str, int]:
    """The field names an expression reads (in order of first use) and the position of their first use."""
    seen: dict[str, int] = {}

    def walk(x: Any) -> None:
        if isinstance(x, Field):
            seen.setdefault(x.name, x.pos)
        elif isinstance(x, Compare):
            walk(x.left)
            walk(x.right)
        elif isinstance(x, InList):
            walk(x.operand)
        elif isinstance(x, BoolOp):
            for a in x.args:
                walk(a)

    walk(node)
    return seen


# -- evaluation over columns ----------------------------------------------------------------
_OPS: dict[str, Callable[[Any, Any], Any]] = {
    "==": lambda a, b: a == b, "!=": lambda a, b: a != b, "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, ">=": lambda a, b: a >= b,
}


def _kind(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, (bool, np.bool_)):
        return "bool"
    if isinstance(v, (int, float, np.integer, np.floating)):
        return "number"
    if isinstance(v, str):
        return "string"
    return type(v).__name__


class _Evaluator:
    def __init__(self, expr: str, columns: dict[str, Sequence[Any]], n: int) -> None:
        self.expr, self.columns, self.n = expr, columns, n
        self.kinds = {f: {_kind(v) for v in vals} for f, vals in columns.items()}

    def values(self, node: Any) -> tuple[list[Any] | None, Any, str]:
        """(per-sample values, or None for a literal; the literal; a description for errors)."""
        if isinstance(node, Field):
            if node.name not in self.columns:
                have = ", ".join(sorted(self.columns)) or "none"
                raise _fail(self.expr, node.pos, f"unknown field {node.name!r} (kept fields: {have})")
            return list(self.columns[node.name]), None, f"field {node.name!r}"
        if isinstance(node, Literal):
            return None, node.value, f"literal {node.value!r}"
        raise _fail(self.expr, node.pos, "a comparison compares a field or a literal, not a test,")

    def check_types(self, node: Any, other: Any, pos: int) -> None:
        """Refuse comparing a field of numbers with a string literal (or strings with a number)."""
        if isinstance(node, Field) and isinstance(other, Literal) and other.value is not None:
            want = _kind(other.value)
            have = self.kinds.get(node.name, set()) - {"null"}
            comparable = {"number", "bool"} if want in ("number", "bool") else {want}
            if have and not have <= comparable:
                raise _fail(self.expr, pos, f"field {node.name!r} holds {', '.join(sorted(have))} values, compared "
                                            f"with the {want} {other.value!r}")

    def test(self, node: Any) -> np.ndarray:
        if isinstance(node, BoolOp):
            parts = [self.test(a) for a in node.args]
            if node.op == "not":
                return ~parts[0]
            out = parts[0].copy()
            for p in parts[1:]:
                out = (out & p) if node.op == "and" else (out | p)
            return out
        if isinstance(node, Field):
            vals, _, _ = self.values(node)
            if self.kinds[node.name] - {"bool"}:
                raise _fail(self.expr, node.pos, f"field {node.name!r} is not a test on its own (it holds "
                                                 f"{', '.join(sorted(self.kinds[node.name]))} values, not booleans)")
            return np.fromiter((bool(v) for v in vals or []), dtype=bool, count=self.n)
        if isinstance(node, Compare):
            self.check_types(node.left, node.right, node.pos)
            self.check_types(node.right, node.left, node.pos)
            a, la, _ = self.values(node.left)
            b, lb, _ = self.values(node.right)
            op = _OPS[node.op]
            left = a if a is not None else [la] * self.n
            right = b if b is not None else [lb] * self.n
            out = np.empty(self.n, dtype=bool)
            for i, (x, y) in enumerate(zip(left, right)):
                if x is None or y is None:  # null equals only null and is never ordered
                    out[i] = (x is y) if node.op == "==" else (x is not y) if node.op == "!=" else False
                    continue
                try:
                    out[i] = bool(op(x, y))
                except TypeError:
                    raise _fail(self.expr, node.pos, f"sample {i}: cannot compare {x!r} {node.op} {y!r}") from None
            return out
        if isinstance(node, InList):
            vals, lit, _ = self.values(node.operand)
            items = vals if vals is not None else [lit] * self.n
            try:
                allowed = set(node.values)
                got = np.fromiter((v in allowed for v in items), dtype=bool, count=self.n)
            except TypeError:
                got = np.fromiter((any(v == w for w in node.values) for v in items), dtype=bool, count=self.n)
            return ~got if node.negate else got
        raise _fail(self.expr, node.pos, "expected a test")


def evaluate(expr: str, columns: dict[str, Sequence[Any]], n: int) -> np.ndarray:
    """Boolean mask (n,) of the samples whose fields match `expr` (columns: field -> n values)."""
    return _Evaluator(expr, columns, n).test(parse(expr))


def matching_ids(expr: str, read_column: Callable[[str], Sequence[Any]], fields: Sequence[str], n: int) -> np.ndarray:
    """Sorted int64 ids of the samples matching `expr`; `read_column(f)` reads a kept field (one of `fields`)."""
    tree = parse(expr)
    columns: dict[str, Sequence[Any]] = {}
    for name, pos in fields_of(tree).items():
        if name not in fields:
            raise _fail(expr, pos, f"unknown field {name!r} (kept fields: {', '.join(fields) or 'none'})")
        columns[name] = read_column(name)
    return np.flatnonzero(_Evaluator(expr, columns, n).test(tree)).astype(np.int64)


__all__ = ["WhereError", "evaluate", "fields_of", "matching_ids", "parse", "tokenize"]
