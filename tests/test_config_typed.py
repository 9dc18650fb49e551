"""The generic dataclass <-> plain-data machinery (dd2dist/config/typed.py) on a small schema of its own."""

from __future__ import annotations

import dataclasses
import pickle
from dataclasses import dataclass, field
from typing import Literal

import pytest

from dd2dist.config.typed import ConfigError, field_type, fingerprint, flatten, from_dict, to_dict, validate


@dataclass(frozen=True)
class Leaf:
    size: int = field(default=4, metadata={"gt": 0, "le": 64})
    rate: float = field(default=0.5, metadata={"ge": 0.0, "lt": 1.0})
    mode: Literal["a", "b"] = "a"
    level: Literal[1, 2] = 1


@dataclass(frozen=True)
class Paths:
    weights: str | None = field(default=None, metadata={"path": "file"})
    folder: str | None = field(default=None, metadata={"path": "dir"})


@dataclass(frozen=True)
class Ordered:
    low: float = 0.0
    high: float = 1.0

    def __post_init__(self):
        if self.low >= self.high:
            raise ConfigError("low", f"must be < high ({self.high})")


@dataclass(frozen=True)
class Root:
    required_name: str
    leaf: Leaf = field(default_factory=Leaf)
    maybe_leaf: Leaf | None = None
    steps: tuple[int, ...] = field(default=(2, 3), metadata={"ge": 2})
    pair: tuple[float, float] = (0.9, 0.95)
    tags: dict[str, int] = field(default_factory=dict)
    optional_text: str | None = None
    flag: bool = False
    kind: str = field(default="x", metadata={"choices": ("x", "y")})
    ordered: Ordered = field(default_factory=Ordered)
    paths: Paths = field(default_factory=Paths)


def _err(data, **kw) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        from_dict(Root, data, **kw)
    return info.value


def test_builds_nested_tree_with_conversions():
    cfg = from_dict(
        Root,
        {
            "required_name": "r",
            "leaf": {"size": 8, "rate": 0},  # int accepted for float
            "maybe_leaf": {"mode": "b"},
            "steps": [2, 5],  # list -> tuple
            "pair": [0, 0.5],
            "tags": {"u": 1},
            "optional_text": None,
        },
    )
    assert cfg.leaf == Leaf(size=8, rate=0.0)
    assert isinstance(cfg.leaf.rate, float)
    assert cfg.maybe_leaf == Leaf(mode="b")
    assert cfg.steps == (2, 5) and isinstance(cfg.steps, tuple)
    assert cfg.pair == (0.0, 0.5)
    assert cfg.tags == {"u": 1}
    assert from_dict(Root, {"required_name": "r"}) == Root(required_name="r")


def test_unknown_nested_key_names_dotted_key_and_allowed_keys():
    err = _err({"required_name": "r", "leaf": {"sise": 3}})
    assert err.key == "leaf.sise"
    assert "did you mean 'size'" in str(err)
    for allowed in ("size", "rate", "mode", "level"):
        assert allowed in str(err)
    assert _err({"required_name": "r", "maybe_leaf": {"bogus": 1}}).key == "maybe_leaf.bogus"
    assert _err({"required_name": "r", "extra": 1}).key == "extra"


@pytest.mark.parametrize(
    "data, key, expected, got",
    [
        ({"leaf": {"size": "4"}}, "leaf.size", "expected int", "str '4'"),
        ({"leaf": {"size": 4.0}}, "leaf.size", "expected int", "float 4.0"),
        ({"leaf": {"size": True}}, "leaf.size", "expected int", "bool True"),
        ({"leaf": {"rate": "0.1"}}, "leaf.rate", "expected float", "str '0.1'"),
        ({"flag": 1}, "flag", "expected bool", "int 1"),
        ({"optional_text": 3}, "optional_text", "expected str | null", "int 3"),
        ({"steps": 3}, "steps", "expected a list", "int 3"),
        ({"steps": [2, "x"]}, "steps[1]", "expected int", "str 'x'"),
        ({"pair": [0.1]}, "pair", "expected a list of 2 items", "got 1"),
        ({"tags": {"u": "v"}}, "tags.u", "expected int", "str 'v'"),
        ({"tags": [1]}, "tags", "expected a mapping", "list [1]"),
        ({"leaf": 5}, "leaf", "expected a mapping", "int 5"),
        ({"leaf": {"mode": "c"}}, "leaf.mode", "must be one of 'a', 'b'", "'c'"),
        ({"leaf": {"level": True}}, "leaf.level", "must be one of 1, 2", "True"),
    ],
)
def test_wrong_type_names_key_expected_and_got(data, key, expected, got):
    err = _err({"required_name": "r", **data})
    assert err.key == key
    assert expected in err.message and got in err.message


@pytest.mark.parametrize(
    "data, key",
    [
        ({"leaf": {"size": 0}}, "leaf.size"),  # gt 0
        ({"leaf": {"size": 65}}, "leaf.size"),  # le 64
        ({"leaf": {"rate": -0.1}}, "leaf.rate"),  # ge 0
        ({"leaf": {"rate": 1.0}}, "leaf.rate"),  # lt 1
        ({"steps": [2, 1]}, "steps[1]"),  # element-wise ge 2
        ({"kind": "z"}, "kind"),  # choices
    ],
)
def test_out_of_range_names_key(data, key):
    err = _err({"required_name": "r", **data})
    assert err.key == key
    assert "must be" in err.message


def test_boundaries_are_inclusive_or_exclusive_as_declared():
    cfg = from_dict(Root, {"required_name": "r", "leaf": {"size": 64, "rate": 0.0}, "steps": [2]})
    assert cfg.leaf.size == 64 and cfg.leaf.rate == 0.0 and cfg.steps == (2,)


def test_missing_required_key_is_named():
    err = _err({})
    assert err.key == "required_name"
    assert "missing required key" in err.message and "str" in err.message


def test_post_init_errors_are_rekeyed_under_their_section():
    err = _err({"required_name": "r", "ordered": {"low": 2.0, "high": 1.0}})
    assert err.key == "ordered.low"
    assert "< high" in str(err)


def test_paths_resolved_against_cwd_stored_absolute_and_checked(tmp_path, monkeypatch):
    (tmp_path / "w.pt").write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = from_dict(Root, {"required_name": "r", "paths": {"weights": "w.pt", "folder": "sub"}})
    assert cfg.paths.weights == str(tmp_path / "w.pt")
    assert cfg.paths.folder == str(tmp_path / "sub")

    err = _err({"required_name": "r", "paths": {"weights": "missing.pt"}})
    assert err.key == "paths.weights"
    assert "file not found" in err.message and "missing.pt" in err.message and str(tmp_path) in err.message
    # a directory is not a file and vice versa
    assert _err({"required_name": "r", "paths": {"weights": "sub"}}).key == "paths.weights"
    assert _err({"required_name": "r", "paths": {"folder": "w.pt"}}).key == "paths.folder"
    # existence checks can be skipped, the path is still made absolute
    lax = from_dict(Root, {"required_name": "r", "paths": {"weights": "later.pt"}}, check_paths=False)
    assert lax.paths.weights == str(tmp_path / "later.pt")


def test_where_prefixes_keys():
    with pytest.raises(ConfigError) as info:
        from_dict(Leaf, {"size": -1}, "outer.leaf")
    assert info.value.key == "outer.leaf.size"


def test_to_dict_round_trip_and_plain_types():
    cfg = Root(required_name="r", maybe_leaf=Leaf(size=2), steps=(3,), tags={"a": 1}, optional_text="t")
    plain = to_dict(cfg)
    assert plain["steps"] == [3] and plain["pair"] == [0.9, 0.95]
    assert plain["maybe_leaf"] == {"size": 2, "rate": 0.5, "mode": "a", "level": 1}
    assert from_dict(Root, plain) == cfg


def test_flatten_gives_dotted_leaves():
    flat = flatten(Root(required_name="r", tags={"a": 1}))
    assert flat["leaf.size"] == 4
    assert flat["steps"] == (2, 3)
    assert flat["tags.a"] == 1
    assert flat["maybe_leaf"] is None
    assert flat["paths.weights"] is None
    assert "leaf" not in flat and "paths" not in flat
    assert len(flat) == 4 + 1 + 1 + 1 + 1 + 1 + 1 + 1 + 2 + 2 + 1  # every leaf once


def test_field_type_walks_schema_and_rejects_unknown():
    assert field_type(Root, "leaf.size") is int
    assert field_type(Root, "maybe_leaf.rate") is float  # looks through `Leaf | None`
    assert field_type(Root, "tags.anything") is int
    with pytest.raises(ConfigError) as info:
        field_type(Root, "leaf.nope")
    assert info.value.key == "leaf.nope"
    with pytest.raises(ConfigError) as info:
        field_type(Root, "flag.sub")
    assert info.value.key == "flag.sub"


def test_config_error_is_value_error_and_pickles():
    err = ConfigError("a.b", "bad", "file.yaml")
    assert isinstance(err, ValueError)
    back = pickle.loads(pickle.dumps(err))
    assert (back.key, back.message, back.source) == ("a.b", "bad", "file.yaml")
    assert str(back) == "a.b: bad [config: file.yaml]"


@dataclass(frozen=True)
class Shards:
    source: str | None = field(default=None, metadata={"path": "pattern"})


def test_pattern_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for i in range(3):
        (tmp_path / "d" / f"s-{i:06d}.tar").parent.mkdir(exist_ok=True)
        (tmp_path / "d" / f"s-{i:06d}.tar").write_bytes(b"")
    ok = {
        "d/s-{000000..000002}.tar": str(tmp_path / "d" / "s-{000000..000002}.tar"),
        "d/*.tar": str(tmp_path / "d" / "*.tar"),
        "d": str(tmp_path / "d"),
        "s3://bucket/s-{0..9}.tar": "s3://bucket/s-{0..9}.tar",  # remote: kept, not checked
    }
    for given, stored in ok.items():
        assert from_dict(Shards, {"source": given}).source == stored
    with pytest.raises(ConfigError) as info:
        from_dict(Shards, {"source": "d/s-{000000..000003}.tar"}, "data")
    assert info.value.key == "data.source" and "s-000003.tar" in info.value.message
    with pytest.raises(ConfigError) as info:
        from_dict(Shards, {"source": "d/*.tgz"})
    assert "no files match" in info.value.message
    with pytest.raises(ConfigError):
        from_dict(Shards, {"source": "empty_dir_absent"})


def test_validate_rechecks_trees_built_in_code():
    good = Root(required_name="r")
    assert validate(good) == good
    bad = dataclasses.replace(good, leaf=Leaf(size=0))  # direct construction skips metadata checks
    with pytest.raises(ConfigError) as info:
        validate(bad)
    assert info.value.key == "leaf.size"


@dataclass(frozen=True)
class PlainCheck:
    n: int = 1

    def __post_init__(self):
        if self.n == 3:
            raise ValueError("three is not allowed")


@dataclass(frozen=True)
class HoldsPlain:
    inner: PlainCheck = field(default_factory=PlainCheck)


def test_plain_value_error_in_post_init_names_the_section():
    with pytest.raises(ConfigError) as info:
        from_dict(HoldsPlain, {"inner": {"n": 3}})
    assert info.value.key == "inner" and "three is not allowed" in info.value.message


def test_fingerprint_is_stable_and_value_sensitive():
    a, b = Root(required_name="r"), Root(required_name="r")
    assert fingerprint(a) == fingerprint(b) and len(fingerprint(a)) == 16
    assert fingerprint(a) != fingerprint(Root(required_name="r", steps=(2, 4)))
    assert fingerprint(a.leaf) != fingerprint(Leaf(rate=0.25))
    # independent computation: digest of the canonical JSON of the plain data
    import hashlib
    import json

    canon = json.dumps(to_dict(a), sort_keys=True, separators=(",", ":"))
    assert fingerprint(a, length=64) == hashlib.sha256(canon.encode()).hexdigest()
