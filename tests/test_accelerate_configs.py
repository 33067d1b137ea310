"""The example accelerate configs parse with accelerate's own loader and name classes that exist."""

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig
from accelerate.utils import DistributedType

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
EXPECTED = {
    "ddp.yaml": DistributedType.MULTI_GPU,
    "deepspeed_zero2.yaml": DistributedType.DEEPSPEED,
    "deepspeed_zero3.yaml": DistributedType.DEEPSPEED,
    "fsdp.yaml": DistributedType.FSDP,
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_parses(name):
    cfg = ClusterConfig.from_yaml_file(str(CONFIGS / name))
    assert cfg.distributed_type == EXPECTED[name]
    if cfg.distributed_type == DistributedType.DEEPSPEED:
        assert cfg.deepspeed_config["zero_stage"] == int(name[-6])
        # accumulation is stage 2's own setting: a fixed value here would override it (accelerate warns and
        # takes DeepSpeed's), so it is left out and accelerate fills in the run's
        assert "gradient_accumulation_steps" not in cfg.deepspeed_config
    if cfg.distributed_type == DistributedType.FSDP:  # the wrapped block class must be the diffusers one
        from diffusers.models.transformers import cogvideox_transformer_3d

        assert hasattr(cogvideox_transformer_3d, cfg.fsdp_config["fsdp_transformer_layer_cls_to_wrap"])


def test_every_config_is_covered():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)
