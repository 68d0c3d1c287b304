"""Groups ``residual``, ``negatives`` and ``views``: the clip-side fused kernels.

Every comparison uses the same input tensor, the same threads, and fresh outputs in every arm; the
``out`` variants write into a buffer allocated once, in every arm (the original-style arm copies its
result into the buffer, which is what the op's pure-PyTorch fallback does).
"""
from typing import List

import torch

from iic_ext import ops
from iic_ext.ops import indices, reference

from . import baselines
from .harness import Config, compare, try_compile

FULL_SHAPES = [(16, 3, 16, 112, 112), (8, 3, 16, 112, 112)]
QUICK_SHAPES = [(8, 3, 16, 112, 112)]


def _clip(cfg: Config, shape, dtype, layout: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
    x = x if dtype == torch.uint8 else (x.to(dtype) / 255)
    fmt = torch.channels_last_3d if layout == "channels_last" else torch.contiguous_format
    return x.contiguous(memory_format=fmt).to(cfg.device)


def _configs(cfg: Config, group: str):
    if cfg.quick:  # the residual's float32 row carries the run's one torch.compile arm
        second = (torch.float32, "contiguous") if group == "residual" else (torch.uint8, "channels_last")
        return [(QUICK_SHAPES[0], torch.uint8, "contiguous"), (QUICK_SHAPES[0], *second)]
    return [(s, d, l) for s in FULL_SHAPES for d in (torch.uint8, torch.float32) for l in ("contiguous", "channels_last")]


def _itemsize(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def bench_residual(cfg: Config) -> List[dict]:
    rows = []
    for shape, dtype, layout in _configs(cfg, "residual"):
        clip = _clip(cfg, shape, dtype, layout)
        numel = clip.numel()
        floor = numel * (_itemsize(dtype) + 4)  # read the clip once, write the float32 view once
        skipped = {}
        # torch.compile of the reference: in --quick only the first float32 configuration
        compiled = None
        if not cfg.quick or (dtype == torch.float32 and layout == "contiguous"):
            compiled, reason = try_compile(cfg, reference.residual_frames, lambda f: (lambda: f(clip)))
            if reason:
                skipped["compiled"] = reason
        arms = {
            "fused": lambda: ops.residual_frames(clip),
            "original": lambda: reference.residual_frames(clip),
            "vectorized": lambda: baselines.residual_frames_vectorized(clip),
            "compiled": compiled,
        }
        rows += compare(cfg, "residual", "residual_frames", shape, dtype, arms, floor, skipped,
                        layout=layout, variant="fresh output")

        buf = torch.empty_like(clip, dtype=torch.float32)
        arms = {
            "fused": lambda: ops.residual_frames(clip, out=buf),
            "original": lambda: buf.copy_(reference.residual_frames(clip)),
            "vectorized": lambda: baselines.residual_frames_vectorized(clip, out=buf),
        }
        rows += compare(cfg, "residual", "residual_frames", shape, dtype, arms, floor,
                        layout=layout, variant="out= (reused buffer)")
        del clip, buf
    return rows


def bench_negatives(cfg: Config) -> List[dict]:
    rows = []
    configs = [(s, torch.float32) for s in (QUICK_SHAPES if cfg.quick else FULL_SHAPES)]
    if not cfg.quick:
        configs.append((FULL_SHAPES[0], torch.uint8))
    for shape, dtype in configs:
        clip = _clip(cfg, shape, dtype, "contiguous")
        B, C, T, H, W = shape
        item = _itemsize(dtype)
        frame_bytes = C * H * W * item
        gen = lambda: torch.Generator(device=cfg.device).manual_seed(0)  # noqa: E731
        g = {k: gen() for k in ("fused", "original", "vectorized", "compiled")}

        # repeat: a one-pass kernel reads one frame per sample and writes the whole clip
        skipped = {}
        compiled = None
        if not cfg.quick:
            compiled, reason = try_compile(
                cfg, reference.temporal_gather_vectorized,
                lambda f: (lambda: f(clip, indices.repeat_index(B, T, g["compiled"], device=cfg.device))),
            )
            if reason:
                skipped["compiled"] = reason
        arms = {
            "fused": lambda: ops.repeat_negative(clip, g["fused"]),
            "original": lambda: reference.repeat_negative(clip, g["original"]),
            "vectorized": lambda: baselines.repeat_negative_vectorized(clip, g["vectorized"]),
            "compiled": compiled,
        }
        rows += compare(cfg, "negatives", "repeat_negative", shape, dtype, arms, B * frame_bytes + clip.numel() * item,
                        skipped, layout="contiguous", variant="fresh output")

        # swap (the original shuffle): every frame read once and written once
        arms = {
            "fused": lambda: ops.shuffle_negative(clip, g["fused"]),
            "original": lambda: reference.shuffle_negative(clip, g["original"]),
            "vectorized": lambda: baselines.shuffle_negative_vectorized(clip, g["vectorized"]),
        }
        rows += compare(cfg, "negatives", "shuffle_negative(swap)", shape, dtype, arms, 2 * clip.numel() * item,
                        layout="contiguous", variant="fresh output")

        # the gather alone, indices given, into a reused buffer
        idx = indices.repeat_index(B, T, gen(), device=cfg.device)
        buf = torch.empty_like(clip)
        arms = {
            "fused": lambda: ops.temporal_gather(clip, idx, out=buf),
            "original": lambda: buf.copy_(reference.temporal_gather(clip, idx)),
            "vectorized": lambda: torch.gather(clip, 2, idx.view(B, 1, T, 1, 1).expand(B, C, T, H, W), out=buf),
        }
        rows += compare(cfg, "negatives", "temporal_gather(repeat index)", shape, dtype, arms,
                        B * frame_bytes + clip.numel() * item, layout="contiguous", variant="out= (reused buffer)")
        del clip, buf
    return rows


def bench_views(cfg: Config) -> List[dict]:
    rows = []
    for shape, dtype, layout in _configs(cfg, "views"):
        clip = _clip(cfg, shape, dtype, layout)
        B, C, T, H, W = shape
        idx = indices.repeat_index(B, T, torch.Generator(device=cfg.device).manual_seed(0), device=cfg.device)
        # read the clip once; write rgb, residual and the negative (float32)
        floor = clip.numel() * _itemsize(dtype) + 3 * clip.numel() * 4
        skipped = {}
        compiled = None
        if not cfg.quick:
            compiled, reason = try_compile(cfg, reference.iic_views, lambda f: (lambda: f(clip, idx)))
            if reason:
                skipped["compiled"] = reason
        arms = {
            "fused": lambda: ops.iic_views(clip, idx),
            "original": lambda: reference.iic_views(clip, idx),
            "vectorized": lambda: baselines.iic_views_vectorized(clip, idx),
            "compiled": compiled,
        }
        rows += compare(cfg, "views", "iic_views", shape, dtype, arms, floor, skipped,
                        layout=layout, variant="fresh output")

        # as a training loop keeps its buffers from one step to the next
        bufs = tuple(torch.empty(s, dtype=torch.float32, device=cfg.device)
                     for s in (shape, shape, (B, C, idx.shape[1], H, W)))

        def original_into():
            for o, v in zip(bufs, reference.iic_views(clip, idx)):
                o.copy_(v)

        arms = {
            "fused": lambda: ops.iic_views(clip, idx, out=bufs),
            "original": original_into,
            "vectorized": lambda: baselines.iic_views_vectorized(clip, idx, out=bufs),
        }
        rows += compare(cfg, "views", "iic_views", shape, dtype, arms, floor,
                        layout=layout, variant="out= (reused buffers)")
        del clip, bufs
    return rows
