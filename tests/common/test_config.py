"""Parameters: `param` checks, settings dataclasses whose defaults are written once."""

from __future__ import annotations

import dataclasses

import pytest

from pipeline.common.config import REQUIRED, ParamsError, defaults, load_params, read_settings, section, setting
from pipeline.data.crop import CropConfig
from pipeline.data.demo_options import DemoOptions
from pipeline.data.register_options import AlignOptions
from pipeline.data.stats_stage import StatsConfig
from pipeline.evaluate.promote import PromoteConfig
from pipeline.evaluate.stage import EvalConfig


@dataclasses.dataclass(frozen=True)
class _Demo:
    size: int = setting(REQUIRED, int, minimum=8)
    name: str = setting("x", str, choices=["x", "y"])
    tags: tuple[str, ...] = setting(("a",), list, convert=lambda v, key: tuple(v))
    table: dict = setting({"k": 1}, dict)


def test_read_settings_takes_defaults_from_the_dataclass():
    s = read_settings(_Demo, {"size": 16}, "demo")
    assert s == _Demo(size=16)
    assert s.tags == ("a",) and s.table == {"k": 1}
    # mutable defaults are not shared between instances
    assert read_settings(_Demo, {"size": 16}, "demo").table is not s.table
    assert read_settings(_Demo, {"size": 16, "tags": ["p", "q"]}, "demo").tags == ("p", "q")


@pytest.mark.parametrize(
    "cfg, key",
    [({}, "demo.size"), ({"size": 4}, "demo.size"), ({"size": 16, "name": "z"}, "demo.name"),
     ({"size": "16"}, "demo.size"), ({"size": 16, "sise": 1}, "demo.sise"), ({"size": True}, "demo.size")],
)
def test_read_settings_errors_name_the_key(cfg, key):
    with pytest.raises(ParamsError, match=key.replace(".", r"\.")):
        read_settings(_Demo, cfg, "demo")


@pytest.mark.parametrize(
    "cls, name, ignore",
    [(CropConfig, "crop", ()), (StatsConfig, "stats", ()), (EvalConfig, "evaluate", ()),
     (PromoteConfig, "promote", ()), (AlignOptions, "register", ("raw_dir",)), (DemoOptions, "demo", ("out_dir",))],
)
def test_params_yaml_sections_read_and_only_known_keys(cls, name, ignore):
    """Every key of the repository's params.yaml section is a field of its settings class."""
    params = load_params("params.yaml")
    cfg = section(params, name)
    settings = cls.from_params(cfg)
    fields = {f.name for f in dataclasses.fields(cls)}
    assert set(cfg) <= fields | set(ignore)
    # an empty section gives the dataclass defaults (crop.patch_size is required)
    if cls is not CropConfig:
        assert cls.from_params({}) == cls()
    assert isinstance(settings, cls)


def test_defaults_helper_lists_field_defaults():
    assert defaults(DemoOptions) == {"num_pairs": 12, "height": 160, "width": 224, "seed": 2024}
