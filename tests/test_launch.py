"""The launch plumbing in one process: how the global batch splits, what a DeepSpeed / accelerate config may not
override, the refusals that name their fix, and the pieces FSDP / DeepSpeed rely on (block classes to wrap,
loss parts that survive output rebuilding). The engines themselves run in tests/test_multiprocess.py."""

from types import SimpleNamespace

import pytest
import torch
from accelerate import PartialState
from accelerate.utils import DistributedType
from conftest import tiny_transformer
from torch.distributed.utils import _apply_to_tensors

from moalign.backbones import get_backbone
from moalign.errors import MoalignError
from moalign.losses import LossParts
from moalign.run.launch import (
    launch_state,
    make_accelerator,
    per_process_batch,
    prepare_training,
    refuse_sharding,
)


def _fake(kind=DistributedType.MULTI_CPU, processes=2, accum=1, ds_config=None, stage=2):
    plugin = SimpleNamespace(deepspeed_config=ds_config or {}, zero_stage=stage)
    return SimpleNamespace(
        distributed_type=kind, num_processes=processes, gradient_accumulation_steps=accum,
        state=SimpleNamespace(deepspeed_plugin=plugin), prepare=lambda *objs: objs,
    )  # fmt: skip


def test_the_global_batch_splits_into_processes_and_micro_batches():
    assert per_process_batch(_fake(processes=2, accum=2), 8, 2) == 2
    assert per_process_batch(_fake(processes=1), 4) == 4
    with pytest.raises(MoalignError, match="must split evenly into 2 process.*multiple of 4"):
        per_process_batch(_fake(processes=2, accum=2), 6, 2)
    with pytest.raises(
        MoalignError, match="launch asks for 4 gradient accumulation steps.*--set gradient_acc"
    ):
        per_process_batch(_fake(accum=4), 8, 2)


def test_deepspeed_is_given_the_run_configs_batch_and_refuses_another():
    ds = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "zero_optimization": {},
    }
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = _fake(DistributedType.DEEPSPEED, processes=4, accum=2, ds_config=ds, stage=3)
    _, _, params = prepare_training(acc, model, opt, micro_batch=3, grad_clip=0.5)
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 2
    assert ds["gradient_clipping"] == 0.5 and ds["train_batch_size"] == 24
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True  # saving gathers
    assert [id(p) for p in params] == [id(p) for p in model.parameters()]
    fixed = _fake(DistributedType.DEEPSPEED, ds_config={"train_micro_batch_size_per_gpu": 8})
    with pytest.raises(MoalignError, match="fixes {'train_micro_batch_size_per_gpu': 8}.*leave them out"):
        prepare_training(fixed, model, opt, micro_batch=3, grad_clip=1.0)
    same = _fake(DistributedType.DEEPSPEED, ds_config={"train_micro_batch_size_per_gpu": 3})
    prepare_training(same, model, opt, micro_batch=3, grad_clip=1.0)  # the same value is no conflict


def test_small_stages_refuse_sharded_engines_with_the_fix():
    refuse_sharding(_fake(DistributedType.MULTI_CPU), "stage 1")  # DDP is fine
    with pytest.raises(MoalignError, match="stage 1 .*configs/accelerate/ddp.yaml.*not deepspeed-zero2"):
        refuse_sharding(_fake(DistributedType.DEEPSPEED), "stage 1")


def test_a_launch_asking_for_another_mixed_precision_is_refused(monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with pytest.raises(MoalignError, match="asks for mixed precision bf16.*--set mixed_precision=bf16"):
        make_accelerator("no")


def test_a_launch_asking_for_other_accumulation_is_refused(monkeypatch):
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4")
    with pytest.raises(MoalignError, match="asks for 4 gradient accumulation steps, the run config for 2"):
        make_accelerator("no", gradient_accumulation_steps=2)
    make_accelerator("no", gradient_accumulation_steps=4)  # the same value: fine


def test_deepspeed_with_the_cpu_flag_is_refused(monkeypatch):
    """ACCELERATE_USE_CPU turns DeepSpeed off inside accelerate: said, not silently run as DDP."""
    saved = dict(PartialState._shared_state)
    PartialState._shared_state.clear()
    try:
        for k, v in {
            "WORLD_SIZE": "2",
            "ACCELERATE_USE_DEEPSPEED": "true",
            "ACCELERATE_USE_CPU": "true",
        }.items():
            monkeypatch.setenv(k, v)
        with pytest.raises(MoalignError, match="unset ACCELERATE_USE_CPU"):
            launch_state()
    finally:
        PartialState._shared_state.clear()
        PartialState._shared_state.update(saved)


@pytest.mark.parametrize("family", ["cogvideox", "wan"])
def test_fsdp_wraps_the_backbones_own_blocks(family):
    from moalign.alignment import AlignConfig, Aligner
    from moalign.stage2 import Stage2Model

    spec = get_backbone(family)
    transformer = tiny_transformer(family)
    model = Stage2Model(spec, transformer, Aligner(AlignConfig(mode="none"), 32, 8, (1, 1, 1), (1, 1, 1)))
    block = type(spec.blocks(transformer)[0]).__name__
    assert block in model._no_split_modules  # accelerate's TRANSFORMER_BASED_WRAP reads this list


def test_loss_parts_survive_output_rebuilding():
    """torch's FSDP / DDP rebuild a module's outputs container by container; LossParts stays LossParts."""
    parts = LossParts(diffusion=torch.tensor(1.0), total=torch.tensor(2.0))
    rebuilt = _apply_to_tensors(lambda t: t * 2, parts)
    assert isinstance(rebuilt, LossParts) and float(rebuilt.total) == 4.0 and list(rebuilt) == list(parts)
