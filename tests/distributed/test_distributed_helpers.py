"""The single-process parts of training/distributed.py: export copies, group ownership, DeepSpeed values."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from flowalign.config import TrainConfig
from flowalign.training import distributed as dist_
from flowalign.training.deepspeed_engines import configure_deepspeed


class Holder:
    """Stands for a method holding a model that holds a pipeline that holds the trainable network."""

    def __init__(self, net: nn.Module) -> None:
        self.model = SimpleNamespace(pipe=SimpleNamespace(transformer=net), modules={"transformer": net})
        self.wrapper = nn.Sequential(net)


def test_export_copies_are_filled_swapped_in_everywhere_and_restored():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    net[0].requires_grad_(False)
    holder = Holder(net)
    copies = dist_.ExportCopies({"transformer": net}, build=True)
    plain = copies.copies["transformer"]
    assert all(p.is_meta for p in plain.parameters())  # no memory before the fill
    full = {k: v + 1.0 for k, v in net.state_dict().items()}
    copies.fill({"transformer": full})
    assert [p.requires_grad for p in plain.parameters()] == [p.requires_grad for p in net.parameters()]
    with copies.swapped(holder):
        assert holder.model.pipe.transformer is plain and holder.model.modules["transformer"] is plain
        assert holder.wrapper[0] is plain
        for key, value in plain.state_dict().items():
            assert torch.equal(value, full[key])
    assert holder.model.pipe.transformer is net and holder.wrapper[0] is net
    assert holder.model.modules["transformer"] is net
    ema = {f"transformer.{n}": torch.full_like(p, 7.0) for n, p in net.named_parameters() if p.requires_grad}
    copies.load_trainable(ema, ["transformer"])
    assert torch.equal(plain[1].weight, torch.full((2, 4), 7.0))
    assert torch.equal(plain[0].weight, full["0.weight"])  # frozen weights are not EMA'd


def test_export_copies_refuse_weights_of_another_module():
    copies = dist_.ExportCopies({"net": nn.Linear(3, 4)}, build=True)
    with pytest.raises(ValueError, match="export of 'net'.*missing \\['bias'\\]"):
        copies.fill({"net": {"weight": torch.zeros(4, 3)}})


class FakeAccelerator:
    """Records ``prepare`` calls; hands back what it got, as an FSDP2 prepare does (in-place sharding),
    with each parameter replaced by a new one, as ``fully_shard`` does."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self._optimizers: list = []
        self.plugin = SimpleNamespace(transformer_cls_names_to_wrap=["Linear", "JointTransformerBlock"])
        self.state = SimpleNamespace(fsdp_plugin=self.plugin)
        self.wrap_names: list[list[str]] = []

    def prepare(self, module, *optimizers):
        self.calls.append((module, *optimizers))
        self.wrap_names.append(list(self.plugin.transformer_cls_names_to_wrap))
        for opt in optimizers:
            for group in opt.param_groups:
                group["params"] = [nn.Parameter(p.detach().clone()) for p in group["params"]]
            self._optimizers.append(opt)
        return (module, *optimizers)

    def prepare_optimizer(self, opt, device_placement=None):
        self._optimizers.append(opt)
        return opt


def test_a_group_spanning_two_modules_gets_its_optimizer_over_the_sharded_parameters():
    """f-distill's critic: one group over two modules. Each module is prepared with a carrier (SGD over
    its share of the group), and the group's optimizer is built afterwards over the parameters the
    carriers were given back, in the group's order; the carriers leave the accelerator's list."""
    gen, fake, heads = nn.Linear(2, 2), nn.Linear(2, 3), nn.Linear(3, 1)
    groups = {"generator": list(gen.parameters()), "critic": [*fake.parameters(), *heads.parameters()]}
    acc = FakeAccelerator()
    built: dict = {}

    def make(g, ps):
        built[g] = torch.optim.AdamW(ps, lr=0.1)
        return built[g]

    trainable = {"generator": gen, "fake_score": fake, "discriminator": heads}
    wrapped, prepared, base, params = dist_.prepare_sharded(acc, dist_.FSDP2, None, trainable, groups, make)
    assert wrapped == trainable and base == built and prepared == built
    assert [len(c) for c in acc.calls] == [2, 2, 2]  # each module with one optimizer: own or carrier
    carriers = [c[1] for c in acc.calls[1:]]
    assert all(isinstance(c, torch.optim.SGD) for c in carriers)
    carried = [p for c in carriers for g in c.param_groups for p in g["params"]]
    assert params["critic"] == carried and len(carried) == 4
    assert all(p is not q for p, q in zip(carried, groups["critic"], strict=True))  # the replacements
    assert acc._optimizers == [built["generator"], built["critic"]]
    # the launch config's layer classes, cut down to those each module has while it is prepared
    assert acc.wrap_names == [["Linear"]] * 3
    assert acc.plugin.transformer_cls_names_to_wrap == ["Linear", "JointTransformerBlock"]


def test_deepspeed_refuses_a_module_shared_by_two_groups():
    a = nn.Linear(2, 2)
    groups = {"w": [a.weight], "b": [a.bias]}
    with pytest.raises(ValueError, match="one engine per optimizer group.*use FSDP2"):
        dist_.prepare_sharded(None, dist_.DEEPSPEED, None, {"a": a}, groups, lambda g, ps: None)


def test_deepspeed_takes_batch_accumulation_and_clipping_from_the_run_config(tmp_path, caplog):
    ds = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 1, "zero_optimization": {}}
    acc = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=ds)))
    acc.num_processes = 8
    cfg = TrainConfig(output_dir=tmp_path, batch_size=2, grad_accum_steps=4, grad_clip=0.5)
    with caplog.at_level(logging.WARNING):
        configure_deepspeed(acc, cfg)
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == 64 and ds["gradient_clipping"] == 0.5
    assert acc.gradient_accumulation_steps == 4
    assert "gradient_accumulation_steps=1 replaced by the run config's 4" in caplog.text


def test_full_state_of_plain_tensors_is_a_copy_and_loads_back():
    net = nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=0.1)
    net(torch.ones(1, 3)).sum().backward()
    opt.step()
    full = dist_.full_optimizer_state(opt, keep=True)
    assert full["param_groups"] == opt.state_dict()["param_groups"]
    for idx, entry in opt.state_dict()["state"].items():
        for key, value in entry.items():
            assert torch.equal(full["state"][idx][key], value)
    assert dist_.full_optimizer_state(opt, keep=False) is None
    weights = dist_.full_tensors(net.named_parameters(), keep=True)
    assert weights["weight"].data_ptr() != net.weight.data_ptr()
    back = dist_.shard_like(weights["weight"].double(), net.weight)
    assert back.dtype == torch.float32 and torch.equal(back, net.weight.detach())


class Block(nn.Linear):
    """Stands for a transformer block class that the launch config wraps."""


def test_a_frozen_reference_is_sharded_block_by_block_then_whole(monkeypatch):
    """shard_frozen gives each block the launch config names an FSDP unit before the module itself
    (a module on the CPU then reaches the device one block at a time); NO_WRAP gives one unit, and an
    unmarked module is left alone."""
    import torch.distributed.fsdp as fsdp

    calls = []
    monkeypatch.setattr(fsdp, "fully_shard", lambda module, mesh=None: calls.append(module))
    ref = nn.Sequential(Block(2, 2), nn.LayerNorm(2), Block(2, 2))
    setattr(ref, dist_.SHARD_FROZEN, True)
    plugin = SimpleNamespace(auto_wrap_policy=print, transformer_cls_names_to_wrap=["Block", "Other"])
    acc = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin), torch_device_mesh=None)
    dist_.shard_frozen(acc, [ref, nn.Linear(2, 2)])
    assert calls == [ref[0], ref[2], ref]
    calls.clear()
    plugin.auto_wrap_policy = None  # NO_WRAP
    dist_.shard_frozen(acc, [ref])
    assert calls == [ref]
