"""Training-step throughput and peak memory of the cross-image transformer (default: official "small", 480x480).

One step = conv4 features of 2P images (frozen ResNet-50, no grad) + the head on P positives and N
in-batch negatives (forward, Eq. 2 loss, backward) + an Adam step: what segswap-train does per
iteration, on random inputs so the data loader is out of the picture. Also timed, as the baseline,
the official formulation of the same head (both images as one concatenated sequence with block
attention masks): the ratio shows what computing inner/cross attention per image saves.

    python benchmarks/bench_train.py [--size 480] [--model small] [--steps 3] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import resource
import time

import torch
from torch import nn

from segswap.nets.resnet import build_backbone, l2n
from segswap.train.loss import SegSwapLoss
from segswap.train.trainer import negative_indices
from segswap.train.transformer import CrossImageTransformer


class ConcatenatedReference(nn.Module):
    """The official layer-by-layer computation on one concatenated sequence, sharing `head`'s weights."""

    def __init__(self, head: CrossImageTransformer):
        super().__init__()
        self.head = head

    def forward(self, f0, f1, pad1=None):
        from segswap.train.transformer import sine_position_encoding
        h = self.head
        x0, x1 = h.drop_feat(h.feat_proj(f0)), h.drop_feat(h.feat_proj(f1))
        b, d, hh, ww = x0.shape
        n = hh * ww
        same = torch.zeros(2 * n, 2 * n, dtype=torch.bool, device=f0.device)
        same[:n, :n] = same[n:, n:] = True
        for block in h.blocks:
            for layer in block.values():
                if layer.kind == "I":
                    pos = sine_position_encoding(hh, ww, d // 2, x0.device, x0.dtype)
                    x0, x1 = x0 + 0.1 * pos, x1 + 0.1 * pos
                seq = torch.cat([x0.flatten(2), x1.flatten(2)], 2).transpose(1, 2)
                out = layer.encoder_layer(seq, src_mask=~same if layer.kind == "I" else same)
                x0 = out[:, :n].transpose(1, 2).reshape(b, d, hh, ww)
                x1 = out[:, n:].transpose(1, 2).reshape(b, d, hh, ww)
        o0, o1 = torch.sigmoid(h.final_linear(x0)), torch.sigmoid(h.final_linear(x1))
        return {"mask0": o0[:, 2], "mask1": o1[:, 2], "flow01": o0[:, :2].permute(0, 2, 3, 1),
                "flow10": o1[:, :2].permute(0, 2, 3, 1)}


def peak_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_steps(backbone, head_fn, params, P, N, size, steps, device, amp):
    g = torch.Generator().manual_seed(0)
    grid = size // 16
    opt = torch.optim.Adam(params, lr=2e-4, betas=(0.5, 0.999))
    loss_fn = SegSwapLoss()
    ni, nj = negative_indices(P, N)
    target = {"mask0": (torch.rand(P, grid, grid, generator=g) > 0.7).float(),
              "mask1": (torch.rand(P, grid, grid, generator=g) > 0.7).float(),
              "flow01": torch.rand(P, grid, grid, 2, generator=g), "flow10": torch.rand(P, grid, grid, 2, generator=g)}
    target["flow01_weight"], target["flow10_weight"] = target["mask0"], target["mask1"]
    target = {k: v.to(device) for k, v in target.items()}
    imgs = torch.randn(2 * P, 3, size, size, generator=g).to(device)
    times = {"backbone": 0.0, "head": 0.0}
    for s in range(steps + 1):  # step 0 warms up (allocator, kernels)
        sync(device)
        t0 = time.perf_counter()
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            f = l2n(backbone(imgs).float())
        f0, f1 = f[:P], f[P:]
        sync(device)
        t1 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = head_fn(torch.cat([f0, f0[ni]]), torch.cat([f1, f1[nj]]))
        loss = loss_fn(out, target, n_pos=P)["total"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        sync(device)
        t2 = time.perf_counter()
        if s:
            times["backbone"] += t1 - t0
            times["head"] += t2 - t1
    return {k: v / steps for k, v in times.items()}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=480)
    ap.add_argument("--model", default="small")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch-pos", type=int, default=5)
    ap.add_argument("--batch-neg", type=int, default=15)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-reference", action="store_true", help="skip the concatenated-sequence baseline")
    args = ap.parse_args()
    device = torch.device(args.device)
    amp = device.type == "cuda"
    torch.manual_seed(0)
    backbone = build_backbone(None).to(device)
    head = CrossImageTransformer(args.model).to(device).train()
    P, N = args.batch_pos, args.batch_neg
    print(f"{args.model} transformer, {args.size}x{args.size}, {P}+{N} pairs per step, {device}"
          f"{' (bf16 autocast)' if amp else ''}, torch threads {torch.get_num_threads()}")
    ours = time_steps(backbone, head, list(head.parameters()), P, N, args.size, args.steps, device, amp)
    step = ours["backbone"] + ours["head"]
    print(f"ours:      {1 / step:.3f} it/s  (step {step:.2f} s = backbone {ours['backbone']:.2f} s + head fwd/bwd/Adam "
          f"{ours['head']:.2f} s), peak memory {peak_mb(device):.0f} MB")
    if not args.no_reference:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        ref = time_steps(backbone, ConcatenatedReference(head), list(head.parameters()), P, N, args.size,
                         args.steps, device, amp)
        print(f"reference: head {ref['head']:.2f} s per step (concatenated masked sequence, as the official code); "
              f"ours is {ref['head'] / ours['head']:.2f}x faster on the head"
              + (f", peak memory {peak_mb(device):.0f} MB" if device.type == "cuda" else ""))


if __name__ == "__main__":
    main()
