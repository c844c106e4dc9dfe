"""YAML for configs, read defensively: what PyYAML's `safe_load` lets through and lorafit must not.

- **Alias bombs.** ``a: &a [x, x]``, ``b: &b [*a, *a]``, ... nine levels deep is a few hundred
  bytes that expand to hundreds of millions of values the first time anything walks or prints it
  (PyYAML shares the nodes; the cost comes later, in ``str``/``repr``/validation). The document's
  size with every alias expanded is counted over the node graph (each node once) and refused above
  `MAX_NODES`; a recursive alias is refused too.
- **Duplicate keys.** PyYAML keeps the last one silently; here both lines are named.
- **Huge integers.** A 5,000-digit integer makes PyYAML's ``int()`` raise ``ValueError`` (Python's
  4,300-digit limit): a `ConfigError` naming the line instead.
- **Deep nesting** (100k ``[``) exhausts the recursion of PyYAML's composer: a `ConfigError`.

`short` is how every config message shows a value: never more than a line, whatever the value.
"""
from __future__ import annotations

import reprlib
from typing import Any

import yaml

from .errors import ConfigError

MAX_NODES = 100_000   # a real config has a few hundred values; a bomb has millions
_MERGE = "tag:yaml.org,2002:merge"


class _Repr(reprlib.Repr):
    """reprlib with ints that `repr` itself refuses (over 4,300 digits) shown by their size."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxlist, self.maxdict, self.maxstring, self.maxother, self.maxlong = 2, 4, 4, 60, 60, 40

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 128:
            return f"<an integer of about {int(x.bit_length() * 0.30103) + 1:,} digits>"
        return super().repr_int(x, level)


_REPR = _Repr()


def short(value: Any) -> str:
    """A bounded repr for error messages: a huge or deeply shared value is cut, never expanded."""
    try:
        return _REPR.repr(value)
    except (ValueError, RecursionError):
        return f"<a {type(value).__name__}>"


class _Loader(yaml.SafeLoader):
    source: str | None = None

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE or not isinstance(key_node, yaml.ScalarNode):
                continue
            line = key_node.start_mark.line + 1
            if key_node.value in seen:
                raise ConfigError(f"duplicate key (lines {seen[key_node.value]} and {line}); "
                                  "YAML would silently keep the last one", file=self.source, line=line,
                                  field=short(key_node.value)[1:-1])
            seen[key_node.value] = line
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        try:
            return super().construct_yaml_int(node)
        except ValueError:
            digits = sum(c.isdigit() for c in node.value)
            raise ConfigError(f"integer of {digits:,} digits is out of range", file=self.source,
                              line=node.start_mark.line + 1) from None


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)


def expanded_size(node: yaml.Node, limit: int = MAX_NODES) -> int:
    """Number of nodes with every alias expanded, counted without expanding (each node once)."""
    sizes: dict[int, int] = {}
    active: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(node, False)]
    while stack:
        n, done = stack.pop()
        if id(n) in sizes:
            continue
        children = ([c for kv in n.value for c in kv] if isinstance(n, yaml.MappingNode)
                    else list(n.value) if isinstance(n, yaml.SequenceNode) else [])
        if done:
            active.discard(id(n))
            sizes[id(n)] = min(limit + 1, 1 + sum(sizes[id(c)] for c in children))
            continue
        if id(n) in active:
            raise ValueError("recursive alias")
        active.add(id(n))
        stack.append((n, True))
        for c in children:
            if id(c) in active:
                raise ValueError("recursive alias")
            if id(c) not in sizes:
                stack.append((c, False))
    return sizes[id(node)]


def load(text: str, source: str | None = None) -> tuple[Any, dict[str, int]]:
    """(value, {top-level key: line}) of a YAML document; every failure is a ConfigError."""
    loader = _Loader(text)
    loader.source = source
    try:
        node = loader.get_single_node()
        if node is None:
            return None, {}
        try:
            size = expanded_size(node)
        except ValueError as e:
            raise ConfigError(f"invalid YAML: {e}", file=source) from None
        if size > MAX_NODES:
            raise ConfigError(f"YAML expands to more than {MAX_NODES:,} values (an alias bomb?); "
                              "a config needs a few hundred", file=source)
        value = loader.construct_document(node)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise ConfigError(f"invalid YAML: {getattr(e, 'problem', None) or e}", file=source,
                          line=None if mark is None else mark.line + 1) from None
    except RecursionError:
        raise ConfigError("invalid YAML: nested too deeply", file=source) from None
    finally:
        loader.dispose()
    lines = ({k.value: k.start_mark.line + 1 for k, _ in node.value if isinstance(k, yaml.ScalarNode)}
             if isinstance(node, yaml.MappingNode) else {})
    return value, lines
