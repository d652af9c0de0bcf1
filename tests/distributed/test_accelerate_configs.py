"""The launch configs in configs/accelerate/ load with accelerate's own config loader and launch parser,
and the environment ``accelerate launch`` would hand each process builds the FSDP2 / DeepSpeed plugin."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from unittest import mock

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "accelerate"

EXPECTED = {
    # file: (distributed type, processes, machines, FSDP version, ZeRO stage)
    "fsdp2_1node_8gpu.yaml": (DistributedType.FSDP, 8, 1, 2, None),
    "fsdp2_2nodes.yaml": (DistributedType.FSDP, 16, 2, 2, None),
    "deepspeed_zero2_8gpu.yaml": (DistributedType.DEEPSPEED, 8, 1, None, 2),
    "deepspeed_zero3_8gpu.yaml": (DistributedType.DEEPSPEED, 8, 1, None, 3),
}


def test_every_shipped_config_is_checked():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads_and_sets_the_strategy(name):
    kind, processes, machines, fsdp_version, zero_stage = EXPECTED[name]
    cfg = load_config_from_file(str(CONFIGS / name))
    assert (cfg.distributed_type, cfg.num_processes, cfg.num_machines) == (kind, processes, machines)
    assert cfg.use_cpu is False
    if fsdp_version is not None:
        assert cfg.fsdp_config["fsdp_version"] == fsdp_version
    else:
        assert cfg.deepspeed_config["zero_stage"] == zero_stage


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_launch_environment_builds_the_plugin(name):
    """What `accelerate launch --config_file` exports to the processes, turned into the plugin the
    Accelerator would build from it."""
    _, _, _, fsdp_version, zero_stage = EXPECTED[name]
    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / name), "train.py"])
    threads = os.environ.get("OMP_NUM_THREADS") or "1"  # accelerate's int() fails on an empty value
    with mock.patch.dict(os.environ, {"OMP_NUM_THREADS": threads}):
        args, defaults, _ = _validate_launch_command(args)
    if zero_stage is not None:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    with mock.patch.dict(os.environ, env):
        if fsdp_version is not None:
            from accelerate.utils import FullyShardedDataParallelPlugin

            plugin = FullyShardedDataParallelPlugin()
            assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
        else:
            from accelerate.utils import DeepSpeedPlugin

            plugin = DeepSpeedPlugin()
            assert plugin.zero_stage == zero_stage
            assert plugin.deepspeed_config["zero_optimization"]["stage"] == zero_stage


def _fake(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/bin/bash\n" + body + "\n")
    path.chmod(0o755)


def test_slurm_example_passes_slurm_node_rank_and_address_to_accelerate(tmp_path):
    """The sbatch script run with stand-ins for scontrol, srun (as node 1 of 2), accelerate and flowalign:
    accelerate gets the node's rank, the first node's address and 16 processes."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "accelerate-args.txt"
    _fake(bin_dir, "scontrol", 'printf "gpu-node-a\\ngpu-node-b\\n"')
    _fake(bin_dir, "srun", 'while [[ "$1" == --* ]]; do shift; done; SLURM_NODEID=1 exec "$@"')
    _fake(bin_dir, "accelerate", f'printf "%s\\n" "$@" > {record}')
    _fake(bin_dir, "flowalign", "exit 0")
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_NODELIST": "gpu-node-[a-b]",
        "SLURM_NNODES": "2",
        "HOME": str(tmp_path),
    }
    script = CONFIGS / "slurm_fsdp2.sbatch"
    proc = subprocess.run(
        ["bash", str(script), "run.yaml", "pairs.jsonl"],
        env=env,
        cwd=CONFIGS.parents[1],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    args = record.read_text().splitlines()
    value = {args[i]: args[i + 1] for i in range(len(args) - 1) if args[i].startswith("--")}
    assert value["--config_file"] == "configs/accelerate/fsdp2_2nodes.yaml"
    assert (value["--num_machines"], value["--num_processes"], value["--machine_rank"]) == ("2", "16", "1")
    assert (value["--main_process_ip"], value["--main_process_port"]) == ("gpu-node-a", "29500")
    assert args[args.index("--main_process_port") + 2 :] == [
        str(bin_dir / "flowalign"), "train", "dpo", "--config", "run.yaml", "--data", "pairs.jsonl", "--resume",
    ]  # fmt: skip
