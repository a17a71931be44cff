"""How the student is spread over processes: data parallel (DDP), sharded (FSDP2) or DeepSpeed ZeRO.

The training loop never asks which; it calls one of these strategies (``train.distributed``):

- :class:`DataParallel` — a full replica per process, gradients averaged (Accelerate's DDP).
- :class:`FullyShardedFSDP2` — PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``): every decoder
  layer is its own unit and the root holds the rest (embeddings, final norm, the LM head, so tied
  embeddings stay in one unit); parameters, gradients and AdamW states are 1/N per process.
  opd calls ``fully_shard`` itself and keeps the model out of ``accelerator.prepare``: Accelerate
  1.16 does not enable FSDP on a CPU-only host (it silently falls back to DDP), and a model it
  did not wrap must not be wrapped twice on a GPU. Accelerate still provides the process group,
  reductions and autocast. Checkpoints are sharded with ``torch.distributed.checkpoint`` (DCP),
  which reshards, so a run may resume on another number of processes.
- :class:`DeepSpeedZeRO` — ZeRO-2 / ZeRO-3 through Accelerate's DeepSpeed plugin.

Each strategy owns the parts that differ: how the model is wrapped, whether a micro-batch's
gradients are synchronised, backward, clip and step, a view with every parameter materialised
(rollouts decode with opd's own loop, whose step count differs between ranks, so per-layer
all-gathers inside it would deadlock), sharded checkpoints, and the full state dict for export.

The loss arrives divided by the step's global token count; DDP, FSDP2 and DeepSpeed all average
gradients over processes, so every strategy multiplies by the world size before backward.
"""

from __future__ import annotations

import abc
import contextlib
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from opd.errors import OpdError

OptimizerFactory = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]


class Parallel(abc.ABC):
    """A way of spreading the student over ``accelerator``'s processes."""

    name = "ddp"

    def __init__(self, accelerator: Any) -> None:
        self.accelerator = accelerator

    @abc.abstractmethod
    def prepare(self, student: torch.nn.Module, make_optimizer: OptimizerFactory
                ) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """Wrap the student and build its optimizer over the trainable parameters."""

    def module(self, model: torch.nn.Module) -> torch.nn.Module:
        """The student itself (its parameters possibly sharded), without a DDP wrapper."""
        return self.accelerator.unwrap_model(model)

    def sync(self, model: torch.nn.Module, last: bool) -> contextlib.AbstractContextManager[None]:
        """Gradient synchronisation for one micro-batch: only the step's last one reduces."""
        return contextlib.nullcontext() if last else self.accelerator.no_sync(model)

    def backward(self, model: torch.nn.Module, loss: torch.Tensor, last: bool) -> None:
        self.accelerator.backward(loss * self.accelerator.num_processes)

    def step(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, max_norm: float | None,
             finite_loss: bool) -> tuple[float, bool]:
        """Clip and step unless the loss or the gradient norm is not finite; returns (norm, stepped).
        Every process sees the same global loss and norm, so all step or all skip."""
        bound = max_norm if max_norm is not None else math.inf
        grad_norm = float(self.accelerator.clip_grad_norm_(model.parameters(), bound))
        stepped = finite_loss and math.isfinite(grad_norm)
        if stepped:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return grad_norm, stepped

    def full_weights(self, model: torch.nn.Module) -> contextlib.AbstractContextManager[None]:
        """Every parameter materialised on every process for the block (rollouts, evaluation)."""
        return contextlib.nullcontext()

    # --- checkpoints ------------------------------------------------------------------------------
    def save(self, folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Write the student's weights and optimizer state into ``folder`` (called on every process)."""
        if self.accelerator.is_main_process:
            from opd.checkpoint import save_student_weights

            save_student_weights(folder, self.module(model))
            torch.save(optimizer.state_dict(), folder / "optimizer.pt")

    def load(self, folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        from opd.checkpoint import load_student_weights

        load_student_weights(folder, self.module(model))
        optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))

    def full_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        """The unsharded state dict on the main process (None elsewhere); called on every process."""
        return self.module(model).state_dict() if self.accelerator.is_main_process else None

    @property
    def resharding(self) -> bool:
        """Whether a checkpoint can be resumed on another number of processes."""
        return False


class DataParallel(Parallel):
    """A full replica of the student per process (Accelerate's DDP; a plain model on one process)."""

    def prepare(self, student: torch.nn.Module, make_optimizer: OptimizerFactory
                ) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        optimizer = make_optimizer([p for p in student.parameters() if p.requires_grad])
        return self.accelerator.prepare(student, optimizer)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks, found by the class names the model lists as not to be split
    (``_no_split_modules``, set by every transformers architecture)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT
    names = set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in base.modules() if type(m).__name__ in names]
    if not layers:
        raise OpdError(f"{type(base).__name__} names no decoder-layer class (_no_split_modules) to shard; "
                       "use train.distributed=ddp")
    return layers


class FullyShardedFSDP2(Parallel):
    """PyTorch FSDP2: parameters, gradients and optimizer states sharded over the processes."""

    name = "fsdp"

    def __init__(self, accelerator: Any, *, reshard_after_forward: bool = True, cpu_offload: bool = False,
                 mixed_precision: str = "no") -> None:
        super().__init__(accelerator)
        self.reshard_after_forward = reshard_after_forward
        self.cpu_offload = cpu_offload
        self.mixed_precision = mixed_precision

    def _policies(self) -> dict[str, Any]:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy

        compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.mixed_precision)
        # Compute in the run's precision, reduce gradients in fp32 (the weights and AdamW stay fp32).
        mp = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32) if compute else \
            MixedPrecisionPolicy()
        # Pinned host memory needs an accelerator; on a CPU-only host offloading is a no-op anyway.
        offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if self.cpu_offload else OffloadPolicy()
        return {"mp_policy": mp, "offload_policy": offload}

    def prepare(self, student: torch.nn.Module, make_optimizer: OptimizerFactory
                ) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        from torch.distributed.fsdp import fully_shard

        if not torch.distributed.is_initialized():
            raise OpdError("train.distributed=fsdp needs a process group: launch with torchrun or accelerate launch")
        policies = self._policies()
        for layer in decoder_layers(student):
            fully_shard(layer, reshard_after_forward=self.reshard_after_forward, **policies)
        fully_shard(student, **policies)  # the root: embeddings, final norm, LM head (tied weights together)
        trainable = [p for p in student.parameters() if p.requires_grad]
        from torch.distributed.tensor import DTensor

        if not all(isinstance(p, DTensor) for p in trainable):
            # e.g. adapters added after sharding: their gradients would never be reduced.
            raise OpdError("some trainable parameters are not sharded; add LoRA adapters before sharding")
        return student, make_optimizer(trainable)

    def module(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def sync(self, model: torch.nn.Module, last: bool) -> contextlib.AbstractContextManager[None]:
        return _gradient_sync(model, last)

    def backward(self, model: torch.nn.Module, loss: torch.Tensor, last: bool) -> None:
        # FSDP2's reduce-scatter averages over processes, like DDP.
        (loss * self.accelerator.num_processes).backward()

    def step(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, max_norm: float | None,
             finite_loss: bool) -> tuple[float, bool]:
        bound = max_norm if max_norm is not None else math.inf
        norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], bound)
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        stepped = finite_loss and math.isfinite(grad_norm)
        if stepped:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return grad_norm, stepped

    @contextlib.contextmanager
    def full_weights(self, model: torch.nn.Module) -> Iterator[None]:
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        model.set_reshard_after_forward(False)  # recursive: no unit reshards inside the block
        for unit in units:
            unit.unshard()  # one all-gather per unit, then forwards need no collective
        try:
            yield
        finally:
            for unit in units:
                unit.reshard()
                unit.set_reshard_after_forward(self.reshard_after_forward if unit is not model else False,
                                               recurse=False)

    def save(self, folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(model, optimizer)
        # Each process writes its own shard of weights and AdamW states (DCP's files + .metadata).
        dcp.save({"model": model_state, "optim": optim_state},
                 storage_writer=dcp.FileSystemWriter(str(folder / "student"), sync_files=True))

    def load(self, folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        if not (folder / "student" / ".metadata").is_file():
            from opd.errors import RunDirError

            raise RunDirError(f"checkpoint {folder} holds no sharded student; it was written with another "
                              "train.distributed (resume with the same one)")
        model_state, optim_state = get_state_dict(model, optimizer)  # also creates AdamW's state to fill
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(folder / "student")))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

    def full_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return full if self.accelerator.is_main_process else None

    @property
    def resharding(self) -> bool:
        return True


@contextlib.contextmanager
def _gradient_sync(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    if enabled:
        yield
        return
    model.set_requires_gradient_sync(False)  # recursive over the units
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


class DeepSpeedZeRO(Parallel):
    """DeepSpeed ZeRO-2 / ZeRO-3 through Accelerate's DeepSpeed plugin.

    DeepSpeed owns accumulation, clipping and the optimizer step: ``backward`` marks the step's last
    micro-batch as the accumulation boundary, and ``step`` then runs the engine's step — unless the
    step's global loss is not finite, in which case the accumulated gradients are dropped instead
    (a non-finite *gradient* with a finite loss is clipped and applied by DeepSpeed, which opd cannot
    veto; the run stops after ``train.max_nonfinite_steps`` such norms in a row).
    """

    name = "deepspeed"

    def __init__(self, accelerator: Any, grad_accum: int) -> None:
        super().__init__(accelerator)
        self.grad_accum = grad_accum
        # Accelerate registers its ZeRO-3 config with transformers, which then loads *every* model of the
        # process partitioned (zero.Init) — the frozen teacher too, whose forwards no engine would gather.
        # opd loads models whole; the engine partitions the student when it is built.
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()

    def prepare(self, student: torch.nn.Module, make_optimizer: OptimizerFactory
                ) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        optimizer = make_optimizer([p for p in student.parameters() if p.requires_grad])
        return self.accelerator.prepare(student, optimizer)

    def module(self, model: torch.nn.Module) -> torch.nn.Module:
        return getattr(model, "module", model)

    def sync(self, model: torch.nn.Module, last: bool) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def backward(self, model: torch.nn.Module, loss: torch.Tensor, last: bool) -> None:
        # The engine divides by its accumulation steps and averages over processes.
        model.set_gradient_accumulation_boundary(is_boundary=last)
        model.backward(loss * self.accelerator.num_processes * self.grad_accum)

    def step(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, max_norm: float | None,
             finite_loss: bool) -> tuple[float, bool]:
        if not finite_loss:
            model.zero_grad()
            return math.nan, False
        model.step()
        norm = model.get_global_grad_norm()
        grad_norm = float(norm) if norm is not None else math.nan
        return grad_norm, math.isfinite(grad_norm)

    @contextlib.contextmanager
    def full_weights(self, model: torch.nn.Module) -> Iterator[None]:
        if getattr(model, "zero_optimization_stage", lambda: 0)() < 3:
            yield
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(self.module(model).parameters()), modifier_rank=None):
            yield

    def save(self, folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        model.save_checkpoint(str(folder / "student"), tag="state")

    def load(self, folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        path, _ = model.load_checkpoint(str(folder / "student"), tag="state")
        if path is None:
            from opd.errors import RunDirError

            raise RunDirError(f"checkpoint {folder} holds no DeepSpeed student; resume with the same "
                              "train.distributed")

    def full_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        state = self.accelerator.get_state_dict(model)  # gathers ZeRO-3 partitions on the main process
        return state if self.accelerator.is_main_process else None


def deepspeed_accelerator_kwargs(config: Any, on_cpu: bool) -> dict[str, Any]:
    """``Accelerator`` arguments for DeepSpeed ZeRO with opd's settings.

    On a CPU-only host Accelerate must not be told ``cpu=True`` (that drops the plugin and wraps the
    model in DDP) and needs the gloo backend named explicitly (otherwise every process believes it is
    the only one). Buckets are sized for small models: DeepSpeed's defaults (5e8 elements) made a step
    of a tiny model take ~10 s on CPU.
    """
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise OpdError("train.distributed=deepspeed needs DeepSpeed: pip install deepspeed "
                       "(or use train.distributed=fsdp, which needs nothing extra)") from None
    from accelerate import DeepSpeedPlugin
    from accelerate.utils import InitProcessGroupKwargs

    train = config.train
    bucket = int(5e6)
    ds_config = {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "gradient_clipping": config.optim.max_grad_norm or 0.0,
        "zero_allow_untested_optimizer": True,  # opd's torch AdamW, partitioned by ZeRO
        "zero_optimization": {"stage": train.zero_stage, "reduce_bucket_size": bucket,
                              "allgather_bucket_size": bucket, "stage3_prefetch_bucket_size": bucket,
                              "stage3_param_persistence_threshold": int(1e4),
                              # lets the export gather ZeRO-3 partitions (in the weights' own dtype)
                              "stage3_gather_16bit_weights_on_model_save": True},
        "bf16": {"enabled": train.mixed_precision == "bf16"},
        "fp16": {"enabled": train.mixed_precision == "fp16"},
    }
    kwargs: dict[str, Any] = {"deepspeed_plugin": DeepSpeedPlugin(hf_ds_config=ds_config, zero3_init_flag=False),
                              "mixed_precision": train.mixed_precision}
    if on_cpu:
        kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
    return kwargs


def shard_for_inference(model: torch.nn.Module, processes: int) -> None:
    """Shard a frozen model (a teacher) with FSDP2 for forward passes only: every process holds 1/N
    of its weights and gathers one decoder layer at a time, so a teacher larger than one device fits.
    Its forwards are collective: every process must run the same number of them."""
    from torch.distributed.fsdp import fully_shard

    if processes < 2 or not torch.distributed.is_initialized():
        raise OpdError("teacher.shard splits the teacher over several processes; launch with torchrun "
                       "--nproc_per_node N (N >= 2) or place it with teacher.device")
    model.requires_grad_(False)
    for layer in decoder_layers(model):
        fully_shard(layer, reshard_after_forward=True)
    fully_shard(model, reshard_after_forward=True)


class StudentWeights:
    """The student's current weights for a sampler holding its own copy (a vLLM server, a snapshot).

    :meth:`hf_state_dict` is a collective — every process calls it — returning the weights under
    Hugging Face names on the main process (None elsewhere): sharded students are gathered, and a LoRA
    student is merged (through an unsharded copy rebuilt once on the main process when sharded).
    """

    def __init__(self, parallel: Parallel, model: torch.nn.Module, rebuild: Callable[[], torch.nn.Module],
                 step: int = 0) -> None:
        self.parallel = parallel
        self.model = model
        self.rebuild = rebuild
        self.step = step  # the optimizer step these weights are at (the resumed one, 0 for a fresh run)
        self._shadow: torch.nn.Module | None = None

    @property
    def module(self) -> torch.nn.Module:
        return self.parallel.module(self.model)

    def hf_state_dict(self) -> dict[str, torch.Tensor] | None:
        from opd.vllm_engine import hf_state_dict

        if self.parallel.name == "ddp":
            return hf_state_dict(self.module) if self.parallel.accelerator.is_main_process else None
        full = self.parallel.full_state_dict(self.model)
        if full is None:
            return None
        if self._shadow is None:
            self._shadow = self.rebuild()
        self._shadow.load_state_dict(full)
        return hf_state_dict(self._shadow)
