"""Data-parallel fine-tuning with PyTorch's distributed engine (chapter 08).

Chapter 02's recipe, unchanged, on ``N`` processes: each process (a *rank*) holds a full copy of
the model, trains on its own slice of every batch, and ``DistributedDataParallel`` (DDP) averages
the gradients across ranks during ``backward``, so every copy takes the same optimizer step. The
pieces, one small function each:

- **Processes.** :func:`launch` starts ``N`` local processes with torch's elastic launcher (the
  engine behind ``torchrun``) and returns what each returned; ``torchrun`` itself starts them on
  several GPUs or machines. :func:`init` reads the launcher's environment (``RANK``,
  ``WORLD_SIZE``, ``LOCAL_RANK``) and joins the process group (gloo on CPU, NCCL on CUDA) with a
  timeout, so a lost rank ends the job with an error instead of a hang; :func:`process_group`
  also leaves it cleanly. Without a launcher both give a one-process :class:`Context`, so the same
  code runs alone.
- **Data.** :func:`train_sampler` (``DistributedSampler``: a disjoint slice of one shared
  permutation per rank, reshuffled every epoch by ``set_epoch``), :class:`SeededItems`
  (each image's augmentation drawn from ``(seed, epoch, index)``, so it does not depend on the
  number of processes or data-loader workers) and :func:`evaluate` (each rank predicts its
  share, without the duplicates ``DistributedSampler`` pads with; the results are gathered).
- **The step.** :func:`fit`: per-rank micro-batches, gradient accumulation (``no_sync`` on all
  but the last micro-batch), one effective batch of ``batch_size`` images per optimizer step for
  any number of processes, BatchNorm kept frozen as in chapter 02, mixed precision on CUDA,
  progress and checkpoints on rank 0 only. :func:`scaled_lr` is Goyal et al. (2017)'s linear
  scaling rule for when the effective batch grows.

With frozen BatchNorm every rank normalises with the same stored statistics, so nothing differs
between ranks but their data. BatchNorm that *trains* normalises each rank's few images by their
own statistics; ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` computes them over all ranks'
images instead (each BN layer then exchanges statistics between the ranks in the forward and in
the backward pass, and waits for them; for timm models use
``timm.layers.convert_sync_batchnorm``, which keeps the activation timm fuses into its BN layers),
which matters when per-GPU batches are small (Wu & He 2018 show BatchNorm's error rising as the batch per GPU shrinks).
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import signal
import threading
import time
import uuid
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from . import env, finetune, train

LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class WorkerFailed(RuntimeError):
    """A rank of a :func:`launch`\\ ed job raised or died; the message names the rank and its error."""


# ----------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class Context:
    """Where this process stands: ``rank`` of ``world_size``, its ``device``.

    ``local_rank`` is the rank among the processes on this machine (it picks the GPU);
    ``backend`` is ``None`` when no process group was started (one process).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that prints, logs and saves."""
        return self.rank == 0

    def print(self, *args, **kwargs) -> None:
        """``print`` on rank 0 only: N processes printing the same line is the first pitfall."""
        if self.is_main:
            print(*args, **kwargs, flush=True)


def launched() -> bool:
    """Whether a launcher (``torchrun``, :func:`launch`, SLURM through ``torchrun``) started this
    process as one rank of a job: it sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``."""
    return all(name in os.environ for name in LAUNCHER_VARIABLES)


def init(backend: str | None = None, timeout_s: float = 300, device: str | torch.device | None = None) -> Context:
    """Join the job's process group from the launcher's environment; returns the :class:`Context`.

    ``device``: default :func:`tlcourse.env.device` (``TLCOURSE_DEVICE=cpu`` forces the CPU);
    ``backend``: ``"nccl"`` on CUDA (GPU-to-GPU collectives), else ``"gloo"`` (CPU). ``timeout_s`` bounds every collective: a rank that never arrives (crashed, stuck on
    I/O) makes the others raise after that long instead of waiting forever; the launcher also
    stops the remaining ranks as soon as one exits with an error. Each CUDA rank takes the GPU
    ``LOCAL_RANK``. A CPU rank gets ``cores / local ranks`` threads (at most ``OMP_NUM_THREADS``
    when that is set), so ``N`` processes on one machine do not fight over its cores. Not launched: a one-process context, no group.
    """
    if not launched():
        return Context(device=torch.device(device) if device is not None else env.device())
    rank, world, local = (int(os.environ[name]) for name in LAUNCHER_VARIABLES)
    device = torch.device(device) if device is not None else env.device()   # TLCOURSE_DEVICE=cpu forces CPU
    if device.type not in ("cuda", "cpu"):
        device = torch.device("cpu")   # gloo and NCCL do not reduce tensors on Apple's MPS: CPU processes there
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"local rank {local} has no GPU of its own: {torch.cuda.device_count()} GPU(s) on this "
                               "machine. NCCL needs one GPU per process: start at most that many processes per "
                               "machine, or train on CPU processes (TLCOURSE_DEVICE=cpu).")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if backend is None:
        backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type != "cuda":
        share = max(1, _cores() // int(os.environ.get("LOCAL_WORLD_SIZE", world)))
        limit = os.environ.get("OMP_NUM_THREADS", "")
        torch.set_num_threads(min(share, int(limit)) if limit.isdigit() and int(limit) > 0 else share)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                                **({"device_id": device} if device.type == "cuda" else {}))
    return Context(rank, world, local, device, backend)


def _cores() -> int:
    # The cores this process may use (SLURM and containers restrict them), not the machine's.
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def shutdown() -> None:
    """Leave the process group (every rank must call it; a no-op without one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def process_group(backend: str | None = None, timeout_s: float = 300, device: str | torch.device | None = None):
    """``with process_group() as ctx:`` — :func:`init`, and :func:`shutdown` however the block ends."""
    ctx = init(backend, timeout_s, device)
    try:
        yield ctx
    finally:
        shutdown()


def launch(fn: Callable, nproc: int, *args, monitor_interval: float = 0.2) -> list:
    """Run ``fn(*args)`` in ``nproc`` new local processes, as ``torchrun --standalone
    --nproc-per-node nproc`` would; returns the ranks' return values ``[rank 0, rank 1, ...]``.

    The processes are *spawned*: fresh interpreters that import ``fn`` by its module and name,
    so ``fn`` must live in a module (like :func:`photo_worker`), not in a notebook cell; its
    arguments and return value are pickled. Each process finds the launcher's variables set and
    calls :func:`init` itself. When one rank raises, the launcher stops the others and this
    raises :class:`WorkerFailed` with that rank's error. The ranks' own printing goes to the
    launching process's terminal, not to a notebook: return what you want to see.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nproc < 1:
        raise ValueError(f"nproc must be at least 1, not {nproc}")
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0",   # port 0: any free port
                          max_restarts=0, monitor_interval=monitor_interval, start_method="spawn")
    quiet = logging.getLogger("torch.distributed.elastic")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)   # its log repeats what WorkerFailed says, in 40 lines
    # The launcher installs its own SIGTERM/SIGINT/... handlers in this process to stop its
    # workers, and leaves them behind; a notebook kernel would then die with a traceback when
    # it is shut down. Put the caller's handlers back.
    names = getattr(config, "signals_to_handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT")   # a field since torch 2.9
    signals = [getattr(signal, name) for name in names.split(",") if hasattr(signal, name)]
    handlers = {s: signal.getsignal(s) for s in signals} if threading.current_thread() is threading.main_thread() else {}
    handlers = {s: h for s, h in handlers.items() if h is not None}   # None: set outside Python, cannot be restored
    try:
        results = elastic_launch(config, fn)(*args)
    except ChildFailedError as exc:
        raise WorkerFailed(failure_message(exc)) from None
    finally:
        quiet.setLevel(level)
        for s, handler in handlers.items():
            signal.signal(s, handler)
    return [results[rank] for rank in range(nproc)]


def failure_message(exc) -> str:
    """A ``ChildFailedError``'s story: every failed rank's error, the cause first. When one rank dies, the ranks waiting for it in
    a collective fail too ("connection reset by peer") and the launcher may notice one of those
    first, so the error files of all local ranks are read (``record`` writes one per rank)."""
    import json

    errors: dict[int, tuple[int | None, str]] = {}
    for rank, failure in exc.failures.items():
        # Without an error file (a rank that exited with a code, not an exception) its own output
        # above says what was wrong; torch's "To enable traceback see ..." would not.
        errors[rank] = (failure.exitcode, _error_text(failure.error_file_data) or "see its output above")
        attempt = Path(failure.error_file).parent.parent if failure.error_file not in (None, "", "<N/A>") else None
        for folder in (attempt.iterdir() if attempt is not None and attempt.is_dir() else ()):
            report = folder / "error.json"
            if folder.name.isdigit() and int(folder.name) not in errors and report.is_file():
                try:
                    errors[int(folder.name)] = (None, _error_text(json.loads(report.read_text())))
                except (OSError, ValueError):
                    pass

    def consequence(item):
        return any(s in item[1][1].lower() for s in ("by peer", "connection closed", "connection reset"))

    lines = [f"rank {rank} failed{'' if code is None else f' (exit code {code})'}: {text}"
             + (" (its peer was gone)" if consequence((rank, (code, text))) else "")
             for rank, (code, text) in sorted(errors.items(), key=lambda item: (consequence(item), item[0]))]
    return "; ".join(lines) + ". The other ranks were stopped."


def _error_text(data) -> str:
    message = data.get("message") if isinstance(data, dict) else None
    return str(message.get("message") if isinstance(message, dict) else message or "")


def rank_seed(seed: int, rank: int) -> int:
    """A seed for ``rank``'s own random stream (dropout masks), independent of the others'.

    ``seed + rank`` would make rank 1 of seed 0 replay rank 0 of seed 1; NumPy's
    ``SeedSequence`` mixes both into unrelated streams.
    """
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


# ----------------------------------------------------------------------------- data


class SeededItems(Dataset):
    """``dataset`` whose item ``(epoch, i)`` is drawn with torch's random state seeded from
    ``(seed, epoch, i)``; returns ``dataset[i]``.

    An augmentation (random crop, flip) then depends on the image and the epoch only, not on
    which rank or data-loader worker computes it, nor on what that process drew before: the
    same run on 1 or 8 processes sees the same augmented images. Use with a sampler wrapped in
    :class:`EpochIndices`, which yields the ``(epoch, i)`` keys (workers cannot see a
    ``set_epoch`` made in the main process; the sampler's keys reach them).
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, i = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(np.random.SeedSequence([self.seed, epoch, i]).generate_state(1)[0]))
            return self.dataset[i]


class EpochIndices(Sampler):
    """A ``DistributedSampler`` whose indices come as ``(epoch, i)`` (for :class:`SeededItems`)."""

    def __init__(self, sampler: DistributedSampler):
        self.sampler = sampler

    def __iter__(self):
        epoch = self.sampler.epoch
        return ((epoch, i) for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)


def train_sampler(dataset: Dataset, ctx: Context, seed: int) -> EpochIndices:
    """This rank's slice of a shuffled epoch.

    Every rank draws the *same* permutation (seeded with ``seed + epoch``) and takes every
    ``world_size``-th index from position ``rank``: disjoint slices that together cover the
    epoch. Call ``set_epoch(e)`` before each epoch, or every epoch repeats the first one's order
    (a classic DDP bug). ``drop_last``: the few images that do not fill a slice for every rank
    are left out this epoch (a new permutation leaves out others next time); the default pads
    with repeated images instead, which would count some images twice.
    """
    sampler = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                 seed=seed, drop_last=True)
    return EpochIndices(sampler)


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, ctx: Context, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[N, C]`` and labels ``[N]`` of every item of ``dataset``, in its order, on every rank.

    Rank ``r`` predicts items ``r, r + W, r + 2W, ...`` (``W`` ranks): each item exactly once.
    ``DistributedSampler`` would instead pad the last slice with repeated items so every rank
    has as many, and an accuracy computed over its output counts those twice. The shares are
    gathered with ``all_gather_object`` (small here: one row of logits per image).
    """
    indices = list(range(ctx.rank, len(dataset), ctx.world_size))
    # No worker processes: the data is decoded already, and N ranks x 8 workers per epoch would cost more.
    loader = train.make_loader(torch.utils.data.Subset(dataset, indices), batch_size, device=ctx.device, num_workers=0)
    logits, labels = train.predict(_unwrap(model), loader, ctx.device) if indices else (None, None)
    if ctx.world_size == 1:
        return logits, labels
    shares = [None] * ctx.world_size
    dist.all_gather_object(shares, (indices, logits, labels))
    n_classes = next(s[1].shape[1] for s in shares if s[1] is not None)
    all_logits, all_labels = torch.empty(len(dataset), n_classes), torch.empty(len(dataset), dtype=torch.long)
    for idx, lg, lb in shares:
        if idx:
            all_logits[idx], all_labels[idx] = lg, lb
    return all_logits, all_labels


# ----------------------------------------------------------------------------- the step


def scaled_lr(base_lr: float, batch_size: int, base_batch_size: int) -> float:
    """Goyal et al. (2017)'s linear scaling rule: when the effective batch grows ``k``-fold,
    multiply the learning rate by ``k`` (``base_lr`` was tuned at ``base_batch_size``).

    ``k`` times more images per step average ``k`` times more gradients, so the step is less
    noisy and ``k`` times fewer steps are taken per epoch; the rule keeps the distance covered
    per epoch the same. It holds with a warm-up (theirs: 5 epochs from ``base_lr``) and up to a
    limit (8k images for ResNet-50 on ImageNet); :func:`fit` warms up through the Strategy's
    ``warmup``.
    """
    if batch_size < 1 or base_batch_size < 1:
        raise ValueError("batch sizes must be at least 1")
    return base_lr * batch_size / base_batch_size


def split_batch(batch_size: int, world_size: int, accumulate: int = 1) -> int:
    """Images per rank per micro-batch so that ``world_size * accumulate`` micro-batches make
    one effective batch of ``batch_size``; raises when it does not divide evenly."""
    share, rest = divmod(batch_size, world_size * accumulate)
    if rest or share < 1:
        raise ValueError(f"an effective batch of {batch_size} does not split into {world_size} process(es) x "
                         f"{accumulate} accumulation step(s); use a multiple of {world_size * accumulate}")
    return share


@dataclass
class DistributedResult:
    """What :func:`fit` measured: the model, accuracies and logits are the same on every rank; the
    times are this rank's. ``images_per_second``: all ranks' training images per second, over the
    epochs after the first when there are several (the first also warms up); ``history`` has
    ``train_loss``, ``train_seconds``, ``lr`` and ``val_acc`` per epoch."""

    model: nn.Module = field(repr=False)
    history: train.History = field(repr=False)
    val_acc: float
    logits: torch.Tensor = field(repr=False)
    labels: torch.Tensor = field(repr=False)
    world_size: int
    batch_size: int
    per_rank_batch: int
    accumulate: int
    steps: int
    train_seconds: float
    images_per_second: float
    trainable: int


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def fit(make_model: Callable[[], nn.Module], strategy: finetune.Strategy, train_set: Dataset, val_set: Dataset,
        ctx: Context, batch_size: int = 32, accumulate: int = 1, seed: int = 0, checkpoint: str | Path | None = None,
        amp: bool | None = None, num_workers: int | None = None, progress: bool = True) -> DistributedResult:
    """Train ``make_model()`` with ``strategy`` (chapter 02's :class:`tlcourse.finetune.Strategy`)
    on this rank's share of ``train_set``; every rank calls it and gets the same result.

    ``batch_size`` is the *effective* batch: images per optimizer step over all ranks and
    accumulation steps (:func:`split_batch` gives each micro-batch). One epoch is
    ``len(train_set) // batch_size`` steps on any number of ranks, and step ``t`` sees images
    ``t * batch_size ... (t + 1) * batch_size - 1`` of the epoch's shared permutation with the
    same augmentation (:class:`SeededItems`): 1 process, 2 processes or 1 process accumulating 2
    micro-batches take the same steps, up to floating-point rounding. Each rank averages the loss
    over its micro-batch and divides it by ``accumulate``; DDP averages the ranks' gradients, so
    the step's gradient is the mean over the effective batch.

    Every rank builds the model from ``seed`` (DDP also copies rank 0's weights to the others
    when it wraps the model) and then seeds its own stream (:func:`rank_seed`) for dropout.
    ``strategy.gradual`` is refused: DDP registers the parameters that get gradients when it
    wraps the model and cannot follow a set that changes during training. After each epoch the
    validation set is evaluated (gathered, :func:`evaluate`); ``checkpoint``: rank 0 saves the
    model's weights there after each epoch (atomically), and the others wait for it.
    """
    if strategy.gradual:
        raise ValueError("gradual unfreezing changes which parameters get gradients during training; DDP "
                         "fixes that set when it wraps the model. Train a fixed set of groups (blocks=k).")
    micro = split_batch(batch_size, ctx.world_size, accumulate)
    steps_per_epoch = len(train_set) // batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"{len(train_set)} training images are fewer than one batch of {batch_size}")
    device = ctx.device
    amp = device.type == "cuda" if amp is None else amp
    env.seed_everything(seed)
    model = make_model()
    if strategy.bn_eval:
        finetune.keep_batchnorm_eval(model)
    if strategy.prepare is not None:
        model = strategy.prepare(model)
    optimizer, scheduler = finetune.build_optimizer(model, strategy, steps_per_epoch)
    train.channels_last(model, device)
    if ctx.world_size > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    torch.manual_seed(rank_seed(seed, ctx.rank))
    sampler = train_sampler(train_set, ctx, seed)
    loader = DataLoader(SeededItems(train_set, seed), batch_size=micro, sampler=sampler, drop_last=True,
                        num_workers=_workers(device, num_workers), pin_memory=device.type == "cuda",
                        persistent_workers=_workers(device, num_workers) > 0)
    scaler = torch.amp.GradScaler("cuda") if train._needs_scaler(device, amp) else None
    history = train.History()
    from tqdm.auto import tqdm

    for epoch in tqdm(range(strategy.epochs), desc="epochs", disable=not (progress and ctx.is_main)):
        sampler.set_epoch(epoch)
        model.train()
        start = time.perf_counter()
        loss_sum = torch.zeros(2, device=device)   # summed loss, images: reduced once per epoch
        batches = iter(loader)
        for _ in range(steps_per_epoch):
            for m in range(accumulate):
                x, y = next(batches)
                x, y = train.to_device(x, device), y.to(device, non_blocking=True)
                last = m == accumulate - 1
                # no_sync: accumulate the micro-batch's gradient locally; the all-reduce runs once,
                # in the last micro-batch's backward, on the summed gradients.
                sync = nullcontext() if last or ctx.world_size == 1 else model.no_sync()
                with sync:
                    with train.autocast(device, amp):
                        loss = nn.functional.cross_entropy(model(x), y)
                    scaled = loss / accumulate
                    (scaler.scale(scaled) if scaler is not None else scaled).backward()
                loss_sum += torch.stack([loss.detach().float() * len(y), torch.tensor(len(y), device=device)])
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if ctx.world_size > 1:
            dist.all_reduce(loss_sum)
        history["train_loss"].append(float(loss_sum[0] / loss_sum[1]))
        history["train_seconds"].append(time.perf_counter() - start)
        # Checked once per epoch: loss.item() after every batch would make the CPU wait for the GPU.
        if not math.isfinite(history["train_loss"][-1]):
            raise FloatingPointError(f"the training loss became {history['train_loss'][-1]} in epoch {epoch + 1}; "
                                     "lower the learning rate or check the inputs")
        history["lr"].append(optimizer.param_groups[0]["lr"])
        logits, labels = evaluate(model, val_set, ctx)
        history["val_acc"].append(float((logits.argmax(1) == labels).float().mean()))
        if checkpoint is not None:
            save_checkpoint(checkpoint, model, ctx, epoch=epoch, val_acc=history["val_acc"][-1])
    history.seconds = train_seconds = sum(history["train_seconds"])
    net = _unwrap(model)
    train.channels_last(net, on=False)
    # Throughput after the first epoch when there are several: the first also pays for warm-up
    # (oneDNN and cuDNN choosing kernels, workers starting).
    timed = history["train_seconds"][1:] or history["train_seconds"]
    throughput = steps_per_epoch * batch_size * len(timed) / sum(timed)
    return DistributedResult(net.cpu().eval(), history, history["val_acc"][-1], logits, labels, ctx.world_size,
                             batch_size, micro, accumulate, steps_per_epoch * strategy.epochs, train_seconds,
                             throughput, finetune.trainable_parameters(net))


def _workers(device: torch.device, requested: int | None) -> int:
    if requested is not None:
        return requested
    # On CUDA, JPEG-free tensor augmentation still benefits from a few workers per rank; on CPU
    # the ranks already use every core.
    return min(4, max(1, (os.cpu_count() or 1) // max(1, torch.cuda.device_count()))) if device.type == "cuda" else 0


def save_checkpoint(path: str | Path, model: nn.Module, ctx: Context, **info: Any) -> Path:
    """Rank 0 writes the (unwrapped) model's ``state_dict`` and ``info`` to ``path``, atomically;
    every rank then waits at a barrier, so none reads a half-written file. Every rank saving
    would write the same bytes ``world_size`` times to one file, racing each other."""
    path = Path(path)
    if ctx.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu() for k, v in _unwrap(model).state_dict().items()}
        tmp = path.with_name(path.name + ".part")
        torch.save({"state_dict": state, **info}, tmp)
        os.replace(tmp, path)
    if ctx.world_size > 1:
        dist.barrier()
    return path


# ----------------------------------------------------------------------------- worked examples


@dataclass(frozen=True)
class PhotoJob:
    """Chapter 02's photos fine-tuned by :func:`fit`: what every rank of :func:`photo_worker` needs.

    ``blocks``: layer groups below the head to train (chapter 02's ``last k``); ``batch_size``:
    the effective batch, split over the ranks and ``accumulate`` micro-batches.
    """

    image_size: int = 128
    epochs: int = 2
    batch_size: int = 32
    accumulate: int = 1
    blocks: int | None = 1
    lr: float = 5e-4
    layer_decay: float = 0.5
    warmup: float = 0.2
    seed: int = 0
    device: str | None = None     # None: a GPU per process if there are GPUs, else the CPU


def photo_worker(job: PhotoJob) -> dict:
    """One rank of a :class:`PhotoJob`: join the group, decode the photos
    (:func:`tlcourse.finetune.course_photos`), :func:`fit`, leave. Returns a summary (the same on
    every rank): data, accuracy per epoch, throughput, the trained weights (``trained``, on the
    CPU) so runs on different numbers of processes can be compared weight by weight, and ``moved``:
    the largest change of any trained weight from its start (the scale such differences are
    measured against)."""
    from . import models

    with process_group(device=job.device) as ctx:
        backbone = models.efficientnet_lite0(pretrained=False)
        mean, std = models.normalization(backbone)
        train_raw, val_raw, data = finetune.course_photos(finetune.short_side_for(job.image_size), job.seed)
        train_set = train_raw.with_transform(finetune.train_transform(job.image_size, mean, std))
        val_set = val_raw.with_transform(finetune.eval_transform(job.image_size, mean, std))
        strategy = finetune.Strategy(f"last {job.blocks} group(s)", blocks=job.blocks, lr=job.lr,
                                     layer_decay=job.layer_decay, epochs=job.epochs, warmup=job.warmup)
        def make_model():
            return models.efficientnet_lite0(num_classes=len(train_raw.classes))

        env.seed_everything(job.seed)
        start = dict(make_model().named_parameters())   # what fit starts from (it seeds the same way)
        result = fit(make_model, strategy, train_set, val_set, ctx, batch_size=job.batch_size,
                     accumulate=job.accumulate, seed=job.seed, progress=False)
        trained = {k: v.detach().clone() for k, v in result.model.named_parameters() if v.requires_grad}
        moved = max((w - start[k]).abs().max().item() for k, w in trained.items())
        return {"data": data, "classes": train_raw.classes, "train_images": len(train_set),
                "val_images": len(val_set), "processes": ctx.world_size, "backend": ctx.backend,
                "device": str(ctx.device), "threads_per_process": torch.get_num_threads(), "val_acc": result.val_acc,
                "val_acc_per_epoch": result.history["val_acc"], "train_loss": result.history["train_loss"],
                "images_per_second": result.images_per_second, "train_seconds": result.train_seconds,
                "steps": result.steps, "per_rank_batch": result.per_rank_batch, "trained": trained,
                "moved": moved}



def gradient_step_worker(batch: torch.Tensor, labels: torch.Tensor, steps: int, lr: float = 0.1,
                         accumulate: int = 1, checkpoint: str | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """One rank of the equivalence check: a small network initialised from ``seed``, ``steps`` SGD steps, each on this
    rank's contiguous share of ``batch [B, D]`` (split into ``accumulate`` micro-batches); returns
    the final parameters, plus ``"logits"``: the trained network's logits ``[B - 1, C]`` on the
    first ``B - 1`` rows, computed by :func:`evaluate` (an odd count with an even ``B``: the ranks
    get unequal shares). ``checkpoint``: also :func:`save_checkpoint` there. Run it with
    :func:`launch` on 2 processes and directly on 1: everything agrees up to rounding
    (``tests/test_distributed.py``, chapter 08)."""
    with process_group() as ctx:
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(batch.shape[1], 16), nn.Tanh(), nn.Linear(16, int(labels.max()) + 1))
        model = nn.parallel.DistributedDataParallel(net) if ctx.world_size > 1 else net
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        mine = batch.chunk(ctx.world_size)[ctx.rank], labels.chunk(ctx.world_size)[ctx.rank]
        for _ in range(steps):
            micro = list(zip(mine[0].chunk(accumulate), mine[1].chunk(accumulate)))
            for m, (x, y) in enumerate(micro):
                sync = nullcontext() if m == len(micro) - 1 or ctx.world_size == 1 else model.no_sync()
                with sync:
                    (nn.functional.cross_entropy(model(x), y) / accumulate).backward()
            opt.step()
            opt.zero_grad()
        logits, _ = evaluate(model, torch.utils.data.TensorDataset(batch[:-1], labels[:-1]), ctx, batch_size=4)
        if checkpoint is not None:
            save_checkpoint(checkpoint, model, ctx, steps=steps)
        return {**{k: v.detach().clone() for k, v in net.state_dict().items()}, "logits": logits}


def failing_worker(fail_rank: int) -> int:
    """A job in which rank ``fail_rank`` raises while the others wait in a collective (for tests)."""
    with process_group(timeout_s=60) as ctx:
        if ctx.rank == fail_rank:
            raise RuntimeError(f"rank {ctx.rank} could not read its data")
        dist.all_reduce(torch.ones(1))
        return ctx.rank
