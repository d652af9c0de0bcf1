"""The DeepSpeed setup's checks that run without DeepSpeed: which modules each group's engine takes,
the refusal of a module shared by two groups, and 0-d parameters around engine start."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flowalign.training import deepspeed_engines as ds_


def test_each_group_takes_the_modules_holding_its_parameters():
    gen, fake, heads = nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 1)
    modules = {"generator": gen, "fake_score": fake, "discriminator": heads}
    groups = {"generator": list(gen.parameters()), "critic": [*fake.parameters(), *heads.parameters()]}
    assert ds_.check_partition(modules, groups) == {
        "generator": ["generator"],
        "critic": ["fake_score", "discriminator"],
    }


def test_a_module_in_two_groups_is_refused():
    net = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"module 'net' holds parameters of groups \['w', 'b'\]; .*FSDP2"):
        ds_.check_partition({"net": net}, {"w": [net.weight], "b": [net.bias]})


def test_frozen_scalars_are_vectors_while_the_engine_starts_and_trainable_ones_are_refused():
    net = nn.Linear(2, 2)
    net.scale = nn.Parameter(torch.tensor(2.5), requires_grad=False)
    with ds_._scalars_as_vectors(net):
        assert net.scale.shape == (1,)
        net.scale.data.view(torch.uint8)  # what DeepSpeed's broadcast does to every parameter
        net.scale.data.fill_(3.0)  # the broadcast writes in place
    assert net.scale.shape == () and net.scale.item() == 3.0
    net.scale.requires_grad_(True)
    with pytest.raises(ValueError, match=r"trainable 0-d parameters \['scale'\]"):
        with ds_._scalars_as_vectors(net):
            pass


def test_an_optimizer_without_an_engine_is_refused():
    with pytest.raises(ValueError, match="no engine"):
        ds_.engine_for(torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1))


def test_a_scalar_partitioned_by_zero3_is_gathered_with_its_own_shape_afterwards():
    """ZeRO-3 replaces a parameter's data by its (empty) partition and records the shape to gather it
    to: that recorded shape, not the data, takes the 0-d shape back."""
    net = nn.Linear(2, 2)
    net.scale = nn.Parameter(torch.tensor(2.5), requires_grad=False)
    with ds_._scalars_as_vectors(net):
        net.scale.ds_shape = net.scale.shape  # what partitioning records, then it empties the data
        net.scale.data = torch.empty(0)
    assert net.scale.ds_shape == torch.Size(()) and net.scale.numel() == 0
