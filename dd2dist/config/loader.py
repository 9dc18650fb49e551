"""YAML files + ``--set`` overrides -> a validated, frozen config; and the resolved dump back to YAML.

Loading order (later wins, nested mappings are merged key by key, lists and scalars are replaced):

1. the files listed under ``defaults:`` (or ``include:``) of the YAML file, in order, each loaded the same
   way (they may include further files). An entry is either a path, merged at the top level (e.g.
   ``defaults: [../teachers/var_tiny.yaml]``, whose file holds a whole ``teacher:`` section), or a one-key
   mapping ``{dotted.section: path}`` whose file holds that section's keys and is merged under it. A relative
   include path is looked up next to the including file first, then in the current working directory;
2. the file's own keys;
3. the ``--set a.b=c`` overrides, in order. Values are parsed as YAML (``3``, ``1e-4``, ``true``, ``null``,
   ``[1, 2]``, ``{cfg: 1.5}``); for a string field a bare number keeps its text (``--set name=007``).

Then :func:`dd2dist.config.typed.from_dict` checks every key, type, range and file path, so a bad config fails
here, before any work, with an error naming the dotted key.

Scalars such as ``1e-4`` are read as floats (YAML 1.2), not as strings as PyYAML's YAML 1.1 rules would.
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import yaml

from dd2dist.config.schema import ExperimentConfig
from dd2dist.config.typed import ConfigError, deep_merge, from_dict, resolve_key, to_dict

INCLUDE_KEYS = ("defaults", "include")

# Presets renamed so that the name says what each is for (smoke test, exact toy check, teacher architecture).
# Commands, scripts and recorded results still name the old paths: a path that is gone fails naming its successor.
RENAMED_CONFIGS = {
    "configs/experiments/tiny_cpu.yaml": "configs/experiments/smoke_var_deepspeed.yaml",
    "configs/experiments/tiny_var.yaml": "configs/experiments/smoke_var_torch.yaml",
    "configs/experiments/tiny_llamagen.yaml": "configs/experiments/smoke_llamagen_torch.yaml",
    "configs/experiments/llamagen_stage0_tiny.yaml": "configs/experiments/smoke_llamagen_stage0.yaml",
    "configs/experiments/toy_var.yaml": "configs/experiments/exact_toy_var.yaml",
    "configs/experiments/toy_llamagen.yaml": "configs/experiments/exact_toy_llamagen.yaml",
    "configs/demo/var_quick.yaml": "configs/demo/smoke_var.yaml",
    "configs/demo/llamagen_quick.yaml": "configs/demo/smoke_llamagen.yaml",
    "configs/digits/var.yaml": "configs/teachers/digits_var.yaml",
    "configs/digits/llamagen.yaml": "configs/teachers/digits_llamagen.yaml",
}


def renamed_to(path: str | os.PathLike) -> str | None:
    """The new path of a renamed preset when ``path`` names its old one (absolute or relative), else None."""
    posix = os.path.normpath(os.path.abspath(os.fspath(path))).replace(os.sep, "/")
    for old, new in RENAMED_CONFIGS.items():
        if posix.endswith("/" + old):
            return posix[: -len(old)] + new
    return None


def _missing(path: str) -> str:
    new = renamed_to(path)
    return f" (this preset was renamed: use {new})" if new else ""

# YAML 1.2 floats: PyYAML (YAML 1.1) needs a dot and a signed exponent, so `1e-4` would load as a string.
_FLOAT_RE = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 float resolution."""


class _Dumper(yaml.SafeDumper):
    """SafeDumper that quotes every string our loader would read back as a float, and indents lists."""

    def increase_indent(self, flow: bool = False, indentless: bool = False):
        return super().increase_indent(flow, False)


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    # Short lists of scalars (betas, patch_nums, stages) read best on one line.
    flow = all(isinstance(v, (str, int, float, bool)) or v is None for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _represent_list)

for _cls in (_Loader, _Dumper):
    _cls.yaml_implicit_resolvers = {
        ch: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:float"]
        for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_RE, list("-+0123456789."))


def parse_yaml(text: str, source: str = "<string>") -> Any:
    """Parse YAML text with the config's rules; ConfigError naming ``source`` on a syntax error."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        raise ConfigError("", f"invalid YAML: {err}", source) from None


def to_yaml(cfg: Any) -> str:
    """The config as YAML text (keys in schema order); reloading it gives an equal config."""
    return yaml.dump(to_dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True)


def dump_yaml(cfg: Any, path: str | os.PathLike) -> str:
    """Write the resolved config to ``path`` (parent directories created); returns the path written.

    The file is replaced atomically, so a run killed mid-write never leaves a truncated config to resume from.
    """
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".config-", suffix=".yaml", dir=parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(to_yaml(cfg))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    """``"a.b", v`` -> ``{"a": {"b": v}}``."""
    for part in reversed(dotted.split(".")):
        value = {part: value}
    return value


def _find_include(entry: str, including_file: str) -> str:
    candidates = [os.path.expanduser(entry)]
    if not os.path.isabs(candidates[0]):
        candidates = [os.path.join(os.path.dirname(os.path.abspath(including_file)), candidates[0]), candidates[0]]
    for candidate in candidates:
        if os.path.isfile(candidate):
            return os.path.abspath(candidate)
    tried = ", ".join(os.path.abspath(c) for c in candidates)
    hint = next((h for h in map(_missing, candidates) if h), "")
    raise ConfigError("defaults", f"included file {entry!r} not found (tried {tried}){hint}", including_file)


def read_yaml_tree(path: str | os.PathLike, _stack: tuple[str, ...] = ()) -> dict[str, Any]:
    """The merged mapping of a YAML file and everything it includes (not yet validated)."""
    path = os.path.abspath(os.fspath(path))
    if path in _stack:
        chain = " -> ".join(list(_stack) + [path])
        raise ConfigError("defaults", f"include cycle: {chain}", path)
    if not os.path.isfile(path):
        raise ConfigError("", f"config file not found: {path}{_missing(path)}")
    with open(path, encoding="utf-8") as fh:
        data = parse_yaml(fh.read(), path)
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError("", f"a config file must hold a mapping at the top level, got {type(data).__name__}", path)
    present = [k for k in INCLUDE_KEYS if k in data]
    if len(present) > 1:
        raise ConfigError(present[1], "use either 'defaults' or 'include', not both", path)
    includes = data.get(present[0], []) if present else []
    own = {k: v for k, v in data.items() if k not in INCLUDE_KEYS}
    if includes is None:
        includes = []
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list):
        raise ConfigError(present[0], f"must be a list of paths, got {type(includes).__name__}", path)

    merged: dict[str, Any] = {}
    for i, entry in enumerate(includes):
        key = f"{present[0]}[{i}]"
        if isinstance(entry, str):
            section, include_path = "", entry
        elif (
            isinstance(entry, Mapping)
            and len(entry) == 1
            and all(isinstance(x, str) for x in next(iter(entry.items())))
        ):
            section, include_path = next(iter(entry.items()))
        else:
            raise ConfigError(key, f"must be a path or a one-key mapping {{section: path}}, got {entry!r}", path)
        included = read_yaml_tree(_find_include(include_path, path), _stack + (path,))
        merged = deep_merge(merged, _nest(section, included) if section else included)
    return deep_merge(merged, own)


def parse_override(text: str, schema: type = ExperimentConfig) -> tuple[str, Any]:
    """``"a.b=c"`` -> ``("a.b", parsed c)``; ConfigError naming the key when the schema has no such key."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(key, f"override must look like KEY=VALUE (dotted key), got {text!r}")
    key, tp = resolve_key(schema, key)
    value = parse_yaml(raw, f"--set {text}")
    # A string field keeps the raw text of a bare number or bool (`--set tracking.experiment=2024`).
    if isinstance(value, (bool, int, float)) and _accepts_str(tp) and not _accepts_non_str_scalar(tp):
        value = raw.strip()
    return key, value


def _accepts_str(tp: Any) -> bool:
    if tp is str:
        return True
    return any(_accepts_str(a) for a in typing.get_args(tp)) if typing.get_origin(tp) is not None else False


def _accepts_non_str_scalar(tp: Any) -> bool:
    if tp in (bool, int, float):
        return True
    if typing.get_origin(tp) is typing.Literal:
        return any(not isinstance(a, str) for a in typing.get_args(tp))
    return any(_accepts_non_str_scalar(a) for a in typing.get_args(tp))


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str], schema: type = ExperimentConfig) -> dict:
    """Apply ``KEY=VALUE`` overrides to a raw config mapping (keys checked against ``schema``)."""
    out = dict(data)
    for text in overrides:
        try:
            key, value = parse_override(text, schema)
        except ConfigError as err:
            raise ConfigError(err.key, err.message, f"--set {text}") from None
        out = deep_merge(out, _nest(key, value))
    return out


def load_config(
    path: str | os.PathLike | None,
    overrides: Sequence[str] = (),
    schema: type = ExperimentConfig,
    *,
    check_paths: bool = True,
) -> Any:
    """Load, merge, override and validate a config; ``path=None`` starts from the schema's defaults.

    Raises :class:`ConfigError` (a ValueError) naming the dotted key and the file for any problem.
    """
    source = os.fspath(path) if path is not None else None
    if source is not None and overrides:
        source += " with --set overrides"
    try:
        data = read_yaml_tree(path) if path is not None else {}
        data = apply_overrides(data, overrides, schema)
        return from_dict(schema, data, check_paths=check_paths)
    except ConfigError as err:
        if err.source is None and source is not None:
            raise err.with_source(source) from None
        raise


def add_config_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--config PATH`` and repeatable ``--set KEY=VALUE`` to a job's argument parser."""
    group = parser.add_argument_group("configuration")
    group.add_argument("--config", metavar="PATH", default=None, help="experiment YAML (default: built-in defaults)")
    group.add_argument(
        "--set",
        dest="overrides",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="override one config value by dotted key, e.g. --set stage2.generator_lr=1e-4 (repeatable)",
    )
    return parser


def config_from_args(ns: argparse.Namespace, schema: type = ExperimentConfig, *, check_paths: bool = True) -> Any:
    """The validated config named by the ``--config`` / ``--set`` arguments of :func:`add_config_args`.

    ``check_paths=False`` is for jobs that create the files a config names (e.g. shard writers).
    """
    return load_config(ns.config, list(ns.overrides or []), schema, check_paths=check_paths)


def parse_config_args(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None = None, schema: type = ExperimentConfig,
    check: Callable[[Any], None] | None = None,
) -> tuple[argparse.Namespace, Any]:
    """Parse a job's command line (``parser`` already has :func:`add_config_args`) and load its config.

    A bad config ends the job the argparse way (usage line, ``error: <dotted key>: <problem>``, exit status 2)
    instead of a traceback; so does a ConfigError raised by ``check``, a job's own test of the loaded config.
    """
    ns = parser.parse_args(argv)
    try:
        cfg = config_from_args(ns, schema)
        if check is not None:
            check(cfg)
        return ns, cfg
    except ConfigError as err:
        parser.error(str(err))
