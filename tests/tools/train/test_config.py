"""Run configs (tools/train/config.py): presets and ``key=value`` overrides."""

from __future__ import annotations

import pytest

from blocklm.tools.train.config import build_config
from blocklm.tools.train.loop_util import window_rooms


@pytest.mark.parametrize("override, field", [
    ('dispatch.mode_stall_weight={"image": 0}', "mode_stall_weight"),
    ("dispatch.budget=0", "budget"),
    ('dispatch.mode_budget={"image": 0}', "budget of 'image'"),
    ("dispatch.ttl_steps=0", "ttl_steps"),
])
def test_dispatch_overrides_are_checked_when_the_config_is_built(override, field):
    # the dispatcher's checks ran only when a trainer built its dispatcher (or not at all when
    # a run was not chained): a bad value now fails at once, naming the field
    with pytest.raises(ValueError, match=field):
        build_config("small", [override])


def test_the_small_preset_lets_image_batches_fill():
    d = build_config("small").dispatch
    assert d.budget_of("image") == 131072 and d.stall_weight_of("image") == 0.25
    assert d.budget_of("text") == 65536 and d.stall_weight_of("text") == 1.0
    back = build_config("small", ["dispatch.mode_budget={}", "dispatch.mode_stall_weight={}"])
    assert back.dispatch.budget_of("image") == 65536
    assert back.dispatch.stall_weight_of("image") == 1.0


def test_the_small_preset_gives_image_windows_their_own_room():
    # an image batch may fill its window to 2 x 65,536 tokens (its budget, 131,072); text and
    # audio windows keep the 1.5 x cap, so their effective batch is unchanged (GPU_NOTES P110)
    t = build_config("small").train
    assert window_rooms(t) == (98304, {"image": 131072})
    assert build_config("small").dispatch.budget_of("image") == window_rooms(t)[1]["image"]
    assert window_rooms(build_config("small", ["train.window_mode_max={}"]).train) == (98304, {})
