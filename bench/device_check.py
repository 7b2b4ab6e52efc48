"""Every GPU figure in one command of under 8 minutes: the device check.

    python bench/device_check.py --out DIR                 # on the lent GPU machine (one H100/H200)
    python bench/device_check.py --cpu --tiny --out DIR    # the rehearsal: every section on CPU, tiny sizes
    python bench/device_check.py --smoke                   # one section of the rehearsal (seconds)

Runs on the lent machine as it is: its own torch, no ffcv (the synthetic ``.beton`` files are
written by bench/synthetic_beton.py and read by the ``memory`` and ``torch`` loaders), no
internet; the pure-Python packages it lacks come as wheels (scripts/device_wheels.sh prints the
command).  Nothing imported at start-up imports ffcv.

Sections, in this order, each in its own child process with its own time budget (a section that
runs out of time says so and the check goes on; a section that does not stop is killed, with what
it had measured kept):

  throughput       bench/train_throughput.py's cases: a (plain loop), b (the harness's step),
                   c (the harness end to end: memory loader at 32 px, torch loader for ImageNet),
                   bf16 + channels_last; then the same compiled while the time allows; b/a, c/a.
  masked_overhead  masked / dense training step (bench/masked_overhead.py): ResNet-20, ResNet-18,
                   ResNet-50.
  runs_per_device  aggregate ResNet-20 images/s of K = 1, 2, 4 runs sharing the device
                   (bench/runs_per_gpu.py).
  precision        the harness's step in fp32, bf16, fp16 + GradScaler, bf16 + channels_last,
                   bf16 + channels_last + compile: each ran, loss finite, masks held, images/s.
  pruning          magnitude masks on the device equal the CPU ones; SNIP and SynFlow (100 rounds)
                   on ResNet-50, seconds (bench/pruning_speed.py).
  distributed      torchrun, one process, NCCL: a 1-epoch, 2-level run of the harness on the digits;
                   the same with gloo for comparison.
  configs          every config under configs/ for one short level (1 epoch, 1 level; at_init
                   configs prune at level 0) on a synthetic .beton of its dataset's format
                   (ImageNet: generated JPEGs in an ImageFolder tree), memory loader where the
                   dataset allows it, else torch: status and images/s.

Written as it goes: ``DIR/device_check.json`` and ``DIR/device_check.md`` are re-rendered after
every measured item from ``DIR/sections/NAME.json``; each section's output is in
``DIR/logs/NAME.log``.  A killed run leaves everything measured up to then.  Figures are
recorded, never asserted; the targets (b/a >= 0.97, K = 4 >= 3x one run, ...) are written beside
them.  ``--tiny`` sizes are for rehearsal only: their figures mean nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import math
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

from utils.core.atomic_io import atomic_write_text

TOTAL_LIMIT_S = 450.0          # the whole check on the GPU: under 8 minutes with start-up and pip install
GRACE_S = 15.0                 # a section past its budget by this much is killed
RESERVE_PER_SECTION_S = 8.0    # kept back for each section still to come (its start-up)


@dataclass(frozen=True)
class SectionPlan:
    name: str
    budget_s: float            # on the GPU
    tiny_budget_s: float       # --tiny (CPU rehearsal); generous, only a guard against a hang
    summary: str


PLANS = [
    SectionPlan("throughput", 125, 150, "a / b / c images/s of train_throughput's cases, eager then compiled"),
    SectionPlan("masked_overhead", 25, 60, "masked / dense step time"),
    SectionPlan("runs_per_device", 45, 90, "aggregate images/s of K runs sharing the device"),
    SectionPlan("precision", 55, 60, "fp32 / bf16 / fp16 + GradScaler / channels_last / compile"),
    SectionPlan("pruning", 35, 60, "magnitude masks device == CPU; SNIP and SynFlow seconds"),
    SectionPlan("distributed", 45, 90, "torchrun, 1 process: NCCL and gloo"),
    SectionPlan("configs", 110, 180, "every shipped config, one short level"),
]
SECTIONS = [plan.name for plan in PLANS]
FINAL = {"ok", "failed", "timeout", "out_of_time", "skipped"}


# ------------------------------------------------------------------------------ files
def section_path(out: Path, name: str) -> Path:
    return out / "sections" / f"{name}.json"


def read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _cell(value) -> str:
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_cell(v) for v in value)
    return str(value).replace("|", "/").replace("\n", " ")


def render(out: Path) -> dict:
    """device_check.json and device_check.md from meta.json and the section files (any process may
    call this; the files are replaced atomically)."""
    meta = read_json(out / "meta.json") or {}
    sections = {}
    for name in meta.get("sections", SECTIONS):
        sections[name] = read_json(section_path(out, name)) or {"name": name, "status": "pending", "items": []}
    report = {"meta": meta, "sections": sections}
    atomic_write_text(out / "device_check.json", json.dumps(report, indent=1, sort_keys=False, default=str) + "\n")
    lines = ["# Device check", ""]
    if meta.get("tiny"):
        lines += ["**Rehearsal (`--tiny`): tiny sizes, the figures mean nothing.**", ""]
    for key in ("started_utc", "device", "torch", "cuda", "python", "platform", "commit", "command"):
        if meta.get(key) is not None:
            lines.append(f"- {key}: {_cell(meta[key])}")
    lines.append("")
    for name, section in sections.items():
        elapsed = section.get("elapsed_s")
        timing = f" ({elapsed:.0f} s of {section.get('budget_s', 0):.0f} s" if isinstance(elapsed, (int, float)) else ""
        if timing:
            timing += f", CPU {section['cpu_s']:.0f} s)" if isinstance(section.get("cpu_s"), (int, float)) else ")"
        lines += [f"## {name}: {section.get('status')}{timing}", ""]
        if section.get("error"):
            lines += [f"error: `{_cell(section['error'])}`", ""]
        items = section.get("items", [])
        if items:
            columns: List[str] = []
            for item in items:
                columns += [key for key in item if key not in columns]
            lines.append("| " + " | ".join(columns) + " |")
            lines.append("|" + "---|" * len(columns))
            for item in items:
                lines.append("| " + " | ".join(_cell(item.get(c, "")) for c in columns) + " |")
            lines.append("")
        for note in section.get("notes", []):
            lines.append(f"- {note}")
        if section.get("notes"):
            lines.append("")
    atomic_write_text(out / "device_check.md", "\n".join(lines) + "\n")
    return report


def one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())}"[:500]


# ------------------------------------------------------------------------------ a section's record
class Recorder:
    """A section's record: items appended as they are measured, the file and the report rewritten
    after each; ``item`` runs one measurement within the section's deadline."""

    def __init__(self, out: Path, name: str, deadline: float, budget_s: float):
        self.out, self.name, self.deadline = out, name, deadline
        self.started = time.time()
        self.record = {"name": name, "status": "running", "budget_s": budget_s, "elapsed_s": 0.0, "items": [],
                       "notes": []}
        self.save()

    def time_left(self) -> float:
        return self.deadline - time.time()

    def save(self) -> None:
        self.record["elapsed_s"] = time.time() - self.started
        atomic_write_text(section_path(self.out, self.name), json.dumps(self.record, indent=1, default=str) + "\n")
        render(self.out)

    def note(self, text: str) -> None:
        self.record["notes"].append(text)
        self.save()

    def add(self, item: dict) -> dict:
        self.record["items"].append(item)
        self.save()
        return item

    def item(self, name: str, function: Callable[[], dict], *, needs_s: float = 0.0) -> dict:
        """Run ``function`` -> figures, as item ``name``: 'ok', 'failed' (one line; traceback to the
        log), or 'out_of_time' (not started: fewer than ``needs_s`` seconds left)."""
        left = self.time_left()
        if left < needs_s:
            return self.add({"item": name, "status": "out_of_time",
                             "detail": f"{left:.0f} s left, needs about {needs_s:.0f} s"})
        print(f"[{self.name}] {name} ...", flush=True)
        started = time.perf_counter()
        try:
            figures = function() or {}
            item = {"item": name, "status": figures.pop("status", "ok"), **figures}
        except Exception as error:  # one item's failure is a figure too; the section goes on
            traceback.print_exc()
            item = {"item": name, "status": "failed", "error": one_line(error)}
        item["seconds"] = time.perf_counter() - started
        print(f"[{self.name}] {name}: {item['status']} ({item['seconds']:.1f} s)", flush=True)
        return self.add(item)

    def finish(self) -> None:
        statuses = {item["status"] for item in self.record["items"]}
        self.record["status"] = ("failed" if "failed" in statuses else
                                 "out_of_time" if "out_of_time" in statuses else "ok")
        self.save()


@dataclass
class Context:
    device: "object"           # torch.device
    tiny: bool
    work: Path                 # scratch: synthetic data, run directories
    out: Path

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def _synchronize(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # note: a CPU-GPU sync point, around timed blocks only


# ------------------------------------------------------------------------------ throughput
def section_throughput(rec: Recorder, ctx: Context) -> None:
    import train_throughput as tt
    if ctx.tiny:
        cases = [tt.Case("resnet20", 32, 16), tt.Case("resnet18", 48, 4)]
        sizes = ["--steps", "1", "--rounds", "1", "--warmup", "1", "--loader-batches", "2"]
        compile_cases, backend, needs = cases[:1], "eager", (5, 10)
    else:
        cases = list(tt.CASES)
        sizes = ["--steps", "10", "--rounds", "3", "--warmup", "3", "--loader-batches", "11"]
        # compile costs most; the small cases first, while the time allows
        compile_cases, backend, needs = cases[:3], "", (15, 45)
    device = "cpu" if not ctx.cuda else "cuda"

    def one(case, compiled: bool) -> dict:
        loader = "memory" if case.dataset != "imagenet" else "torch"
        argv = ["--devices", device, "--precision", "bf16", "--channels-last", "--loaders", loader,
                "--data-dir", str(ctx.work / "throughput"), *sizes]
        if compiled:
            argv += ["--compile"] + (["--compile-backend", backend] if backend else [])
        args = tt.parse_args(argv)
        (ctx.work / "throughput").mkdir(parents=True, exist_ok=True)
        row = tt.measure_case(case, ctx.device, args)
        c = row.get(f"c_{loader}")
        figures = {"case": case.label, "batch": case.batch, "loader": loader, "a_img_s": row["a"], "b_img_s": row["b"],
                   "c_img_s": c if isinstance(c, float) else str(c), "b/a": row["b"] / row["a"],
                   "c/a": c / row["a"] if isinstance(c, float) else None, "density": row["density"]}
        if compiled:
            figures.update({"a_eager_img_s": row["a_eager"], "compile_s": row["compile_s"]})
        return figures

    rec.note("a = plain loop, b = harness step (masks at density 0.2), c = b fed by the loader from a .beton; "
             "bf16 autocast on CUDA (CPU trains fp32), channels_last. Targets on one H100/H200: b/a >= 0.97; "
             "ResNet-20 batch 128 end to end <= 1.0 s per 50k images (c >= 50k img/s); ResNet-18 at 176 px >= 9.2k "
             "img/s; ResNet-50 at 224 px >= 3.5k img/s.")
    for case in cases:
        rec.item(f"{case.label} b{case.batch} eager", lambda case=case: one(case, False), needs_s=needs[0])
    for case in compile_cases:
        rec.item(f"{case.label} b{case.batch} compiled", lambda case=case: one(case, True), needs_s=needs[1])


# ------------------------------------------------------------------------------ masked_overhead
def section_masked_overhead(rec: Recorder, ctx: Context) -> None:
    import masked_overhead as mo
    if ctx.tiny:
        cases = [mo.Case("resnet20", 32, 8, 8), mo.Case("resnet18", 40, 2, 2), mo.Case("resnet50", 40, 2, 2)]
        repeats, warmup = 1, 0
    else:
        cases = [mo.Case("resnet20", 32, 128, 128), mo.Case("resnet18", 224, 32, 256),
                 mo.Case("resnet50", 224, 16, 128)]
        repeats, warmup = 5, 2
    rec.note("ratio = median masked step / median dense step (target <= 1.05); apply_ms = apply_masks_ alone.")
    for case in cases:
        def one(case=case) -> dict:
            row = mo.measure(case, ctx.device, repeats, warmup)
            return {key: row[key] for key in ("model", "batch", "dense_ms", "masked_ms", "ratio", "apply_ms",
                                              "density")}
        rec.item(f"{case.model}@{case.image_size}", one, needs_s=3)


# ------------------------------------------------------------------------------ runs_per_device
def section_runs_per_device(rec: Recorder, ctx: Context) -> None:
    import runs_per_gpu
    device = "cuda" if ctx.cuda else "cpu"
    if ctx.tiny:
        argv, ks = ["--batch", "8", "--steps", "1", "--warmup", "1"], [1, 2]
    else:
        argv, ks = ["--batch", "128", "--steps", "50", "--warmup", "10", "--precision", "bf16", "--channels-last"], [1, 2, 4]
    args = runs_per_gpu.parse_args(argv + ["--device", device, "--ks", ",".join(map(str, ks))])
    rec.note("ResNet-20 (masks at density 0.2), harness step on synthetic device tensors; images/s of all K runs "
             "together. Target: K = 4 >= 3x one run.")
    first = {}
    for k in ks:
        def one(k=k) -> dict:
            total = runs_per_gpu.measure(k, args)
            first.setdefault("value", total)
            return {"K": k, "batch": args.batch, "images_per_s": total, "per_run": total / k,
                    "x_one_run": total / first["value"]}
        rec.item(f"K={k}", one, needs_s=5 + 3 * k)


# ------------------------------------------------------------------------------ precision
def section_precision(rec: Recorder, ctx: Context) -> None:
    import torch
    import train_throughput as tt

    from utils.training.step import PRECISIONS
    # --tiny: LeNet-300-100 (fp16 convolutions on a CPU take seconds each; the rehearsal wants the path)
    case = tt.Case("lenet_300_100", 32, 8) if ctx.tiny else tt.Case("resnet20", 32, 512)
    steps, warmup = (2, 1) if ctx.tiny else (30, 5)
    variants = [("fp32", "fp32", False, False), ("bf16", "bf16", False, False), ("fp16+GradScaler", "fp16", False, False),
                ("bf16+channels_last", "bf16", True, False), ("bf16+channels_last+compile", "bf16", True, True)]
    backend = "eager" if ctx.tiny else True
    rec.note(f"the harness's TrainingStep + train_epoch on {case.label} batch {case.batch} (masks at density 0.2); "
             "loss = mean over the timed steps; autocast in the named dtype on this device.")

    def one(precision: str, channels_last: bool, compiled: bool) -> dict:
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        harness = tt.HarnessStep(case, ctx.device, memory_format, PRECISIONS[precision], compiled and backend)
        harness.run(warmup)                      # first steps: compilation, cuDNN autotuning
        _synchronize(ctx.device)
        started = time.perf_counter()
        state = harness.epoch_over(((harness.images, harness.labels) for _ in range(steps)), steps)
        _synchronize(ctx.device)
        seconds = time.perf_counter() - started
        loss = float(state.sums[0] / state.sums[2])
        harness.check_masks()
        scaler = harness.step.scaler
        figures = {"images_per_s": steps * case.batch / seconds, "loss": loss, "loss_finite": math.isfinite(loss),
                   "grad_scale": scaler.get_scale() if scaler.is_enabled() else None}
        if not math.isfinite(loss):
            figures["status"] = "failed"
        return figures

    for name, precision, channels_last, compiled in variants:
        rec.item(name, lambda p=precision, c=channels_last, k=compiled: one(p, c, k), needs_s=3 if not compiled else 20)


# ------------------------------------------------------------------------------ pruning
def section_pruning(rec: Recorder, ctx: Context) -> None:
    import pruning_speed as ps
    import torch
    import torchvision

    from utils.models.mask_layers import prepare_model
    from utils.pruning import criteria
    from utils.pruning import masks as pruning_masks
    name, side, rounds, snip_runs = ("resnet18", 32, 2, 1) if ctx.tiny else ("resnet50", 224, 100, 3)
    torch.manual_seed(0)
    model = prepare_model(torchvision.models.get_model(name)).to(ctx.device)
    seed = ps.draw_weights_without_tie_at_cut(model, 0)
    rec.note(f"torchvision {name}, global allocation, density {ps.DENSITY}; SNIP on 1 batch of 8 at {side} px; "
             f"SynFlow {rounds} rounds at {side} px in {criteria.synflow_dtype(ctx.device)}.")

    def magnitude() -> dict:
        seconds, on_device = ps.timed(lambda: pruning_masks.compute_masks(
            model, density=ps.DENSITY, criterion="magnitude", allocation="global"), ctx.device)
        on_cpu = pruning_masks.compute_masks(copy.deepcopy(model).cpu(), density=ps.DENSITY, criterion="magnitude",
                                             allocation="global")
        equal = all(torch.equal(on_device[k].cpu(), on_cpu[k]) for k in on_cpu) and on_device.keys() == on_cpu.keys()
        figures = {"device_s": seconds, "masks_equal_cpu": equal, "weight_seed": seed,
                   "kept": sum(int(m.sum()) for m in on_cpu.values())}
        if not equal:
            figures["status"] = "failed"
        return figures

    rec.item("magnitude: device masks == CPU masks", magnitude, needs_s=3)
    rec.item("SNIP", lambda: {"seconds": ps.time_snip(model, ctx.device, side, snip_runs)}, needs_s=3)

    def synflow() -> dict:
        seconds, per_round = ps.time_synflow(model, ctx.device, side, rounds)
        return {"rounds": rounds, "seconds": seconds, "per_round_s": per_round}
    rec.item(f"SynFlow {rounds} rounds", synflow, needs_s=5)


# ------------------------------------------------------------------------------ distributed
def digits_data(ctx: Context):
    import synthetic_beton
    return synthetic_beton.synthetic_dataset("digits", ctx.work / "data", train=0, test=0)


def last_epoch_row(run_dir: Path) -> dict:
    import csv
    with open(run_dir / "epochs.csv") as handle:
        rows = list(csv.DictReader(handle))
    return rows[-1] if rows else {}


def section_distributed(rec: Recorder, ctx: Context) -> None:
    import yaml
    train, test = digits_data(ctx)
    config = {
        "model": {"name": "lenet_300_100"},
        "dataset": {"name": "digits", "train_path": str(train), "test_path": str(test), "batch_size": 64,
                    "num_workers": 1, "loader": "memory"},
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4},
        "schedule": {"name": "cosine"},
        "training": {"epochs": 1, "progress": False, "device": "cuda" if ctx.cuda else "cpu"},
        "prune": {"criterion": "magnitude", "allocation": "global", "training_type": "imp", "rate": 0.2, "levels": 2},
        "experiment": {"name": "x", "base_dir": str(ctx.work / "distributed"), "seed": 0},
    }
    path = ctx.work / "distributed.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    rec.note("torchrun --standalone --nproc_per_node=1 harness.py: LeNet-300-100 on the digits, 1 epoch per level, "
             "2 levels (one pruning step), memory loader.")

    def one(backend: str) -> dict:
        if backend == "nccl" and not ctx.cuda:
            return {"status": "skipped", "detail": "NCCL needs CUDA"}
        name = f"torchrun_{backend}"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                   "harness.py", "--config", str(path), f"--distributed.backend={backend}",
                   f"--experiment.name={name}"]
        started = time.perf_counter()
        left = max(5.0, rec.time_left())
        try:
            run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=left,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"})
        except subprocess.TimeoutExpired:
            return {"status": "out_of_time", "detail": f"killed after {left:.0f} s"}
        seconds = time.perf_counter() - started
        print(run.stdout[-2000:], run.stderr[-4000:], sep="\n", flush=True)
        if run.returncode != 0:
            last = (run.stderr.strip().splitlines() or ["(no output)"])[-1]
            return {"status": "failed", "exit": run.returncode, "wall_s": seconds, "error": last[:300]}
        row = last_epoch_row(ctx.work / "distributed" / name)
        return {"exit": 0, "wall_s": seconds, "images_per_s": float(row.get("images_per_s") or "nan"),
                "test_acc": float(row.get("test_acc") or "nan")}

    for backend in ("nccl", "gloo"):
        rec.item(backend, lambda b=backend: one(b), needs_s=8)


# ------------------------------------------------------------------------------ configs
def shipped_configs() -> List[Path]:
    return sorted((ROOT / "configs").glob("*.yaml"))


def short_config(config: dict, ctx: Context, data: Dict[str, tuple], name: str) -> dict:
    """A shipped config made one short level on synthetic data: 1 epoch, 1 level where it sets
    ``prune.levels`` (at_init configs prune at level 0 anyway), every epoch-valued setting (LR
    milestones, warm-up, peak, step size, the progressive-resizing ramp, the rewind epoch) scaled
    into that one epoch, the memory loader where the dataset allows it (else torch)."""
    from utils.data.memory_loader import check_memory_loader_spec
    from utils.data.sources import DataError
    from utils.data.specs import get_dataset_spec
    short = copy.deepcopy(config)
    dataset = short["dataset"]
    spec = get_dataset_spec(dataset["name"])
    try:
        check_memory_loader_spec(spec)
        fits_memory = True
    except DataError:
        fits_memory = False
    train, test = data[dataset["name"]]
    dataset.update({"train_path": str(train), "test_path": str(test), "loader": "memory" if fits_memory else "torch",
                    "num_workers": min(int(dataset.get("num_workers", 4)), os.cpu_count() or 1)})
    training = short.setdefault("training", {})
    scale = 1.0 / float(training.get("epochs", 10))
    training.update({"epochs": 1, "progress": False, "device": "cuda" if ctx.cuda else "cpu"})
    schedule = short.setdefault("schedule", {})
    for key in ("warmup_epochs", "peak_epoch", "step_size"):
        if key in schedule:
            schedule[key] = float(schedule[key]) * scale
    if "milestones" in schedule:
        schedule["milestones"] = [float(m) * scale for m in schedule["milestones"]]
    if short.get("resolution", {}).get("end_epoch"):
        short["resolution"].update({"start_epoch": 0, "end_epoch": 1})
    prune = short.setdefault("prune", {})
    if prune.get("levels") is not None:
        prune["levels"] = 2 if prune.get("early_bird") else 1     # Early-Bird needs a level to end early into
    if prune.get("rewind_epoch"):
        prune["rewind_epoch"] = 0
    if ctx.tiny:
        dataset["batch_size"] = 8
        if spec.name == "imagenet":                 # 32 px crops instead of 160-256 px
            dataset.update({"resolution": 32, "eval_resolution": 32})
            if short.get("resolution", {}).get("end_epoch"):
                short["resolution"].update({"start_res": 32, "end_res": 32})
        if prune.get("criterion") == "synflow":
            prune["synflow_iterations"] = 2
    short["experiment"] = {**short.get("experiment", {}), "name": name, "base_dir": str(ctx.work / "configs")}
    return short


def section_configs(rec: Recorder, ctx: Context) -> None:
    import synthetic_beton
    import yaml
    configs = shipped_configs()
    loaded = {path.stem: yaml.safe_load(path.read_text()) for path in configs}
    datasets = sorted({config["dataset"]["name"] for config in loaded.values()})
    largest_batch = {d: max(int(c["dataset"].get("batch_size", 128)) for c in loaded.values()
                            if c["dataset"]["name"] == d) for d in datasets}
    data: Dict[str, tuple] = {}
    rec.note("each config on a synthetic .beton of its dataset's format, 1 epoch, prune.levels=1 where it sets "
             "levels (2 for Early-Bird), its epoch-valued settings (milestones, warm-up, peak, ramp, rewind epoch) scaled into that "
             "epoch, memory loader where the dataset allows it (else torch)" +
             ("; --tiny: batch 8, 2 SynFlow rounds, ImageNet at 32 px" if ctx.tiny else "") +
             ". images_per_s: from the run's epochs.csv (steady state, first batch left out).")
    for dataset in datasets:
        batch = 8 if ctx.tiny else largest_batch[dataset]
        train_count = (3 * batch if dataset == "imagenet" else 10 * batch) if not ctx.tiny else 2 * batch + 4
        test_count = batch if ctx.tiny else min(train_count, 2048)

        def write(dataset=dataset, train_count=train_count, test_count=test_count) -> dict:
            data[dataset] = synthetic_beton.synthetic_dataset(
                dataset, ctx.work / "data", train=train_count, test=test_count,
                imagenet_side=80 if ctx.tiny else 160)
            from utils.data.beton import BetonFile
            return {"train_samples": BetonFile(data[dataset][0]).num_samples,
                    "test_samples": BetonFile(data[dataset][1]).num_samples}
        rec.item(f"data: {dataset}", write, needs_s=2)
    for path in configs:
        config = loaded[path.stem]
        if config["dataset"]["name"] not in data:
            rec.add({"item": path.name, "status": "failed", "error": "its synthetic data was not written"})
            continue
        rec.item(path.name, lambda path=path, config=config: run_config(path, config, ctx, data), needs_s=4)


def run_config(path: Path, config: dict, ctx: Context, data: Dict[str, tuple]) -> dict:
    """One shipped config through harness.main, in this process (no start-up per config)."""
    import gc

    import torch
    import yaml

    import harness
    name = path.stem
    short = ctx.work / "configs" / f"{name}.yaml"
    short.parent.mkdir(parents=True, exist_ok=True)
    short.write_text(yaml.safe_dump(short_config(config, ctx, data, name), sort_keys=False))
    argv = ["--config", str(short)]
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors):
        status = harness.main(argv)
    sys.stderr.write(errors.getvalue()[-4000:])
    gc.collect()
    if ctx.cuda:
        torch.cuda.empty_cache()
    if status != 0:
        last = (errors.getvalue().strip().splitlines() or ["(no message)"])[-1]
        return {"status": "failed", "exit": status, "error": last[:300]}
    row = last_epoch_row(ctx.work / "configs" / name)
    return {"exit": 0, "model": config["model"]["name"], "dataset": config["dataset"]["name"],
            "batch": 8 if ctx.tiny else config["dataset"].get("batch_size"),
            "images_per_s": float(row.get("images_per_s") or "nan"), "test_acc": float(row.get("test_acc") or "nan")}


SECTION_FUNCTIONS: Dict[str, Callable[[Recorder, Context], None]] = {
    "throughput": section_throughput, "masked_overhead": section_masked_overhead,
    "runs_per_device": section_runs_per_device, "precision": section_precision, "pruning": section_pruning,
    "distributed": section_distributed, "configs": section_configs,
}


# ------------------------------------------------------------------------------ the child: one section
def run_section(args) -> int:
    import torch
    device = torch.device("cpu" if args.cpu else "cuda")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if args.tiny:
        torch.set_num_threads(1)     # tiny steps gain nothing from a second thread on a shared machine
    budget = args.budget_s if args.budget_s is not None else args.deadline - time.time()
    rec = Recorder(Path(args.out), args.run_section, args.deadline, budget)
    ctx = Context(device=device, tiny=args.tiny, work=Path(args.work), out=Path(args.out))
    try:
        SECTION_FUNCTIONS[args.run_section](rec, ctx)
    except Exception as error:       # the section's set-up failed: say so, keep what it measured
        traceback.print_exc()
        rec.record["error"] = one_line(error)
        rec.add({"item": "(section)", "status": "failed", "error": one_line(error)})
    rec.finish()
    return 0


# ------------------------------------------------------------------------------ the parent
def environment(args, device_name: str) -> dict:
    import torch
    commit = None
    with contextlib.suppress(Exception):
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    return {"started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "device": device_name,
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "platform": platform.platform(), "cpus": os.cpu_count(), "commit": commit, "tiny": args.tiny,
            "cpu": args.cpu, "sections": args.sections,
            "command": "python bench/device_check.py " + " ".join(args.argv)}


def run_all(args) -> int:
    import torch
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    for name in args.sections:                      # a fresh check: no section of an earlier one
        with contextlib.suppress(FileNotFoundError):
            section_path(out, name).unlink()
    device_name = "CPU" if args.cpu else torch.cuda.get_device_name()
    atomic_write_text(out / "meta.json", json.dumps(environment(args, device_name), indent=1) + "\n")
    render(out)
    work = Path(tempfile.mkdtemp(prefix="device-check-"))
    started = time.time()
    total = args.total_s if args.total_s else (math.inf if args.tiny else TOTAL_LIMIT_S)
    plans = [p for p in PLANS if p.name in args.sections]
    banked = 0.0
    print(f"device check on {device_name}: sections {', '.join(args.sections)}; writing {out}", flush=True)
    try:
        for index, plan in enumerate(plans):
            planned = (plan.tiny_budget_s if args.tiny else plan.budget_s) * args.budget_scale
            later = RESERVE_PER_SECTION_S * (len(plans) - index - 1)
            budget = max(1.0, min(planned + banked, total - (time.time() - started) - later))
            section_started = time.time()
            children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
            command = [sys.executable, str(Path(__file__).resolve()), "--run-section", plan.name, "--out", str(out),
                       "--work", str(work), "--deadline", str(section_started + budget), "--budget-s", str(budget)]
            command += (["--cpu"] if args.cpu else []) + (["--tiny"] if args.tiny else [])
            print(f"== {plan.name}: budget {budget:.0f} s", flush=True)
            with open(out / "logs" / f"{plan.name}.log", "w") as log:
                child = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
                try:
                    code = child.wait(timeout=budget + args.grace_s)
                except subprocess.TimeoutExpired:
                    os.killpg(child.pid, signal.SIGKILL)   # the section and whatever it started
                    child.wait()
                    code = None
            used = time.time() - section_started
            banked = max(0.0, planned + banked - used)
            record = read_json(section_path(out, plan.name)) or {"name": plan.name, "items": [], "notes": []}
            children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
            record["budget_s"], record["elapsed_s"] = budget, used
            # CPU seconds of the section and all it started (waited for): a shared machine's wall
            # time says little, this says what the section costs
            record["cpu_s"] = (children_after.ru_utime + children_after.ru_stime
                               - children_before.ru_utime - children_before.ru_stime)
            if code is None:
                record["status"] = "timeout"
                record["error"] = f"killed {args.grace_s:.0f} s past its {budget:.0f} s budget; items above were measured"
            elif code != 0 or record.get("status") not in FINAL:
                tail = (out / "logs" / f"{plan.name}.log").read_text(errors="replace").strip().splitlines()[-1:]
                record["status"] = "failed"
                record["error"] = f"exit {code}: {tail[0][:300] if tail else '(no output)'}"
            atomic_write_text(section_path(out, plan.name), json.dumps(record, indent=1, default=str) + "\n")
            render(out)
            print(f"   {plan.name}: {record['status']} in {used:.0f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = render(out)
    print(f"done in {time.time() - started:.0f} s: {out / 'device_check.md'}")
    for name, section in report["sections"].items():
        print(f"  {name:<16} {section.get('status'):<12} {section.get('elapsed_s', 0):6.0f} s wall "
              f"{section.get('cpu_s', 0):6.0f} s CPU")
    return 0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="folder for device_check.json, device_check.md, logs/")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (the rehearsal; the figures are not GPU's)")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: every code path in minutes, figures meaningless")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list, in this order: {','.join(SECTIONS)}")
    parser.add_argument("--budget-scale", type=float, default=1.0, help="multiply every section's time budget")
    parser.add_argument("--total-s", type=float, default=0.0,
                        help=f"the whole check's limit in seconds (default {TOTAL_LIMIT_S:.0f}; --tiny: none)")
    parser.add_argument("--grace-s", type=float, default=GRACE_S,
                        help=f"seconds past its budget before a section is killed (default {GRACE_S:.0f})")
    parser.add_argument("--smoke", action="store_true", help="--cpu --tiny --sections precision into a temp folder")
    parser.add_argument("--run-section", default=None, help=argparse.SUPPRESS)   # the child's entry
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--budget-s", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.smoke:
        args.cpu, args.tiny, args.sections = True, True, "precision"
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown or not sections:
        parser.exit(2, f"device_check: --sections {','.join(unknown) or '(empty)'}: unknown; "
                       f"allowed: {','.join(SECTIONS)}\n")
    args.sections = [s for s in SECTIONS if s in sections]
    if args.run_section is not None:
        if args.run_section not in SECTIONS or not (args.out and args.work and args.deadline):
            parser.exit(2, "device_check: --run-section is internal (NAME, --out, --work and --deadline)\n")
        return args
    if args.out is None and not args.smoke:
        parser.exit(2, "device_check: --out DIR is required (where device_check.json and .md go)\n")
    if args.budget_scale <= 0 or args.total_s < 0 or args.grace_s < 0:
        parser.exit(2, "device_check: --budget-scale must be > 0, --total-s and --grace-s >= 0\n")
    if not args.cpu:
        import torch
        if not torch.cuda.is_available():
            parser.exit(2, "device_check: no CUDA device here; --cpu --tiny rehearses every section on the CPU\n")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.run_section is not None:
        return run_section(args)
    if args.out is None:                         # --smoke without --out
        with tempfile.TemporaryDirectory(prefix="device-check-smoke-") as scratch:
            args.out = scratch
            code = run_all(args)
            print((Path(scratch) / "device_check.md").read_text())
            return code
    return run_all(args)


if __name__ == "__main__":
    sys.exit(main())
