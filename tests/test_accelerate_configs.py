"""The example accelerate configs parse with accelerate's own loader, their DeepSpeed JSONs build DeepSpeed plugins,
and they leave to the run config what the run config decides (precision, batch, accumulation, clipping).
tests/test_multiprocess.py launches each of them with 2 CPU processes."""

import json
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig
from accelerate.utils import DistributedType

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "accelerate"
EXPECTED = {
    "ddp.yaml": DistributedType.MULTI_GPU,
    "deepspeed_zero2.yaml": DistributedType.DEEPSPEED,
    "deepspeed_zero3.yaml": DistributedType.DEEPSPEED,
    "fsdp.yaml": DistributedType.FSDP,
}
RUN_CONFIG_DECIDES = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                      "gradient_clipping")  # fmt: skip


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_parses(name, monkeypatch):
    cfg = ClusterConfig.from_yaml_file(str(CONFIGS / name))
    assert cfg.distributed_type == EXPECTED[name]
    assert cfg.mixed_precision in (None, "no")  # the run config's (a launch asking for another is refused)
    if cfg.distributed_type == DistributedType.DEEPSPEED:
        file = ROOT / cfg.deepspeed_config["deepspeed_config_file"]  # relative to the repository root
        ds = json.loads(file.read_text())
        assert ds["zero_optimization"]["stage"] == int(name[-6])
        assert all(ds[k] == "auto" for k in RUN_CONFIG_DECIDES)
        assert ds["bf16"]["enabled"] == "auto" and ds["fp16"]["enabled"] == "auto"
        from accelerate.utils import DeepSpeedPlugin

        monkeypatch.chdir(ROOT)
        plugin = DeepSpeedPlugin(hf_ds_config=str(file))  # what accelerate builds from it in each process
        assert plugin.zero_stage == int(name[-6])
    if cfg.distributed_type == DistributedType.FSDP:  # FSDP2, wrapping the backbone's own blocks
        assert cfg.fsdp_config["fsdp_version"] == 2
        assert cfg.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        assert "fsdp_transformer_layer_cls_to_wrap" not in cfg.fsdp_config


def test_every_config_is_covered():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)
    assert sorted(p.name for p in (ROOT / "configs" / "deepspeed").glob("*.json")) == [
        "zero2.json",
        "zero3.json",
    ]
