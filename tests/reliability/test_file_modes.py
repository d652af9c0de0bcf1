"""Atomic writes respect the umask: a file written through a temporary file and a rename gets
0666 & ~umask (0644 under umask 022), a folder 0777 & ~umask -- not the 0600/0700 of ``tempfile``."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import rel_summary
import torch

from flowalign.config import TrainConfig, save_config
from flowalign.data.media import atomic_write, save_image
from flowalign.files import atomic_write_json, current_umask, match_umask, write_jsonl
from flowalign.rewards.multihead_files import write_folder


@pytest.fixture(params=[0o022, 0o002, 0o077])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_current_umask_reads_the_process_umask(umask):
    assert current_umask() == umask


def test_atomic_writers_give_files_the_umask_mode(tmp_path, umask):
    want = 0o666 & ~umask
    written = {
        "save_image": tmp_path / "a.png",
        "atomic_write": tmp_path / "b.txt",
        "save_config": tmp_path / "c.yaml",
        "atomic_write_json": tmp_path / "d.json",
        "write_jsonl": tmp_path / "e.jsonl",
    }
    save_image(torch.zeros(3, 8, 8), written["save_image"])
    with atomic_write(written["atomic_write"]) as tmp:
        tmp.write_text("x")
    save_config(TrainConfig(), written["save_config"])
    atomic_write_json(written["atomic_write_json"], {})
    write_jsonl(written["write_jsonl"], [{"a": 1}])
    for name, path in written.items():
        assert _mode(path) == want, (name, oct(_mode(path)), oct(want))
        rel_summary.add_to_list("file modes", f"umask {umask:04o} -> {want:04o}", name)
    assert umask != 0o022 or want == 0o644


def test_an_atomically_written_folder_gets_the_umask_mode(tmp_path, umask):
    out = write_folder(
        tmp_path / "rm", state={"w": torch.zeros(2)}, config={}, dtype="float32", tokenizer=None
    )
    assert _mode(out) == 0o777 & ~umask
    for child in out.iterdir():
        assert _mode(child) == 0o666 & ~umask, child
    rel_summary.add_to_list("file modes", f"umask {umask:04o} -> {0o777 & ~umask:04o}", "reward model folder")


def test_match_umask_on_a_mkstemp_file(tmp_path, umask):
    import tempfile

    fd, name = tempfile.mkstemp(dir=tmp_path)
    os.close(fd)
    assert _mode(Path(name)) == 0o600  # what tempfile gives, whatever the umask
    match_umask(name)
    assert _mode(Path(name)) == 0o666 & ~umask


def test_a_checkpoint_gets_the_umask_mode(tmp_path, umask):
    from flowalign.training.checkpoint import save_checkpoint

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = save_checkpoint(
        tmp_path / "run",
        1,
        modules={"m": model},
        optimizers={"o": opt.state_dict()},
        schedulers={},
        state={},
        ema={"w": torch.zeros(2)},
    )
    modes = {p.name: _mode(p) for p in Path(path).iterdir()}
    assert set(modes.values()) == {0o666 & ~umask}, {k: oct(v) for k, v in modes.items()}
    rel_summary.add_to_list("file modes", f"umask {umask:04o} -> {0o666 & ~umask:04o}", "checkpoint files")
