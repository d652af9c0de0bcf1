"""Safe loading: no code runs from a weights file, no remote code, no path escapes, no HTML injection.

1. A static scan (ast) of the package: ``torch.load`` only with ``weights_only=True``; no
   ``trust_remote_code=True``; no ``pickle``/``marshal``/``dill``/``joblib`` loads, ``np.load`` with
   ``allow_pickle=True`` or ``pandas.read_pickle``; ``yaml.load`` only with a safe loader; no builtin
   ``eval``/``exec``.
2. Every loading path that may meet a pickle (checkpoints, published reward and metric weights,
   diffusers / transformers / open_clip folders, the CDT tokenizer) is handed a malicious pickle whose
   unpickling would create a directory: the load is refused with an error naming the file, and the
   directory never appears.
3. Reports escape prompts and names (``<script>`` renders as text).
"""

from __future__ import annotations

import ast
import functools
import os
import pickle
from pathlib import Path

import pytest
import rel_summary
import torch

import flowalign

PACKAGE = Path(flowalign.__file__).resolve().parent

# --------------------------------------------------------------------------------------------- static scan

_PICKLE_LOADS = {
    ("pickle", "load"), ("pickle", "loads"), ("cPickle", "load"), ("cPickle", "loads"), ("_pickle", "load"),
    ("_pickle", "loads"), ("marshal", "load"), ("marshal", "loads"), ("dill", "load"), ("dill", "loads"),
    ("joblib", "load"), ("pd", "read_pickle"), ("pandas", "read_pickle"), ("shelve", "open"),
}  # fmt: skip
_SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


@functools.cache
def package_trees() -> tuple[tuple[str, ast.Module], ...]:
    """(path relative to the package's parent, syntax tree) of every module of flowalign."""
    return tuple(
        (str(f.relative_to(PACKAGE.parent)), ast.parse(f.read_text(encoding="utf-8"), filename=str(f)))
        for f in sorted(PACKAGE.rglob("*.py"))
    )


def unsafe_calls(source: str | ast.Module, filename: str = "<src>") -> list[str]:
    """Every unsafe loading construct in ``source`` (text or a parsed tree), as ``file:line: what``."""
    tree = ast.parse(source, filename=filename) if isinstance(source, str) else source
    torch_load_names = {"torch.load"}
    for node in ast.walk(tree):  # ``from torch import load [as x]``
        if isinstance(node, ast.ImportFrom) and node.module == "torch":
            torch_load_names |= {a.asname or a.name for a in node.names if a.name == "load"}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        where = f"{filename}:{node.lineno}"
        if name in torch_load_names and not _is_true(_keyword(node, "weights_only")):
            found.append(f"{where}: {name}() without weights_only=True")
        trust = _keyword(node, "trust_remote_code")
        if trust is not None and not (isinstance(trust, ast.Constant) and trust.value is False):
            found.append(f"{where}: trust_remote_code={ast.unparse(trust)}")
        parts = tuple(name.rsplit(".", 1)) if "." in name else ("", name)
        if parts in _PICKLE_LOADS or (parts[1] in ("load", "loads") and parts[0].endswith("pickle")):
            found.append(f"{where}: {name}() unpickles")
        if name in ("np.load", "numpy.load") and _is_true(_keyword(node, "allow_pickle")):
            found.append(f"{where}: {name}(allow_pickle=True)")
        if name in ("yaml.load", "yaml.load_all"):
            loader = _keyword(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            if loader is None or _dotted(loader).rsplit(".", 1)[-1] not in _SAFE_YAML_LOADERS:
                found.append(f"{where}: {name}() without a safe Loader")
        if name in ("yaml.unsafe_load", "yaml.full_load", "yaml.unsafe_load_all", "yaml.full_load_all"):
            found.append(f"{where}: {name}()")
        if isinstance(node.func, ast.Name) and node.func.id in ("eval", "exec"):
            found.append(f"{where}: builtin {node.func.id}()")
    return found


def test_the_scanner_finds_every_unsafe_construct():
    bad = """
import pickle, yaml, torch, numpy as np
from torch import load as tload
torch.load(p)
torch.load(p, weights_only=False)
tload(p)
AutoModel.from_pretrained(x, trust_remote_code=True)
AutoModel.from_pretrained(x, trust_remote_code=flag)
pickle.loads(b)
np.load(p, allow_pickle=True)
yaml.load(s)
yaml.load(s, Loader=yaml.Loader)
yaml.full_load(s)
eval("1")
exec("x = 1")
"""
    good = """
import yaml, torch, numpy as np
torch.load(p, map_location="cpu", weights_only=True)
yaml.load(s, Loader=yaml.SafeLoader)
yaml.safe_load(s)
np.load(p, allow_pickle=False)
model.eval()
AutoModel.from_pretrained(x, trust_remote_code=False)
"""
    flagged = unsafe_calls(bad)
    assert sorted({int(f.split(":")[1]) for f in flagged}) == list(range(4, 16)), flagged
    assert unsafe_calls(good) == []


def test_package_source_has_no_unsafe_loading():
    trees = package_trees()
    assert len(trees) > 50
    problems = [p for name, tree in trees for p in unsafe_calls(tree, name)]
    assert problems == [], "unsafe loading constructs:\n" + "\n".join(problems)
    rel_summary.record(
        "loading",
        "package files scanned (ast): no unsafe torch.load/pickle/yaml/eval/exec/trust_remote_code",
        len(trees),
    )


# --------------------------------------------------------------------------------------------- malicious pickles


class _Payload:
    """Unpickling this creates the directory ``marker`` (what an attacker's code would do instead)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def write_malicious(path: Path, marker: Path, *, as_state_dict: bool = True) -> Path:
    """A torch-format (zip) pickle at ``path`` that runs code when loaded without weights_only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    obj = {"weight": _Payload(marker)} if as_state_dict else _Payload(marker)
    torch.save(obj, path)
    return path


def test_the_payload_really_runs_without_weights_only(tmp_path):
    """Guard for the tests below: the file would execute code if anything loaded it unsafely."""
    marker = tmp_path / "pwned"
    path = write_malicious(tmp_path / "evil.pt", marker)
    torch.load(path, weights_only=False)  # the unsafe way, on purpose, in this test only
    assert marker.is_dir()


def _refused(load, marker: Path, *, names: str, what: str) -> None:
    with pytest.raises(
        (ValueError, OSError)
    ) as info:  # flowalign's errors; OSError from diffusers' own loader
        load()
    assert not marker.exists(), f"{what}: the pickle's code ran"
    assert names in str(info.value), f"{what}: the error does not name {names}: {info.value}"
    rel_summary.add_to_list("loading", "pickle-based loading paths that refuse a malicious pickle", what)


def test_checkpoint_pickles_are_loaded_weights_only(tmp_path):
    from flowalign.training.checkpoint import (
        CheckpointError,
        capture_rng_state,
        load_checkpoint,
        save_checkpoint,
    )

    path = save_checkpoint(
        tmp_path / "run", 1, modules={"net": torch.nn.Linear(2, 2)}, optimizers={}, schedulers={},
        state={"epoch": 0, "position": 0}, rng_states=[capture_rng_state()],
    )  # fmt: skip
    for name in ("optimizer.pt", "scheduler.pt", "rng.pt", "method_state.pt"):
        marker = tmp_path / f"pwned-{name}"
        write_malicious(path / name, marker)
        _refused(
            lambda: load_checkpoint(path, verify=False),
            marker,
            names=name,
            what=f"training checkpoint {name}",
        )
        with pytest.raises(CheckpointError):
            load_checkpoint(path)  # verified loads stop earlier, at the hash
        (path / name).unlink()
        torch.save({}, path / name)


def test_reward_and_metric_weights_are_loaded_weights_only(tmp_path):
    from flowalign.evals.diversity import load_lpips
    from flowalign.evals.fid import load_inception_features
    from flowalign.rewards.backbones import load_state_dict_file
    from flowalign.rewards.videoreward_files import read_weights

    cases = {
        "reward checkpoints (HPSv2 .pt, aesthetic .pth, ImageReward .pt)": lambda p: load_state_dict_file(p),
        "VideoReward model.pth": lambda p: read_weights(p),
        "FID Inception-v3 weights": lambda p: load_inception_features(p),
        "LPIPS backbone weights": lambda p: load_lpips(backbone_weights=p),
    }
    for i, (what, load) in enumerate(cases.items()):
        marker = tmp_path / f"pwned-{i}"
        path = write_malicious(tmp_path / f"weights-{i}.pth", marker)
        _refused(lambda load=load, path=path: load(path), marker, names=path.name, what=what)


def test_diffusers_and_tokenizer_folders_refuse_pickled_weights(tmp_path):
    from flowalign.models import load_flow_model
    from flowalign.models.toy import build_toy_pipeline
    from flowalign.tokenizers.cdt import CDTConfig, ConditionedDiffusionTokenizer

    folder = tmp_path / "model"
    build_toy_pipeline("image", size=16, width=32, num_layers=1, text_width=16).save_pretrained(str(folder))
    weights = next((folder / "transformer").glob("*.safetensors"))
    weights.unlink()
    marker = tmp_path / "pwned-diffusers"
    write_malicious(folder / "transformer" / "diffusion_pytorch_model.bin", marker)
    _refused(
        lambda: load_flow_model(folder),
        marker,
        names="diffusion_pytorch_model.bin",
        what="diffusers model folder (.bin)",
    )

    tok = tmp_path / "tokenizer"
    ConditionedDiffusionTokenizer.from_cdt_config(CDTConfig.tiny()).save_pretrained(str(tok))
    next(tok.glob("*.safetensors")).unlink()
    marker = tmp_path / "pwned-cdt"
    write_malicious(tok / "diffusion_pytorch_model.bin", marker)
    _refused(
        lambda: ConditionedDiffusionTokenizer.from_pretrained(tok),
        marker,
        names="diffusion_pytorch_model.bin",
        what="CDT tokenizer folder (.bin)",
    )


def _tiny_clip_folder(folder: Path) -> Path:
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config={"hidden_size": 8, "intermediate_size": 16, "num_attention_heads": 2, "num_hidden_layers": 1,
                     "vocab_size": 64, "max_position_embeddings": 16},
        vision_config={"hidden_size": 8, "intermediate_size": 16, "num_attention_heads": 2, "num_hidden_layers": 1,
                       "image_size": 16, "patch_size": 8},
        projection_dim=8,
    )  # fmt: skip
    CLIPModel(config).save_pretrained(str(folder))
    return folder


def test_transformers_and_open_clip_folders_refuse_pickled_weights(tmp_path):
    from flowalign.rewards.backbones import load_clip_backbone, load_open_clip

    folder = _tiny_clip_folder(tmp_path / "clip")
    next(folder.glob("*.safetensors")).unlink()
    marker = tmp_path / "pwned-transformers"
    write_malicious(folder / "pytorch_model.bin", marker)
    _refused(
        lambda: load_clip_backbone(folder),
        marker,
        names=str(folder),
        what="transformers CLIP folder (pytorch_model.bin)",
    )

    oc = tmp_path / "open_clip"
    oc.mkdir()
    (oc / "open_clip_config.json").write_text(
        '{"model_cfg": {"embed_dim": 8, "vision_cfg": {"image_size": 16, "layers": 1, "width": 8, "patch_size": 8,'
        ' "head_width": 8}, "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 8, "heads": 2, "layers": 1}},'
        ' "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}'
    )
    marker = tmp_path / "pwned-open-clip"
    write_malicious(oc / "open_clip_pytorch_model.bin", marker)
    _refused(
        lambda: load_open_clip(f"local-dir:{oc}"),
        marker,
        names=str(oc),
        what="open_clip local-dir folder (.bin)",
    )


# --------------------------------------------------------------------------------------------- reports


def test_reports_render_prompts_and_names_as_text(tmp_path):
    from flowalign.evals import EvalOptions, run_eval
    from flowalign.models.toy import build_toy_pipeline
    from flowalign.pipelines.generate_files import GenerationSettings

    folder = tmp_path / "model"
    build_toy_pipeline("image", size=16, width=32, num_layers=1, text_width=16).save_pretrained(str(folder))
    prompts = tmp_path / "prompts.txt"
    attack = "<script>alert('x')</script><img src=x onerror=alert(1)>"
    prompts.write_text(f'a red circle {attack}\nplain & simple "quoted"\n')
    options = EvalOptions(
        settings=GenerationSettings(num_inference_steps=1, height=16, width=16), num_resamples=20
    )
    result = run_eval(
        {"m<b>odel": folder}, prompts, ["toy"], out_dir=tmp_path / "eval", options=options, progress=False
    )
    html = result.html_path.read_text(encoding="utf-8")
    assert "<script>alert" not in html and "<img src=x" not in html and "<b>odel" not in html
    assert "&lt;script&gt;alert(" in html and "m&lt;b&gt;odel" in html
    assert "<script" not in html.lower()  # the report carries no script at all
    rel_summary.add_to_list("loading", "HTML outputs that escape prompts and names", "eval report.html")


def test_symlinked_media_inside_the_root_are_followed_but_not_outside(tmp_path):
    """Hub snapshots are symlinks into a blob store: a link inside the dataset folder is fine; the path
    rule is about what the row says, not where a link points (the row cannot name an outside file)."""
    from flowalign.data.errors import DataError
    from flowalign.data.media import save_image
    from flowalign.data.paths import resolve_data_path

    root = tmp_path / "data"
    root.mkdir()
    save_image(torch.rand(3, 8, 8), tmp_path / "blob.png")
    (root / "linked.png").symlink_to(tmp_path / "blob.png")
    assert (
        resolve_data_path(root, "linked.png", source="m.jsonl", where="line 1", key="file")
        == root / "linked.png"
    )
    for bad in ("../blob.png", str(tmp_path / "blob.png"), "", 3, None):
        with pytest.raises(DataError, match=r"m\.jsonl: line 1: "):
            resolve_data_path(root, bad, source="m.jsonl", where="line 1", key="file")


def test_pickle_module_is_not_needed_to_read_any_project_file():
    """The package never imports pickle for reading (multiprocessing/DataLoader use it internally only)."""
    blocked = ("pickle", "dill", "cloudpickle", "joblib")
    offenders = [
        name
        for name, tree in package_trees()
        for node in ast.walk(tree)
        if (isinstance(node, ast.Import) and any(a.name.split(".")[0] in blocked for a in node.names))
        or (isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in blocked)
    ]
    assert offenders == []
    assert pickle.HIGHEST_PROTOCOL >= 2  # the module itself is only used by these tests to build payloads
