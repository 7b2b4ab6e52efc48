"""Every shipped config loads through the strict loader, names its method in its file name,
and builds: model for the dataset's classes/channels/resolution, masks, densities."""
from __future__ import annotations

from pathlib import Path

import pytest

import harness_params
from utils.data.specs import get_dataset_spec
from utils.models.mask_layers import prepare_model, prunable_layer_names
from utils.models.registry import get_model
from utils.pruning.schedules import iterative_densities

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
REQUIRED = ["resnet18_lrr_imagenet", "resnet18_wr_imagenet", "resnet50_lrr_imagenet", "resnet20_imp_cifar10",
            "resnet20_wr_cifar10", "resnet20_lrr_cifar10", "vgg16_snip_cifar10", "vgg16_synflow_cifar10",
            "resnet18_erk_cifar100", "resnet18_balanced_cifar100", "lenet_300_100_imp_mnist", "quickstart",
            "resnet20_slim_cifar10", "resnet20_earlybird_cifar10", "vit_imp_cifar10", "lenet_300_100_imp_fashion",
            "conv2_imp_fashion"]
SHORT_DATA_NAMES = {"fashion": "fashion_mnist"}   # a file name's data part: the dataset's name, or this short one


def test_required_configs_exist():
    assert sorted(REQUIRED) == sorted(p.stem for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads_validates_and_builds(path):
    c = harness_params.resolve(str(path), {})
    spec = get_dataset_spec(c["dataset.name"])
    if path.stem != "quickstart":
        model_part, method, data = path.stem.rsplit("_", 2)
        assert c["model.name"].startswith(model_part.split("_")[0])
        assert SHORT_DATA_NAMES.get(data, data) == c["dataset.name"]
        expected = {"imp": ("training_type", "imp"), "wr": ("training_type", "wr"), "lrr": ("training_type", "lrr"),
                    "snip": ("criterion", "snip"), "synflow": ("criterion", "synflow"),
                    "erk": ("allocation", "erk"), "balanced": ("allocation", "balanced"),
                    "slim": ("structure", "channel"), "earlybird": ("early_bird", True)}[method]
        assert c[f"prune.{expected[0]}"] == expected[1]
    resolution = c["dataset.resolution"] or spec.resolution
    model = get_model(c["model.name"], num_classes=spec.num_classes, in_channels=spec.channels, image_size=resolution)
    prepare_model(model, exclude=c["prune.exclude"])
    names = prunable_layer_names(model)
    assert names
    for pattern in c["prune.exclude"]:
        assert pattern not in names
    if c["prune.training_type"] == "at_init":
        assert 0 < c["prune.target_density"] <= 1
    else:
        densities = iterative_densities(c["prune.rate"], levels=c["prune.levels"], target_density=c["prune.target_density"])
        assert densities[0] == 1.0 and len(densities) >= 2


def test_quickstart_is_an_imp_run_of_at_least_8_levels_ending_at_or_below_5_percent():
    """Deep enough for the demo's lottery-ticket effect (the controls fall below 5% density)."""
    c = harness_params.resolve(str(CONFIGS[[p.stem for p in CONFIGS].index("quickstart")]), {})
    densities = iterative_densities(c["prune.rate"], levels=c["prune.levels"])
    assert c["prune.training_type"] == "imp" and len(densities) >= 8 and densities[-1] <= 0.05


def make_recipe(target):
    """The commands of a Makefile target, continuation lines joined, $(VAR) left as written."""
    lines = (ROOT / "Makefile").read_text().replace("\\\n", " ").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{target}:"))
    recipe = []
    for line in lines[start + 1:]:
        if not line.startswith("\t"):
            break
        recipe.append(" ".join(line.split()))
    return recipe


def harness_overrides(command):
    """--section.key=value words of a harness command (torchrun's own --flags have no dot)."""
    words = command.split()
    assert words[words.index("--config") + 1] == "configs/quickstart.yaml"
    return dict(word[2:].split("=", 1) for word in words if word.startswith("--") and "=" in word
                and word[2:].split("=", 1)[0].count(".") == 1)


def test_make_demo_runs_imp_then_its_reinit_and_shuffle_controls_and_reports_all_three():
    recipe = make_recipe("demo")
    runs = [line for line in recipe if "harness.py" in line]
    assert len(runs) == 3 and all(line.startswith("$(TORCHRUN)") for line in runs)
    configs = [harness_params.resolve(str(ROOT / "configs" / "quickstart.yaml"), harness_overrides(line))
               for line in runs]
    imp, reinit, shuffle = configs
    assert imp["prune.masks_from"] == "" and imp["prune.control"] == "none"
    source = f"{imp['experiment.base_dir']}/{imp['experiment.name']}"
    for control, c in (("reinit", reinit), ("shuffle", shuffle)):
        assert c["prune.masks_from"] == source and c["prune.control"] == control
    # reinit's "fresh" init comes from its own seed: the source's seed would rebuild the ticket's init
    assert reinit["experiment.seed"] != imp["experiment.seed"]
    names = [f"{c['experiment.base_dir']}/{c['experiment.name']}" for c in configs]
    assert len(set(names)) == 3
    report = next(line for line in recipe if "utils.report" in line)
    assert recipe.index(report) == len(recipe) - 1
    out_dir = report.split("--out-dir", 1)[1].split()[0]
    assert [word for word in report.split() if word in names] == names
    removed = make_recipe("clean-demo")[0].split()
    assert removed[:2] == ["rm", "-rf"] and sorted(removed[2:]) == sorted(names + [out_dir])
