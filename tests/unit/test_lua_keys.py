"""Every Lua script touches only keys its caller declares in KEYS.

Redis requires it of scripts (a proxy or a cluster routes a script by its KEYS, and a script that
builds a key name from ARGV or from data it read touches a key nobody declared). Redis itself
checks nothing of the kind on one node, so this is a static check of every ``.lua`` file in the
repository. What it checks: the key arguments of each ``redis.call`` and ``redis.pcall`` (by
command: the first argument, every argument of ``DEL`` and ``EXISTS``, none of ``TIME`` and
``PUBLISH``, whose argument is a channel) are derived from the ``KEYS`` table: ``KEYS[...]``
itself, a local or a loop variable assigned only such values (or ``false``/``nil``), a function
parameter passed only such values at every call, or an element of a local table filled only with
them. A command it does not know fails the check until it is classified here. What it does not
check: that the caller puts the right names in KEYS (the store and transport tests do, by
behaviour).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(p for top in ("worker", "producer") for p in (ROOT / top).rglob("*.lua"))

#: Which arguments of a command are keys.
FIRST = {
    "EXPIREAT", "GET", "HDEL", "HEXISTS", "HGET", "HGETALL", "HINCRBY", "HINCRBYFLOAT", "HLEN", "HMGET",
    "HSET", "HSETNX", "LINDEX", "LLEN", "LPUSH", "LRANGE", "LTRIM", "PTTL", "RPOP", "RPUSH", "SADD", "SET",
    "PEXPIRE", "SETRANGE", "SISMEMBER", "ZADD", "ZMSCORE", "ZREM", "ZSCORE",
}  # fmt: skip
ALL = {"DEL", "EXISTS"}
NONE = {"TIME", "PUBLISH"}

_TOKEN = re.compile(
    r"""(?P<comment>--\[\[.*?\]\]|--[^\n]*)
      |(?P<string>'(?:[^'\\\n]|\\.)*'|"(?:[^"\\\n]|\\.)*")
      |(?P<newline>\n)
      |(?P<space>[ \t\r]+)
      |(?P<number>\d+(?:\.\d+)?)
      |(?P<name>[A-Za-z_]\w*)
      |(?P<op>\.\.\.|\.\.|==|~=|<=|>=|[-+*/%^#<>=(){}\[\];:,.])""",
    re.X | re.S,
)
_ENDS = {"end", "else", "elseif", "local", "return", "if", "for", "while", "then", "do"}
_CONTINUES = {",", "(", "[", "{", "=", "..", "+", "-", "*", "/", "%", "^", "and", "or", "not", "<", ">"}


@dataclass(frozen=True)
class Tok:
    kind: str
    text: str
    line: int


def tokenize(source: str) -> list[Tok]:
    if source.startswith("#!"):  # a shebang line (#!lua flags=...)
        source = "\n" + source.split("\n", 1)[1]
    out, line, pos = [], 1, 0
    while pos < len(source):
        m = _TOKEN.match(source, pos)
        assert m, f"cannot read line {line}: {source[pos : pos + 30]!r}"
        kind = m.lastgroup or ""
        if kind not in ("comment", "space"):
            out.append(Tok(kind, m.group(), line))
        line += m.group().count("\n")
        pos = m.end()
    return out


class Script:
    """One script's tokens, and where each name gets its values."""

    def __init__(self, source: str) -> None:
        self.toks = tokenize(source)
        self.code = [t for t in self.toks if t.kind != "newline"]

    # -- reading ---------------------------------------------------------------------------------

    def _close(self, toks: list[Tok], i: int) -> int:
        """The index of the bracket that closes the one at ``i``."""
        pairs = {"(": ")", "[": "]", "{": "}"}
        depth = 0
        for j in range(i, len(toks)):
            if toks[j].text in pairs:
                depth += 1
            elif toks[j].text in pairs.values():
                depth -= 1
                if depth == 0:
                    return j
        raise AssertionError(f"unclosed {toks[i].text!r} on line {toks[i].line}")

    def _split(self, toks: list[Tok]) -> list[list[Tok]]:
        """``toks`` split at the commas outside brackets."""
        parts: list[list[Tok]] = [[]]
        depth = 0
        for t in toks:
            if t.text in "([{" and t.kind == "op":
                depth += 1
            elif t.text in ")]}" and t.kind == "op":
                depth -= 1
            if t.text == "," and depth == 0:
                parts.append([])
            else:
                parts[-1].append(t)
        return [p for p in parts if p]

    def calls(self, name: str) -> list[tuple[int, list[list[Tok]]]]:
        """(line, arguments) of each call of ``name`` (``redis.call``, or a local function)."""
        dotted = name.split(".")
        out = []
        for i in range(len(self.code)):
            if [t.text for t in self.code[i : i + 2 * len(dotted) - 1]] == " . ".join(dotted).split():
                j = i + 2 * len(dotted) - 1
                before = self.code[i - 1].text if i else ""
                if j < len(self.code) and self.code[j].text == "(" and before not in (".", "function"):
                    out.append((self.code[i].line, self._split(self.code[j + 1 : self._close(self.code, j)])))
        return out

    def assignments(self, name: str) -> list[tuple[list[Tok], bool]]:
        """Each value assigned to ``name`` (or, with the flag, to an element ``name[...]``)."""
        toks, out = self.toks, []
        for p, t in enumerate(toks):
            if t.text != "=" or t.kind != "op":
                continue
            targets, k = [], p - 1
            while k >= 0:
                end = k
                if toks[k].text == "]":
                    depth = 0
                    while True:
                        depth += {"]": 1, "[": -1}.get(toks[k].text, 0)
                        if depth == 0:
                            break
                        k -= 1
                    k -= 1
                if k < 0 or toks[k].kind != "name":
                    break
                targets.insert(0, (toks[k].text, end != k))
                if k > 0 and toks[k - 1].text == ",":
                    k -= 2
                else:
                    break
            values = self._split(self._expression(p + 1))
            for position, (target, indexed) in enumerate(targets):
                if target == name:
                    value = values[position] if position < len(values) else [Tok("name", "nil", t.line)]
                    out.append((value, indexed))
        return out

    def _expression(self, start: int) -> list[Tok]:
        """The expression list that starts at token ``start`` (the right side of an ``=``)."""
        out: list[Tok] = []
        depth = 0
        for t in self.toks[start:]:
            if depth == 0 and ((t.text in _ENDS and t.kind == "name") or t.kind == "newline"):
                if t.kind == "newline" and out and out[-1].text in _CONTINUES:
                    continue
                break
            if t.kind == "newline":
                continue
            depth += {"(": 1, "[": 1, "{": 1, ")": -1, "]": -1, "}": -1}.get(t.text, 0)
            if depth < 0:
                break
            out.append(t)
        return out

    def loop_sources(self, name: str) -> list[list[Tok]]:
        """What ``for ..., name in ipairs(X)`` iterates over: X, for each such loop."""
        out = []
        for i, t in enumerate(self.code):
            if t.text == "for":
                j = i + 1
                names = []
                while self.code[j].kind == "name" and self.code[j].text != "in":
                    names.append(self.code[j].text)
                    j += 2 if self.code[j + 1].text == "," else 1
                if name in names and self.code[j].text == "in":
                    tail = self.code[j + 1 :]
                    assert [x.text for x in tail[:2]] == ["ipairs", "("], f"line {t.line}: only ipairs"
                    out.append(tail[2 : self._close(tail, 1)])
        return out

    def parameters(self, name: str) -> list[tuple[str, int]]:
        """(function, position) of each local function that has a parameter ``name``. (Names are
        not told apart by scope: every function's calls count, which can only find more.)"""
        out = []
        for i, t in enumerate(self.code):
            if t.text == "function" and self.code[i + 2].text == "(":
                params = [
                    x.text for x in self.code[i + 3 : self._close(self.code, i + 2)] if x.kind == "name"
                ]
                if name in params:
                    out.append((self.code[i + 1].text, params.index(name)))
        return out

    # -- the check -------------------------------------------------------------------------------

    def from_keys(self, expr: list[Tok], seen: frozenset[str] = frozenset()) -> bool:
        """Whether ``expr`` can only be a name from the KEYS table (or no key: false, nil)."""
        text = [t.text for t in expr]
        if len(text) == 1 and text[0] in ("false", "nil"):
            return True
        if len(text) >= 3 and text[1] == "[" and self._close(expr, 1) == len(expr) - 1:
            return text[0] == "KEYS" or self.key_table(text[0], seen)
        if text[:3] == ["table", ".", "remove"] and len(text) == 6:
            return self.key_table(text[4], seen)
        if len(text) != 1 or expr[0].kind != "name" or text[0] in seen:
            return len(text) == 1 and text[0] in seen  # a cycle adds nothing
        name, seen = text[0], seen | {text[0]}
        sources = [value for value, indexed in self.assignments(name) if not indexed]
        loops = self.loop_sources(name)
        for function, position in self.parameters(name):
            sources += [args[position] for _, args in self.calls(function) if position < len(args)]
        if not sources and not loops:
            return False
        # A loop over KEYS, or over a table of names from KEYS (a single name: ipairs(t)).
        loops_ok = all(
            len(x) == 1 and (x[0].text == "KEYS" or self.key_table(x[0].text, seen)) for x in loops
        )
        return loops_ok and all(self.from_keys(v, seen) for v in sources)

    def key_table(self, name: str, seen: frozenset[str] = frozenset()) -> bool:
        """Whether ``name`` is a local table filled only with names from KEYS."""
        if name in seen:
            return True
        seen = seen | {name}
        made = self.assignments(name)
        if not any(not indexed for _, indexed in made):
            return False
        for value, indexed in made:
            if indexed:
                ok = self.from_keys(value, seen)
            else:  # only a table constructor, every element a name from KEYS
                constructor = value[0].text == "{" and self._close(value, 0) == len(value) - 1
                ok = constructor and all(self.from_keys(e, seen) for e in self._split(value[1:-1]))
            if not ok:
                return False
        return all(
            self.from_keys(args[1], seen) for _, args in self.calls("table.insert") if args[0][0].text == name
        )

    def undeclared(self) -> list[str]:
        """Each key argument not derived from KEYS, as ``line N: CMD expr``."""
        problems = []
        for kind in ("redis.call", "redis.pcall"):
            for line, args in self.calls(kind):
                head = args[0]
                if len(head) != 1 or head[0].kind != "string":
                    problems.append(f"line {line}: a command that is not a string literal")
                    continue
                command = head[0].text[1:-1].upper()
                if command in NONE:
                    continue
                if command not in FIRST | ALL:
                    problems.append(f"line {line}: {command} is not classified in this test")
                    continue
                for key in args[1:2] if command in FIRST else args[1:]:
                    if not self.from_keys(key):
                        problems.append(f"line {line}: {command} {' '.join(t.text for t in key)}")
        return problems


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_key_a_script_touches_is_declared_in_keys(path: Path) -> None:
    assert Script(path.read_text(encoding="utf-8")).undeclared() == []


def test_the_scripts_are_all_found() -> None:
    names = {p.name for p in SCRIPTS}
    assert {"commit.lua", "snapshot.lua", "write_results.lua", "fetch.lua", "dead.lua"} <= names


@pytest.mark.parametrize(
    ("source", "found"),
    [
        # a name built from ARGV
        ("local marker = ARGV[9] .. slot\nredis.call('HSET', marker, 'f', 1)", ["line 2: HSET marker"]),
        # a name read from Redis
        (
            "redis.call('DEL', ARGV[1] .. redis.call('RPOP', KEYS[2]))",
            ["line 1: DEL ARGV [ 1 ] .. redis . call ( 'RPOP' , KEYS [ 2 ] )"],
        ),
        # a parameter passed a name from ARGV at one call of two
        (
            "local function w(key)\n  redis.call('GET', key)\nend\nw(KEYS[1])\nw(ARGV[2])",
            ["line 2: GET key"],
        ),
        # two functions with a parameter of the same name, one of them passed a name from ARGV
        (
            "local function p(key)\n  redis.call('PUBLISH', key, 1)\nend\n"
            "local function w(key)\n  redis.call('GET', key)\n  p(key)\nend\nw(ARGV[1])",
            ["line 5: GET key"],
        ),
        # a local that is a KEYS name on one path and an ARGV name on another
        ("local k = KEYS[1]\nif x then k = ARGV[1] end\nredis.call('LLEN', k)", ["line 3: LLEN k"]),
        # a table with one element not from KEYS
        ("local t = {KEYS[1]}\nt[2] = ARGV[1]\nredis.call('DEL', t[2])", ["line 3: DEL t [ 2 ]"]),
        # a command the check does not know
        (
            "redis.call('SUNIONSTORE', KEYS[1], KEYS[2])",
            ["line 1: SUNIONSTORE is not classified in this test"],
        ),
    ],
)
def test_the_check_finds_keys_not_from_keys(source: str, found: list[str]) -> None:
    assert Script(source).undeclared() == found


@pytest.mark.parametrize(
    "source",
    [
        "local dead, stats = KEYS[2], KEYS[3]\nif c then dead, stats = KEYS[4], false end\n"
        "redis.call('LPUSH', dead, 1)\nif stats then redis.call('HINCRBY', stats, 'f', 1) end",
        "for _, key in ipairs(KEYS) do redis.call('EXISTS', key) end",
        "local names = {KEYS[4]}\nfor j = 1, 3 do\n  names[j + 1] = KEYS[4 + j]\nend\n"
        "redis.call('DEL', table.remove(names))\nredis.call('HMGET', names[1], 'a')",
        "local function push(key, first)\n  redis.call('LPUSH', key, first)\nend\npush(KEYS[4], 1)",
        "redis.call('RPUSH', KEYS[3 + tonumber(ARGV[i])], ARGV[i + 2])\nredis.call('TIME')",
    ],
)
def test_the_check_accepts_names_from_keys(source: str) -> None:
    assert Script(source).undeclared() == []
