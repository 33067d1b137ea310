"""How a run meets its launch: accelerate's process state, the engine (DDP, DeepSpeed ZeRO-2/3, FSDP2), how the
global batch splits across processes, and what each engine needs to prepare, gather and save a model.

Every command that trains or builds caches starts here, so that `torchrun` / `accelerate launch` are honoured on
GPUs and on CPU alike; the engines are tested on CPU with 2 processes in tests/test_multiprocess.py.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from moalign.errors import MoalignError
from moalign.run import console

logger = console.get_logger(__name__)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def _has_accelerator() -> bool:
    """Whether torch sees a GPU (or another accelerator) in this process."""
    probe = getattr(torch, "accelerator", None)  # torch >= 2.6
    if probe is not None:
        return bool(probe.is_available()) and probe.current_accelerator().type != "mps"
    return torch.cuda.is_available()


def launch_state():
    """accelerate's per-process state, created with the settings of the launch that started this process.

    accelerate creates its process state once per process and caches it; a bare `PartialState()` on a machine
    without GPUs ignores `torchrun` / `accelerate launch` and makes every process "process 0 of 1", each
    training alone. So the state is created here, first, from the launch's environment:

    - launched (WORLD_SIZE > 1) on a machine without an accelerator: the CPU path with gloo, DeepSpeed on its
      CPU accelerator when the accelerate config asks for DeepSpeed (`ACCELERATE_USE_DEEPSPEED`);
    - otherwise accelerate's defaults (NCCL on GPUs; one plain process outside a launch).

    Raises:
        MoalignError: DeepSpeed asked for together with ACCELERATE_USE_CPU, which turns DeepSpeed off.
    """
    from accelerate import PartialState

    if PartialState._shared_state:  # created before, by us or by a caller with its own settings
        return PartialState()
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerated = _has_accelerator()
    cpu = not accelerated or _env_flag("ACCELERATE_USE_CPU")
    if not accelerated:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # what DeepSpeed would pick, without its warning
    if launched and cpu and _env_flag("ACCELERATE_USE_DEEPSPEED"):
        if _env_flag("ACCELERATE_USE_CPU"):
            raise MoalignError(
                "the launch asks for DeepSpeed and for ACCELERATE_USE_CPU, which turns DeepSpeed off: unset "
                "ACCELERATE_USE_CPU (DeepSpeed runs on its CPU accelerator when the machine has no GPU)"
            )
        return PartialState(backend="gloo")
    return PartialState(cpu=cpu)


def make_accelerator(mixed_precision: str = "no", gradient_accumulation_steps: int = 1):
    """An `accelerate.Accelerator` for one stage, honouring the launch (see `launch_state`).

    The engine (DDP, DeepSpeed, FSDP) comes from the accelerate config of the launch. On a machine without GPUs
    accelerate maps an FSDP config to plain multi-CPU DDP; here it is mapped to FSDP, as on GPUs (FSDP2 runs on
    CPU over gloo: the tests and CPU debugging use it).

    Mixed precision and gradient accumulation are the run config's; a launch asking for others (`accelerate
    launch --mixed_precision / --gradient_accumulation_steps`, or the same in its config file) is refused, both
    values named.

    accelerate keeps one process-wide state and refuses a second Accelerator with another mixed precision. In a
    single process (the demo, a notebook, tests) each stage may bring its own, so the state is reset between
    stages; in a launched multi-process run the launch fixes it, as accelerate intends.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if launched not in ("no", mixed_precision):
        raise MoalignError(
            f"the accelerate launch asks for mixed precision {launched}, the run config for {mixed_precision}: set "
            f"it once, in the run config (--set mixed_precision={launched}; the real-model presets use bf16), and "
            "leave it out of the launch"
        )
    accumulation = os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
    if accumulation is not None and accumulation.strip() not in ("", "1", str(gradient_accumulation_steps)):
        raise MoalignError(
            f"the accelerate launch asks for {accumulation.strip()} gradient accumulation steps, the run config for "
            f"{gradient_accumulation_steps}: set it once, in the run config (--set gradient_accumulation_steps="
            f"{accumulation.strip()}), and leave it out of the launch"
        )
    state = launch_state()
    if state.num_processes == 1:
        AcceleratorState._reset_state()  # accelerate's own reset (its test utilities use it); keeps PartialState
    accelerator = Accelerator(
        mixed_precision=mixed_precision, gradient_accumulation_steps=gradient_accumulation_steps
    )
    if accelerator.distributed_type == DistributedType.MULTI_CPU and _env_flag("ACCELERATE_USE_FSDP"):
        from accelerate import PartialState
        from accelerate.utils import FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin()  # from the launch's environment, as accelerate builds it
        if accelerator.mixed_precision != "no":
            plugin.set_mixed_precision(accelerator.mixed_precision)
        accelerator.state.fsdp_plugin = plugin
        accelerator.state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return accelerator


def start_launch(
    stage: str,
    mixed_precision: str,
    batch_size: int,
    gradient_accumulation_steps: int = 1,
    *,
    shardable: bool = False,
):
    """The Accelerator of one training stage, checked against its launch, and the start-up line saying how it runs.

    Args:
        stage: the stage's name in the log ("stage1", "stage2", "pretrain-encoder").
        batch_size: the global batch of one step (`per_process_batch` splits it).
        shardable: whether the stage may run under DeepSpeed / FSDP (else `refuse_sharding`).

    Returns:
        (accelerator, micro-batch per process, launch record for RUN/config.json).
    """
    accelerator = make_accelerator(mixed_precision, gradient_accumulation_steps)
    if not shardable:
        refuse_sharding(accelerator, stage)
    micro = per_process_batch(accelerator, batch_size, gradient_accumulation_steps)
    record = launch_record(accelerator, micro, gradient_accumulation_steps)
    logger.info(f"[{stage}] {describe_launch(record)}")
    return accelerator, micro, record


def engine_name(accelerator) -> str:
    """The training engine of an Accelerator, as the run folder records it: "single", "ddp",
    "deepspeed-zero2", "deepspeed-zero3", "fsdp1", "fsdp2" (or accelerate's own name for other types)."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        stage = accelerator.state.deepspeed_plugin.zero_stage
        return f"deepspeed-zero{stage}"
    if kind == DistributedType.FSDP:
        return f"fsdp{accelerator.state.fsdp_plugin.fsdp_version}"
    if kind == DistributedType.NO:
        return "single"
    if accelerator.num_processes > 1:
        return "ddp"
    return str(kind).split(".")[-1].lower()


def launch_record(accelerator, micro_batch: int, gradient_accumulation_steps: int = 1) -> dict[str, Any]:
    """What RUN/config.json records of the launch: processes, engine, per-process batch, device."""
    from accelerate.utils import DistributedType

    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    return {
        "num_processes": accelerator.num_processes,
        "engine": engine_name(accelerator),
        "per_process_batch": micro_batch * gradient_accumulation_steps,
        "micro_batch": micro_batch,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        # DeepSpeed handles precision itself (accelerate reports "no" for it)
        "mixed_precision": _deepspeed_precision(accelerator) if deepspeed else accelerator.mixed_precision,
        "device": str(accelerator.device),
    }


def describe_launch(record: dict[str, Any]) -> str:
    """One line for the start-up log."""
    n = record["num_processes"]
    return (
        f"{n} process{'es' if n > 1 else ''} ({record['engine']}, {record['device']}), "
        f"{record['per_process_batch']} clip(s) per process and step "
        f"({record['gradient_accumulation_steps']} micro-batch(es) of {record['micro_batch']}), "
        f"mixed precision {record['mixed_precision']}"
    )


def _deepspeed_precision(accelerator) -> str:
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    for name in ("bf16", "fp16"):
        if ds.get(name, {}).get("enabled") is True:
            return name
    return "no"


def deepspeed_dtype(accelerator) -> torch.dtype | None:
    """The dtype DeepSpeed holds the prepared model in (bf16 / fp16), else None.

    DeepSpeed casts the whole model to 16 bit and keeps float32 master weights in its optimizer; accelerate's
    autocast is off then, so floating inputs must be cast by the caller (as diffusers' training scripts do)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    return autocast_dtype(_deepspeed_precision(accelerator))


def autocast_dtype(mixed_precision: str | None) -> torch.dtype | None:
    """The 16-bit dtype of accelerate's mixed-precision setting ("bf16", "fp16"), None for "no"."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)


def per_process_batch(accelerator, batch_size: int, gradient_accumulation_steps: int = 1) -> int:
    """The micro-batch of each process: the global `batch_size` split over the processes, then into
    `gradient_accumulation_steps` micro-batches.

    Raises:
        MoalignError: the batch does not split evenly, or the launch asks for another accumulation.
    """
    if accelerator.gradient_accumulation_steps != gradient_accumulation_steps:
        raise MoalignError(
            f"the accelerate launch asks for {accelerator.gradient_accumulation_steps} gradient accumulation steps, "
            f"the run config for {gradient_accumulation_steps}: set it once, with --set "
            "gradient_accumulation_steps=N, and leave it out of the accelerate / DeepSpeed config (or set it to "
            "'auto' there)"
        )
    parts = accelerator.num_processes * gradient_accumulation_steps
    if batch_size % parts:
        raise MoalignError(
            f"batch_size {batch_size} is the global batch and must split evenly into {accelerator.num_processes} "
            f"process(es) x {gradient_accumulation_steps} accumulation step(s); use a multiple of {parts} "
            "(--batch-size or --gradient-accumulation-steps)"
        )
    return batch_size // parts


def reduce_scalars(accelerator, scalars: dict[str, float]) -> dict[str, float]:
    """The mean of each logged scalar over the processes: the global batch's value, not rank 0's share.
    Every process must call it."""
    if accelerator.num_processes == 1:
        return scalars
    names = sorted(scalars)
    mean = accelerator.reduce(torch.tensor([scalars[k] for k in names], device=accelerator.device), "mean")
    return dict(zip(names, mean.tolist(), strict=True))


def refuse_sharding(accelerator, stage: str) -> None:
    """Stages that train small modules every process holds whole (stage 1's heads, the playground's encoder)
    run single-process or DDP; a DeepSpeed / FSDP launch is refused rather than silently run as DDP."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        raise MoalignError(
            f"{stage} trains small modules that every process holds whole: launch it with DDP "
            "(accelerate launch --config_file configs/accelerate/ddp.yaml, or torchrun), not "
            f"{engine_name(accelerator)}; DeepSpeed and FSDP are for stage 2"
        )


def prepare_training(accelerator, model: nn.Module, optimizer, *, micro_batch: int, grad_clip: float):
    """`accelerator.prepare(model, optimizer)` for any engine; returns (model, optimizer, trainable parameters).

    DeepSpeed is told the per-process micro-batch, the accumulation and the gradient clipping of the run
    config (it cannot infer them without a dataloader); an accelerate / DeepSpeed config that fixes another
    value is refused. Under ZeRO-3 the weights are gathered for saving (stage3_gather_16bit_weights_on_model_save).
    The parameter list is taken after `prepare`, which may replace the parameters (FSDP2: DTensors), so gradient
    clipping sees what the optimizer steps.

    Raises:
        MoalignError: the DeepSpeed config fixes a micro-batch, accumulation or clipping other than the run's.
    """
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ours = {
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": accelerator.gradient_accumulation_steps,
            "gradient_clipping": float(grad_clip),
        }
        fixed = {k: ds[k] for k in ours if ds.get(k, "auto") != "auto" and float(ds[k]) != float(ours[k])}
        if fixed:
            asked = {k: ours[k] for k in fixed}
            raise MoalignError(
                f"the DeepSpeed config fixes {fixed}, the run config asks for {asked}: set them once, in the "
                "run config (--set batch_size / gradient_accumulation_steps / grad_clip), and leave them out of "
                "the DeepSpeed config (or set them to 'auto' there)"
            )
        ds.update(ours)
        if accelerator.state.deepspeed_plugin.zero_stage == 3:  # saving needs the gathered weights
            ds.setdefault("zero_optimization", {})["stage3_gather_16bit_weights_on_model_save"] = True
        ds["train_batch_size"] = (
            micro_batch * accelerator.gradient_accumulation_steps * accelerator.num_processes
        )
    model, optimizer = accelerator.prepare(model, optimizer)
    params = [p for p in model.parameters() if p.requires_grad]
    return model, optimizer, params


def full_state_dict(accelerator, model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The prepared model's whole state dict on the main process, None on the others; every process must call it
    (ZeRO-3 and FSDP gather the shards here).

    Under DeepSpeed with 16-bit weights the trainable entries are DeepSpeed's float32 master weights (what its
    optimizer steps), so LoRA adapters and full fine-tunes are saved as trained, not rounded to bf16.
    """
    state = accelerator.get_state_dict(model)
    if deepspeed_dtype(accelerator) is not None:
        from deepspeed.utils import safe_get_full_fp32_param

        inner = accelerator.unwrap_model(model)
        master = {  # a collective under ZeRO-3: every process runs it
            n: safe_get_full_fp32_param(p) for n, p in inner.named_parameters() if p.requires_grad
        }
        if state is not None:
            state.update({n: v.detach().cpu() for n, v in master.items() if v is not None})
    return state if accelerator.is_main_process else None
