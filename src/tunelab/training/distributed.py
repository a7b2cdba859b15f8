"""Several processes training one model with ``torch.distributed``: DDP or FSDP2, launched by torchrun.

Contract with :func:`tunelab.training.loop.fit` (which every recipe uses):

* **Data.** Every rank builds the same deterministic :class:`~tunelab.training.loop.BatchPlan`. An
  optimizer step consumes ``grad_accum × world_size`` consecutive micro-batches of the plan; rank
  ``r`` takes micro-batches ``r, r + W, r + 2W, ...`` of them (:func:`rank_micro_batches`), so the
  ranks' shards are disjoint and together are exactly the batch one process would take with
  ``grad_accum × W`` micro-batches.
* **Normalization.** The loss-unit count (supervised tokens, examples, pairs) is summed over the
  rank's micro-batches and then all-reduced, so every rank divides its summed loss by the *global*
  count of the accumulated batch. Gradients are then **summed** across ranks (not averaged: DDP gets
  a summing comm hook, FSDP a divide factor of 1), which makes ``W`` ranks × batch ``b`` give the
  same update as one rank × batch ``W·b`` whatever the sequence lengths.
* **Wrapping.** The model is put inside :class:`LossModule`, whose ``forward(fn, *args)`` runs
  ``fn(model, *args)``; DDP or FSDP2 wraps that module. So a recipe's ``compute_loss`` (which may call
  ``model.get_decoder()`` and read the LM-head weight directly, as the chunked CE does) always runs
  inside the wrapper's forward: DDP prepares its gradient reduction, FSDP's root gathers the
  embedding/head shards, and each decoder layer (its own FSDP unit) gathers its shard when called.

FSDP2 (``torch.distributed.fsdp.fully_shard``) is the per-parameter-sharding FSDP of PyTorch ≥ 2.4
(Zhao et al. 2023, "PyTorch FSDP", arXiv:2304.11277, ZeRO-3 style; Rajbhandari et al. 2020,
arXiv:1910.02054). Simplifications: one flat data-parallel mesh (no HSDP / tensor parallelism);
sample generation runs redundantly on every rank. Held-out evaluation of the classification, reward
and preference recipes is shared over the ranks and gathered (:meth:`Runtime.map_shards`); SFT's runs
on every rank.
"""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tunelab.config.distributed import DistributedConfig
from tunelab.errors import ConfigError, TunelabError


def env_world_size() -> int:
    """``WORLD_SIZE`` set by torchrun (1 when not launched by it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_rank() -> int:
    """Global rank from ``RANK`` (0 when not launched by torchrun)."""
    return int(os.environ.get("RANK", "0"))


def env_local_rank() -> int:
    """Rank on this machine from ``LOCAL_RANK``; picks the GPU ``cuda:LOCAL_RANK``."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def strip_options(argv: list[str], *, flags: tuple[str, ...] = (), with_value: tuple[str, ...] = ()) -> list[str]:
    """``argv`` without the options named: ``flags`` alone, ``with_value`` as ``--opt VALUE`` or ``--opt=VALUE``."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in with_value:
            skip = True
        elif arg not in flags and not arg.startswith(tuple(f"{o}=" for o in with_value)):
            kept.append(arg)
    return kept


def launch_local(nproc: int, argv: list[str]) -> int:
    """Run ``tunelab <argv>`` (without its ``--nproc`` option) as ``nproc`` processes on this machine.

    Equivalent to ``torchrun --standalone --nproc-per-node NPROC -m tunelab ARGV``; returns
    torchrun's exit status (non-zero when any rank failed; torchrun then stops the others).

    Raises:
        TunelabError: already running under torchrun.
    """
    if "LOCAL_RANK" in os.environ:
        raise TunelabError("--nproc starts torchrun itself; under torchrun, drop --nproc")
    args = strip_options(argv, with_value=("--nproc",))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "tunelab", *args]
    return _wait_relaying_sigterm(subprocess.Popen(cmd))


def _wait_relaying_sigterm(proc: subprocess.Popen) -> int:
    """Wait for torchrun; a SIGTERM sent to this process is passed on (torchrun relays it to the ranks,
    which checkpoint and stop), a SIGINT is not (a terminal's Ctrl-C reached every process already).
    Returns torchrun's status, or 128 + the signal when one arrived (see :mod:`tunelab.training.interrupt`)."""
    got: list[int] = []

    def relay(signum, frame):
        got.append(signum)
        if signum == signal.SIGTERM and proc.poll() is None:
            proc.send_signal(signum)

    previous = {s: signal.signal(s, relay) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        status = proc.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 128 + got[0] if got else status


def rank_micro_batches(start: int, grad_accum: int, rank: int, world_size: int) -> list[int]:
    """Plan indices of the micro-batches rank ``rank`` runs in the step starting at micro-batch ``start``.

    The step spans ``grad_accum × world_size`` micro-batches ``start ...``; ranks take them
    round-robin, so shards are disjoint and their union is the whole step.
    """
    return [start + i * world_size + rank for i in range(grad_accum)]


class LossModule(nn.Module):
    """The root every strategy wraps: ``forward(fn, *args)`` returns ``fn(model, *args)``.

    Running a recipe's loss (or evaluation) through the wrapper's forward is what lets DDP and
    FSDP do their work around code that uses submodules of ``model`` directly.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:  # noqa: D102
        return fn(self.model, *args, **kwargs)


@dataclass
class Runtime:
    """Where this process stands in the run and how its model is wrapped.

    ``strategy`` is ``none`` (one process, no process group), ``ddp`` or ``fsdp``.
    Collective methods must be called by every rank in the same order.
    """

    strategy: str = "none"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    config: DistributedConfig = field(default_factory=DistributedConfig)
    precision: str = "auto"
    wrapped: nn.Module | None = None
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        """True on rank 0, the rank that logs, prints and writes the final files."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        """True when a process group is in use (strategy ddp or fsdp, even on one process)."""
        return self.strategy != "none"

    def wrap(self, model: nn.Module) -> nn.Module:
        """Wrap ``model`` for the strategy (once; later calls return the same wrapper).

        Call after the trainable parameters are set (LoRA injected) and before building the
        optimizer: FSDP replaces parameters by sharded ``DTensor`` parameters in place.

        Raises:
            TunelabError: FSDP finds no decoder layers to shard.
        """
        if self.wrapped is not None:
            if self.wrapped_model() is not model:
                raise RuntimeError("this runtime already wraps another model")
            return self.wrapped
        root = LossModule(model)
        if self.strategy == "ddp":
            self.wrapped = _wrap_ddp(root, self.device)
        elif self.strategy == "fsdp":
            self.wrapped = _wrap_fsdp(root, self.device, self.config, self.precision)
        else:
            self.wrapped = root
        return self.wrapped

    def wrapped_model(self) -> nn.Module | None:
        """The model inside the wrapper, or None before :meth:`wrap`."""
        if self.wrapped is None:
            return None
        root = self.wrapped.module if self.strategy == "ddp" else self.wrapped
        return root.model

    @contextmanager
    def gradient_sync(self, enabled: bool) -> Iterator[None]:
        """Skip the gradient all-reduce / reduce-scatter inside unless ``enabled`` (accumulation)."""
        if self.strategy == "ddp" and not enabled:
            with self.wrapped.no_sync():
                yield
            return
        if self.strategy == "fsdp":
            self.wrapped.set_requires_gradient_sync(enabled)
        yield

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of ``values`` over all ranks (float64)."""
        if not self.is_distributed or self.world_size == 1:
            return [float(v) for v in values]
        tensor = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(tensor)
        return tensor.tolist()

    def sum_dicts(self, values: dict[str, float]) -> dict[str, float]:
        """Per-key sum of a metrics dict over all ranks; keys missing on a rank count as 0."""
        if not self.is_distributed or self.world_size == 1:
            return dict(values)
        gathered: list[dict[str, float]] = [{} for _ in range(self.world_size)]
        dist.all_gather_object(gathered, values)
        keys = list(dict.fromkeys(k for d in gathered for k in d))
        return {k: sum(float(d.get(k, 0.0)) for d in gathered) for k in keys}

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (picklable objects)."""
        if not self.is_distributed or self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def from_main(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` run on rank 0 only; its (picklable) result on every rank. Collective.

        For decisions one rank must take alone (the output-directory check, a cache hit); when ``fn``
        raises on rank 0 the other ranks wait in the broadcast until torchrun stops them.
        """
        return self.broadcast(fn(*args, **kwargs) if self.is_main else None)

    def on_main(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` on rank 0 (the rank that writes the final files); None elsewhere. Not collective."""
        return fn(*args, **kwargs) if self.is_main else None

    def console(self, console: Any = None) -> Any:
        """The rich ``Console`` this rank prints on: ``console`` (or a new one) on rank 0, a quiet one elsewhere."""
        from rich.console import Console

        return (console or Console()) if self.is_main else Console(quiet=True)

    def map_shards(self, fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
        """``[fn(item) for item in items]`` with the items shared round-robin over the ranks. Collective.

        Rank ``r`` calls ``fn`` on items ``r, r + W, ...``; the (picklable, e.g. CPU tensor) results of
        every rank are gathered back into item order on every rank. Every rank calls ``fn`` equally
        often, ``ceil(N / W)`` times (a rank short of items repeats item 0 and drops the result), because
        under FSDP each forward pass all-gathers the layer shards with every rank. Used for held-out
        evaluation and the precomputed reference: metrics computed from the gathered outputs equal one
        process's exactly (accuracy, macro-F1, pairwise accuracy, KTO's ``z_ref`` over all examples).
        """
        if not self.is_distributed or self.world_size == 1 or not items:
            return [fn(item) for item in items]
        rounds = -(-len(items) // self.world_size)
        mine = []
        for i in range(self.rank, rounds * self.world_size, self.world_size):
            if i < len(items):
                mine.append(fn(items[i]))
            else:
                fn(items[0])  # the same number of forward passes as the other ranks; result dropped
        gathered: list[list[Any]] = [[] for _ in range(self.world_size)]
        dist.all_gather_object(gathered, mine)
        return [gathered[i % self.world_size][i // self.world_size] for i in range(len(items))]

    def evaluate(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` without gradients, through the wrapper's forward once :meth:`wrap` ran (FSDP's root then
        gathers the embedding/head shards and each layer its own), directly before. Collective under FSDP."""
        with torch.no_grad():
            return self.wrapped(lambda _model: fn()) if self.wrapped is not None else fn()

    def shard_frozen(self, model: nn.Module) -> nn.Module:
        """A frozen model (a DPO/KTO reference copy) placed like the policy; returns a :class:`LossModule`.

        Call it as ``runner(fn, *args)`` to get ``fn(model, *args)``. Under FSDP its decoder layers and
        root are sharded with the policy's options (each rank holds ``1/W`` of the copy; each call
        all-gathers, so every rank must call it equally often); under DDP or one process it is the whole
        model (no gradients, nothing to synchronize).
        """
        model.requires_grad_(False).eval()
        root = LossModule(model)
        if self.strategy == "fsdp":
            _wrap_fsdp(root, self.device, self.config, self.precision)
        return root

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.is_distributed and self.world_size > 1:
            dist.barrier()

    @contextmanager
    def full_weights(self) -> Iterator[None]:
        """Inside, every parameter of the wrapped model is a whole, plain tensor on every rank.

        A no-op for ``none`` and ``ddp``. With ``fsdp``, every unit is all-gathered (costing the
        whole model's memory on each rank) so the model can generate, be evaluated and be saved
        like a plain model; the shards are restored on exit. Collective.
        """
        if self.strategy != "fsdp" or self.wrapped is None:
            yield
            return
        units = _fsdp_units(self.wrapped)
        for unit in units:
            unit.unshard()
            unit.set_reshard_after_forward(False)
        try:
            yield
        finally:
            for unit in units:
                unit.reshard()
                unit.set_reshard_after_forward(self.config.reshard_after_forward)

    def close(self) -> None:
        """Tear down the process group this runtime created."""
        if self.owns_group and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
            self.owns_group = False

    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def single_process(device: torch.device | None = None) -> Runtime:
    """The runtime of a plain one-process run (no process group, no wrapping but :class:`LossModule`)."""
    return Runtime(device=device or torch.device("cpu"))


def init_distributed(cfg: DistributedConfig, precision: str = "auto") -> Runtime:
    """Join the run torchrun launched (or stay single-process) as ``cfg`` says.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT`` (set by
    torchrun). Uses ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU. A process group
    already initialized by the caller is reused (and not destroyed by :meth:`Runtime.close`).
    ``strategy: ddp|fsdp`` on a single process without torchrun runs with a one-rank group.

    Args:
        cfg: the ``distributed:`` config section.
        precision: ``train.precision``; FSDP's ``mixed_precision: auto`` follows it.

    Raises:
        ConfigError: ``strategy: none`` under torchrun with several processes, ``cpu_offload``
            without ``strategy: fsdp`` or without CUDA, ``backend: nccl`` without CUDA.
    """
    world_size = dist.get_world_size() if dist.is_initialized() else env_world_size()
    strategy = cfg.strategy if cfg.strategy != "auto" else ("ddp" if world_size > 1 else "none")
    if strategy == "none" and world_size > 1:
        raise ConfigError(f"distributed.strategy=none, but {world_size} processes were launched; "
                          "use distributed.strategy=ddp or fsdp (or launch one process)")
    local_rank = env_local_rank()
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    _check_options(cfg, strategy, device)
    if strategy == "none":
        return Runtime(device=device, config=cfg, precision=precision)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
        timeout = datetime.timedelta(seconds=cfg.timeout_s)
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, timeout=timeout)
        else:  # one plain process asked for ddp/fsdp: a one-rank group in memory
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return Runtime(strategy=strategy, rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                   device=device, config=cfg, precision=precision, owns_group=owns)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP shards one by one: modules of a class in ``model._no_split_modules``
    (transformers' list, e.g. ``LlamaDecoderLayer``), else the children of the longest ``nn.ModuleList``.

    Raises:
        TunelabError: neither is found.
    """
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
        layers = list(max(lists, key=len)) if lists else []
    if not layers:
        raise TunelabError(f"{type(model).__name__}: found no decoder layers to shard with distributed.strategy=fsdp")
    return layers


def _check_options(cfg: DistributedConfig, strategy: str, device: torch.device) -> None:
    if cfg.cpu_offload and strategy != "fsdp":
        raise ConfigError("distributed.cpu_offload needs distributed.strategy=fsdp")
    if cfg.cpu_offload and device.type != "cuda":
        raise ConfigError("distributed.cpu_offload offloads GPU memory to the CPU; this machine has no CUDA GPU")
    if cfg.backend == "nccl" and device.type != "cuda":
        raise ConfigError("distributed.backend=nccl needs CUDA GPUs; use gloo (or auto) on CPU")


def _wrap_ddp(root: nn.Module, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(root, device_ids=[device.index] if device.type == "cuda" else None)
    ddp.register_comm_hook(None, _allreduce_sum_hook)
    return ddp


def _allreduce_sum_hook(state, bucket):  # no annotations: DDP checks them against its own types
    """DDP comm hook: sum a gradient bucket over ranks (the loss is already divided by the global count).

    ``bucket`` is a ``dist.GradBucket``; returns a ``Future`` of the summed flat gradient tensor.
    """
    work = dist.all_reduce(bucket.buffer(), async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def _wrap_fsdp(root: LossModule, device: torch.device, cfg: DistributedConfig, precision: str) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    param_dtype = _fsdp_param_dtype(cfg.mixed_precision, precision, device)
    policy = MixedPrecisionPolicy(param_dtype=param_dtype,
                                  reduce_dtype=torch.bfloat16 if cfg.reduce_dtype == "bf16" else torch.float32)
    options = {"mesh": mesh, "reshard_after_forward": cfg.reshard_after_forward, "mp_policy": policy,
               "offload_policy": CPUOffloadPolicy() if cfg.cpu_offload else OffloadPolicy()}
    for layer in decoder_layers(root.model):
        fully_shard(layer, **options)
    fully_shard(root, **options)
    for unit in _fsdp_units(root):  # sum, not average: the loss is already divided by the global count
        unit.set_gradient_divide_factor(1.0)
        if hasattr(unit, "set_force_sum_reduction_for_comms"):  # torch >= 2.8; gloo has no PREMUL_SUM
            unit.set_force_sum_reduction_for_comms(True)
    return root


def _fsdp_param_dtype(setting: str, precision: str, device: torch.device) -> torch.dtype | None:
    if setting == "auto":
        bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
        return torch.bfloat16 if bf16 else None
    return torch.bfloat16 if setting == "bf16" else None


def _fsdp_units(wrapped: nn.Module) -> list[Any]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in wrapped.modules() if isinstance(m, FSDPModule)]
