"""Registry: built-in names, lazy loading, user registration, clear errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from flowalign.rewards import RewardModel, available_rewards, load_reward, parse_reward_spec, register_reward
from flowalign.rewards import registry as registry_module

BUILTINS = {"clip", "pickscore", "hpsv2", "hpsv2.1", "aesthetic", "toy"}


class ConstantReward(RewardModel):
    name = "constant"
    dimensions = ("const",)
    needs_prompts = False

    def __init__(self, value: float, device, dtype) -> None:
        super().__init__()
        self.value = torch.nn.Parameter(torch.tensor(value, device=device, dtype=dtype), requires_grad=False)

    def _score_images(self, images, prompts):
        return {"const": self.value.expand(images.shape[0])}


@pytest.fixture()
def clean_registry():
    before = dict(registry_module._REGISTRY)
    yield
    registry_module._REGISTRY.clear()
    registry_module._REGISTRY.update(before)


def test_builtins_are_listed_without_importing_backbones():
    assert BUILTINS <= set(available_rewards())
    assert available_rewards() == sorted(available_rewards())
    # Listing must not pull in open_clip / transformers (seconds of import time): fresh interpreter.
    code = (
        "import sys, flowalign.rewards as r; r.available_rewards(); "
        "print('open_clip' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match=r"unknown reward 'hpsv3'.*clip.*hpsv2\.1.*pickscore"):
        load_reward("hpsv3")


def test_register_and_load_custom_reward_with_device_and_dtype(clean_registry):
    @register_reward("constant")
    def _load(*, device="cpu", dtype=torch.float32, value=1.5):
        return ConstantReward(value, device, dtype)

    assert "constant" in available_rewards()
    reward = load_reward("constant", dtype=torch.float64, value=4.0)
    assert not reward.training and reward.value.dtype == torch.float64
    out = reward.score(torch.rand(3, 3, 4, 4))
    assert out["const"].dtype == torch.float32 and out["const"].tolist() == [4.0, 4.0, 4.0]
    with pytest.raises(ValueError, match="already registered"):
        register_reward("constant")(_load)
    with pytest.raises(ValueError, match="already registered"):
        register_reward("pickscore")(_load)


def test_loader_must_return_a_reward_model(clean_registry):
    @register_reward("broken")
    def _load(*, device="cpu", dtype=torch.float32):
        return object()

    with pytest.raises(TypeError, match="expected a RewardModel"):
        load_reward("broken")


def test_parse_reward_spec_reads_name_and_typed_options():
    assert parse_reward_spec("pickscore") == ("pickscore", {})
    assert parse_reward_spec("clip:model=/ckpt/clip-L,scale=2.5, pretrained=null") == (
        "clip",
        {"model": "/ckpt/clip-L", "scale": 2.5, "pretrained": None},
    )
    with pytest.raises(ValueError, match="option 'scale' is not of the form key=value"):
        parse_reward_spec("clip:scale")
    with pytest.raises(ValueError, match="empty reward name"):
        parse_reward_spec(":model=x")
    with pytest.raises(ValueError, match="'model' is given twice"):
        parse_reward_spec("clip:model=a,model=b")
