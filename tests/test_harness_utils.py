"""Files: atomic writes, CSV logs that never hold half or duplicated rows, dir decisions, RNG state."""
import random

import numpy as np
import pandas as pd
import pytest
import torch

import harness_utils as hu


def test_csv_log_append_truncate_and_pandas(tmp_path):
    log = hu.CsvLog(tmp_path / "epochs.csv", hu.EPOCH_COLUMNS)
    log.create()
    for epoch in range(3):
        log.append({c: epoch for c in hu.EPOCH_COLUMNS} | {"lr": 0.1 / (epoch + 1)})
    frame = pd.read_csv(log.path)
    assert list(frame.columns) == hu.EPOCH_COLUMNS and len(frame) == 3
    assert frame["lr"].tolist() == pytest.approx([0.1, 0.05, 0.033333], rel=1e-4)
    log.truncate(1)
    assert pd.read_csv(log.path)["epoch"].tolist() == [0]
    with pytest.raises(KeyError):
        log.append({"level": 0})


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    hu.atomic_write_bytes(tmp_path / "a.txt", b"one")
    hu.atomic_write_bytes(tmp_path / "a.txt", b"two")
    hu.atomic_torch_save({"x": torch.arange(3)}, tmp_path / "b.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.pt"]
    assert (tmp_path / "a.txt").read_bytes() == b"two"


def test_rng_state_roundtrip_through_weights_only_load(tmp_path):
    hu.seed_everything(3)
    state = hu.rng_state()
    hu.atomic_torch_save(state, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    hu.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def _config(tmp_path, **kw):
    c = {"experiment.base_dir": str(tmp_path), "experiment.name": "exp", "experiment.resume": True,
         "prune.rate": 0.2, "training.progress": True,
         "dataset.train_path": str(tmp_path / "train.beton"), "dataset.test_path": str(tmp_path / "test.beton")}
    c.update(kw)
    return c


def test_directory_decisions(tmp_path):
    c = _config(tmp_path)
    assert hu.decide_experiment_dir(c, restarted=False).action == "fresh"
    root = tmp_path / "exp"
    root.mkdir()
    hu.atomic_write_bytes(root / "config.yaml", hu.config_yaml(c))
    # Same config (resume and progress do not count) -> resume.
    decision = hu.decide_experiment_dir({**c, "training.progress": False}, restarted=False)
    assert (decision.action, decision.root) == ("resume", root)
    # Another config -> refused, naming the key.
    with pytest.raises(hu.UserError, match=r"prune.rate \(0.2 there, 0.5 now\)"):
        hu.decide_experiment_dir({**c, "prune.rate": 0.5}, restarted=False)
    # resume=false -> a new sibling directory, never the old one.
    decision = hu.decide_experiment_dir({**c, "experiment.resume": False}, restarted=False)
    assert (decision.action, decision.root.name) == ("fresh", "exp_1")
    # A finished checkpoint -> finished.
    hu.atomic_torch_save({"format": hu.CHECKPOINT_FORMAT, "finished": True}, root / "checkpoints" / "last.pt")
    assert hu.decide_experiment_dir(c, restarted=False).action == "finished"


def test_foreign_directory_is_refused(tmp_path):
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "notes.txt").write_text("mine")
    with pytest.raises(hu.UserError, match="not an experiment directory"):
        hu.decide_experiment_dir(_config(tmp_path), restarted=False)


def test_corrupt_checkpoint_is_refused(tmp_path):
    path = tmp_path / "last.pt"
    path.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(hu.UserError, match="cannot be read"):
        hu.load_checkpoint(path)
    hu.atomic_torch_save({"format": hu.CHECKPOINT_FORMAT, "config": {"prune.rate": 0.3}}, path)
    with pytest.raises(hu.UserError, match="another config"):
        hu.load_checkpoint(path, {"prune.rate": 0.2})


def test_build_optimizer_registry():
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert isinstance(hu.build_optimizer(params, name="adamw", lr=1e-3), torch.optim.AdamW)
    sgd = hu.build_optimizer(params, name="sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    assert sgd.param_groups[0]["nesterov"] and sgd.param_groups[0]["weight_decay"] == 1e-4
    with pytest.raises(ValueError, match="adam, adamw, sgd"):
        hu.build_optimizer(params, name="lion", lr=1)
