"""Training throughput: the limit (a plain PyTorch loop), the harness's step, the harness end to end.

For each case (model, image size, batch) and device, in one process, images/s of

  a  plain loop: the bare torchvision/CIFAR model, synthetic images and labels already on the
     device, forward + cross-entropy + backward + SGD (momentum 0.9, Nesterov, weight decay
     5e-5): what this model can do on this device with this precision / memory format /
     compile setting, nothing else.  The limit.
  b  the harness's training step (utils.training.step.TrainingStep inside utils.training.step.train_epoch):
     the same model made prunable (utils.models.mask_layers.prepare_model) with magnitude masks at
     density 0.2 (utils.pruning.masks.compute_masks), the harness's optimizer builder and LR
     schedule, apply_masks_ after every step, the epoch's on-device sums; the same synthetic
     tensors as a.
  c  the harness end to end: b fed by utils.data.loaders.make_loader (back-end per --loaders) from a
     synthetic .beton written by bench/synthetic_beton.py, no ffcv needed (CIFAR-10 layout for 32 px cases,
     ImageNet layout, JPEG and raw mixed, for the others).  Steady state: the loader's first
     epoch (ffcv's pipeline compilation) is a warm-up, and each timed epoch starts its clock
     after its first batch (pipeline start-up is paid once per epoch, not per batch).

Ratios b/a and c/a are printed (targets on one H100/H200: b/a >= 0.97, c/a >= 0.9 once warm).  The three are
interleaved round by round (order rotating) and each figure is the median over rounds, so
a shared machine's drift hits all three alike.

    python bench/train_throughput.py --quick                     # CPU smoke run, ~1-2 min
    python bench/train_throughput.py --devices cuda --precision bf16 --channels-last
    python bench/train_throughput.py --devices cuda --precision bf16 --channels-last --compile
    python bench/train_throughput.py --models resnet20 --compile --devices cpu   # compile time / speed-up

Cases: resnet20@32 batch 128 and 512, resnet18@32 (CIFAR ResNet-18) batch 512,
resnet18@176 batch 256, resnet50@224 batch 256 (ImageNet, 1000 classes).  ``--quick``:
resnet20@32 batch 128, few steps.  With ``--compile`` every model (a, b, c) is compiled
(torch.compile, default mode), and the table adds the eager plain loop, the compiled/eager
speed-up of the plain loop and the compile time (first compiled step minus a warm step).
Precision: bf16/fp16 autocast on CUDA; on CPU the harness trains in fp32, and so does this
bench (a note says so).  Figures are printed, never asserted.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
sys.path.insert(0, str(Path(__file__).resolve().parent))      # the other bench modules

import harness_utils  # noqa: E402
from utils.data import writer as write_beton
from utils.data.loaders import LOADER_BACKENDS, make_loader
from utils.data.sources import DataError
from utils.data.specs import get_dataset_spec
from utils.models import mask_layers
from utils.models.registry import get_model
from utils.pruning.masks import compute_masks
from utils.training.schedulers import LRSchedule, ScheduleSpec
from utils.training.step import PRECISIONS, EpochState, TrainingStep, autocast, train_epoch

DENSITY = 0.2            # fraction of prunable weights kept in b and c
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 5e-5
SYNTHETIC_IMAGENET_SIDE = 256   # px, the stored side of the synthetic ImageNet images


@dataclass(frozen=True)
class Case:
    model: str
    image_size: int
    batch: int

    @property
    def dataset(self) -> str:
        return "cifar10" if self.image_size == 32 else "imagenet"

    @property
    def label(self) -> str:
        return f"{self.model}@{self.image_size}"


CASES = [Case("resnet20", 32, 128), Case("resnet20", 32, 512), Case("resnet18", 32, 512),
         Case("resnet18", 176, 256), Case("resnet50", 224, 256)]
QUICK_CASES = [Case("resnet20", 32, 128)]
SMOKE_CASES = [Case("resnet20", 32, 16)]


# ------------------------------------------------------------------------------ helpers
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # note: a CPU-GPU sync point, only around timed blocks


class Clock:
    """Wall seconds of a block, with the device's queued work included."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        synchronize(self.device)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        synchronize(self.device)
        self.seconds = time.perf_counter() - self.start


def synthetic_batch(case: Case, device: torch.device, memory_format, seed: int = 0):
    spec = get_dataset_spec(case.dataset)
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(case.batch, 3, case.image_size, case.image_size, generator=generator)
    labels = torch.randint(0, spec.num_classes, (case.batch,), generator=generator)
    return images.to(device, memory_format=memory_format), labels.to(device)


def build_model(case: Case, device: torch.device, memory_format, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    spec = get_dataset_spec(case.dataset)
    model = get_model(case.model, num_classes=spec.num_classes, image_size=case.image_size)
    return model.to(device=device, memory_format=memory_format).train()


def maybe_compile(model: torch.nn.Module, compile_model) -> torch.nn.Module:
    """``compile_model``: False (eager), True (torch.compile's default back-end) or a back-end name
    (e.g. ``aot_eager``: the compile path without code generation, for rehearsals on CPU)."""
    if not compile_model:
        return model
    return torch.compile(model) if compile_model is True else torch.compile(model, backend=compile_model)


# ------------------------------------------------------------------------------ a: plain loop
class PlainLoop:
    """The limit: nothing but forward, loss, backward, optimizer step."""

    def __init__(self, case: Case, device, memory_format, autocast_dtype, compile_model: bool):
        self.model = build_model(case, device, memory_format)
        self.train_model = maybe_compile(self.model, compile_model)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=LR, momentum=MOMENTUM, nesterov=True,
                                         weight_decay=WEIGHT_DECAY)
        self.scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)
        self.autocast_dtype = autocast_dtype
        self.device = device
        self.images, self.labels = synthetic_batch(case, device, memory_format)

    def step(self) -> None:
        with autocast(self.device, self.autocast_dtype):
            loss = F.cross_entropy(self.train_model(self.images), self.labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def run(self, steps: int) -> None:
        for _ in range(steps):
            self.step()


# ------------------------------------------------------------------------------ b, c: the harness
class HarnessStep:
    """utils.training.step.TrainingStep + train_epoch on a masked model (density 0.2)."""

    def __init__(self, case: Case, device, memory_format, autocast_dtype, compile_model: bool):
        self.device = device
        model = mask_layers.prepare_model(build_model(case, device, memory_format))
        masks = compute_masks(model, density=DENSITY, criterion="magnitude", allocation="global")
        mask_layers.set_masks(model, masks)
        self.density = mask_layers.overall_density(model)
        optimizer = harness_utils.build_optimizer(model.parameters(), name="sgd", lr=LR, momentum=MOMENTUM,
                                                  nesterov=True, weight_decay=WEIGHT_DECAY)
        schedule = LRSchedule(optimizer, ScheduleSpec(name="cosine", epochs=10_000, iterations_per_epoch=100))
        scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)
        self.step = TrainingStep(train_model=maybe_compile(model, compile_model), model=model, optimizer=optimizer,
                                 schedule=schedule, scaler=scaler, autocast_dtype=autocast_dtype)
        self.images, self.labels = synthetic_batch(case, device, memory_format)
        self.epoch = 0

    def epoch_over(self, batches, total: int) -> EpochState:
        state = EpochState(epoch=self.epoch, total_batches=total, lr_at_start=self.step.schedule.lr)
        self.epoch += 1
        return train_epoch(self.step, batches, state, device=self.device)

    def run(self, steps: int) -> None:
        """b: ``steps`` steps on the synthetic tensors, through train_epoch."""
        self.epoch_over(((self.images, self.labels) for _ in range(steps)), steps)

    def check_masks(self) -> None:
        for name, layer in mask_layers.masked_layers(self.step.model):
            assert bool((layer.weight[~layer.mask] == 0).all()), f"{name}: a pruned weight is not zero"


def write_synthetic_beton(case: Case, directory: Path, num_samples: int) -> Path:
    """A training .beton in the case's dataset layout (CIFAR-10: random pixels; ImageNet: photo-like
    images stored JPEG and raw mixed, as utils.write_beton stores ImageNet), written without ffcv by
    bench/synthetic_beton.py, so it works where ffcv is not installed."""
    import synthetic_beton
    spec = get_dataset_spec(case.dataset)
    # ImageNet cases crop what they need from the same stored images: one file for all their sizes
    stored = SYNTHETIC_IMAGENET_SIDE if case.dataset == "imagenet" else case.image_size
    path = directory / f"{case.dataset}_{stored}px_{num_samples}.beton"
    if path.exists():
        return path
    if case.dataset == "imagenet":
        source = synthetic_beton.photo_like_images(num_samples, SYNTHETIC_IMAGENET_SIDE, spec.num_classes)
        options = dict(max_resolution=write_beton.DEFAULT_MAX_RESOLUTION, jpeg_quality=write_beton.DEFAULT_JPEG_QUALITY,
                       compress_probability=write_beton.DEFAULT_COMPRESS_PROBABILITY)
    else:
        source, options = synthetic_beton.random_images(spec, num_samples), {}
    return synthetic_beton.write_beton_numpy(source, path, spec, split="train", **options)


class EndToEnd:
    """c: the harness step fed by a .beton loader; one loader epoch = ``steps_per_epoch`` batches."""

    def __init__(self, harness: HarnessStep, case: Case, beton: Path, backend: str, device, channels_last: bool,
                 num_workers: int):
        self.harness = harness
        spec = get_dataset_spec(case.dataset)
        resolution = case.image_size if spec.name == "imagenet" else None
        self.loader = make_loader(beton, spec, train=True, batch_size=case.batch, num_workers=num_workers,
                                  device=device, channels_last=channels_last, backend=backend,
                                  resolution=resolution)
        self.device = device
        self.epoch = 0

    def warm_up(self) -> float:
        """One full epoch (ffcv compiles its pipeline here); -> its seconds."""
        with Clock(self.device) as clock:
            self._epoch()
        return clock.seconds

    def _epoch(self, after_first: Optional[Callable[[], None]] = None) -> None:
        batches = self.loader.batches(self.epoch)
        self.epoch += 1

        def timed_batches() -> Iterator:
            for index, batch in enumerate(batches):
                if index == 1 and after_first is not None:
                    after_first()
                yield batch

        self.harness.epoch_over(timed_batches(), len(self.loader))

    def run_timed(self) -> Tuple[float, int]:
        """(seconds, images) of one epoch with its first batch (pipeline start-up) left out."""
        marks = {}

        def start_clock():
            synchronize(self.device)
            marks["start"] = time.perf_counter()

        self._epoch(after_first=start_clock)
        synchronize(self.device)
        return time.perf_counter() - marks["start"], (len(self.loader) - 1) * self.loader.batch_size


# ------------------------------------------------------------------------------ measuring
def warm_and_time_first(function: Callable[[], None], device) -> float:
    with Clock(device) as clock:
        function()
    return clock.seconds


def measure_case(case: Case, device: torch.device, args) -> Dict[str, object]:
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    autocast_dtype = PRECISIONS[args.precision] if device.type == "cuda" else None
    row: Dict[str, object] = {"case": case, "device": device.type}
    compile_model = args.compile and (args.compile_backend or True)
    plain = PlainLoop(case, device, memory_format, autocast_dtype, compile_model)
    harness = HarnessStep(case, device, memory_format, autocast_dtype, compile_model)
    row["density"] = harness.density
    eager_plain = PlainLoop(case, device, memory_format, autocast_dtype, False) if args.compile else None

    # warm-up: the first step compiles (when compiling) and tunes cuDNN; time it for the report
    first = warm_and_time_first(plain.step, device)
    warm_and_time_first(lambda: harness.run(1), device)
    for _ in range(args.warmup):
        plain.step()
        harness.run(1)
        if eager_plain is not None:
            eager_plain.step()
    warm = warm_and_time_first(plain.step, device)
    row["compile_s"] = first - warm if args.compile else float("nan")

    loaders: Dict[str, EndToEnd] = {}
    if args.loaders:
        with tempfile.TemporaryDirectory(prefix="throughput-") as scratch:
            beton = write_synthetic_beton(case, Path(args.data_dir or scratch), case.batch * args.loader_batches)
            for backend in args.loaders:
                try:
                    end_to_end = EndToEnd(harness, case, beton, backend, device, args.channels_last, args.workers)
                except DataError as error:
                    row[f"c_{backend}"] = f"n/a ({error})"
                    continue
                row[f"warmup_{backend}_s"] = end_to_end.warm_up()
                loaders[backend] = end_to_end
            rounds = run_rounds(case, device, args, plain, harness, eager_plain, loaders)
    else:
        rounds = run_rounds(case, device, args, plain, harness, eager_plain, loaders)
    harness.check_masks()
    row.update({name: statistics.median(values) for name, values in rounds.items()})
    return row


def run_rounds(case, device, args, plain, harness, eager_plain, loaders) -> Dict[str, List[float]]:
    """Interleaved rounds; -> images/s per round for a, b, each c_<backend> (and a_eager)."""
    jobs: List[Tuple[str, Callable[[], Tuple[float, int]]]] = []

    def timed_steps(function: Callable[[int], None]) -> Callable[[], Tuple[float, int]]:
        def job():
            with Clock(device) as clock:
                function(args.steps)
            return clock.seconds, args.steps * case.batch
        return job

    jobs.append(("a", timed_steps(plain.run)))
    jobs.append(("b", timed_steps(harness.run)))
    if eager_plain is not None:
        jobs.append(("a_eager", timed_steps(eager_plain.run)))
    for backend, end_to_end in loaders.items():
        jobs.append((f"c_{backend}", end_to_end.run_timed))
    results: Dict[str, List[float]] = {name: [] for name, _ in jobs}
    for round_index in range(args.rounds):
        shift = round_index % len(jobs)
        for name, job in jobs[shift:] + jobs[:shift]:
            seconds, images = job()
            results[name].append(images / seconds)
    return results


def format_row(row: Dict[str, object], loaders: List[str], compile_model: bool) -> str:
    case: Case = row["case"]
    a = row["a"]
    cells = [f"{case.label:<14}", f"{case.batch:>5}", f"{row['device']:<5}", f"{a:>9.1f}", f"{row['b']:>9.1f}"]
    ratios = [f"{row['b'] / a:>5.3f}"]
    for backend in loaders:
        value = row.get(f"c_{backend}")
        if isinstance(value, float):
            cells.append(f"{value:>9.1f}")
            ratios.append(f"{value / a:>6.3f}")
        else:
            cells.append(f"{'n/a':>9}")
            ratios.append(f"{'n/a':>6}")
    extra = []
    if compile_model:
        extra = [f"{row['a_eager']:>9.1f}", f"{a / row['a_eager']:>6.2f}", f"{row['compile_s']:>7.1f}"]
    return " ".join(cells + ratios + extra)


def header(loaders: List[str], compile_model: bool) -> str:
    cells = [f"{'model@px':<14}", f"{'batch':>5}", f"{'dev':<5}", f"{'a img/s':>9}", f"{'b img/s':>9}"]
    cells += [f"{'c ' + b:>9}" for b in loaders]
    cells += [f"{'b/a':>5}"] + [f"{'c/a ' + b[:2]:>6}" for b in loaders]
    if compile_model:
        cells += [f"{'a eager':>9}", f"{'a x':>6}", f"{'comp s':>7}"]
    return " ".join(cells)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="", help="comma list of model names to keep from the cases "
                        f"({', '.join(sorted({c.model for c in CASES}))}); default all")
    parser.add_argument("--quick", action="store_true", help="resnet20@32 batch 128, few steps: a ~1-2 min CPU run")
    parser.add_argument("--devices", default="auto", help="comma list of cpu,cuda; auto = cuda if present, else cpu")
    parser.add_argument("--precision", default="auto", choices=["auto", *PRECISIONS],
                        help="autocast dtype on CUDA (auto: bf16 on CUDA); CPU runs train in fp32 like the harness")
    parser.add_argument("--channels-last", action="store_true", help="channels_last model, batches and loaders")
    parser.add_argument("--compile", action="store_true", help="torch.compile the models of a, b and c")
    parser.add_argument("--compile-backend", default="", help="torch.compile back-end (default: torch's, inductor)")
    parser.add_argument("--smoke", action="store_true", help="resnet20@32 batch 16, 1 step, memory loader: seconds")
    parser.add_argument("--loaders", default="ffcv", help="comma list of make_loader back-ends for c "
                        f"(available: {', '.join(LOADER_BACKENDS)}); empty: skip c")
    parser.add_argument("--steps", type=int, default=0, help="steps per timed block of a and b (default 20, quick 3)")
    parser.add_argument("--loader-batches", type=int, default=0,
                        help="batches per loader epoch for c (default 21, quick 4; the first is not timed)")
    parser.add_argument("--rounds", type=int, default=0, help="interleaved timed rounds (default 5, quick 3)")
    parser.add_argument("--warmup", type=int, default=0, help="untimed steps of a and b first (default 5, quick 1)")
    parser.add_argument("--workers", type=int, default=0, help="loader workers (default: all cores, up to 8)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--data-dir", default="", help="keep the synthetic .beton files here (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.quick = True
        args.steps, args.rounds, args.warmup = args.steps or 1, args.rounds or 1, args.warmup or 1
        args.loader_batches = args.loader_batches or 2
        if args.loaders == parser.get_default("loaders"):
            args.loaders = "memory"
    quick = args.quick
    args.steps = args.steps or (3 if quick else 20)
    args.loader_batches = args.loader_batches or (4 if quick else 21)
    args.rounds = args.rounds or (3 if quick else 5)
    args.warmup = args.warmup or (1 if quick else 5)
    args.workers = args.workers or min(8, os.cpu_count() or 1)
    for name in ("steps", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.loader_batches < 2:
        parser.error("--loader-batches must be >= 2 (the first batch of each epoch is not timed)")
    args.loaders = [b.strip() for b in args.loaders.split(",") if b.strip()]
    unknown = [b for b in args.loaders if b not in LOADER_BACKENDS]
    if unknown:
        parser.error(f"--loaders {','.join(unknown)}: unknown back-end; available: {', '.join(LOADER_BACKENDS)}")
    cases = SMOKE_CASES if args.smoke else QUICK_CASES if quick else CASES
    if args.models:
        wanted = [m.strip() for m in args.models.split(",") if m.strip()]
        known = {c.model for c in CASES}
        if not set(wanted) <= known:
            parser.error(f"--models {','.join(sorted(set(wanted) - known))}: not a case; cases: {', '.join(sorted(known))}")
        cases = [c for c in cases if c.model in wanted] or [c for c in CASES if c.model in wanted]
    args.cases = cases
    if args.devices == "auto":
        args.devices = ["cuda"] if torch.cuda.is_available() else ["cpu"]
    else:
        args.devices = [d.strip() for d in args.devices.split(",") if d.strip()]
        if any(d not in ("cpu", "cuda") for d in args.devices):
            parser.error(f"--devices {','.join(args.devices)}: use cpu and/or cuda")
        if "cuda" in args.devices and not torch.cuda.is_available():
            parser.error("--devices cuda: no CUDA device here")
    if args.precision == "auto":
        args.precision = "bf16" if "cuda" in args.devices else "fp32"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, {os.cpu_count()} cores, load average "
          f"{load:.1f}; precision {args.precision} (CUDA only; CPU trains fp32), channels_last={args.channels_last}, "
          f"compile={args.compile}; {args.rounds} rounds of {args.steps} steps (a, b) and "
          f"{args.loader_batches - 1} timed batches (c) after warm-up; loader workers {args.workers}")
    if torch.cuda.is_available() and "cuda" in args.devices:
        print(f"CUDA device: {torch.cuda.get_device_name()}")
    print(header(args.loaders, args.compile))
    for device_name in args.devices:
        device = torch.device(device_name)
        for case in args.cases:
            row = measure_case(case, device, args)
            print(format_row(row, args.loaders, args.compile), flush=True)
            notes = [f"density {row['density']:.3f}"]
            notes += [f"{key[7:-2]} warm-up epoch {value:.1f} s" for key, value in row.items()
                      if key.startswith("warmup_")]
            notes += [f"{key}: {value}" for key, value in row.items() if key.startswith("c_") and isinstance(value, str)]
            print("    " + "; ".join(notes))
    print("a = plain PyTorch loop on device tensors (the limit); b = the harness's TrainingStep + train_epoch, "
          "masks at density 0.2; c = b fed by make_loader from a .beton (steady state).  Targets: b/a >= 0.97, "
          "c/a >= 0.9.  images/s are medians over interleaved rounds.")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
