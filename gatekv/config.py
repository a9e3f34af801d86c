"""Typed, validated configs: dataclasses built from YAML plus ``a.b=c`` overrides.

A config is a tree of dataclasses. Every field has a type annotation and one docstring (a string literal right under
the field): the same text is the CLI help and the YAML comment (:func:`describe`). Loading is strict: an unknown key
or a value of the wrong type is a ``ValueError`` naming the dotted key, e.g.::

    trainer.max_steps: expected int, got str 'ten'
    unknown key 'optim.learning_rate' (valid keys of optim: betas, grad_clip, lr, ...)

Typical use::

    config = load_config(TrainConfig, "configs/train/x.yaml", ["optim.lr=1e-3", "trainer.max_steps=50"])
    print(dump_yaml(config))

Saved artifacts (adapter configs, result files) are read forgivingly instead: :func:`read_saved` warns about and
drops unknown keys (a newer gatekv may have written them) and leaves the checks to the dataclass itself.

Supported field types: ``bool``, ``int``, ``float`` (ints are accepted), ``str``, ``Optional[X]`` / ``X | None``,
``Literal[...]``, ``list[X]``, ``tuple[X, ...]`` / ``tuple[X, Y]``, ``dict[str, X]``, unions of those, and nested
dataclasses. ``__post_init__`` of each dataclass runs after its fields are set (for cross-field checks); a
``ValueError`` raised there is re-raised with the dataclass's dotted path in front.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import re
import textwrap
import types
import typing
import warnings
from pathlib import Path
from typing import Any, Literal, Union

import yaml

_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``5e-4`` and ``1e3`` as floats (YAML 1.1 wants a dot: ``5.0e-4``), so a
    quoted ``"5e-4"`` stays a string and can be refused where a number is expected."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(_NUMBER.pattern + "$"), list("-+0123456789."))


def _yaml(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)

__all__ = [
    "apply_overrides",
    "check_options",
    "describe",
    "dump_yaml",
    "field_docs",
    "from_dict",
    "load_config",
    "load_yaml",
    "parse_override",
    "read_saved",
    "to_dict",
]


# ----------------------------------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------------------------------


def load_yaml(path: str | Path) -> dict:
    """The mapping stored in a YAML file; ``ValueError`` naming the file if it is missing, unparsable or no mapping."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file not found: {path}")
    try:
        data = _yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ValueError(f"config file {path} is not valid YAML: {error}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping at the top level, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b=c"`` -> ``(["a", "b"], value)``; the value is read as YAML (``5e-4`` and ``1e3`` are numbers too)."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ValueError(f"override {text!r} has an empty key")
    try:
        value = _yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as error:
        raise ValueError(f"override {text!r}: the value is not valid YAML ({error})") from None
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """A copy of ``data`` with each ``a.b=c`` override set (intermediate mappings are created as needed).

    Keys are not checked here: :func:`from_dict` rejects unknown ones, naming them.
    """
    data = _deep_copy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for depth, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ValueError(f"override {text!r}: {'.'.join(path[: depth + 1])} is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | None = None):
    """An instance of dataclass ``cls`` from a YAML file (optional) with ``a.b=c`` overrides applied."""
    data = load_yaml(path) if path is not None else {}
    return from_dict(cls, apply_overrides(data, overrides or []))


# ----------------------------------------------------------------------------------------------------------------------
# typed construction
# ----------------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls: type, data: Any, path: str = ""):
    """Build dataclass ``cls`` from a mapping, checking every key and type (``ValueError`` naming the dotted key)."""
    where = path or "config"
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping of {cls.__name__} fields, got {type(data).__name__} {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(map(str, data)) - set(fields))
    if unknown:
        first = f"{path}.{unknown[0]}" if path else unknown[0]
        raise ValueError(
            f"unknown key {first!r} (valid keys of {where}: {', '.join(sorted(fields))})"
        )
    hints = _hints(cls)
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(hints[name], value, f"{path}.{name}" if path else name)
    try:
        return cls(**kwargs)
    except ValueError as error:
        message = str(error)
        if path and not message.startswith(path):
            message = f"{path}.{message}"
        raise ValueError(message) from None


def read_saved(cls: type, data: Any, what: str, required: tuple[str, ...] = (), build: bool = True):
    """Dataclass ``cls`` from a mapping read back from a saved file, forgivingly: unknown keys are ignored with a
    warning (``ignoring unknown {what} keys [...]``), missing required ones (fields without a default, and
    ``required``) are a ``ValueError`` (``{what} lacks [...]``); values are checked by ``cls`` itself.

    build: False returns the known keys as a dict instead of an instance (for a caller that converts some first).
    """
    if not isinstance(data, dict):
        raise ValueError(f"{what} must be a mapping, got {type(data).__name__}")
    fields = [f for f in dataclasses.fields(cls) if f.init]
    names = {f.name for f in fields}
    unknown = sorted(set(map(str, data)) - names)
    if unknown:
        warnings.warn(f"ignoring unknown {what} keys {unknown}", stacklevel=3)
    needed = {f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    missing = sorted((needed | set(required)) - set(data))
    if missing:
        raise ValueError(f"{what} lacks {missing}")
    known = {k: v for k, v in data.items() if k in names}
    return cls(**known) if build else known


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _convert(tp: Any, value: Any, path: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        errors = []
        for option in args:
            if option is type(None):
                continue
            try:
                return _convert(option, value, path)
            except ValueError as error:
                errors.append(str(error))
        names = " or ".join(_type_name(a) for a in args)
        raise ValueError(f"{path}: expected {names}, got {type(value).__name__} {value!r}")
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise ValueError(f"{path}: expected one of {list(args)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if origin in (list, tuple):
        if isinstance(value, (list, tuple)):
            items = list(value)
        else:
            raise ValueError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(items) != len(args):
                raise ValueError(f"{path}: expected {len(args)} items, got {len(items)}: {value!r}")
            return tuple(_convert(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, items)))
        item_type = args[0] if args else Any
        converted = [_convert(item_type, v, f"{path}[{i}]") for i, v in enumerate(items)]
        return tuple(converted) if origin is tuple else converted
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
        key_type, value_type = args if args else (Any, Any)
        return {
            _convert(key_type, k, f"{path}.<key>"): _convert(value_type, v, f"{path}.{k}") for k, v in value.items()
        }
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{path}: expected bool (true/false), got {type(value).__name__} {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError(f"{path}: expected int, got {type(value).__name__} {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        hint = " (a quoted number is a string: write it without quotes)" if isinstance(value, str) else ""
        raise ValueError(f"{path}: expected float, got {type(value).__name__} {value!r}{hint}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{path}: expected str, got {type(value).__name__} {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ValueError(f"{path}: expected null, got {value!r}")
    raise TypeError(f"{path}: unsupported config field type {tp!r}")


# ----------------------------------------------------------------------------------------------------------------------
# writing and documentation
# ----------------------------------------------------------------------------------------------------------------------


def to_dict(config) -> dict:
    """Plain nested dict/list/scalar form of a config dataclass (tuples become lists), for YAML or JSON."""

    def plain(value):
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(config)


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """``{field name: docstring}`` read from the string literal right under each field of dataclass ``cls``."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    tree = ast.parse(source)
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs = {}
    for node, following in zip(body, body[1:] + [None]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if (
                isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """Every leaf field of config dataclass ``cls`` as ``(dotted key, type, docstring)``, in declaration order."""
    rows = []
    docs = field_docs(cls)
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows += describe(tp, key + ".")
        else:
            rows.append((key, _type_name(tp), docs.get(f.name, "")))
    return rows


def dump_yaml(config, comments: bool = True) -> str:
    """YAML text of a config dataclass; with ``comments`` every field's docstring is written above it."""
    if not comments:
        return yaml.safe_dump(to_dict(config), sort_keys=False)
    lines: list[str] = []

    def emit(obj, indent: int):
        docs = field_docs(type(obj))
        for f in dataclasses.fields(obj):
            if not f.init:
                continue
            value = getattr(obj, f.name)
            pad = " " * indent
            doc = docs.get(f.name)
            if doc:
                for line in textwrap.wrap(doc, width=max(40, 116 - indent)):
                    lines.append(f"{pad}# {line}")
            if dataclasses.is_dataclass(value):
                lines.append(f"{pad}{f.name}:")
                emit(value, indent + 2)
            else:
                plain = to_dict(value)
                if isinstance(plain, (list, dict)):
                    text = f"{f.name}: " + yaml.safe_dump(plain, default_flow_style=True, width=10**6).strip()
                else:
                    text = yaml.safe_dump({f.name: plain}, default_flow_style=False, width=10**6).strip()
                lines.append(f"{pad}{text}")

    emit(config, 0)
    return "\n".join(lines) + "\n"


def _deep_copy(data):
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def check_options(kind: str, name: str, factory, options: dict) -> None:
    """``ValueError`` naming the ``kind`` (scorer, allocator, merger), its ``name`` and the valid options when
    ``options`` holds a keyword that ``factory``'s signature lacks (factories taking ``**kwargs`` accept anything)."""
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    valid = sorted(n for n, p in parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"{kind} {name!r}: unknown option(s) {unknown}; valid: {', '.join(valid) or '(none)'}")
