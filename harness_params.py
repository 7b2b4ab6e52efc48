"""Every configuration key, declared once (fastargs Sections/Params), and the strict loader.

fastargs declares and documents the keys and feeds ``@param`` in the harness, but on its own
it silently ignores keys nobody declared, turns the string "false" into True, truncates
3.7 to 3 for an int, and exits with status 0 on a validation error.  ``load_config`` closes
those holes: YAML and ``--section.key=value`` overrides are merged, every key must be
declared, every value is checked by a strict checker below, cross-field contradictions are
refused, and any problem ends the program with ONE line on stderr and exit status 2 before
anything is created on disk.
"""
from __future__ import annotations

import difflib
import io
import math
import os
import sys
from contextlib import redirect_stderr, redirect_stdout
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml
from fastargs import Config, Param, Section, get_current_config, set_current_config
from fastargs.validation import Checker

from harness_checkers import (  # noqa: F401  (part of this module's interface: the keys' checkers)
    ConfigError,
    StrictInt,
    StrictFloat,
    StrictBool,
    BoolOrAuto,
    StrictStr,
    Choice,
    ListOf,
    Optional_,
    NameOrImport,
    LayerRates,
    NMPattern,
    _range_help,
)
from utils.core.user_code import UserCodeError, import_callable, is_import_path
from utils.data.loaders import LOADER_BACKENDS
from utils.data.sources import DataError
from utils.data.specs import augment_names, dataset_names, get_dataset_spec, uses_resized_crops, with_augment
from utils.models.registry import model_names
from utils.pruning.allocations import ALLOCATIONS
from utils.pruning.criteria import SCORES, get_criterion, user_criterion
from utils.runs.rundir import (
    RENAMED_KEYS,
    as_tree,  # noqa: F401  (the config's nesting: one rule, in utils/runs/rundir.py)
)
from utils.runs.rundir import current_key_names as rundir_key_names
from utils.training.optimizers import OPTIMIZERS
from utils.training.schedulers import schedule_names
from utils.pruning.settings import PruneSettings
from utils.pruning.structures import STRUCTURES, StructureRegistryError, get_structure
from utils.training.level_plan import plan_levels
from utils.training.training_types import TRAINING_TYPES, TrainingTypeError, get_training_type

EXIT_CONFIG_ERROR = 2


# ------------------------------------------------------------------------------ schema
def P(checker: Checker, desc: str, default: Any = None, required: bool = False) -> Param:
    return Param(checker, desc, default=default, required=required)


# ------------------------------------------------------------ help texts from the registries
# What --help says a name means is read off the registry entry, so an entry added there (or a
# removed one) shows in --help without an edit here.
def _listing(entries) -> str:
    """``a (what a is), b (what b is), c``: (name, one-line description) pairs."""
    return ", ".join(f"{name} ({text})" if text else name for name, text in entries)


def _one_line(obj) -> str:
    """An entry's own one-line description: its ``description``, else the first line of its
    docstring ("" when it has neither)."""
    text = getattr(obj, "description", None) or (getattr(obj, "__doc__", None) or "").strip()
    line = (str(text).splitlines() or [""])[0].strip().rstrip(".").replace("``", "")
    return line[:1].lower() + line[1:] if line[1:2].islower() else line  # "The data ..." -> "the data ..."


def training_types_help() -> str:
    return _listing((name, kind.describe()) for name, kind in TRAINING_TYPES.items())


def fine_tuning_types() -> str:
    """The registered types that fine-tune at a constant rate (``fine_tunes``): what prune.finetune_lr needs."""
    return " or ".join(f"prune.training_type={name}" for name, kind in TRAINING_TYPES.items() if kind.fine_tunes)


def rewinding_types() -> str:
    """The registered types that rewind (``captures_rewind``): what a rewind key needs."""
    return " or ".join(f"prune.training_type={name}" for name, kind in TRAINING_TYPES.items() if kind.captures_rewind)


def sparse_types() -> str:
    """The training types whose masks change during training (for help texts and refusals)."""
    return ", ".join(name for name, kind in TRAINING_TYPES.items() if kind.updates_masks)


SPARSE_TRAINING_KEYS = ("prune.update_every", "prune.update_start", "prune.update_end", "prune.drop_fraction")


def loaders_help() -> str:
    from utils.data.loaders import get_loader_backend
    return _listing((name, _one_line(get_loader_backend(name))) for name in sorted(LOADER_BACKENDS))


def augmentations_help() -> str:
    from utils.data.specs import AUGMENTATIONS, DEFAULT_AUGMENT

    def steps(policy) -> str:
        done = (["RandomResizedCrop"] if policy.resized_crop else []) + \
               ([f"pad {policy.translate_padding} + random crop"] if policy.translate_padding else []) + \
               (["flip"] if policy.horizontal_flip else [])
        return " + ".join(done) or "nothing"

    return _listing([(DEFAULT_AUGMENT, "the dataset's own"), *((name, steps(policy)) for name, policy in AUGMENTATIONS.items())])


def datasets_help() -> str:
    def shape(spec) -> str:
        if spec.from_record:
            return "from the training file's write record"
        return f"{spec.channels}x{spec.resolution}x{spec.resolution}, {spec.num_classes} classes"

    return _listing((name, shape(get_dataset_spec(name))) for name in dataset_names())


def declare_sections() -> Config:
    """Declare every section and key into a fresh fastargs Config and make it current."""
    config = Config()
    set_current_config(config)

    Section("model", "Network").params(
        name=P(NameOrImport(model_names()), "Registry name of the network (utils/models/registry.py), or package.module:factory "
               "(called with num_classes=, and in_channels=, image_size= when it takes them)", required=True),
        blurpool=P(StrictBool(), "Anti-aliasing blur before every strided convolution (BlurPool, as ffcv-imagenet)", default=False),
        weights=P(StrictStr(), "Given initial weights: a state dict file (torch.save(model.state_dict()), a torchvision "
                  "weights file, or a ticket file FILE[:init|trained|rewind] of python -m utils.ticket export) loaded with "
                  "weights_only before level 0; a head of another class count keeps its "
                  "fresh init (utils/models/pretrained.py); empty = random init", default=""),
    )
    Section("dataset", "Data (FFCV .beton files)").params(
        name=P(NameOrImport(dataset_names()), "Dataset (utils/data/specs.py), or package.module:NAME of an outside "
               f"DatasetSpec; it fixes resolution, channels, classes, mean/std: {datasets_help()}", required=True),
        train_path=P(StrictStr(), "Training .beton file", required=True),
        test_path=P(StrictStr(), "Evaluation .beton file", required=True),
        batch_size=P(StrictInt(1), "GLOBAL batch size: each of W processes takes batch_size / W", default=128),
        num_workers=P(StrictInt(0), "Loader worker threads per process", default=4),
        loader=P(Choice(sorted(LOADER_BACKENDS)), f"Loader back-end (utils/data/loaders.py): {loaders_help()}", default="ffcv"),
        augment=P(Choice(augment_names()), f"Training augmentation (utils/data/specs.py): {augmentations_help()}", default="default"),
        resolution=P(StrictInt(0), "Training image size; 0 = the dataset's own (ImageNet: RandomResizedCrop size)", default=0),
        eval_resolution=P(StrictInt(0), "Evaluation image size; 0 = the dataset's own (ImageNet: center crop, ratio 224/256)", default=0),
        val_fraction=P(StrictFloat(0, 1, high_open=True), "Share of the training file held out as validation data "
                       "(removed from training; the best and early-stopping epochs are chosen on it; 0 = none: "
                       "the best epoch is chosen on the test set, and levels.csv says so)", default=0.0),
        val_seed=P(StrictInt(0), "Seed of the validation split (utils/data/validation.py): not experiment.seed, so "
                   "every seed and control of a study holds out the same samples", default=0),
        train_samples=P(StrictInt(0), "Train on this many samples of the training file (after the validation split; "
                        "drawn with dataset.val_seed, utils/data/validation.py); 0 = all", default=0),
        val_path=P(StrictStr(), "Validation .beton file (e.g. an image folder's val/ split written with --splits "
                   "train=train,test=val); '' = none", default=""),
    )
    Section("optimizer", "Optimizer").params(
        name=P(Choice(list(OPTIMIZERS)), "Optimizer (utils/training/optimizers.py)", default="sgd"),
        lr=P(StrictFloat(0, math.inf, low_open=True), "Peak learning rate (for the global batch size)", default=0.1),
        momentum=P(StrictFloat(0, 1, high_open=True), "SGD momentum", default=0.9),
        nesterov=P(StrictBool(), "Nesterov momentum (sgd with momentum > 0)", default=False),
        weight_decay=P(StrictFloat(0), "L2 / decoupled weight decay", default=1e-4),
        betas=P(ListOf(StrictFloat(0, 1, high_open=True), 2), "Adam/AdamW betas", default=[0.9, 0.999]),
        label_smoothing=P(StrictFloat(0, 1, high_open=True), "Label smoothing of the cross-entropy loss", default=0.0),
    )
    Section("schedule", "Learning-rate schedule (per iteration, epochs as units)").params(
        name=P(Choice(schedule_names()), "Shape of the schedule", default="constant"),
        warmup_epochs=P(StrictFloat(0), "Linear warmup length in epochs (0 = none)", default=0.0),
        warmup_start_factor=P(StrictFloat(0, 1), "LR factor at the first warmup step", default=0.0),
        milestones=P(ListOf(StrictFloat(0)), "multistep: epochs at which LR is multiplied by gamma", default=[]),
        gamma=P(StrictFloat(0, 1, low_open=True), "step/multistep decay factor", default=0.1),
        step_size=P(StrictFloat(0, math.inf, low_open=True), "step: epochs between decays", default=30.0),
        peak_epoch=P(StrictFloat(0), "triangular: epoch at which LR peaks", default=2.0),
        final_factor=P(StrictFloat(0, 1), "cosine/linear/triangular: LR factor at the end", default=0.0),
    )
    Section("training", "Training loop").params(
        epochs=P(StrictInt(1), "Epochs per level", default=10),
        precision=P(Choice(["fp32", "bf16", "fp16"]), "Autocast dtype on CUDA; CPU always trains in fp32", default="fp32"),
        channels_last=P(StrictBool(), "channels_last memory format (CUDA)", default=False),
        compile=P(StrictBool(), "torch.compile the model", default=False),
        device=P(Choice(["auto", "cpu", "cuda"]), "auto = cuda:LOCAL_RANK when present, else cpu", default="auto"),
        grad_clip=P(StrictFloat(0), "Clip the gradient norm of the alive weights (and unpruned parameters) to this (0 = off)", default=0.0),
        progress=P(StrictBool(), "Progress bar on rank 0", default=True),
        flip_tta=P(StrictBool(), "Evaluate on each test image and its mirror image, logits averaged (test-time flip)", default=False),
        bn_l1=P(StrictFloat(0), "Network slimming: L1 penalty on BatchNorm scales (lambda; 0 = off)", default=0.0),
    )
    Section("prune", "Pruning between levels").params(
        criterion=P(NameOrImport(list(SCORES)), "What scores a weight or a channel: " + "; ".join(
                    f"{name}: {spec.description} (scores {' and '.join(spec.scores())})" for name, spec in SCORES.items())
                    + "; or package.module:function taking (inputs, masks), docs/extending.md", default="magnitude"),
        allocation=P(Choice(sorted(ALLOCATIONS)), "How kept weights are shared among layers", default="global"),
        training_type=P(NameOrImport(list(TRAINING_TYPES)), "What happens between levels (utils/training/training_types.py): "
                        f"{training_types_help()}; or package.module:Name (a TrainingType subclass)", default="imp"),
        rate=P(StrictFloat(0, 1, low_open=True, high_open=True), "Fraction of the remaining weights removed per level", default=0.2),
        levels=P(Optional_(StrictInt(1)), "Number of levels, dense level 0 included", default=None),
        target_density=P(Optional_(StrictFloat(0, 1, low_open=True)), "at_init: the density; iterative: stop at the first level at or below it", default=None),
        rewind_epoch=P(StrictInt(0), f"The level-0 epoch whose end state later levels restart from; needs "
                       f"{rewinding_types()}", default=0),
        exclude=P(ListOf(StrictStr()), "fnmatch patterns of layer names kept dense and uncounted", default=[]),
        synflow_iterations=P(StrictInt(1), "SynFlow rounds (exponential density schedule)", default=100),
        score_batches=P(StrictInt(1), "Training batches a criterion that needs batches scores on (snip sums their "
                        "gradients, grasp its g and H g; package.module:function criteria get them unless they say "
                        "otherwise); the old name prune.snip_batches is still read", default=1),
        snip_mode=P(Choice(["eval", "train"]), "BatchNorm during SNIP scoring: eval (running statistics, as the reference codes) or train (batch statistics)", default="eval"),
        structure=P(NameOrImport(list(STRUCTURES)), "Unit of pruning: " + "; ".join(
                    f"{name}: {cls.description}" for name, cls in STRUCTURES.items())
                    + "; or package.module:Name (a Structure subclass, docs/extending.md)", default="unstructured"),
        nm=P(NMPattern(), "prune.structure=nm: keep N of every M consecutive inputs at the last level; level L of K "
             "keeps round(M - L*(M-N)/(K-1)) per group", default="2:4"),
        min_channel_fraction=P(StrictFloat(0, 1), "Channel structure: no coupled group keeps fewer than this fraction of its "
                               "channels (and never fewer than 1); densities too low for it are refused", default=0.1),
        early_bird=P(StrictBool(), "Early-Bird: end level 0 when the next level's channel mask stops changing (channel structure)", default=False),
        early_bird_threshold=P(StrictFloat(0, 1, low_open=True), "Early-Bird: stop when the largest mask distance over the window is below this", default=0.1),
        early_bird_window=P(StrictInt(2), "Early-Bird: masks compared, the current epoch's included", default=5),
        masks_from=P(StrictStr(), "Control run: train, level by level, the masks of this experiment directory "
                     "(its masks/level_L.pt and checkpoints/init.pt) or ticket file (python -m utils.ticket "
                     "export: its levels 0..L); empty = off", default=""),
        control=P(Choice(["none", "reinit", "shuffle"]), "With masks_from: none (the masks and initial weights as they "
                  "are), reinit (the masks, this run's own random init), shuffle (each layer's count of kept weights "
                  "at random positions, the source's init)", default="none"),
        rewind_iteration=P(StrictInt(0), "Rewind to the state after this many optimizer steps of level 0 (late "
                           f"resetting) instead of rewind_epoch; 0 = off; needs {rewinding_types()}", default=0),
        finetune_lr=P(Optional_(StrictFloat(0, math.inf, low_open=True)), "The constant learning rate of the levels "
                      f"after 0 with {fine_tuning_types()}; null = the schedule's final rate (the rate of its last "
                      "step, Renda et al. 2020)", default=None),
        layer_rates=P(LayerRates(), "Per-layer rates for allocation uniform: \"pattern=rate\" items, the first "
                      "matching pattern wins, other layers use prune.rate; level L keeps (1-rate)^L of each layer", default=[]),
        update_every=P(StrictInt(1), f"Sparse training ({sparse_types()}): optimizer steps between mask updates", default=100),
        update_start=P(StrictFloat(0, 1, high_open=True), "Sparse training: first mask update at this fraction of the "
                       "run's optimizer steps (gmp: where the cubic schedule starts; rigl and set default to 0)", default=0.1),
        update_end=P(StrictFloat(0, 1, low_open=True), "Sparse training: last mask update at this fraction of the run's "
                     "optimizer steps (gmp: where the target density is reached; rigl, set: where the drop fraction "
                     "has decayed to 0)", default=0.75),
        drop_fraction=P(StrictFloat(0, 1, low_open=True, high_open=True), "rigl, set: fraction of each layer's alive "
                        "weights dropped (and as many grown) at the first update, cosine-decayed to 0 at "
                        "prune.update_end", default=0.3),
    )
    Section("resolution", "Progressive resizing of training images (ImageNet; ffcv-imagenet's ramp)").params(
        start_res=P(StrictInt(0), "Training resolution up to start_epoch (0 = off: dataset.resolution throughout)", default=0),
        end_res=P(StrictInt(0), "Training resolution from end_epoch on", default=0),
        start_epoch=P(StrictInt(0), "Epoch at which the ramp starts", default=0),
        end_epoch=P(StrictInt(0), "Epoch at which the ramp ends (linear in between, multiples of 32)", default=0),
    )
    Section("analysis", "Analyses run beside training").params(
        stability=P(StrictBool(), "At every level train a second copy with another data order and measure the error "
                    "barrier on the linear path between the two (stability.csv, levels.csv instability)", default=False),
        interpolation_points=P(StrictInt(2), "Points on the path, end points included (alphas 0, 1/(n-1), ..., 1)", default=11),
        bn_batches=P(StrictInt(1), "Training batches over which BatchNorm statistics are re-estimated at each point", default=20),
        reestimate_endpoints=P(StrictBool(), "Re-estimate BatchNorm statistics at the end points too (default: the two "
                               "networks' own statistics, so the ends equal their own evaluations)", default=False),
    )
    Section("distributed", "Process group").params(
        backend=P(Choice(["auto", "nccl", "gloo"]), "auto = nccl on CUDA, gloo on CPU", default="auto"),
        sync_bn=P(BoolOrAuto(), "BatchNorm statistics over the global batch (SyncBatchNorm; CUDA only). auto = on with CUDA and "
                  "more than one process, so 1 and N GPUs train the same model; false = per-rank batch statistics, rank 0's running stats",
                  default="auto"),
        timeout_s=P(StrictFloat(1), "Collective timeout in seconds", default=1800.0),
    )
    Section("experiment", "Where results go").params(
        name=P(StrictStr(), "Experiment directory name under base_dir", required=True),
        base_dir=P(StrictStr(), "Parent directory of experiment directories", default="runs"),
        seed=P(StrictInt(0), "Seed for initialisation, data order and random scores", default=0),
        resume=P(StrictBool(), "Resume from a checkpoint of the same config; false = start fresh in a new directory", default=True),
    )
    Section("logging", "Optional experiment trackers (utils/runs/trackers.py), rank 0 only").params(
        tensorboard=P(StrictBool(), "Write TensorBoard event files into the experiment directory", default=False),
        wandb_project=P(Optional_(StrictStr()), "Weights & Biases project to log to (needs the wandb package); null = off", default=None),
    )
    return config


# ----------------------------------------------------------------------------- loading
USAGE = ("usage: harness.py --config FILE.yaml [--section.key=value ...]  "
         "(python harness.py --help lists every key)")


def _fail(message: str) -> None:
    raise ConfigError(message)


def parse_argv(argv: Sequence[str]) -> Tuple[Optional[str], Dict[str, str], bool]:
    """-> (config path, {dotted key: raw string}, wants_help)."""
    config_path, overrides, wants_help = None, {}, False
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("-h", "--help"):
            wants_help = True
        elif arg in ("--config", "-C", "--config-file") or arg.startswith(("--config=", "--config-file=")):
            if "=" in arg:
                config_path = arg.split("=", 1)[1]
            else:
                if i + 1 >= len(args):
                    _fail(f"{arg} needs a file name. {USAGE}")
                i += 1
                config_path = args[i]
        elif arg.startswith("--") and "." in arg.split("=", 1)[0]:
            if "=" in arg:
                key, raw = arg[2:].split("=", 1)
            else:
                if i + 1 >= len(args):
                    _fail(f"{arg} needs a value. {USAGE}")
                key, raw = arg[2:], args[i + 1]
                i += 1
            overrides[key] = raw
        else:
            _fail(f"unexpected argument {arg!r}. {USAGE}")
        i += 1
    return config_path, overrides, wants_help


def _flatten(tree: Any, prefix: str = "") -> Dict[str, Any]:
    flat: Dict[str, Any] = {}
    if not isinstance(tree, dict):
        _fail(f"config: {prefix or 'the top level'} must be a mapping of sections, got {type(tree).__name__}")
    for key, value in tree.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            flat.update(_flatten(value, path))
        else:
            flat[path] = value
    return flat


def current_key_names(flat: Dict[str, Any], origin: str = "") -> Dict[str, Any]:
    """``flat`` with old key names (``utils.runs.rundir.RENAMED_KEYS``) under their new names.  ``origin``
    (e.g. "in FILE"): refuse old and new name both given with different values; empty: the new
    name wins (utils.runs.rundir.current_key_names)."""
    if origin:
        for old, new in RENAMED_KEYS.items():
            if old in flat and new in flat and flat[old] != flat[new]:
                _fail(f"{old}={flat[old]!r} and {new}={flat[new]!r} both given ({origin}); {old} is the old name of "
                      f"{new}: give {new} only")
    return rundir_key_names(flat)


def _known_keys(config: Config) -> Dict[str, Param]:
    return {".".join(path): param for path, param in config.entries.items()}


def _check_declared(flat: Dict[str, Any], known: Dict[str, Param], origin: str) -> None:
    sections = sorted({k.split(".")[0] for k in known})
    for key in flat:
        if key in known:
            continue
        nearest = difflib.get_close_matches(key, list(known), n=1, cutoff=0.75)  # a typo: name the key meant
        hint = f"; did you mean {nearest[0]}?" if nearest else ""
        section = key.split(".")[0]
        if section not in sections:
            _fail(f"unknown section {section!r} ({origin} key {key}){hint}; sections: {', '.join(sections)}")
        keys = sorted(k.split(".", 1)[1] for k in known if k.startswith(section + "."))
        _fail(f"unknown key {key} ({origin}){hint}; keys of {section}: {', '.join(keys)}")


def read_yaml(path: str) -> Dict[str, Any]:
    if not os.path.exists(path):
        _fail(f"config file {path} does not exist")
    if os.path.isdir(path):
        _fail(f"config file {path} is a directory, not a YAML file")
    try:
        with open(path) as handle:
            tree = yaml.safe_load(handle)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        _fail(f"config file {path} is not valid YAML{where}: {problem}")
    except UnicodeDecodeError:
        _fail(f"config file {path} is not a text (UTF-8) YAML file")
    return tree if tree is not None else {}


def resolve(config_path: Optional[str], overrides: Dict[str, str]) -> Dict[str, Any]:
    """Merge YAML + overrides, check each key and value; -> {dotted key: checked value}."""
    config = declare_sections()
    known = _known_keys(config)
    flat = current_key_names(_flatten(read_yaml(config_path)), f"in {config_path}") if config_path else {}
    _check_declared(flat, known, f"in {config_path}")
    parsed_overrides = {}
    for key, raw in overrides.items():
        try:
            parsed_overrides[key] = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            parsed_overrides[key] = raw
    parsed_overrides = current_key_names(parsed_overrides, "on the command line")
    _check_declared(parsed_overrides, known, "on the command line")
    flat.update(parsed_overrides)

    resolved: Dict[str, Any] = {}
    for key, param in known.items():
        if key in flat:
            value = flat[key]
            try:
                resolved[key] = param.checker.check(value)
            except Exception:
                shown = getattr(param.checker, "display", repr)(value)
                _fail(f"{key}={shown} is not allowed: expected {param.checker.help()}")
        elif param.required:
            _fail(f"{key} is required ({param.desc}); set it in the YAML or with --{key}=...")
        else:
            resolved[key] = param.default
    apply_training_type_defaults(resolved, given=set(flat))
    check_cross_fields(resolved)
    # Hand the checked values to fastargs so @param works in the harness.
    config.collect(as_tree(resolved))
    return resolved


def apply_training_type_defaults(resolved: Dict[str, Any], given: set) -> None:
    """The training type's own defaults of other keys (``TrainingType.config_defaults``: rigl and
    set prune with erk + random) for the keys the user did not give."""
    for key, value in training_type_of(resolved).config_defaults.items():
        if key not in given:
            resolved[key] = value


def check_cross_fields(c: Dict[str, Any]) -> None:
    """Contradictions between keys that each look fine alone."""
    kind, structure = training_type_of(c), structure_of(c)
    check_structure_refusals(c, structure)
    check_science_fields(c)
    levels, target = c["prune.levels"], c["prune.target_density"]
    epochs = c["training.epochs"]
    check_level_plan(c, structure)  # an iterative run without levels or a target is the plan's refusal
    refusal = kind.check(c)
    if refusal:
        _fail(refusal)
    if not kind.one_shot:
        if levels is not None and target is not None:
            _fail(f"prune.levels={levels} and prune.target_density={target} both set; give one (levels, or the density to stop at)")
    if c["optimizer.nesterov"] and (c["optimizer.name"] != "sgd" or c["optimizer.momentum"] == 0):
        _fail("optimizer.nesterov=true needs optimizer.name=sgd and optimizer.momentum > 0")
    if c["schedule.name"] == "multistep":
        milestones = c["schedule.milestones"]
        if not milestones:
            _fail("schedule.name=multistep needs schedule.milestones (a list of epochs)")
        if list(milestones) != sorted(milestones) or any(m > epochs for m in milestones):
            _fail(f"schedule.milestones={milestones} must increase and lie within training.epochs={epochs}")
    if c["schedule.warmup_epochs"] >= epochs:
        _fail(f"schedule.warmup_epochs={c['schedule.warmup_epochs']} must be less than training.epochs={epochs}")
    check_structure_fields(c, structure)
    check_speed_fields(c)
    if c["dataset.val_fraction"] > 0 and c["dataset.val_path"]:
        _fail(f"dataset.val_fraction={c['dataset.val_fraction']} and dataset.val_path={c['dataset.val_path']} both "
              f"set; give one (a share of the training file held out, or a validation file)")
    if c["schedule.name"] == "triangular" and c["schedule.peak_epoch"] > epochs:
        _fail(f"schedule.peak_epoch={c['schedule.peak_epoch']} must be within training.epochs={epochs}")


def check_speed_fields(c: Dict[str, Any]) -> None:
    """The dataset and its augmentation, test-time flip and progressive resizing (docs/speed.md)."""
    try:
        spec = get_dataset_spec(c["dataset.name"])
        with_augment(spec, c["dataset.augment"])
    except DataError as error:
        _fail(str(error) if str(error).startswith("dataset.augment=") else f"dataset.name: {error}")
    if c["training.flip_tta"] and spec.flip_changes_labels:
        _fail(f"training.flip_tta=true does not suit dataset.name={c['dataset.name']}: its labels change under a "
              f"mirror flip; use it for {', '.join(n for n in dataset_names() if not get_dataset_spec(n).flip_changes_labels)}")
    start, end = c["resolution.start_res"], c["resolution.end_res"]
    if start or end:
        if not (start and end):
            _fail(f"resolution.start_res={start} and resolution.end_res={end}: give both (or neither)")
        if not uses_resized_crops(spec, c["dataset.augment"]):
            _fail(f"progressive resizing (resolution.start_res) needs resized crops: dataset.augment=rrc "
                  f"(imagenet's default), not {c['dataset.augment']} with dataset.name={c['dataset.name']}")
        if not c["resolution.start_epoch"] <= c["resolution.end_epoch"] <= c["training.epochs"]:
            _fail(f"resolution.start_epoch={c['resolution.start_epoch']} <= resolution.end_epoch="
                  f"{c['resolution.end_epoch']} <= training.epochs={c['training.epochs']} does not hold")


def structure_of(c: Dict[str, Any]):
    """The config's pruning structure (utils/pruning/structures/), made with its prune settings; an
    outside one that cannot be had is refused in one line."""
    try:
        return get_structure(c["prune.structure"])(PruneSettings.from_config(c))
    except StructureRegistryError as error:
        _fail(f"prune.structure: {error}")


def criterion_of(c: Dict[str, Any]):
    """The config's criterion's registry entry (or the user's, imported); refused in one line when
    it cannot be had."""
    try:
        return get_criterion(c["prune.criterion"])
    except ValueError as error:
        _fail(f"prune.criterion: {error}")


def check_structure_fields(c: Dict[str, Any], structure) -> None:
    """What the structure accepts (it is asked, never named): criteria that score its units,
    its allocations; prune.early_bird."""
    criterion = criterion_of(c)
    name, allocation = c["prune.structure"], c["prune.allocation"]
    if not structure.accepts(criterion):
        allowed = [n for n, spec in SCORES.items() if structure.accepts(spec)]
        needs = [s for s, cls in STRUCTURES.items() if cls(structure.settings).accepts(criterion)]
        _fail(f"prune.criterion={c['prune.criterion']} does not apply to prune.structure={name}; allowed: "
              f"{', '.join(allowed)} (prune.criterion={c['prune.criterion']} scores {' and '.join(criterion.scores())}"
              + (f": it needs prune.structure={' or '.join(needs)})" if needs else ")"))
    allocations = structure.allocations()
    if allocations is not None and allocation not in allocations:
        _fail(f"prune.allocation={allocation} does not apply to prune.structure={name}; allowed: {', '.join(allocations)}")
    if c["prune.early_bird"]:
        if not structure.compares_units:
            comparing = [s for s, cls in STRUCTURES.items() if cls.compares_units]
            _fail(f"prune.early_bird=true needs prune.structure={' or '.join(comparing)} (it compares the units "
                  f"successive epochs would keep)")
        if get_training_type(c["prune.training_type"]).one_shot:
            _fail(f"prune.early_bird=true contradicts prune.training_type={c['prune.training_type']} (Early-Bird "
                  f"ends a dense level 0)")
        if not criterion.reads_weights:
            trained = [n for n, spec in SCORES.items() if spec.reads_weights and structure.accepts(spec)]
            _fail(f"prune.early_bird=true needs a trained score ({' or '.join(trained)}), not "
                  f"prune.criterion={c['prune.criterion']}")
        if c["prune.levels"] == 1 or c["prune.target_density"] == 1.0:
            _fail("prune.early_bird=true needs a level after level 0 (prune.levels >= 2 or prune.target_density < 1)")


def training_type_of(c: Dict[str, Any]):
    """The config's training type (utils/training/training_types.py); an outside one that cannot be had is
    refused in one line."""
    try:
        return get_training_type(c["prune.training_type"])
    except TrainingTypeError as error:
        _fail(f"prune.training_type: {error}")


def check_structure_refusals(c: Dict[str, Any], structure) -> None:
    """The structure's own refusals of the prune settings (N:M: layer rates, a target density,
    too few levels; channel: layer rates), asked of the structure."""
    kind = training_type_of(c)
    if not structure.accepts_training(kind):
        allowed = [name for name, other in TRAINING_TYPES.items() if structure.accepts_training(other)]
        needs = [s for s, cls in STRUCTURES.items() if cls(structure.settings).accepts_training(kind)]
        _fail(f"prune.training_type={c['prune.training_type']} does not apply to prune.structure={c['prune.structure']} "
              f"(its masks change single weights during training); allowed: {', '.join(allowed)}"
              + (f"; or prune.structure={' or '.join(needs)}" if needs else ""))
    refusal = structure.refusal(kind.one_shot)
    if refusal:
        _fail(refusal)


def check_level_plan(c: Dict[str, Any], structure) -> None:
    """The level plan can be made from these settings (the shapes aside: those need the model);
    a control's is its source's, read when the run starts."""
    if c["prune.masks_from"]:
        return
    try:
        plan_levels(structure.settings, training_type_of(c), structure, shapes=None)
    except ValueError as error:
        _fail(str(error))


def check_science_fields(c: Dict[str, Any]) -> None:
    """Controls, late resetting, per-layer rates, the user's own code (docs/design.md section 9).

    What needs the data or the model (the loader length for rewind_iteration, layer names
    for layer_rates, the source directory for masks_from) is checked by the harness with
    ``utils.lottery.controls.read_source``, ``utils.training.rewind.rewind_point`` and
    ``utils.pruning.schedules.layer_rate_plan``.
    """
    kind = training_type_of(c)
    masks_from, control = c["prune.masks_from"], c["prune.control"]
    if control != "none" and not masks_from:
        _fail(f"prune.control={control} needs prune.masks_from (the experiment directory whose masks it controls)")
    if masks_from:
        if kind.one_shot:
            _fail(f"prune.masks_from takes the masks of every level from the source; prune.training_type={kind.name} "
                  f"contradicts it (use {' or '.join(n for n, t in TRAINING_TYPES.items() if not t.one_shot)})")
        if c["prune.target_density"] is not None:
            _fail(f"prune.target_density={c['prune.target_density']} contradicts prune.masks_from (the source's masks "
                  f"fix the densities); give prune.levels, or neither to train all of the source's levels")
        if c["prune.layer_rates"]:
            _fail("prune.layer_rates contradicts prune.masks_from (the source's masks fix every layer's density)")
    defaults_now = defaults()
    for key in SPARSE_TRAINING_KEYS:  # settings of a mask-update schedule, and no schedule to use them
        if c[key] != defaults_now[key] and not kind.updates_masks:
            _fail(f"{key}={c[key]} needs prune.training_type={' or '.join(sparse_types().split(', '))}, not "
                  f"{kind.name}, whose masks do not change during training")
    rewind_iteration = c["prune.rewind_iteration"]
    for key in ("prune.rewind_epoch", "prune.rewind_iteration"):  # a rewind point, and nothing that rewinds to it
        if c[key] and not kind.captures_rewind:
            _fail(f"{key}={c[key]} needs {rewinding_types()}, not {kind.name}, which does not rewind")
    if c["prune.finetune_lr"] is not None and not kind.fine_tunes:
        _fail(f"prune.finetune_lr={c['prune.finetune_lr']} needs {fine_tuning_types()}, not {kind.name}, which does "
              f"not fine-tune at a constant rate")
    if rewind_iteration:
        if c["prune.rewind_epoch"]:
            _fail(f"prune.rewind_iteration={rewind_iteration} and prune.rewind_epoch={c['prune.rewind_epoch']} both "
                  f"set; give one")
    if c["prune.layer_rates"]:
        if c["prune.allocation"] != "uniform":
            _fail(f"prune.layer_rates are per-layer densities: they need prune.allocation=uniform, not "
                  f"{c['prune.allocation']}")
        if kind.one_shot:
            _fail(f"prune.layer_rates need an iterative run (imp, wr or lrr); {kind.name} prunes once to "
                  f"prune.target_density")
        if c["prune.target_density"] is not None:
            _fail(f"prune.layer_rates and prune.target_density={c['prune.target_density']} both set; with per-layer "
                  f"rates give prune.levels")
    if is_import_path(c["model.name"]):
        try:
            import_callable(c["model.name"], keywords=("num_classes",))
        except UserCodeError as error:
            _fail(f"model.name: {error}")
    if is_import_path(c["prune.criterion"]):
        try:
            user_criterion(c["prune.criterion"])
        except ValueError as error:
            _fail(f"prune.criterion: {error}")


def help_text() -> str:
    config = declare_sections()
    lines = [USAGE, "", "Keys (YAML: section: {key: value}; command line: --section.key=value):"]
    current = None
    for path, param in config.entries.items():
        section = path[0]
        if section != current:
            current = section
            lines.append(f"\n[{section}] {config.sections[(section,)].desc}")
        default = "REQUIRED" if param.required else repr(param.default)
        lines.append(f"  {'.'.join(path):28s} {param.desc}. Allowed: {param.checker.help()}. Default: {default}")
    return "\n".join(lines)


def load_config_on_every_rank(argv: Optional[Sequence[str]]):
    """load_config, with its message (or --help) printed by rank 0 only: every rank parses
    the same files, so every rank fails the same way.  -> the config, or the exit status to
    end with."""
    from utils.core.distributed import rank_from_env

    quiet = rank_from_env() != 0
    sink = io.StringIO()
    try:
        with redirect_stderr(sink if quiet else sys.stderr), redirect_stdout(sink if quiet else sys.stdout):
            return load_config(argv)
    except SystemExit as exit_request:
        code = exit_request.code
        return code if isinstance(code, int) else (0 if code is None else EXIT_CONFIG_ERROR)


def load_config(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Parse argv, print help or a one-line error (exit 2), else return the resolved config."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        config_path, overrides, wants_help = parse_argv(argv)
        if wants_help:
            print(help_text())
            sys.exit(0)
        if config_path is None:
            _fail(f"no config given. {USAGE}")
        return resolve(config_path, overrides)
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        sys.exit(EXIT_CONFIG_ERROR)


_DEFAULTS: Optional[Dict[str, Any]] = None


def defaults() -> Dict[str, Any]:
    """Every declared key's default (required keys: None)."""
    global _DEFAULTS
    if _DEFAULTS is None:
        previous = get_current_config()
        config = declare_sections()
        _DEFAULTS = {".".join(path): (None if param.required else param.default) for path, param in config.entries.items()}
        set_current_config(previous)
    return dict(_DEFAULTS)


def with_defaults(resolved: Dict[str, Any]) -> Dict[str, Any]:
    """``resolved`` with the keys it lacks (a config from before they existed) at their defaults."""
    return {**defaults(), **current_key_names(resolved)}


def differing_keys(a: Dict[str, Any], b: Dict[str, Any]) -> List[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
