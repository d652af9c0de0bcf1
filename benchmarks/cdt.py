"""Benchmark: CDT encode/decode frames/s vs diffusers' AutoencoderKLWan of similar size, and memory vs length.

    python benchmarks/cdt.py                                     # CPU, tiny models, 9 frames of 32x32
    python benchmarks/cdt.py --device cuda --frames 17 --size 256 --preset small --dtype bf16
    python benchmarks/cdt.py --device cuda --frames 65 --size 256 --preset small --dtype bf16
    python benchmarks/cdt.py --memory --frames 9 17 33 65          # peak memory of chunked decoding

Both models get the same random clip ([B, 3, T, H, W] in [-1, 1]) with random weights, sized to
similar parameter counts (CDT toy 2.7 M vs Wan base_dim=16 3.6 M on CPU; CDT-small 137 M vs Wan
2.1's 127 M default on GPU). Timings are interleaved (A B A B ...) medians; CDT decodes with one
DDIM step (the released default). Throughput is frames per second of video (frames in for
encoding, frames out for decoding). Both tokenizers process the clip chunk by chunk with a feature
cache (CDT: ``default_chunk_sizes`` unless --chunk-latents is given; Wan: one latent frame at a time).

``--memory`` decodes clips of growing length streaming the chunks (nothing accumulated), and
prints the peak memory of each: CUDA ``max_memory_allocated``, or on CPU the peak resident set
size (sampled every millisecond) of a fresh subprocess minus its size before decoding. Flat rows = memory independent
of the video length. Numbers print; nothing fails on timing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from harness import interleaved  # noqa: E402

from flowalign.tokenizers.cdt import CDTConfig, ConditionedDiffusionTokenizer, default_chunk_sizes  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
WAN_BASE_DIM = {"toy": 16, "small": 96, "base": 96}


def build(preset: str, device: str, dtype: torch.dtype):
    """(CDT, Wan VAE) with random weights, in eval mode on ``device``."""
    from diffusers import AutoencoderKLWan
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # .to(dtype) warns about fp32 modules neither model has

    torch.manual_seed(0)
    cdt = ConditionedDiffusionTokenizer.from_cdt_config(getattr(CDTConfig, preset)())
    wan = AutoencoderKLWan(base_dim=WAN_BASE_DIM[preset], z_dim=cdt.config.latent_channels)
    return cdt.to(device, dtype).eval(), wan.to(device, dtype).eval()


def _sync(device: str):
    return torch.cuda.synchronize if device.startswith("cuda") else None


def speed(args) -> dict:
    device, dtype = args.device, DTYPES[args.dtype]
    cdt, wan = build(args.preset, device, dtype)
    x = torch.rand(args.batch, 3, args.frames, args.size, args.size, device=device).to(dtype) * 2 - 1
    enc_chunk, dec_chunk = default_chunk_sizes(args.size, args.size, time_factor=cdt.time_factor)
    dec_chunk = args.chunk_latents or dec_chunk
    with torch.inference_mode():
        z_cdt = cdt.encode(x, chunk_frames=enc_chunk).mean
        z_wan = wan.encode(x).latent_dist.mode()
        gen = (
            torch.Generator(device).manual_seed(0)
            if device.startswith("cuda")
            else torch.Generator().manual_seed(0)
        )
        noise = torch.randn(x.shape, generator=gen, device=device, dtype=torch.float32)
        runs = {
            "wan encode": lambda: wan.encode(x).latent_dist.mode(),
            "cdt encode": lambda: cdt.encode(x, chunk_frames=enc_chunk).mean,
            "wan decode": lambda: wan.decode(z_wan).sample,
            "cdt decode (1 step)": lambda: cdt.decode(z_cdt, noise=noise, chunk_latents=dec_chunk),
        }
        times = interleaved(runs, repeats=args.repeats, warmup=1, sync=_sync(device))
    frames = args.batch * args.frames
    out = {
        "device": torch.cuda.get_device_name()
        if device.startswith("cuda")
        else f"cpu x{torch.get_num_threads()}",
        "shape": list(x.shape),
        "dtype": args.dtype,
        "preset": args.preset,
        "params": {
            "cdt": sum(p.numel() for p in cdt.parameters()),
            "wan": sum(p.numel() for p in wan.parameters()),
        },
        "latent": {"cdt": list(z_cdt.shape), "wan": list(z_wan.shape)},
        "frames_per_s": {name: frames / t.median for name, t in times.items()},
    }
    fps = out["frames_per_s"]
    print(
        f"\n## {out['device']}, clip {out['shape']} {args.dtype}, params CDT {out['params']['cdt']:,} "
        f"vs Wan {out['params']['wan']:,}; latents CDT {out['latent']['cdt']} vs Wan {out['latent']['wan']}"
    )
    print(f"{'run':<24} {'frames/s':>12} {'median s':>10}")
    for name, t in times.items():
        print(f"{name:<24} {fps[name]:>12.2f} {t.median:>10.4f}")
    print(
        f"encode speed-up CDT / Wan: {fps['cdt encode'] / fps['wan encode']:.2f}x; "
        f"decode speed-up CDT / Wan: {fps['cdt decode (1 step)'] / fps['wan decode']:.2f}x"
    )
    return out


class _RssPeak:
    """Samples this process's resident set size every millisecond; ``extra`` = peak - size at entry."""

    def __enter__(self):
        import psutil

        self._proc, self._stop = psutil.Process(), threading.Event()
        self.base = self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)
        self.extra = self.peak - self.base


def _peak_one(args, frames: int, model_name: str, streamed: bool) -> float:
    """Peak extra memory (MiB) of decoding a ``frames``-frame clip's latents with one model."""
    device, dtype = args.device, DTYPES[args.dtype]
    cdt, wan = build(args.preset, device, dtype)
    t_lat = 1 + (frames - 1) // 4
    h = args.size // 8
    z = torch.randn(1, cdt.config.latent_channels, t_lat, h, h, device=device, dtype=dtype)
    _, dec_chunk = default_chunk_sizes(args.size, args.size, time_factor=cdt.time_factor)
    dec_chunk = args.chunk_latents or dec_chunk
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with torch.inference_mode(), _RssPeak() as rss:
        if model_name == "cdt":
            if streamed:
                for chunk in cdt.iter_decode(z, chunk_latents=dec_chunk):
                    del chunk
            else:
                cdt.decode(z, chunk_latents=None)
        else:
            _ = wan.decode(z).sample
    if cuda:
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    return rss.extra / 2**20


def memory(args) -> dict:
    rows = {}
    for frames in args.frames_list:
        row = {}
        for name, streamed in (
            ("cdt chunked (streamed)", True),
            ("cdt single pass", False),
            ("wan (cached)", False),
        ):
            model = "cdt" if name.startswith("cdt") else "wan"
            if args.device.startswith("cuda"):
                row[name] = _peak_one(args, frames, model, streamed)
            else:  # a fresh process per measurement: CPU peak RSS never goes down
                cmd = [
                    sys.executable,
                    __file__,
                    "--_peak",
                    json.dumps([frames, model, streamed]),
                    "--size",
                    str(args.size),
                    "--preset",
                    args.preset,
                    "--dtype",
                    args.dtype,
                    "--device",
                    args.device,
                ]
                if args.chunk_latents:
                    cmd += ["--chunk-latents", str(args.chunk_latents)]
                row[name] = float(
                    subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()
                )
        rows[frames] = row
    names = list(next(iter(rows.values())))
    print(f"\n## peak extra memory of decoding (MiB), {args.preset}, {args.size}x{args.size}, {args.device}")
    print(f"{'frames':>7} " + " ".join(f"{n:>24}" for n in names))
    for frames, row in rows.items():
        print(f"{frames:>7} " + " ".join(f"{row[n]:>24.1f}" for n in names))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    parser.add_argument(
        "--preset",
        default=None,
        choices=["toy", "small", "base"],
        help="CDT preset (default: toy on CPU, small on CUDA)",
    )
    parser.add_argument("--frames", type=int, nargs="+", default=[9])
    parser.add_argument("--size", type=int, default=None, help="frame side (default 32 on CPU, 256 on CUDA)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-latents", type=int, default=None)
    parser.add_argument("--memory", action="store_true", help="peak memory of decoding vs clip length")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--_peak", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    args.preset = args.preset or ("small" if cuda else "toy")
    args.size = args.size or (256 if cuda else 32)
    if not cuda:
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    if args._peak:
        frames, model, streamed = json.loads(args._peak)
        print(_peak_one(args, frames, model, streamed))
        return
    args.frames_list = args.frames
    if args.memory:
        result = memory(args)
    else:
        result = {}
        for frames in args.frames:
            args.frames = frames
            result[frames] = speed(args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
