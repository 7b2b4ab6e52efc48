"""utils/report/cli.py: groups of seeds, summary numbers, report files, incomplete runs, bad input.

The experiment directories here are written in the harness's on-disk format (config.yaml as
the harness writes it, epochs.csv / levels.csv / layers.csv with the contract's columns);
the numbers are drawn at random so that the expected means and deviations are computed,
not copied."""
from __future__ import annotations

import csv
import math
import os
import random
import statistics
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.helpers import ROOT, digits_config
from utils.report import cli as report_cli
from utils.report import experiments as report_experiments
from utils.report import figures as report_figures
from utils.report import tables as report_tables

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
    write_csv(root / "epochs.csv", epoch_rows, report_experiments.EPOCH_COLUMNS + ["epoch_time_s", "images_per_s"])
    write_csv(root / "levels.csv", level_rows, report_experiments.LEVEL_COLUMNS)
    write_csv(root / "layers.csv", layer_rows, report_experiments.LAYER_COLUMNS)
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
    experiments = [report_experiments.load_experiment(d) for d in report_experiments.expand_dirs([base])]
    assert len(experiments) == 6  # logs/ is not an experiment
    groups = report_experiments.make_groups(experiments)
    assert [sorted(e.seed for e in g.members) for g in groups] == [[0, 1, 2], [0, 1, 2]]
    assert report_experiments.differing_keys(groups) == ["prune.training_type"]
    assert {g.label for g in groups} == {"magnitude/global/imp", "magnitude/global/lrr"}
    for group in groups:
        kind = group.config["prune.training_type"]
        summary = report_tables.summarize(group)
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
    assert report_cli.main([str(base), "--out-dir", str(out)]) == 0
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
    assert pngs == ["accuracy_vs_cost.png", "accuracy_vs_density.png", "curves_g1.png", "curves_g2.png", "layers_g1.png", "layers_g2.png"]
    for name in pngs:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({name})" in text
    assert not list(out.glob("*.tmp*"))


def test_runs_in_progress_are_read_up_to_their_last_finished_level(tmp_path):
    base = tmp_path / "runs"
    done = make_experiment(base, "done", seed=0, levels=3, levels_done=3)
    running = make_experiment(base, "running", seed=1, levels=3, levels_done=1, epochs_in_progress=1)
    experiment = report_experiments.load_experiment(running)
    assert not experiment.complete and len(experiment.levels) == 1
    assert set(experiment.epochs["level"]) == {0}  # the level being trained is left out
    assert experiment.status() == "incomplete: 1 of 3 levels finished, level 1 at epoch 1 of 2"
    out = tmp_path / "out"
    written = report_cli.write_report([done, running], out)
    assert [e.path.name for e in written["incomplete"]] == ["running"]
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary["n_seeds"]) == [2, 1, 1]
    assert "1 of 2 runs are incomplete" in (out / "report.md").read_text()
    # a run that has not finished any level yet still counts as an (incomplete) member
    make_experiment(base, "just_started", seed=2, levels=3, levels_done=0, epochs_in_progress=1)
    written = report_cli.write_report([base], tmp_path / "out2")
    assert len(written["groups"]) == 1 and len(written["incomplete"]) == 2


def test_controls_group_across_seeds_by_the_group_of_their_masks(tmp_path):
    base = tmp_path / "runs"
    sources = [make_experiment(base, f"imp_seed{s}", seed=s) for s in (0, 1)]
    controls = [make_experiment(base, f"shuffle_seed{s}", seed=s, **{"prune.masks_from": str(sources[s]),
                                                                        "prune.control": "shuffle"})
                for s in (0, 1)]
    experiments = [report_experiments.load_experiment(d) for d in [*sources, *controls]]
    groups = report_experiments.make_groups(experiments)
    assert len(groups) == 2
    assert groups[1].is_control and len(groups[1].members) == 2
    assert groups[1].label.startswith("control shuffle of g1")
    text_table = report_tables.summary_table(groups)
    assert set(text_table.loc[text_table.group == "g2", "prune.masks_from"]) == {"masks of g1"}


def test_a_control_whose_source_is_a_copy_left_out_still_names_the_sources_group(tmp_path):
    """A control of the sweep's seed-0 when a newer run of seed 0 is counted instead: its masks
    still come from group g1 (found among g1's copies), not from a run the report does not name."""
    base = tmp_path / "runs"
    swept = make_experiment(base, "seed-0", seed=0)
    rerun = make_experiment(base, "rerun", seed=0)
    set_written_at(swept, 1_700_000_000)
    set_written_at(rerun, 1_700_000_100)
    control = make_experiment(base, "seed-0_reinit", seed=1000, **{"prune.masks_from": str(swept),
                                                                   "prune.control": "reinit"})
    written = report_cli.write_report([swept, rerun, control], tmp_path / "out")
    source, controls = written["groups"]
    assert [e.path.name for e in source.dropped] == ["seed-0"]
    assert controls.label == "control reinit of g1"
    assert set(report_tables.summary_table(written["groups"]).loc[lambda t: t.group == "g2", "prune.masks_from"]) == {"masks of g1"}


@pytest.mark.parametrize("structure, words, common", [
    ({"prune.structure": "channel"}, "channel magnitude/global/imp", "`prune.structure=channel`"),
    ({"prune.structure": "nm", "prune.nm": "2:4"}, "2:4 magnitude/global/imp", "`prune.nm=2:4`"),
    ({"prune.structure": "unstructured"}, "lenet_300_100 magnitude/global/imp", "`prune.structure=unstructured`")])
def test_a_groups_label_and_the_common_settings_name_the_pruning_structure(tmp_path, structure, words, common):
    """A channel or N:M study must not read as unstructured pruning: its structure is in the label."""
    base = tmp_path / "runs"
    roots = [make_experiment(base, f"seed{s}", seed=s, **structure) for s in (0, 1)]
    written = report_cli.write_report(roots, tmp_path / "out")
    (group,) = written["groups"]
    assert group.label.endswith(words)
    assert common in (tmp_path / "out" / "report.md").read_text()


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
    with pytest.raises(report_experiments.ReportError, match="no finished level"):
        report_cli.write_report([root], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_one_plot_cli_still_works(sweep, tmp_path, capsys):
    base, dirs = sweep
    out = tmp_path / "plot.png"
    assert report_cli.main([str(dirs[("imp", 0)]), str(dirs[("lrr", 0)]), "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert printed.count("== ") == 2 and "plot written to" in printed


# ------------------------------------------------------------- numbers that cannot mislead
def write_checkpoints(root: Path, *, world_size=1, cuda=False, batchnorm=False):
    """checkpoints/init.pt and last.pt with what the report reads of them, in the harness's format:
    the initial state dict (BatchNorm layers carry running_mean), the launch's world_size, and a
    CUDA RNG state only when CUDA was in use."""
    import torch
    (root / "checkpoints").mkdir(exist_ok=True)
    model = {"fc1.weight": torch.zeros(3, 3), "fc1.mask": torch.ones(3, 3, dtype=torch.bool)}
    if batchnorm:
        model.update({"bn1.weight": torch.ones(3), "bn1.running_mean": torch.zeros(3),
                      "bn1.running_var": torch.ones(3), "bn1.num_batches_tracked": torch.tensor(0)})
    torch.save({"format": 1, "model": model}, root / "checkpoints" / "init.pt")
    rng = {"torch": torch.get_rng_state(), **({"cuda": [torch.get_rng_state()]} if cuda else {})}
    torch.save({"format": 1, "model": model, "world_size": world_size, "rng": rng, "finished": True},
               root / "checkpoints" / "last.pt")


def set_written_at(root: Path, seconds: float):
    for name in ("epochs.csv", "levels.csv"):
        os.utime(root / name, (seconds, seconds))


def test_copies_of_one_seed_count_once_keeping_the_newest_complete_run(tmp_path):
    """The issue's case: four runs of seed 0 (by hand, with 2 processes, an interrupted one,
    the sweep's) and one of seed 1 -- 2 seeds, not 5; seed 0's number is the newest complete run's."""
    base = tmp_path / "runs"
    by_hand = make_experiment(base, "by_hand", seed=0)
    two_procs = make_experiment(base, "two_procs", seed=0)        # LeNet (no BatchNorm): the same model
    write_checkpoints(two_procs, world_size=2)
    interrupted = make_experiment(base, "interrupted", seed=0, levels_done=1, epochs_in_progress=1)
    sweeps = make_experiment(base / "sweep", "seed-0", seed=0)
    seed1 = make_experiment(base, "seed1", seed=1)
    for age, root in enumerate([by_hand, sweeps, two_procs, interrupted]):  # interrupted is the newest of all
        set_written_at(root, 1_700_000_000 + 100 * age)
    set_written_at(seed1, 1_700_000_000)
    out = tmp_path / "out"
    written = report_cli.write_report([base, base / "sweep"], out)
    (group,) = written["groups"]
    assert sorted(e.path.name for e in group.members) == ["seed1", "two_procs"]
    assert sorted(e.path.name for e in written["dropped"]) == ["by_hand", "interrupted", "seed-0"]
    assert all(e.duplicate_of.path == two_procs for e in written["dropped"])
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary["n_seeds"]) == [2, 2, 2]
    for level in range(3):
        finals = [pd.read_csv(root / "levels.csv").final_test_acc[level] for root in (two_procs, seed1)]
        assert summary.final_test_acc_mean[level] == pytest.approx(statistics.mean(finals))
        assert summary.final_test_acc_std[level] == pytest.approx(statistics.stdev(finals))
    text = (out / "report.md").read_text()
    assert "**3 of 5 runs are copies of a seed already counted**" in text
    for name in ("by_hand", "interrupted", "seed-0"):
        assert f"kept `{two_procs}` (complete (3 levels)), dropped `{base / name if name != 'seed-0' else sweeps}`" in text
    assert f"| `{interrupted}` | g1 | 0 | no: copy of `two_procs` |" in text
    assert "| g1 | " in text and "0, 1 (3 copies left out)" in text


def test_with_only_incomplete_copies_the_one_with_most_levels_is_kept(tmp_path):
    base = tmp_path / "runs"
    short = make_experiment(base, "short", seed=0, levels_done=1)
    longer = make_experiment(base, "longer", seed=0, levels_done=2)
    set_written_at(short, 1_700_000_100)
    set_written_at(longer, 1_700_000_000)
    (group,) = report_experiments.make_groups([report_experiments.load_experiment(d) for d in (short, longer)])
    assert [e.path for e in group.members] == [longer] and [e.path for e in group.dropped] == [short]


def test_runs_that_train_different_models_are_not_pooled(tmp_path):
    """BatchNorm with per-rank statistics (CPU): 1 and 2 processes are different models -> two
    groups.  On CUDA with SyncBatchNorm (sync_bn auto) they are the same model -> one group, and
    the second run of a seed is a copy.  sync_bn=false on CUDA: per-rank again.  Another loader:
    another group (the config says so)."""
    base = tmp_path / "runs"
    roots = {}
    for procs in (1, 2):
        for seed in (0, 1):
            roots[("cpu", procs, seed)] = root = make_experiment(base / "cpu", f"p{procs}_s{seed}", seed=seed)
            write_checkpoints(root, world_size=procs, batchnorm=True)
            roots[("cuda", procs, seed)] = root = make_experiment(base / "cuda", f"p{procs}_s{seed}", seed=seed,
                                                                  **{"training.device": "auto"})
            write_checkpoints(root, world_size=procs, cuda=True, batchnorm=True)
    cpu = report_experiments.make_groups([report_experiments.load_experiment(d) for d in report_experiments.expand_dirs([base / "cpu"])])
    assert len(cpu) == 2 and [len(g.members) for g in cpu] == [2, 2] and not any(g.dropped for g in cpu)
    assert report_experiments.differing_keys(cpu) == ["bn_processes"]
    assert sorted(g.label for g in cpu) == ["bn_processes=1", "bn_processes=2"]
    two = next(g for g in cpu if g.label == "bn_processes=2")
    assert sorted(e.path.name for e in two.members) == ["p2_s0", "p2_s1"]
    cuda = report_experiments.make_groups([report_experiments.load_experiment(d) for d in report_experiments.expand_dirs([base / "cuda"])])
    assert len(cuda) == 1 and len(cuda[0].members) == 2 and len(cuda[0].dropped) == 2
    # sync_bn=false: each rank normalises over its own share, on CUDA too
    unsynced = [make_experiment(base / "nosync", f"p{p}", seed=0, **{"distributed.sync_bn": False,
                                                                    "training.device": "cuda"}) for p in (1, 2)]
    for procs, root in zip((1, 2), unsynced):
        write_checkpoints(root, world_size=procs, cuda=True, batchnorm=True)
    assert len(report_experiments.make_groups([report_experiments.load_experiment(d) for d in unsynced])) == 2
    # another loader: another group, not a copy
    loaders = [make_experiment(base / "loaders", name, seed=0, **{"dataset.loader": name}) for name in ("torch", "ffcv")]
    groups = report_experiments.make_groups([report_experiments.load_experiment(d) for d in loaders])
    assert len(groups) == 2 and report_experiments.differing_keys(groups) == ["dataset.loader"]
    out = tmp_path / "out"
    report_cli.write_report([base / "cpu"], out)
    text = (out / "report.md").read_text()
    assert "`bn_processes` is not a config key" in text
    assert set(pd.read_csv(out / "summary.csv")["bn_processes"]) == {1, 2}


def test_controls_of_different_sources_are_different_samples(tmp_path):
    """Two shuffle controls with the same seed but sources of different seeds are two samples;
    two controls of the same source seed with the same seed are copies."""
    base = tmp_path / "runs"
    sources = [make_experiment(base, f"imp{s}", seed=s) for s in (0, 1)]
    controls = [make_experiment(base, f"shuffle_of_{s}", seed=7, **{"prune.masks_from": str(sources[s]),
                                                                     "prune.control": "shuffle"}) for s in (0, 1)]
    again = make_experiment(base, "shuffle_of_0_again", seed=7, **{"prune.masks_from": str(sources[0]),
                                                                    "prune.control": "shuffle"})
    groups = report_experiments.make_groups([report_experiments.load_experiment(d) for d in [*sources, *controls, again]])
    assert [len(g.members) for g in groups] == [2, 2]
    assert [e.path.name for e in groups[1].dropped] in (["shuffle_of_0"], ["shuffle_of_0_again"])


def test_a_run_at_chance_level_is_flagged(tmp_path):
    """digits has 10 classes: chance is 10%; a level whose every epoch stays at or below 12% is
    flagged (the stuck control of the issue: 8.4% every epoch); 20% is not chance."""
    base = tmp_path / "runs"
    fine = make_experiment(base, "fine", seed=0)
    stuck = make_experiment(base, "stuck", seed=1)
    frame = pd.read_csv(stuck / "epochs.csv")
    frame.loc[frame.level >= 1, "test_acc"] = 8.4
    frame.to_csv(stuck / "epochs.csv", index=False)
    low = make_experiment(base, "low", seed=2)
    frame = pd.read_csv(low / "epochs.csv")
    frame.loc[frame.level == 2, "test_acc"] = [20.0, 11.0]
    frame.to_csv(low / "epochs.csv", index=False)
    experiments = {d.name: report_experiments.load_experiment(d) for d in (fine, stuck, low)}
    assert experiments["stuck"].num_classes == 10
    assert experiments["stuck"].chance_levels() == [1, 2]
    assert experiments["fine"].chance_levels() == [] and experiments["low"].chance_levels() == []
    out = tmp_path / "out"
    written = report_cli.write_report([base], out)
    assert [e.path.name for e in written["at_chance"]] == ["stuck"]
    text = (out / "report.md").read_text()
    assert f"**`{stuck}` is at chance level** in levels 1-2" in text and "exceeds 12%" in text
    assert "complete (3 levels); **AT CHANCE** in levels 1-2" in text
    assert "`fine` is at chance" not in text and f"`{low}` is at chance" not in text


def test_bands_stay_between_0_and_100(tmp_path, monkeypatch):
    """Two seeds far apart near 0% and near 100%: mean ± std passes both ends; the drawn band does not."""
    base = tmp_path / "runs"
    roots = [make_experiment(base, f"s{s}", seed=s) for s in (0, 1)]
    for root, value in zip(roots, (1.0, 99.5)):
        frame = pd.read_csv(root / "levels.csv")
        frame["final_test_acc"] = [value, 100 - value, value]
        frame.to_csv(root / "levels.csv", index=False)
    groups = report_experiments.make_groups([report_experiments.load_experiment(d) for d in roots])
    summaries = {g.gid: report_tables.summarize(g) for g in groups}
    assert (summaries["g1"].final_test_acc_mean - summaries["g1"].final_test_acc_std).min() < 0
    figures = []
    monkeypatch.setattr(report_figures, "_save", lambda fig, out: figures.append(fig))
    report_figures.plot_accuracy_vs_density(groups, summaries, tmp_path / "a.png")
    (fig,) = figures
    bands = [c for c in fig.axes[0].collections if c.get_paths() and len(c.get_paths()[0].vertices) > 3]
    assert bands
    for band in bands:
        y = band.get_paths()[0].vertices[:, 1]
        assert y.min() >= 0.0 and y.max() <= 100.0
        assert y.min() == 0.0  # the clipped side reaches the limit, it is not dropped


def test_a_level_taken_from_the_source_is_named_in_the_status(tmp_path):
    base = tmp_path / "runs"
    source = make_experiment(base, "imp", seed=0)
    control = make_experiment(base, "shuffle", seed=0, **{"prune.masks_from": str(source), "prune.control": "shuffle"})
    (control / "reused.csv").write_text(f"level,source,reason\n0,{source},identical\n")
    out = tmp_path / "out"
    report_cli.write_report([source, control], out)
    assert f"complete (3 levels); level 0 taken from `{source}` (identical: not retrained)" in (out / "report.md").read_text()


# ------------------------------------------------- one table of every group; dense points; densities named
def markdown_table(text: str, heading: str):
    """The first table after ``heading`` in report.md: (header cells, rows of cells)."""
    lines = text.split(heading, 1)[1].splitlines()
    table = [line for line in lines[lines.index(next(l for l in lines if l.startswith("|"))):]]
    table = table[:next((i for i, line in enumerate(table) if not line.startswith("|")), len(table))]
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in table]
    return cells[0], cells[2:]


def final_accuracies(roots, level):
    return [float(pd.read_csv(root / "levels.csv").set_index("level").final_test_acc[level]) for root in roots
            if level in set(pd.read_csv(root / "levels.csv").level)]


def expected_cell(values, members):
    text = f"{statistics.mean(values):.2f}" + (f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else "")
    return text + (f" (n={len(values)})" if len(values) != members else "")


@pytest.fixture
def study(tmp_path):
    """A ticket (imp) of seeds 0-2 with its reinit and shuffle controls (the shuffle control took
    its source's level 0, as the harness does), and lrr runs whose level 1 is at another density."""
    base = tmp_path / "runs"
    tickets = [make_experiment(base, f"imp_seed{s}", seed=s) for s in (0, 1, 2)]
    reinit = [make_experiment(base, f"reinit_seed{s}", seed=1000 + s, **{"prune.masks_from": str(tickets[s]),
                                                                         "prune.control": "reinit"})
              for s in (0, 1, 2)]
    shuffle = [make_experiment(base, f"shuffle_seed{s}", seed=s, levels_done=3 if s else 2,
                               **{"prune.masks_from": str(tickets[s]), "prune.control": "shuffle"}) for s in (0, 1, 2)]
    for ticket, control in zip(tickets, shuffle):
        levels = pd.read_csv(control / "levels.csv")
        levels.loc[0] = pd.read_csv(ticket / "levels.csv").loc[0]   # level 0 taken: the source's row
        levels.to_csv(control / "levels.csv", index=False)
        (control / "reused.csv").write_text(f"level,source,reason\n0,{ticket},identical\n")
    lrr = [make_experiment(base, f"lrr_seed{s}", seed=s, **{"prune.training_type": "lrr"}) for s in (0, 1)]
    for root in lrr:
        levels = pd.read_csv(root / "levels.csv")
        levels.loc[1, ["target_density", "density"]] = [0.5, 0.5]
        levels.to_csv(root / "levels.csv", index=False)
    return {"ticket": tickets, "reinit": reinit, "shuffle": shuffle, "lrr": lrr}


def test_the_report_opens_with_ticket_controls_and_methods_side_by_side(study, tmp_path):
    out = tmp_path / "out"
    written = report_cli.write_report([root for roots in study.values() for root in roots], out)
    text = (out / "report.md").read_text()
    heading = "## Final test accuracy by density"
    assert text.index(heading) < text.index("## Experiments")  # at the top
    header, rows = markdown_table(text, heading)
    labels = {g.gid: g.label for g in written["groups"]}
    assert header[:3] == ["target density", "weight density", "level"]
    columns = {name: next(i for i, cell in enumerate(header) if cell.startswith(f"{gid}: ")) for name, gid in
               (("ticket", "g1"), ("reinit", "g2"), ("shuffle", "g3"), ("lrr", "g4"))}
    assert labels["g2"].startswith("control reinit of g1") and labels["g3"].startswith("control shuffle of g1")
    assert header[columns["ticket"]] == f"g1: {labels['g1']} (n=3)" and header[columns["lrr"]].endswith("(n=2)")
    by_density = {row[0]: row for row in rows}
    assert list(by_density) == ["100% (dense)", "80% of weights", "64% of weights", "50% of weights"]
    for density, level in (("100% (dense)", 0), ("80% of weights", 1), ("64% of weights", 2)):
        row = by_density[density]
        assert row[2] == str(level)
        for name in ("ticket", "reinit", "shuffle"):
            expected = expected_cell(final_accuracies(study[name], level), 3)
            if name == "shuffle" and level == 0:
                expected += " †"  # taken from the ticket: the ticket's own numbers
                assert row[columns["shuffle"]].split(" †")[0] == row[columns["ticket"]]
            assert row[columns[name]] == expected, (density, name)
    assert "(n=2)" in by_density["64% of weights"][columns["shuffle"]]  # one shuffle seed stopped after level 1
    # lrr's level 1 is at 50%: its own row, empty elsewhere, and an empty lrr cell at 80%
    assert by_density["80% of weights"][columns["lrr"]] == ""
    assert by_density["50% of weights"][columns["lrr"]] == expected_cell(final_accuracies(study["lrr"], 1), 2)
    assert [by_density["50% of weights"][columns[n]] for n in ("ticket", "reinit", "shuffle")] == ["", "", ""]
    assert "† a level some seed of the control took from its source" in text


def test_every_groups_dense_point_is_visible(study, tmp_path, monkeypatch):
    """The shuffle control's dense point is its ticket's (taken): the same x and y.  Each group's
    dense marker keeps x = 100% in data, has its own shape, and no two cover each other on
    screen: the ticket's and the shuffle control's sit side by side, in legend order, inside the axes."""
    roots = [root for name in ("ticket", "reinit", "shuffle") for root in study[name]]
    groups = report_experiments.make_groups([report_experiments.load_experiment(d) for d in roots])
    summaries = {g.gid: report_tables.summarize(g) for g in groups}
    assert summaries["g1"].final_test_acc_mean[0] == summaries["g3"].final_test_acc_mean[0]  # would hide each other
    figures = []
    monkeypatch.setattr(report_figures, "_save", lambda fig, out: (fig.canvas.draw(), figures.append(fig)))
    report_figures.plot_accuracy_vs_density(groups, summaries, tmp_path / "a.png")
    (fig,) = figures
    size = report_figures.DENSE_MARKER_SIZE * fig.dpi / 72  # pixels
    for ax in fig.axes[:2]:
        dense = {line.get_gid(): line for line in ax.get_lines() if str(line.get_gid()).startswith("dense:")}
        assert sorted(dense) == ["dense:g1", "dense:g2", "dense:g3"]
        assert len({line.get_marker() for line in dense.values()}) == 3
        box = ax.get_window_extent()
        centres = {}
        for gid, line in dense.items():
            x, y = line.get_data()
            assert list(x) == [100.0]
            centres[gid] = line.get_transform().transform((x[0], y[0]))
            assert box.x0 + size / 2 <= centres[gid][0] <= box.x1 - size / 2, gid  # not clipped at the edge
        for a in dense:
            for b in dense:
                if a < b:
                    assert math.dist(centres[a], centres[b]) >= size, (a, b)  # none covers another
        assert centres["dense:g1"][0] + size <= centres["dense:g3"][0]  # the same point: side by side, legend order
    assert "side by side" in fig._suptitle.get_text()


def test_dense_markers_move_only_when_they_would_touch():
    assert report_figures.dense_rows([10.0, 30.0, 10.0, 50.0, 55.0], apart=12.0) == [[0, 2], [1], [3, 4]]
    assert report_figures.dense_offsets(1) == [0.0]
    assert report_figures.dense_offsets(3) == [-report_figures.DENSE_SPACING, 0.0, report_figures.DENSE_SPACING]


def test_channel_densities_are_named_apart_from_weight_densities(tmp_path):
    """A channel run's target_density counts channels, density weights: the report calls them
    target_channel_density, channel_density and weight_density (summary.csv keeps density)."""
    base = tmp_path / "runs"
    channel = [make_experiment(base, f"channel{s}", seed=s, **{"prune.structure": "channel"}) for s in (0, 1)]
    for seed, root in enumerate(channel):
        levels = pd.read_csv(root / "levels.csv")
        levels["channel_density"] = levels["target_density"] + 0.01 * seed * (levels["level"] > 0)
        levels["density"] = levels["target_density"] ** 2 * (1 - 0.02 * seed)   # weights fall faster
        levels.to_csv(root / "levels.csv", index=False)
    plain = [make_experiment(base, f"plain{s}", seed=s) for s in (0, 1)]
    out = tmp_path / "out"
    report_cli.write_report([*channel, *plain], out)
    summary = pd.read_csv(out / "summary.csv")
    assert "target_density" not in summary.columns
    position = list(summary.columns).index
    assert position("level") < position("target_channel_density") < position("target_weight_density") \
        < position("channel_density") < position("weight_density") < position("final_test_acc_mean")
    assert (summary["density"] == summary["weight_density"]).all()
    is_channel = summary["prune.structure"] == "channel"
    by_structure = {"channel": summary[is_channel].set_index("level"), "unstructured": summary[~is_channel].set_index("level")}
    for level in range(3):
        frames = [pd.read_csv(root / "levels.csv").set_index("level").loc[level] for root in channel]
        row = by_structure["channel"].loc[level]
        assert row.target_channel_density == pytest.approx(0.8 ** level)
        assert row.channel_density == pytest.approx(statistics.mean(f.channel_density for f in frames))
        assert row.weight_density == pytest.approx(statistics.mean(f.density for f in frames))
        assert math.isnan(row.target_weight_density)
        plain_row = by_structure["unstructured"].loc[level]
        assert plain_row.target_weight_density == pytest.approx(0.8 ** level)
        assert math.isnan(plain_row.target_channel_density) and math.isnan(plain_row.channel_density)
    text = (out / "report.md").read_text()
    channel_gid = summary.loc[summary["prune.structure"] == "channel", "group"].iloc[0]
    header, rows = markdown_table(text, f"## {channel_gid}: ")
    assert header[:4] == ["level", "target channel density", "channel density", "weight density"]
    assert rows[1][1:4] == [f"{0.8:.4f}", f"{by_structure['channel'].loc[1].channel_density:.4f}",
                            f"{by_structure['channel'].loc[1].weight_density:.4f}"]
    header, rows = markdown_table(text, "## Final test accuracy by density")
    firsts = [row[0] for row in rows]
    assert "80% of channels" in firsts and "80% of weights" in firsts  # never one row
    dense = next(row for row in rows if row[0] == "100% (dense)")  # the dense network is one whatever the unit
    assert all(dense[3:]) and firsts.count("100% (dense)") == 1
    weights = statistics.mean(pd.read_csv(root / "levels.csv").density[1] for root in channel)
    assert next(row for row in rows if row[0] == "80% of channels")[1] == f"{weights * 100:.3g}%"


def test_every_point_carries_its_training_cost_and_a_figure_plots_accuracy_against_it(tmp_path):
    """train_cost_epochs per group and level, from each training type's formula (written out here):
    IMP/LRR (L + 1) E, WR E + L (E - rewind epoch) (a rewind iteration as a fraction of an epoch, the
    steps per epoch read from the run's last checkpoint), fine-tuning E + L E, at_init E."""
    import math

    import torch
    base = tmp_path / "runs"
    epochs = 5
    runs = {
        "imp": {"prune.training_type": "imp"},
        "lrr": {"prune.training_type": "lrr"},
        "finetune": {"prune.training_type": "finetune"},
        "wr_epoch": {"prune.training_type": "wr", "prune.rewind_epoch": 2},
        "wr_iteration": {"prune.training_type": "wr", "prune.rewind_iteration": 12},
        "wr_unknown": {"prune.training_type": "wr", "prune.rewind_iteration": 3, "optimizer.lr": 0.02},
        "at_init": {"prune.training_type": "at_init", "prune.target_density": 0.3},
    }
    for name, overrides in runs.items():
        at_init = overrides["prune.training_type"] == "at_init"
        make_experiment(base, name, levels=1 if at_init else 4, levels_done=1 if at_init else 4,
                        **{"training.epochs": epochs, **overrides})
    (base / "wr_iteration" / "checkpoints").mkdir()
    torch.save({"format": 1, "world_size": 1, "iterations_per_epoch": 8, "finished": True},
               base / "wr_iteration" / "checkpoints" / "last.pt")
    expected = {
        "imp": [(level + 1) * epochs for level in range(4)],
        "lrr": [(level + 1) * epochs for level in range(4)],
        "finetune": [epochs + level * epochs for level in range(4)],
        "wr_epoch": [epochs + level * (epochs - 2) for level in range(4)],
        "wr_iteration": [epochs + level * (epochs - 12 / 8) for level in range(4)],
        "wr_unknown": [math.nan] * 4,   # steps per epoch not recorded: unknown, not guessed
        "at_init": [epochs],
    }
    out = tmp_path / "out"
    assert report_cli.main([str(base), "--out-dir", str(out)]) == 0
    summary = pd.read_csv(out / "summary.csv")
    assert "train_cost_epochs" in summary.columns
    groups = {e.path.name: g.gid for g in report_experiments.make_groups(
        [report_experiments.load_experiment(d) for d in report_experiments.expand_dirs([base])]) for e in g.members}
    for name, costs in expected.items():
        rows = summary[summary["group"] == groups[name]].sort_values("level")
        assert rows["train_cost_epochs"].tolist() == pytest.approx(costs, nan_ok=True), name
    text = (out / "report.md").read_text()
    assert "![accuracy against training cost](accuracy_vs_cost.png)" in text
    assert "| 3 | 0.5120 | 0.5120 |" in text and f"| {epochs + 3 * (epochs - 12 / 8):g} |" in text
    assert f"Cost unknown (left off that figure): {groups['wr_unknown']} --" in text
    assert (out / "accuracy_vs_cost.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "accuracy_vs_density.png").is_file()
