"""The configuration system: YAML + includes + dotted overrides -> strict, validated schema."""

from __future__ import annotations

from typing import Literal

import pytest
import yaml

from pipeline.common.config_io import ConfigModel, flatten, load_config, save_resolved
from pipeline.common.errors import RdptConfigError


class Inner(ConfigModel):
    size: int = 4
    lr: float = 1e-3
    kind: Literal["a", "b"] = "a"


class Outer(ConfigModel):
    name: str = "x"
    inner: Inner = Inner()
    tags: list[str] = []


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: run1\ninner:\n  size: 8\n")
    cfg = load_config(Outer, p, ["inner.lr=3e-4", "tags=[a, b]", "inner.kind=b"])
    assert cfg.name == "run1" and cfg.inner.size == 8
    assert cfg.inner.lr == pytest.approx(3e-4) and cfg.inner.kind == "b"
    assert cfg.tags == ["a", "b"]


def test_section_include_relative_to_file(tmp_path):
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "inner.yaml").write_text("size: 16\n")
    p = tmp_path / "c.yaml"
    p.write_text("inner: presets/inner.yaml\n")
    cfg = load_config(Outer, p, ["inner.lr=0.5"])
    assert cfg.inner.size == 16 and cfg.inner.lr == 0.5


def test_unknown_key_names_file_and_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("inner:\n  sise: 8\n")
    with pytest.raises(RdptConfigError) as e:
        load_config(Outer, p)
    msg = str(e.value)
    assert str(p) in msg and "inner.sise" in msg and "size" in msg


def test_wrong_type_names_expected_type(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("inner:\n  size: many\n")
    with pytest.raises(RdptConfigError) as e:
        load_config(Outer, p)
    assert "inner.size" in str(e.value) and "integer" in str(e.value)
    with pytest.raises(RdptConfigError, match="inner.kind"):
        load_config(Outer, None, ["inner.kind=c"])


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(RdptConfigError, match="dotted.key=value"):
        load_config(Outer, None, ["inner.size"])
    with pytest.raises(RdptConfigError, match="not found"):
        load_config(Outer, tmp_path / "nope.yaml")


def test_resolved_round_trip(tmp_path):
    cfg = load_config(Outer, None, ["inner.size=3"])
    save_resolved(cfg, tmp_path / "resolved.yaml")
    again = load_config(Outer, tmp_path / "resolved.yaml")
    assert again == cfg
    assert yaml.safe_load((tmp_path / "resolved.yaml").read_text())["inner"]["size"] == 3
    assert flatten(cfg)["inner.size"] == 3
