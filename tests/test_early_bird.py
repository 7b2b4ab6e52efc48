"""Early-Bird (utils/lottery/early_bird.py): the stopping rule on constructed mask sequences, and the
callback's CSV, level end and exact resume."""
from __future__ import annotations

import copy

import pytest
import torch

from utils.core.callbacks import LevelInfo
from utils.lottery.early_bird import EarlyBird, early_bird_stop, mask_distance
from utils.models.mask_layers import prepare_model
from utils.models.registry import get_model
from utils.pruning import channel_graph, channel_select

UNITS = 100


def flipped(count: int) -> torch.Tensor:
    """A 100-unit mask differing from all-True in its first ``count`` units: the distance
    between flipped(a) and flipped(b) is |a - b| / 100."""
    mask = torch.ones(UNITS, dtype=torch.bool)
    mask[:count] = False
    return mask


def test_mask_distance_is_the_fraction_of_differing_units():
    assert mask_distance(flipped(30), flipped(12)) == pytest.approx(0.18)
    assert mask_distance(flipped(5), flipped(5)) == 0.0


def test_stops_at_the_first_mask_whose_window_distance_is_below_the_threshold():
    flips = [50, 40, 30, 25, 22, 21, 21, 21]
    stop, distances = early_bird_stop([flipped(f) for f in flips], threshold=0.1, window=3)
    # i=2: max(|30-50|, |30-40|) = 0.20; i=3: max(15, 5) = 0.15; i=4: max(8, 3) = 0.08 < 0.1
    assert distances[:2] == [None, None]
    assert distances[2:5] == pytest.approx([0.20, 0.15, 0.08])
    assert stop == 4


def test_one_close_neighbour_is_not_enough_the_whole_window_must_be_close():
    # the last two masks agree, but the one before them is far: no stop until it leaves the window
    flips = [0, 60, 60, 61, 61]
    stop, distances = early_bird_stop([flipped(f) for f in flips], threshold=0.1, window=3)
    assert distances[2] == pytest.approx(0.60) and distances[3] == pytest.approx(0.01)
    assert stop == 3


def test_a_distance_equal_to_the_threshold_does_not_stop_and_a_drifting_sequence_never_stops():
    stop, _ = early_bird_stop([flipped(f) for f in (0, 10, 20, 30)], threshold=0.1, window=2)
    assert stop is None
    stop, _ = early_bird_stop([flipped(f) for f in (0, 10, 20, 29)], threshold=0.1, window=2)
    assert stop == 3


# ------------------------------------------------------------------------------ callback
FLIPS = [60, 45, 30, 20, 14, 10, 8, 7, 7, 7]


class Drawer:
    """draw_mask stand-in: the mask of the epoch the model says it is at."""

    def __init__(self):
        self.epoch = 0

    def __call__(self, model):
        return flipped(FLIPS[self.epoch])


def run_level0(callback: EarlyBird, drawer: Drawer, root, epochs, start=0):
    """The harness's level-0 epoch loop as far as the callback sees it; -> epoch it ended at."""
    info = LevelInfo(level=0, density=1.0, model=torch.nn.Linear(1, 1), root=root)
    for epoch in range(start, epochs):
        drawer.epoch = epoch
        info.epoch, info.end_level = epoch, False
        callback.on_epoch_logged(info)
        if info.end_level:
            return epoch
    return None


def csv_rows(root):
    lines = (root / "early_bird.csv").read_text().splitlines()
    assert lines[0] == "epoch,distance"
    return [line.split(",") for line in lines[1:]]


def expected_stop():
    stop, _ = early_bird_stop([flipped(f) for f in FLIPS], threshold=0.1, window=5)
    return stop


def test_callback_ends_level_0_where_the_pure_rule_stops_and_writes_every_epoch(tmp_path):
    callback = EarlyBird(Drawer(), threshold=0.1, window=5)
    callback.on_run_start(LevelInfo(level=0, density=1.0, model=None, root=tmp_path))
    stopped = run_level0(callback, callback.draw_mask, tmp_path, len(FLIPS))
    # window distances from epoch 4: 0.46, 0.35, 0.22, 0.13, then epoch 8: max(|7-14|, ...) = 0.07
    assert stopped == expected_stop() == 8
    rows = csv_rows(tmp_path)
    assert [int(r[0]) for r in rows] == list(range(stopped + 1))
    assert all(r[1] == "" for r in rows[:4]) and float(rows[stopped][1]) < 0.1 <= float(rows[stopped - 1][1])
    # level 1: the callback stays quiet
    info = LevelInfo(level=1, density=0.5, model=None, root=tmp_path, epoch=0)
    callback.on_epoch_logged(info)
    assert not info.end_level and len(csv_rows(tmp_path)) == stopped + 1


def test_resume_from_a_checkpoint_continues_exactly_and_drops_rows_written_after_it(tmp_path):
    reference_dir, resumed_dir = tmp_path / "a", tmp_path / "b"
    reference_dir.mkdir(), resumed_dir.mkdir()
    reference = EarlyBird(Drawer())
    reference.on_run_start(LevelInfo(level=0, density=1.0, model=None, root=reference_dir))
    stop_reference = run_level0(reference, reference.draw_mask, reference_dir, len(FLIPS))

    first = EarlyBird(Drawer())
    first.on_run_start(LevelInfo(level=0, density=1.0, model=None, root=resumed_dir))
    run_level0(first, first.draw_mask, resumed_dir, 3)          # epochs 0-2, checkpoint after epoch 2
    saved = copy.deepcopy(first.state_dict())
    run_level0(first, first.draw_mask, resumed_dir, 4, start=3)  # epoch 3's row written, then killed
    assert len(csv_rows(resumed_dir)) == 4

    second = EarlyBird(Drawer())
    second.load_state_dict(saved)
    second.on_run_start(LevelInfo(level=0, density=1.0, model=None, root=resumed_dir))
    assert len(csv_rows(resumed_dir)) == 3
    stop_resumed = run_level0(second, second.draw_mask, resumed_dir, len(FLIPS), start=3)
    assert stop_resumed == stop_reference
    assert csv_rows(resumed_dir) == csv_rows(reference_dir)


def test_min_epochs_delays_the_stop(tmp_path):
    callback = EarlyBird(Drawer(), min_epochs=10)
    assert run_level0(callback, callback.draw_mask, tmp_path, len(FLIPS)) == 9


def test_channel_masks_of_a_model_feed_the_callback(tmp_path):
    """End to end on a real model: the mask drawn twice from unchanged weights is the same
    (distance 0), so the rule stops as soon as the window is full."""
    model = prepare_model(get_model("resnet20", num_classes=10))
    structure = channel_graph.build_channel_structure(model, (3, 32, 32))

    def draw(m):
        keep = channel_select.select_channels(m, structure, density=0.5, criterion="bn_gamma", allocation="global")
        return channel_select.keep_vector(keep, structure)

    vector = draw(model)
    assert vector.dtype == torch.bool and vector.numel() == structure.total_units
    assert int(vector.sum()) == round(0.5 * structure.total_units)
    callback = EarlyBird(draw, window=3)
    info = LevelInfo(level=0, density=1.0, model=model, root=tmp_path)
    callback.on_run_start(info)
    ended = []
    for epoch in range(4):
        info.epoch, info.end_level = epoch, False
        callback.on_epoch_logged(info)
        ended.append(info.end_level)
    assert ended == [False, False, True, False]  # stopped once; quiet afterwards
