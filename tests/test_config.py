"""Config loading: frozen dataclasses from YAML with one-line errors naming the field."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from fedclip.sdk.config import from_mapping, from_yaml, load_yaml, to_mapping
from fedclip.sdk.errors import ConfigError


@dataclass(frozen=True)
class Inner:
    rank: int
    alpha: float = 8.0


@dataclass(frozen=True)
class Sample:
    name: str
    inner: Inner
    kind: Literal["lora", "tri-lora"] = "lora"
    enabled: bool = True
    lr: float = 1e-3
    targets: tuple[str, ...] = ("q", "v")
    groups: list[int] = field(default_factory=list)
    extra: dict[str, float] = field(default_factory=dict)
    out: Path | None = None
    note: str | None = None

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"lr: must be > 0, got {self.lr}")


GOOD = {"name": "x", "inner": {"rank": 4}}


def test_round_trip_through_mapping():
    cfg = from_mapping(Sample, {**GOOD, "targets": "q, k,v", "groups": [1, 2], "extra": {"a": 1}, "out": "o"})
    assert cfg.targets == ("q", "k", "v") and cfg.groups == [1, 2] and cfg.extra == {"a": 1.0}
    assert cfg.out == Path("o") and cfg.inner == Inner(4, 8.0)
    assert isinstance(cfg.extra["a"], float)
    assert dataclasses.is_dataclass(cfg) and from_mapping(Sample, to_mapping(cfg)) == cfg
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.name = "y"  # type: ignore[misc]


@pytest.mark.parametrize(
    "data, where",
    [
        ({**GOOD, "lr": "fast"}, "config.lr: expected a finite number"),
        ({**GOOD, "lr": float("nan")}, "config.lr: expected a finite number"),
        ({**GOOD, "lr": True}, "config.lr: expected a finite number"),
        ({**GOOD, "enabled": "yes"}, "config.enabled: expected true or false"),
        ({**GOOD, "name": 3}, "config.name: expected a string"),
        ({**GOOD, "kind": "dora"}, "config.kind: 'dora' is not one of 'lora', 'tri-lora'"),
        ({**GOOD, "inner": {"rank": 2.5}}, "config.inner.rank: expected an integer"),
        ({**GOOD, "inner": {"rank": True}}, "config.inner.rank: expected an integer"),
        ({**GOOD, "inner": 3}, "config.inner: expected a mapping"),
        ({**GOOD, "groups": [1, "a"]}, "config.groups[1]: expected an integer"),
        ({**GOOD, "groups": 5}, "config.groups: expected a list"),
        ({**GOOD, "extra": {"a": "b"}}, "config.extra.a: expected a finite number"),
        ({**GOOD, "extra": [1]}, "config.extra: expected a mapping"),
        ({**GOOD, "out": 5}, "config.out"),
        ({"inner": {"rank": 4}}, "config.name: required field is missing"),
        ({"name": "x", "inner": {}}, "config.inner.rank: required field is missing"),
        ({**GOOD, "lr": -1.0}, "lr: must be > 0"),
    ],
)
def test_bad_field_is_named(data, where):
    with pytest.raises(ConfigError) as exc:
        from_mapping(Sample, data)
    assert where in str(exc.value)
    assert "\n" not in str(exc.value)


def test_unknown_key_is_an_error_listing_known_fields():
    with pytest.raises(ConfigError, match=r"unknown field 'lrr' \(known: enabled, extra, groups"):
        from_mapping(Sample, {**GOOD, "lrr": 0.1})
    with pytest.raises(ConfigError, match="unknown field 'typo'"):
        from_mapping(Sample, {"name": "x", "inner": {"rank": 1, "typo": 2}})


def test_unknown_non_string_keys_do_not_crash():
    with pytest.raises(ConfigError, match="unknown field"):
        from_mapping(Sample, {**GOOD, 1: "a", "zz": 2})


def test_not_a_mapping():
    with pytest.raises(ConfigError, match="expected a mapping, got list"):
        from_mapping(Sample, [1, 2])


def test_from_yaml_with_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: x\ninner:\n  rank: 4\nlr: 0.5\n")
    cfg = from_yaml(Sample, p, overrides={"lr": 0.25, "note": None})
    assert cfg.lr == 0.25 and cfg.note is None and cfg.inner.rank == 4


def test_yaml_errors_name_file_and_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\ninner:\n  rank: [4\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: line \d+ is not valid YAML"):
        from_yaml(Sample, p)
    with pytest.raises(ConfigError, match="cannot read"):
        load_yaml(tmp_path / "missing.yaml")
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_yaml(p)
    p.write_text("")
    assert load_yaml(p) == {}


def test_yaml_type_error_names_file_and_field(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: x\ninner:\n  rank: four\n")
    with pytest.raises(ConfigError, match=r"c.yaml.inner.rank: expected an integer, got 'four'"):
        from_yaml(Sample, p)
