"""Strict conversion between plain data (YAML dicts) and trees of frozen dataclasses.

Works for any dataclass tree: the type hints drive the conversion, and field metadata declares ranges and
file paths::

    lr: float = field(default=2e-4, metadata={"gt": 0})          # also "ge", "le", "lt"
    csd_loss: str = field(default="sid", metadata={"choices": ("sid", "dmd")})
    checkpoint: str | None = field(default=None, metadata={"path": "file"})   # or "dir"

Range and choice constraints on a tuple field apply to each element. Supported types: bool, int, float
(an int is accepted and converted), str, ``Literal[...]``, ``X | None`` / ``Union``, ``tuple[X, ...]`` and
fixed ``tuple[X, Y]`` (a YAML list becomes a tuple), ``list[X]``, ``dict[str, X]``, nested dataclasses and
``Any``. Every problem raises :class:`ConfigError` with the full dotted key.

Path fields (``metadata={"path": "file" | "dir" | "pattern"}``): when not null, ``~`` and ``$VARS`` are
expanded, a relative path is resolved against the current working directory (run jobs from the repository
root; Ray workers then get absolute paths), the result is stored absolute, and the file or directory must
exist. A ``pattern`` is a directory (its ``*.tar``), a brace pattern and/or glob: at least one file must match
and every brace-expanded name without wildcards must exist; remote patterns (``s3://``, ``pipe:``) are kept as
they are. Pass ``check_paths=False`` to skip existence checks (local paths are still made absolute).

Renamed fields: a dataclass may declare ``RENAMED_KEYS: ClassVar[dict[str, str]] = {old: new}``. An old key in
the input (a stored config, a ``--set`` override) is read as the new one, with one DeprecationWarning per key and
process; giving both names is an error. Retired fields: ``RETIRED_KEYS: ClassVar[dict[str, str]] = {name: why}``;
such a key in the input is dropped with one DeprecationWarning saying why, so stored configs of earlier runs load.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import glob
import hashlib
import json
import os
import types
import typing
import warnings
from collections.abc import Mapping
from typing import Any, Literal, Union

_RANGE_CHECKS = {
    "ge": (lambda v, b: v >= b, ">="),
    "gt": (lambda v, b: v > b, ">"),
    "le": (lambda v, b: v <= b, "<="),
    "lt": (lambda v, b: v < b, "<"),
}
_WARNED_RENAMES: set[tuple[str, str]] = set()


class ConfigError(ValueError):
    """A bad configuration value. ``key`` is the full dotted key ("" for file-level problems)."""

    def __init__(self, key: str, message: str, source: str | None = None):
        self.key = key
        self.message = message
        self.source = source
        super().__init__(key, message, source)

    def __str__(self) -> str:
        where = f"{self.key}: " if self.key else ""
        origin = f" [config: {self.source}]" if self.source else ""
        return f"{where}{self.message}{origin}"

    def __reduce__(self):
        # Ray ships exceptions between processes; keep all three fields through pickling.
        return (ConfigError, (self.key, self.message, self.source))

    def under(self, prefix: str) -> ConfigError:
        """The same error with its key nested under ``prefix`` (used for errors raised in __post_init__)."""
        return ConfigError(join_key(prefix, self.key), self.message, self.source)

    def with_source(self, source: str) -> ConfigError:
        return ConfigError(self.key, self.message, source)


def join_key(prefix: str, name: str) -> str:
    """Dotted key ``prefix.name`` (list indices are written ``prefix[i]``)."""
    if not prefix:
        return name
    if not name:
        return prefix
    return f"{prefix}{name}" if name.startswith("[") else f"{prefix}.{name}"


@functools.cache
def type_hints(cls: type) -> dict[str, Any]:
    """Resolved annotations of a dataclass (string annotations from ``from __future__ import annotations``)."""
    return typing.get_type_hints(cls)


def type_name(tp: Any) -> str:
    """Readable name of a type hint for error messages."""
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        args = typing.get_args(tp)
        inner = ", ".join("..." if a is Ellipsis else type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    return getattr(tp, "__name__", str(tp))


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _is_optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType) and type(None) in typing.get_args(tp)


def _convert(tp: Any, value: Any, key: str, check_paths: bool) -> Any:
    """Convert ``value`` to type hint ``tp`` or raise ConfigError naming ``key``."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        return from_dict(tp, value, key, check_paths=check_paths)

    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        members = [a for a in args if a is not type(None)]
        errors = []
        for member in members:
            try:
                return _convert(member, value, key, check_paths)
            except ConfigError as err:
                errors.append(err)
        if len(errors) == 1:
            # One non-null member (the common `X | None`): its own message is the most precise, but it
            # must still say that null is allowed.
            err = errors[0]
            if err.key == key and value is not None and _is_optional(tp):
                raise ConfigError(key, f"expected {type_name(tp)}, got {_describe(value)}")
            raise err
        raise ConfigError(key, f"expected {type_name(tp)}, got {_describe(value)}")

    if origin is Literal:
        # `True == 1` in Python; compare types too so that a bool never passes for an int choice.
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise ConfigError(key, f"must be {type_name(tp)}; got {value!r}")

    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list ({type_name(tp)}), got {_describe(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{key}[{i}]", check_paths) for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(key, f"expected a list of {len(args)} items ({type_name(tp)}), got {len(value)}")
        return tuple(_convert(a, v, f"{key}[{i}]", check_paths) for i, (a, v) in enumerate(zip(args, value)))

    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list ({type_name(tp)}), got {_describe(value)}")
        item = args[0] if args else Any
        return [_convert(item, v, f"{key}[{i}]", check_paths) for i, v in enumerate(value)]

    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(key, f"expected a mapping ({type_name(tp)}), got {_describe(value)}")
        key_tp, val_tp = args if args else (Any, Any)
        return {
            _convert(key_tp, k, join_key(key, str(k)), check_paths): _convert(
                val_tp, v, join_key(key, str(k)), check_paths
            )
            for k, v in value.items()
        }

    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, f"expected bool, got {_describe(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(key, f"expected int, got {_describe(value)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(key, f"expected float, got {_describe(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(key, f"expected str, got {_describe(value)}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(key, f"expected null, got {_describe(value)}")
    raise TypeError(f"config field {key!r} has unsupported type {type_name(tp)}")


def _check_metadata(meta: Mapping[str, Any], value: Any, key: str) -> None:
    """Apply range / choice constraints from field metadata (element-wise on tuples and lists)."""
    if value is None:
        return
    if isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            _check_metadata(meta, item, f"{key}[{i}]")
        return
    for name, (ok, symbol) in _RANGE_CHECKS.items():
        if name in meta and not ok(value, meta[name]):
            raise ConfigError(key, f"must be {symbol} {meta[name]}, got {value!r}")
    if "choices" in meta and value not in meta["choices"]:
        choices = ", ".join(repr(c) for c in meta["choices"])
        raise ConfigError(key, f"must be one of {choices}; got {value!r}")


def resolve_path(path: str) -> str:
    """Expand ``~`` and ``$VARS`` and make ``path`` absolute against the current working directory."""
    return os.path.abspath(os.path.expandvars(os.path.expanduser(path)))


def _is_remote(path: str) -> bool:
    return "://" in path or path.startswith("pipe:")


def _pattern_files(pattern: str) -> tuple[list[str], list[str]]:
    """(existing, missing) files of a directory (its ``*.tar``), brace pattern and/or glob."""
    import braceexpand  # a webdataset dependency; only needed for pattern fields

    if os.path.isdir(pattern):
        return sorted(glob.glob(os.path.join(glob.escape(pattern), "*.tar"))), []
    found, missing = [], []
    for part in braceexpand.braceexpand(pattern):
        if any(c in part for c in "*?["):
            found += sorted(glob.glob(part))
        elif os.path.isfile(part):
            found.append(part)
        else:
            missing.append(part)
    return found, missing


def _check_path(kind: str, value: str, key: str, check_paths: bool) -> str:
    if kind == "pattern" and _is_remote(value):
        return value  # streamed by the reader (s3://, http://, pipe:): nothing to check locally
    resolved = resolve_path(value)
    if not check_paths:
        return resolved
    shown = value if value == resolved else f"{value} (resolved to {resolved})"
    if kind == "pattern":
        found, missing = _pattern_files(resolved)
        if missing:
            raise ConfigError(key, f"{len(missing)} file(s) of {shown} do not exist, e.g. {missing[0]}")
        if not found:
            raise ConfigError(key, f"no files match {shown}")
        return resolved
    exists = os.path.isfile(resolved) if kind == "file" else os.path.isdir(resolved)
    if not exists:
        raise ConfigError(key, f"{'file' if kind == 'file' else 'directory'} not found: {shown}")
    return resolved


def _field_default(fld: dataclasses.Field) -> Any:
    if fld.default is not dataclasses.MISSING:
        return fld.default
    if fld.default_factory is not dataclasses.MISSING:
        return fld.default_factory()
    return None


def renamed_keys(cls: Any) -> dict[str, str]:
    """``{old name: new name}`` of a dataclass's renamed fields (empty when it declares none)."""
    return dict(getattr(cls, "RENAMED_KEYS", None) or {}) if isinstance(cls, type) else {}


def retired_keys(cls: Any) -> dict[str, str]:
    """``{name: why}`` of a dataclass's retired fields (empty when it declares none)."""
    return dict(getattr(cls, "RETIRED_KEYS", None) or {}) if isinstance(cls, type) else {}


def _apply_renames(cls: type, data: Mapping[str, Any], where: str) -> Mapping[str, Any]:
    """``data`` with the old names of ``cls``'s renamed fields replaced by the new ones, its retired fields
    dropped."""
    renames, retired = renamed_keys(cls), retired_keys(cls)
    if not any(old in data for old in (*renames, *retired)):
        return data
    out = dict(data)
    for name, why in retired.items():
        if name in out:
            out.pop(name)
            if (cls.__qualname__, name) not in _WARNED_RENAMES:
                _WARNED_RENAMES.add((cls.__qualname__, name))
                warnings.warn(f"config key {join_key(where, name)!r} is no longer used and was ignored: {why}",
                              DeprecationWarning, stacklevel=4)
    for old, new in renames.items():
        if old not in out:
            continue
        if new in out:
            raise ConfigError(join_key(where, old), f"was renamed to {new!r}; give only {join_key(where, new)!r}")
        _warn_renamed(cls, old, where)
        out[new] = out.pop(old)
    return out


def _renamed_tree(cls: type, data: Mapping[str, Any], where: str) -> Mapping[str, Any]:
    """:func:`_apply_renames` on ``data`` and on every nested section of it."""
    data = _apply_renames(cls, data, where)
    hints = type_hints(cls)
    out = None
    for fld in dataclasses.fields(cls):
        value = data.get(fld.name)
        if not isinstance(value, Mapping):
            continue
        tp = hints.get(fld.name)
        if _is_optional(tp):
            members = [a for a in typing.get_args(tp) if a is not type(None)]
            tp = members[0] if len(members) == 1 else tp
        if dataclasses.is_dataclass(tp) and isinstance(tp, type):
            renamed = _renamed_tree(tp, value, join_key(where, fld.name))
            if renamed is not value:
                out = out if out is not None else dict(data)
                out[fld.name] = renamed
    return data if out is None else out


def _warn_renamed(cls: type, old: str, where: str) -> None:
    if (cls.__qualname__, old) in _WARNED_RENAMES:
        return
    _WARNED_RENAMES.add((cls.__qualname__, old))
    new = renamed_keys(cls)[old]
    warnings.warn(f"config key {join_key(where, old)!r} is deprecated: it was renamed to {join_key(where, new)!r}",
                  DeprecationWarning, stacklevel=4)


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """A new dict: ``update`` over ``base``, merging nested mappings key by key (lists are replaced)."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def from_dict(cls: type, data: Any, where: str = "", *, check_paths: bool = True) -> Any:
    """Build dataclass ``cls`` from a (nested) mapping, strictly.

    A mapping given for a dataclass-valued field updates that field's default value key by key, so a
    partial section keeps the schema's defaults for the keys it does not mention.

    Unknown keys, wrong types, out-of-range values, missing required keys and missing files raise
    :class:`ConfigError` whose ``key`` is the dotted path below ``where``. Errors raised by a class's own
    ``__post_init__`` (cross-field checks) are re-keyed under ``where`` as well.
    """
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
        raise TypeError(f"from_dict needs a dataclass type, got {cls!r}")
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(where, f"expected a mapping (section {cls.__name__}), got {_describe(data)}")
    # The whole tree at once: a section merged into its default below would hold the old and the new name.
    data = _renamed_tree(cls, data, where)

    init_fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in init_fields]
    if unknown:
        bad = unknown[0]
        hint = difflib.get_close_matches(str(bad), list(init_fields), n=1)
        suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
        section = f"'{where}'" if where else "the top level"
        raise ConfigError(
            join_key(where, str(bad)),
            f"unknown key{suggestion}; allowed keys under {section}: {', '.join(sorted(init_fields))}",
        )

    hints = type_hints(cls)
    kwargs: dict[str, Any] = {}
    for name, fld in init_fields.items():
        key = join_key(where, name)
        if name not in data:
            if fld.default is dataclasses.MISSING and fld.default_factory is dataclasses.MISSING:
                raise ConfigError(key, f"missing required key (expected {type_name(hints[name])})")
            continue
        meta = fld.metadata
        raw = data[name]
        default = _field_default(fld)
        if isinstance(raw, Mapping) and dataclasses.is_dataclass(default):
            # A partial section changes the field's own default (e.g. Sampling(guidance_scale=2.0)), not the class's.
            raw = deep_merge(to_dict(default), raw)
        value = _convert(hints[name], raw, key, check_paths)
        _check_metadata(meta, value, key)
        if "path" in meta and value is not None:
            if meta["path"] not in ("file", "dir", "pattern"):
                raise TypeError(f"field {key!r}: metadata 'path' must be file, dir or pattern, got {meta['path']!r}")
            value = _check_path(meta["path"], value, key, check_paths)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise err.under(where) from None
    except (ValueError, TypeError) as err:
        # A section's own __post_init__ check that does not know its key: name the section at least.
        raise ConfigError(where, f"invalid {cls.__name__}: {err}") from err


def validate(cfg: Any, *, check_paths: bool = True) -> Any:
    """Re-check a dataclass tree built in code (e.g. with ``dataclasses.replace``); returns the checked copy.

    Construction in code skips the metadata checks that :func:`from_dict` applies; this runs them all.
    """
    return from_dict(type(cfg), to_dict(cfg), check_paths=check_paths)


def to_dict(cfg: Any) -> Any:
    """Plain data (dicts, lists, scalars) for a dataclass tree; tuples become lists. Inverse of from_dict."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, Mapping):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def fingerprint(cfg: Any, length: int = 16) -> str:
    """A stable hex digest of a config (or section) value, e.g. to cache an artefact built from it.

    Equal configs give equal digests across processes and runs; absolute paths are part of the value.
    """
    text = json.dumps(to_dict(cfg), sort_keys=True, separators=(",", ":"), default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """``{dotted_key: leaf_value}`` for a dataclass tree (e.g. MLflow params); tuples stay leaf values."""
    out: dict[str, Any] = {}
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        items = [(f.name, getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init]
    elif isinstance(cfg, Mapping) and prefix:
        items = list(cfg.items())
    else:
        return {prefix: cfg}
    for name, value in items:
        key = join_key(prefix, str(name))
        if (dataclasses.is_dataclass(value) and not isinstance(value, type)) or (
            isinstance(value, Mapping) and value
        ):
            out.update(flatten(value, key))
        else:
            out[key] = value
    return out


def field_type(cls: type, dotted_key: str) -> Any:
    """The type hint of ``dotted_key`` inside dataclass ``cls``; ConfigError naming the key when it has none.

    Optional sections (``X | None``) are looked through; below a ``dict[str, V]`` field any key is allowed.
    """
    return resolve_key(cls, dotted_key)[1]


def resolve_key(cls: type, dotted_key: str) -> tuple[str, Any]:
    """``(dotted key with renamed fields under their current names, its type hint)``; see :func:`field_type`."""
    tp: Any = cls
    walked = ""
    for part in dotted_key.split("."):
        if not part:
            raise ConfigError(dotted_key, "empty component in dotted key")
        if _is_optional(tp):
            members = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(members) == 1:
                tp = members[0]
        origin = typing.get_origin(tp)
        if dataclasses.is_dataclass(tp) and isinstance(tp, type):
            names = {f.name for f in dataclasses.fields(tp) if f.init}
            if part in renamed_keys(tp):
                _warn_renamed(tp, part, walked)
                part = renamed_keys(tp)[part]
            if part not in names:
                hint = difflib.get_close_matches(part, list(names), n=1)
                suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
                section = f"'{walked}'" if walked else "the top level"
                raise ConfigError(
                    join_key(walked, part),
                    f"unknown key{suggestion}; allowed keys under {section}: {', '.join(sorted(names))}",
                )
            tp = type_hints(tp)[part]
        elif origin in (dict, Mapping) or tp is dict:
            args = typing.get_args(tp)
            tp = args[1] if args else Any
        elif tp is Any:
            pass
        else:
            raise ConfigError(join_key(walked, part), f"'{walked}' is a {type_name(tp)}, it has no sub-keys")
        walked = join_key(walked, part)
    return walked, tp
