"""Every pair of choices, proven on real runs: an all-pairs (pairwise covering) array over the
factors a user combines -- model kind x criterion x allocation x training type x structure x
control x processes x loader -- each row a tiny run on the digits data (1 epoch a level, 2
levels; at_init, gmp, rigl, set: one pruned level).

A run that applies must exit 0 and write exact densities (channel densities for channel
structure) per level, masks nested level to level (shuffle controls redraw each level: the same
count per layer instead), whole channels for channel structure, no NaN, and a run the report
reads.  A combination that does not apply (``refusal``) must be refused in one line with exit
status 2 before anything is written; every pair that cannot occur in a valid run gets one such
row.  The array comes from ``all_pairs``: a small deterministic greedy algorithm (AETG-like,
no randomness), not the product of the factors.

Extending: a model kind, a structure or any factor value is one entry of ``MODEL_KINDS``,
``STRUCTURES`` or ``FACTORS``; the refusal rules read the entries' fields.

Cost: the 1-process rows and the controls' source runs run in this process (FFCV's loader
compiles once); the 2-process rows are started with torchrun in the background when the first
row runs, and checked last.
"""
from __future__ import annotations

import itertools
import math
import os
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, FrozenSet, List, Optional, Sequence, Tuple

import pandas as pd
import pytest
import torch
from torch import nn

from tests.helpers import PYTHON, ROOT, TORCHRUN, digits_config, write_config
from tests.test_resume import assert_same_results, run_in_process
from utils.models.mask_layers import is_subset, prepare_model
from utils.models.registry import get_model
from utils.pruning import channel_graph, channel_select
from utils.pruning.schedules import target_keep_count

# make test runs the suite on 2 workers (pytest-xdist, --dist loadgroup): this file's tests stay on
# one worker, in order: its rows share one session fixture of runs (a control row uses its source row's run).
pytestmark = pytest.mark.xdist_group("combinations")


# ============================================================================ the factors
def bn_cnn(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """A plain BatchNorm CNN (no residual): conv-BN-ReLU x 2, max-pool, linear classifier."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(16 * (image_size // 2) ** 2, num_classes))


@dataclass(frozen=True)
class ModelKind:
    name: str
    model: str                  # model.name
    batchnorm: bool             # every pruned channel group has a BatchNorm (bn_gamma applies)


@dataclass(frozen=True)
class Structure:
    name: str
    criteria: FrozenSet[str]    # prune.criterion values that apply
    allocations: FrozenSet[str]
    overrides: Dict[str, object] = field(default_factory=dict, hash=False, compare=False)


WEIGHT_CRITERIA = frozenset({"magnitude", "random", "snip", "synflow", "grasp"})
MODEL_KINDS = [
    ModelKind("mlp", "lenet_300_100", batchnorm=False),
    ModelKind("bn_cnn", "tests.test_combinations:bn_cnn", batchnorm=True),
    ModelKind("residual_cnn", "resnet20", batchnorm=True),
    ModelKind("vit", "vit_nano_p4", batchnorm=False),
]
STRUCTURES = [
    Structure("unstructured", WEIGHT_CRITERIA, frozenset({"global", "uniform", "erk", "balanced"})),
    Structure("channel", frozenset({"magnitude", "bn_gamma", "random"}), frozenset({"global", "uniform"})),
    # N:M: the pattern fixes each level's density (at_init: no target_density); allocation does not apply
    Structure("nm", WEIGHT_CRITERIA, frozenset({"global", "uniform", "erk", "balanced"}),
              {"prune.nm": "2:4", "prune.target_density": None}),
]
# name -> values; the first value of each is the cheapest, and what refusal rows fill in.
FACTORS: List[Tuple[str, List]] = [
    ("model", [kind.name for kind in MODEL_KINDS]),
    ("structure", [s.name for s in STRUCTURES]),
    ("criterion", ["magnitude", "random", "snip", "synflow", "grasp", "bn_gamma"]),
    ("allocation", ["global", "uniform", "erk", "balanced"]),
    ("training_type", ["imp", "wr", "lrr", "finetune", "at_init", "gmp", "rigl", "set"]),
    ("control", ["off", "none", "reinit", "shuffle"]),   # off: no prune.masks_from
    ("processes", [1, 2]),
    ("loader", ["torch", "memory", "ffcv"]),
]
KINDS = {kind.name: kind for kind in MODEL_KINDS}
SPARSE_TRAINING_TYPES = ("gmp", "rigl", "set")         # masks change during the one run
ONE_RUN_TYPES = ("at_init",) + SPARSE_TRAINING_TYPES    # one level at prune.target_density
STRUCTURE_BY_NAME = {s.name: s for s in STRUCTURES}

Row = Dict[str, object]


def source_key(row: Row) -> Tuple:
    """A control trains the masks of a run pruned like the row: one source run per key."""
    return (row["model"], row["structure"], row["criterion"], row["allocation"])


def run_cost(row: Row, earlier: Sequence[Row]) -> int:
    """What running ``row`` adds, in new pairs it must cover to be worth it: a torchrun launch
    (two more processes) 3, a control needing a source run no earlier row needs 1 (weights
    tried on this array: these give 30 rows, 5 of them torchrun, 15 source runs)."""
    cost = 3 if row.get("processes") == 2 else 0
    if row.get("control", "off") != "off" and all(f in row for f in ("model", "structure", "criterion", "allocation")):
        if all(r["control"] == "off" or source_key(r) != source_key(row) for r in earlier):
            cost += 1
    return cost


# ----------------------------------------------------------------------- refusal rules
# Each rule reads only the factors it names and is skipped while one is unset (partial rows).
@dataclass(frozen=True)
class Rule:
    factors: Tuple[str, ...]
    refuses: Callable[..., bool]
    why: str


RULES = [
    Rule(("structure", "criterion"), lambda s, c: c not in STRUCTURE_BY_NAME[s].criteria,
         "the criterion does not score that unit (snip/synflow score weights, bn_gamma channels)"),
    Rule(("structure", "allocation"), lambda s, a: a not in STRUCTURE_BY_NAME[s].allocations,
         "erk and balanced share weights among layers; channel structure allocates channels (global/uniform)"),
    Rule(("model", "criterion"), lambda m, c: c == "bn_gamma" and not KINDS[m].batchnorm,
         "bn_gamma needs a BatchNorm after every pruned layer"),
    Rule(("control", "training_type"), lambda control, t: control != "off" and t in ONE_RUN_TYPES,
         "a control trains every level of its source's masks; at_init, gmp, rigl and set set masks by themselves"),
    Rule(("structure", "training_type"), lambda s, t: s != "unstructured" and t in SPARSE_TRAINING_TYPES,
         "gmp, rigl and set change single weights' masks during training: unstructured only"),
]


def broken_rules(row: Row) -> List[Rule]:
    return [rule for rule in RULES if all(f in row for f in rule.factors)
            and rule.refuses(*(row[f] for f in rule.factors))]


# -------------------------------------------------------------- the covering array
Pair = Tuple[Tuple[str, object], Tuple[str, object]]


def pairs_of(row: Row, factors: Sequence[Tuple[str, List]]) -> set:
    names = [name for name, _ in factors if name in row]
    return {((a, row[a]), (b, row[b])) for a, b in itertools.combinations(names, 2)}


def completion(row: Row, factors: Sequence[Tuple[str, List]], allowed: Callable[[Row], bool]) -> Optional[Row]:
    """A full allowed row extending ``row`` (first values first, depth first), or None."""
    if not allowed(row):
        return None
    for name, values in factors:
        if name not in row:
            for value in values:
                found = completion({**row, name: value}, factors, allowed)
                if found is not None:
                    return found
            return None
    return row


def all_pairs(factors: Sequence[Tuple[str, List]], allowed: Callable[[Row], bool],
              cost: Callable[[Row, Sequence[Row]], int] = lambda row, earlier: 0) -> Tuple[List[Row], List[Pair]]:
    """(rows, impossible pairs): allowed rows covering every pair of values that some allowed
    row can hold, and the pairs no allowed row holds.

    Greedy and deterministic: take the first uncovered pair (factor order, value order), then
    give each other factor, in order, the value that covers the most uncovered pairs with the
    values chosen so far, less ``cost(row so far, earlier rows)``, while the row can still be
    completed (ties: the earlier value, the cheaper one by convention)."""
    possible, impossible = set(), []
    for (a, values_a), (b, values_b) in itertools.combinations(factors, 2):
        for va, vb in itertools.product(values_a, values_b):
            pair = ((a, va), (b, vb))
            if completion({a: va, b: vb}, factors, allowed) is None:
                impossible.append(pair)
            else:
                possible.add(pair)
    canonical = [p for p in (((a, va), (b, vb)) for (a, values_a), (b, values_b) in itertools.combinations(factors, 2)
                             for va, vb in itertools.product(values_a, values_b)) if p in possible]
    uncovered, rows = set(possible), []
    while uncovered:
        (a, va), (b, vb) = next(p for p in canonical if p in uncovered)
        row: Row = {a: va, b: vb}
        for name, values in factors:
            if name in row:
                continue
            best, best_gain = None, -math.inf
            for value in values:
                trial = {**row, name: value}
                if completion(trial, factors, allowed) is None:
                    continue
                gain = len(pairs_of(trial, factors) & uncovered) - cost(trial, rows)
                if gain > best_gain:
                    best, best_gain = value, gain
            row[name] = best
        rows.append({name: row[name] for name, _ in factors})
        uncovered -= pairs_of(row, factors)
    return rows, impossible


def refusal_rows(impossible: Sequence[Pair], factors: Sequence[Tuple[str, List]]) -> List[Row]:
    """One row per impossible pair not already in an earlier refusal row: the pair, the other
    factors filled with the values breaking the fewest rules (first values first)."""
    rows: List[Row] = []
    for pair in impossible:
        if any(all(row[name] == value for name, value in pair) for row in rows):
            continue
        row: Row = dict(pair)
        for name, values in factors:
            if name not in row:
                row[name] = min(values, key=lambda v: (len(broken_rules({**row, name: v})), values.index(v)))
        rows.append({name: row[name] for name, _ in factors})
    return rows


def allowed(row: Row) -> bool:
    return not broken_rules(row)


ROWS, IMPOSSIBLE = all_pairs(FACTORS, allowed, run_cost)
# 1-process rows first: the 2-process ones run in the background meanwhile and are checked last.
ROWS.sort(key=lambda row: row["processes"])
REFUSALS = refusal_rows(IMPOSSIBLE, FACTORS)


def row_id(row: Row) -> str:
    return "-".join(str(row[name]) for name, _ in FACTORS)


# ============================================================================ running
def run_config(row: Row, digits: Path, base: Path, name: str, source: Optional[Path] = None) -> Dict:
    """The config of ``row``: LeNet/BN-CNN/ResNet-20/ViT on digits, 1 epoch a level, 2 levels."""
    overrides = {"model.name": KINDS[row["model"]].model, "prune.structure": row["structure"],
                 "prune.criterion": row["criterion"], "prune.allocation": row["allocation"],
                 "prune.training_type": row["training_type"], "dataset.loader": row["loader"],
                 "training.epochs": 1, "prune.levels": 2, "prune.rate": 0.3, "prune.synflow_iterations": 10}
    if row["training_type"] in ONE_RUN_TYPES:
        overrides.update({"prune.levels": None, "prune.target_density": 0.5})
    if row["training_type"] in SPARSE_TRAINING_TYPES:
        overrides["prune.update_every"] = 4   # a few mask updates in the one epoch
    overrides.update(STRUCTURE_BY_NAME[row["structure"]].overrides)
    if row["training_type"] == "wr":
        overrides["prune.rewind_iteration"] = 5   # late resetting: level 0's 5th step
    if row["control"] != "off":
        overrides.update({"prune.masks_from": str(source), "prune.control": row["control"], "prune.levels": None,
                          "experiment.seed": 1})   # reinit needs a seed other than the source's
    return digits_config(digits, base, name, **overrides)


BACKGROUND_AT_ONCE = 1   # 2-process rows running beside the 1-process ones


class Runs:
    """Session cache: the controls' source runs (one per model, structure, criterion and
    allocation: a control trains the masks such a run made) and every row's outcome."""

    def __init__(self, digits: Path, base: Path):
        self.digits, self.base = digits, base
        self.sources: Dict[Tuple, Path] = {}
        self.outcomes: Dict[str, Tuple[int, str, Path]] = {}
        self.background: Dict[str, Tuple[subprocess.Popen, Path, Path]] = {}
        self.queue: Optional[List[Row]] = None    # 2-process rows not started yet

    def source(self, row: Row) -> Path:
        key = source_key(row)
        if key not in self.sources:
            name = "source-" + "-".join(key)
            source_row = {**row, "training_type": "imp", "control": "off", "loader": "torch", "processes": 1}
            config = write_config(self.base / f"{name}.yaml", run_config(source_row, self.digits, self.base, name))
            code, _, err = run_in_process(config)
            assert code == 0, err
            self.sources[key] = self.base / name
        return self.sources[key]

    def config(self, row: Row, base: Optional[Path] = None) -> Tuple[Path, Path]:
        name = row_id(row)
        base = base or self.base
        base.mkdir(parents=True, exist_ok=True)
        source = self.source(row) if row["control"] != "off" else None
        config = write_config(base / f"{name}.yaml", run_config(row, self.digits, base, name, source))
        return config, base / name

    def start_background(self) -> None:
        """Queue the 2-process rows and start the first: one torchrun (2 processes) at a time runs
        beside the 1-process rows (more at once only slows every run on a 2-core machine)."""
        if self.queue is None:
            self.queue = [row for row in ROWS if row["processes"] == 2]
        self.pump()

    def pump(self) -> None:
        running = sum(1 for process, _, _ in self.background.values() if process.poll() is None)
        while self.queue and running < BACKGROUND_AT_ONCE:
            self.launch(self.queue.pop(0))
            running += 1

    def launch(self, row: Row) -> None:
        config, root = self.config(row)  # its source first, in this process
        log = self.base / f"{row_id(row)}.log"
        with open(log, "w") as handle:
            process = subprocess.Popen([TORCHRUN, "--standalone", "--nproc_per_node=2", "harness.py",
                                        "--config", str(config)], cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT,
                                       env={**os.environ, "OMP_NUM_THREADS": "1"})
        self.background[row_id(row)] = (process, root, log)

    def outcome(self, row: Row) -> Tuple[int, str, Path]:
        """(exit status, stderr or log, run directory), running the row if it has not run."""
        key = row_id(row)
        if key not in self.outcomes:
            self.start_background()
            if row["processes"] == 2:
                if key not in self.background:  # not started yet: now
                    self.queue.remove(row)
                    self.launch(row)
                process, root, log = self.background[key]
                code = process.wait(timeout=600)
                self.outcomes[key] = (code, log.read_text()[-3000:], root)
            else:
                config, root = self.config(row)
                code, _, err = run_in_process(config)
                self.outcomes[key] = (code, err, root)
            self.pump()
        return self.outcomes[key]


@pytest.fixture(scope="session")
def runs(tmp_path_factory, digits):
    runs = Runs(digits, tmp_path_factory.mktemp("combinations"))
    yield runs
    for process, _, _ in runs.background.values():
        if process.poll() is None:
            process.kill()
            process.wait()


# ============================================================================ checks
def model_of(row: Row) -> nn.Module:
    torch.manual_seed(0)
    model = prepare_model(get_model(KINDS[row["model"]].model, num_classes=10, in_channels=1, image_size=8))
    return model


def load_masks(root: Path) -> Dict[int, Dict[str, torch.Tensor]]:
    return {int(p.stem.split("_")[1]): torch.load(p, weights_only=True) for p in (root / "masks").glob("level_*.pt")}


def assert_whole_channels(masks: Dict[str, torch.Tensor]) -> None:
    """A mask is its alive rows (output channels) times its alive columns (input channels)."""
    for name, mask in masks.items():
        rows = mask.flatten(1).any(1)
        columns = mask.transpose(0, 1).flatten(1).any(1)
        expected = rows.view(-1, 1, *([1] * (mask.dim() - 2))) & columns.view(1, -1, *([1] * (mask.dim() - 2)))
        assert torch.equal(mask, expected.expand_as(mask)), f"{name}: a channel is partly pruned"


def check_run(row: Row, root: Path, runs: Runs) -> None:
    levels = pd.read_csv(root / "levels.csv")
    epochs = pd.read_csv(root / "epochs.csv")
    expected_levels = [0] if row["training_type"] in ONE_RUN_TYPES else [0, 1]
    assert levels.level.tolist() == expected_levels
    for column in ("train_loss", "test_loss", "test_acc"):
        assert epochs[column].map(math.isfinite).all(), f"epochs.csv {column} has NaN/inf"
    final = torch.load(root / "checkpoints" / "last.pt", weights_only=True)
    assert final["finished"]
    assert all(bool(torch.isfinite(t).all()) for t in final["model"].values() if t.is_floating_point())
    masks = load_masks(root)
    assert sorted(masks) == expected_levels
    layers = pd.read_csv(root / "layers.csv")
    source_masks = load_masks(runs.source(row)) if row["control"] != "off" else None
    structure = None
    if row["structure"] == "channel":
        model = model_of(row)
        structure = channel_graph.build_channel_structure(model, (1, 8, 8))
    for level in expected_levels:
        target = levels.target_density[level]
        at = layers[layers.level == level]
        if source_masks is not None:  # a control trains its source's counts, layer by layer
            assert {n: int(m.sum()) for n, m in masks[level].items()} == \
                   {n: int(m.sum()) for n, m in source_masks[level].items()}
            same = all(torch.equal(masks[level][n], source_masks[level][n]) for n in masks[level])
            assert same == (row["control"] != "shuffle" or level == 0)
        elif structure is None:
            assert at.alive.sum() == target_keep_count(target, at.numel.sum()), "kept weights: the target rounded"
        if structure is not None:
            assert_whole_channels(masks[level])
            alive = channel_select.units_alive(structure, masks[level])
            kept = sum(int(a.sum()) for a in alive.values())
            if source_masks is None:
                assert kept == target_keep_count(target, structure.total_units), "kept channels: the target rounded"
            assert levels.channel_density[level] == pytest.approx(kept / structure.total_units, abs=1e-6)
        if row["structure"] == "nm":  # every group keeps its level's count; layers without groups stay dense
            keep = 2 if row["training_type"] == "at_init" or level == 1 else 4
            assert set(at.nm) <= {f"{keep}:4", "dense"} and f"{keep}:4" in set(at.nm), set(at.nm)
        assert levels.density[level] == pytest.approx(at.alive.sum() / at.numel.sum(), abs=1e-6)  # CSV: 6 digits
    if len(expected_levels) == 2:  # shuffle controls too: one random order per run, fewer kept -> a subset
        assert is_subset(masks[1], masks[0]), "masks only shrink"


# ============================================================================ the tests
def test_the_array_covers_every_possible_pair_and_refuses_every_impossible_one():
    covered = set().union(*(pairs_of(row, FACTORS) for row in ROWS))
    everything = {((a, va), (b, vb)) for (a, values_a), (b, values_b) in itertools.combinations(FACTORS, 2)
                  for va in values_a for vb in values_b}
    assert covered | set(IMPOSSIBLE) == everything and not covered & set(IMPOSSIBLE)
    assert all(allowed(row) for row in ROWS) and all(broken_rules(row) for row in REFUSALS)
    for pair in IMPOSSIBLE:
        assert any(all(row[name] == value for name, value in pair) for row in REFUSALS)
    total = math.prod(len(values) for _, values in FACTORS)
    assert len(ROWS) < total / 100  # all pairs, not all combinations
    # the paths the brief names: channel structure with each training type and each control
    for value in ("wr", "lrr", "at_init"):
        assert any(r["structure"] == "channel" and r["training_type"] == value for r in ROWS)
    for control in ("none", "reinit", "shuffle"):
        assert any(r["structure"] == "channel" and r["control"] == control for r in ROWS)
        assert any(r["processes"] == 2 and r["control"] == control for r in ROWS)
    again, impossible = all_pairs(FACTORS, allowed, run_cost)
    assert impossible == IMPOSSIBLE and sorted(map(row_id, again)) == sorted(map(row_id, ROWS))


def test_the_greedy_array_is_deterministic_and_small_on_a_textbook_case():
    factors = [("a", [0, 1]), ("b", [0, 1]), ("c", [0, 1])]
    rows, impossible = all_pairs(factors, lambda row: True)
    assert impossible == [] and len(rows) <= 6 and rows == all_pairs(factors, lambda row: True)[0]
    covered = set().union(*(pairs_of(row, factors) for row in rows))
    assert len(covered) == 12
    rows, impossible = all_pairs(factors, lambda row: not (row.get("a") == 1 and row.get("b") == 1))
    assert impossible == [(("a", 1), ("b", 1))]


@pytest.mark.parametrize("row", ROWS, ids=row_id)
def test_combination(row, runs):
    runs.start_background()  # the first row starts the 2-process rows, one after another
    code, err, root = runs.outcome(row)
    assert code == 0, err[-3000:]
    check_run(row, root, runs)


@pytest.mark.parametrize("row", REFUSALS, ids=row_id)
def test_refused_combination(row, tmp_path, digits):
    """Refused in one line, exit 2, nothing written (a control's source is never read: a
    placeholder path is enough for every rule here)."""
    source = tmp_path / "no_source"
    config = write_config(tmp_path / "c.yaml", run_config({**row, "processes": 1}, digits, tmp_path / "runs", "x", source))
    code, _, err = run_in_process(config)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "runs").exists()


def test_the_report_reads_every_run(runs, tmp_path):
    from utils.report import cli as report_cli
    from utils.report import experiments as report_experiments
    from utils.report import tables as report_tables
    roots = []
    for row in ROWS:
        code, err, root = runs.outcome(row)
        assert code == 0, err[-2000:]
        roots.append(root)
    experiments = [report_experiments.load_experiment(root) for root in roots]
    assert all(e.complete and len(e.levels) == len(pd.read_csv(e.path / "levels.csv")) for e in experiments)
    table = report_tables.summary_table(report_experiments.make_groups(experiments))
    assert len(table) >= len(ROWS)
    # the whole report (tables and figures) for one run of each structure and a control
    picked = [roots[ROWS.index(next(r for r in ROWS if r["structure"] == s and r["control"] == c))]
              for s, c in (("channel", "off"), ("unstructured", "shuffle"))]
    written = report_cli.write_report(picked, tmp_path / "report")
    assert (tmp_path / "report" / "report.md").stat().st_size > 0 and not written["incomplete"]


# ------------------------------------------------------ paths the array does not reach
def test_a_control_killed_with_sigkill_resumes_to_the_uninterrupted_results(runs, tmp_path):
    row = {"model": "mlp", "structure": "unstructured", "criterion": "magnitude", "allocation": "global",
           "training_type": "lrr", "control": "shuffle", "processes": 1, "loader": "torch"}
    reference, reference_root = runs.config(row, tmp_path / "ref")
    code, _, err = run_in_process(reference)
    assert code == 0, err
    config, root = runs.config(row, tmp_path / "killed")
    for point in ("prune:1", "batch:1:0:3"):
        killed = subprocess.run([PYTHON, "harness.py", "--config", str(config)], cwd=ROOT, capture_output=True,
                                text=True, timeout=300,
                                env={**os.environ, "OMP_NUM_THREADS": "1", "HARNESS_TEST_KILL_AT": point})
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    code, out, err = run_in_process(config)
    assert code == 0, err
    assert "resuming" in out
    assert_same_results(reference_root, root)


def test_stability_analysis_with_two_processes_matches_one(runs, tmp_path, digits):
    tree = digits_config(digits, tmp_path / "runs", "one", **{
        "analysis.stability": True, "analysis.interpolation_points": 3, "prune.levels": 2, "training.epochs": 1})
    one = write_config(tmp_path / "one.yaml", tree)
    code, _, err = run_in_process(one)
    assert code == 0, err
    two = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node=2", "harness.py", "--config", str(one),
                          "--experiment.name=two"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-3000:]
    paths = [pd.read_csv(tmp_path / "runs" / name / "stability.csv") for name in ("one", "two")]
    assert paths[0][["level", "alpha"]].equals(paths[1][["level", "alpha"]])
    assert paths[1].level.tolist() == [0, 0, 0, 1, 1, 1]
    # the same model up to reduction order: a few of 360 test images may flip
    assert (paths[0].test_acc - paths[1].test_acc).abs().max() <= 1.0
    assert paths[0].test_loss.to_numpy() == pytest.approx(paths[1].test_loss.to_numpy(), rel=1e-2)
    barrier = pd.read_csv(tmp_path / "runs" / "two" / "levels.csv").instability
    assert barrier.map(math.isfinite).all() and (barrier >= 0).all()


BATCH_CRITERION = '''
import torch

def input_variance_scores(inputs, masks):
    """|w| times the variance over a training batch of the input the weight reads (first layer);
    |w| elsewhere.  Inputs that never vary (digits' blank corner pixels) score 0."""
    from utils.models.mask_layers import masked_layers
    x, _ = next(iter(inputs.batches))
    variance = x.flatten(1).var(0).to(inputs.device)
    scores = {}
    for index, (name, layer) in enumerate(masked_layers(inputs.model)):
        weight = layer.weight.detach().abs().to(inputs.device)
        scores[name] = weight * variance.view(1, -1) if index == 0 else weight.clone()
    return scores
'''


def test_a_user_criterion_scores_with_the_training_batches(tmp_path, digits, monkeypatch):
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "batch_criterion.py").write_text(BATCH_CRITERION)
    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    config = write_config(tmp_path / "c.yaml", digits_config(digits, tmp_path / "runs", "user", **{
        "prune.criterion": "batch_criterion:input_variance_scores", "prune.levels": 2, "training.epochs": 1}))
    code, _, err = run_in_process(config)
    assert code == 0, err
    masks = torch.load(tmp_path / "runs" / "user" / "masks" / "level_1.pt", weights_only=True)
    first = masks["1"]  # LeNet-300-100's first Linear (nn.Sequential index 1)
    from sklearn.datasets import load_digits
    blank = torch.from_numpy(load_digits().data.std(0) == 0)  # pixels that are 0 in every image
    assert bool(blank.any()) and not bool(first[:, blank].any()), "inputs that never vary are pruned first"
    assert bool(first[:, ~blank].any())
    layers = pd.read_csv(tmp_path / "runs" / "user" / "layers.csv")
    at = layers[layers.level == 1]
    assert at.alive.sum() == target_keep_count(0.8, at.numel.sum())
