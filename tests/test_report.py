"""utils/report.py: groups of seeds, summary numbers, report files, incomplete runs, bad input.

The experiment directories here are written in the harness's on-disk format (config.yaml as
the harness writes it, epochs.csv / levels.csv / layers.csv with the contract's columns);
the numbers are drawn at random so that the expected means and deviations are computed,
not copied."""
from __future__ import annotations

import csv
import random
import statistics
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.helpers import ROOT, digits_config
from utils import report

EPOCHS = 2
LAYERS = [("fc1", 300 * 64), ("fc2", 100 * 300), ("fc3", 10 * 100)]


def write_csv(path: Path, rows, columns):
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def make_experiment(base: Path, name: str, *, seed=0, levels_done=3, levels=3, epochs_in_progress=0, rng=None,
                    **overrides) -> Path:
    rng = rng or random.Random(f"{name}/{seed}")
    tree = digits_config(Path("data"), base, name=name, **{"prune.levels": levels, "experiment.seed": seed,
                                                           "training.epochs": EPOCHS, **overrides})
    root = base / name
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(yaml.safe_dump(tree, sort_keys=True))
    level_rows, epoch_rows, layer_rows = [], [], []
    for level in range(levels_done + (1 if epochs_in_progress else 0)):
        density = 0.8 ** level
        finished = level < levels_done
        for epoch in range(EPOCHS if finished else epochs_in_progress):
            epoch_rows.append({"level": level, "epoch": epoch, "lr": 0.05, "train_loss": rng.uniform(0.05, 1),
                               "train_acc": rng.uniform(80, 100), "test_loss": rng.uniform(0.05, 1),
                               "test_acc": rng.uniform(80, 100), "epoch_time_s": 1.0, "images_per_s": 1000.0})
        if not finished:
            continue
        final = epoch_rows[-1]["test_acc"]
        best = max(r["test_acc"] for r in epoch_rows if r["level"] == level)
        level_rows.append({"level": level, "target_density": density, "density": density, "final_test_acc": final,
                           "best_test_acc": best, "train_time_s": 2.0})
        for layer, numel in LAYERS:
            alive = round(numel * density * rng.uniform(0.8, 1.0)) if level else numel
            layer_rows.append({"level": level, "layer": layer, "numel": numel, "alive": alive,
                               "density": alive / numel})
    write_csv(root / "epochs.csv", epoch_rows, report.EPOCH_COLUMNS + ["epoch_time_s", "images_per_s"])
    write_csv(root / "levels.csv", level_rows, report.LEVEL_COLUMNS)
    write_csv(root / "layers.csv", layer_rows, report.LAYER_COLUMNS)
    return root


@pytest.fixture
def sweep(tmp_path):
    """2 training types x 3 seeds, the way utils.sweep lays them out, plus a logs/ folder."""
    base = tmp_path / "runs" / "sw"
    dirs = {}
    for kind in ("imp", "lrr"):
        for seed in (0, 1, 2):
            dirs[(kind, seed)] = make_experiment(base, f"training_type-{kind}_seed-{seed}", seed=seed,
                                                 **{"prune.training_type": kind})
    (base / "logs").mkdir()
    return base, dirs


def test_groups_are_seeds_of_one_config_with_mean_and_std(sweep):
    base, dirs = sweep
    experiments = [report.load_experiment(d) for d in report.expand_dirs([base])]
    assert len(experiments) == 6  # logs/ is not an experiment
    groups = report.make_groups(experiments)
    assert [sorted(e.seed for e in g.members) for g in groups] == [[0, 1, 2], [0, 1, 2]]
    assert report.differing_keys(groups) == ["prune.training_type"]
    assert {g.label for g in groups} == {"training_type=imp", "training_type=lrr"}
    for group in groups:
        kind = group.config["prune.training_type"]
        summary = report.summarize(group)
        assert list(summary["level"]) == [0, 1, 2]
        for level in range(3):
            finals = [pd.read_csv(dirs[(kind, s)] / "levels.csv").final_test_acc[level] for s in (0, 1, 2)]
            bests = [pd.read_csv(dirs[(kind, s)] / "levels.csv").best_test_acc[level] for s in (0, 1, 2)]
            row = summary.iloc[level]
            assert row.final_test_acc_mean == pytest.approx(statistics.mean(finals))
            assert row.final_test_acc_std == pytest.approx(statistics.stdev(finals))
            assert row.best_test_acc_mean == pytest.approx(statistics.mean(bests))
            assert row.best_test_acc_std == pytest.approx(statistics.stdev(bests))
            assert row.n_seeds == 3 and row.density == pytest.approx(0.8 ** level)


def test_report_files(sweep, tmp_path):
    base, dirs = sweep
    out = tmp_path / "out"
    assert report.main([str(base), "--out-dir", str(out)]) == 0
    summary = pd.read_csv(out / "summary.csv")
    assert len(summary) == 2 * 3  # one row per group and level
    assert {"group", "label", "prune.training_type", "level", "density", "final_test_acc_mean",
            "final_test_acc_std", "best_test_acc_mean", "best_test_acc_std", "n_seeds"} <= set(summary.columns)
    imp = summary[summary["prune.training_type"] == "imp"].set_index("level")
    finals = [pd.read_csv(dirs[("imp", s)] / "levels.csv").final_test_acc[2] for s in (0, 1, 2)]
    assert imp.loc[2, "final_test_acc_mean"] == pytest.approx(statistics.mean(finals))
    text = (out / "report.md").read_text()
    assert "`prune.training_type`" in text and "All 6 runs are complete" in text
    assert f"{statistics.mean(finals):.2f} ± {statistics.stdev(finals):.2f}" in text
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["accuracy_vs_density.png", "curves_g1.png", "curves_g2.png", "layers_g1.png", "layers_g2.png"]
    for name in pngs:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({name})" in text
    assert not list(out.glob("*.tmp*"))


def test_runs_in_progress_are_read_up_to_their_last_finished_level(tmp_path):
    base = tmp_path / "runs"
    done = make_experiment(base, "done", seed=0, levels=3, levels_done=3)
    running = make_experiment(base, "running", seed=1, levels=3, levels_done=1, epochs_in_progress=1)
    experiment = report.load_experiment(running)
    assert not experiment.complete and len(experiment.levels) == 1
    assert set(experiment.epochs["level"]) == {0}  # the level being trained is left out
    assert experiment.status() == "incomplete: 1 of 3 levels finished, level 1 at epoch 1 of 2"
    out = tmp_path / "out"
    written = report.write_report([done, running], out)
    assert [e.path.name for e in written["incomplete"]] == ["running"]
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary["n_seeds"]) == [2, 1, 1]
    assert "1 of 2 runs are incomplete" in (out / "report.md").read_text()
    # a run that has not finished any level yet still counts as an (incomplete) member
    make_experiment(base, "just_started", seed=2, levels=3, levels_done=0, epochs_in_progress=1)
    written = report.write_report([base], tmp_path / "out2")
    assert len(written["groups"]) == 1 and len(written["incomplete"]) == 2


def test_controls_group_across_seeds_by_the_group_of_their_masks(tmp_path):
    base = tmp_path / "runs"
    sources = [make_experiment(base, f"imp_seed{s}", seed=s) for s in (0, 1)]
    controls = [make_experiment(base, f"shuffle_seed{s}", seed=s, **{"prune.masks_from": str(sources[s]),
                                                                        "prune.control": "shuffle"})
                for s in (0, 1)]
    experiments = [report.load_experiment(d) for d in [*sources, *controls]]
    groups = report.make_groups(experiments)
    assert len(groups) == 2
    assert groups[1].is_control and len(groups[1].members) == 2
    assert groups[1].label.startswith("control shuffle of g1")
    text_table = report.summary_table(groups)
    assert set(text_table.loc[text_table.group == "g2", "prune.masks_from"]) == {"masks of g1"}


def test_a_directory_that_is_not_an_experiment_is_refused_in_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    for bad in (tmp_path / "empty", tmp_path / "missing", tmp_path / "notes.txt"):
        result = subprocess.run([sys.executable, "-m", "utils.report", str(bad), "--out-dir", str(tmp_path / "o")],
                                cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and str(bad) in result.stderr
        assert not (tmp_path / "o").exists()


def test_nothing_finished_is_refused(tmp_path):
    root = make_experiment(tmp_path / "runs", "fresh", levels_done=0)
    with pytest.raises(report.ReportError, match="no finished level"):
        report.write_report([root], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_one_plot_cli_still_works(sweep, tmp_path, capsys):
    base, dirs = sweep
    out = tmp_path / "plot.png"
    assert report.main([str(dirs[("imp", 0)]), str(dirs[("lrr", 0)]), "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert printed.count("== ") == 2 and "plot written to" in printed
