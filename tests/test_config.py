"""Presets, overrides and config round trips."""

import json

import pytest

from moalign.errors import MoalignError
from moalign.presets import PRESETS, Recipe, get_preset
from moalign.run.serialize import apply_overrides, from_dict, to_dict
from moalign.stage1 import Stage1Config


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds_and_round_trips(name):
    recipe = get_preset(name)
    assert isinstance(recipe, Recipe)
    data = json.loads(json.dumps(to_dict(recipe)))  # JSON-able
    assert from_dict(Recipe, data) == recipe
    assert recipe.stage1.data.num_frames % 4 == 1


@pytest.mark.parametrize(
    ("name", "geometry", "sampler"),
    [
        ("tiny", (17, 64, 64), (25, 1.0, 8.0)),  # the demo's videos (its base model, generation settings)
        ("small", (17, 128, 128), (25, 1.0, 8.0)),
        ("cogvideox-2b", (49, 480, 720), (50, 6.0, 8.0)),  # GenerateConfig's defaults
        ("cogvideox-5b", (49, 480, 720), (50, 6.0, 8.0)),
        ("wan2.1-1.3b", (81, 480, 832), (50, 5.0, 16.0)),
        ("wan2.1-14b", (81, 480, 832), (50, 5.0, 16.0)),
    ],
)
def test_presets_generate_settings(name, geometry, sampler):
    g = get_preset(name).generate
    assert (g.num_frames, g.height, g.width) == geometry and (g.steps, g.guidance_scale, g.fps) == sampler
    if name in ("tiny", "small"):
        demo = get_preset(name).demo
        assert geometry == (demo.base.num_frames, demo.base.height, demo.base.width)


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ValueError, match="tiny"):
        get_preset("huge")


def test_overrides_coerce_types_and_nest():
    cfg = get_preset("tiny").stage1
    new = apply_overrides(
        cfg, ["lr=3e-4", "encoder.layer=2", "data.fps=8", "encoder.input_size=32,48", "steps=10"]
    )
    assert new.lr == 3e-4 and new.steps == 10 and isinstance(new.steps, int)
    assert new.encoder.layer == 2 and new.data.fps == 8.0
    assert new.encoder.input_size == (32, 48)
    assert cfg.lr != 3e-4  # frozen original untouched


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("nope=1", "unknown config field"),
        ("lr", "key=value"),
        ("data.num_frames=16", "4k\\+1"),
        ("steps=1.5", "integer"),
    ],
)
def test_bad_overrides_say_what_is_wrong(override, match):
    with pytest.raises((ValueError, TypeError, MoalignError), match=match):
        apply_overrides(Stage1Config(), [override])


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match="unknown"):
        from_dict(Stage1Config, {"not_a_field": 1})


def test_overrides_apply_together_in_any_order():
    """Configs check themselves once, after every override: validate_every may come before its prompts."""
    from moalign.stage2 import Stage2Config

    a = apply_overrides(Stage2Config(model="m"), ["validate_every=5", "validation_prompts=a ball"])
    b = apply_overrides(Stage2Config(model="m"), ["validation_prompts=a ball", "validate_every=5"])
    assert a == b and a.validation_prompts == ("a ball",)
    with pytest.raises(ValueError, match="validate_every needs validation_prompts"):
        apply_overrides(Stage2Config(model="m"), ["validate_every=5"])
    with pytest.raises(ValueError, match="'lr' has no sub-fields"):
        apply_overrides(Stage2Config(), ["lr.x=1"])
