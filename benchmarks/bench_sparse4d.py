"""Sparse vs dense neighbourhood-consensus stack: time and peak memory at 30x30 and 60x60 grids.

The stack is SegSwap's Sparse NC-Net default (ReLU -> 3^4 conv 1->16 -> ReLU -> 3^4 conv 16->1 -> ReLU,
symmetric mode), run on the sparse correlation (mutual top-k, k=10) of a synthetic image pair, and the
same stack run densely on the full 4D correlation volume (NC-Net style, conv3d over slices). One forward
and one backward pass is one "step", as in training.

Inputs are smooth random 256-d feature maps, the second a shifted, noisy crop of the first, so the
top-k lists cluster spatially the way real matches do (the neighbour count per point, printed, is what
drives the sparse cost).

Every measurement runs in a fresh child process so peak memory is that configuration's own: on CPU the
rise of the process's peak RSS over its level just before the step (glibc's mmap threshold fixed at
64 KiB so RSS follows the live tensors); on CUDA
``torch.cuda.max_memory_allocated`` above the inputs. Timings are the median of ``--repeat`` runs after
one warm-up. Dense at 60x60 is 16x the 30x30 volume; it is measured only with ``--dense-60`` (it needs
several GB and minutes on a small CPU) and otherwise estimated as 16x the 30x30 figures, marked "est".

    python benchmarks/bench_sparse4d.py                      # CPU, 30 and 60
    python benchmarks/bench_sparse4d.py --device cuda --dense-60
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))  # test oracles and fixtures

FEATURE_CHANNELS = 256


def make_features(grid: int, batch: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    margin = 8
    base = torch.randn(batch, FEATURE_CHANNELS, grid + 2 * margin, grid + 2 * margin, generator=g)
    base = F.avg_pool2d(base, 5, 1, padding=2)  # spatially smooth, like conv features
    f0 = base[:, :, margin:margin + grid, margin:margin + grid]
    f1 = base[:, :, margin + 3:margin + 3 + grid, margin - 5:margin - 5 + grid]  # a shifted view
    f1 = f1 + 0.5 * f1.std() * torch.randn(f1.shape, generator=g)
    return F.normalize(f0, dim=1).to(device), F.normalize(f1, dim=1).to(device)


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _rss_now_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def child(kind: str, grid: int, args) -> dict:
    from dense4d import dense_conv4d, swap_ab  # the test oracle, in tests/

    from segswap.train.ncnet import SparseNCNet, sparse_correlation
    from segswap.train.sparse4d import NeighbourMap, me_kernel_to_dense

    torch.manual_seed(0)
    device = args.device
    net = SparseNCNet(topk=args.topk, channels=tuple(args.channels), kernel_sizes=(3,) * len(args.channels)).to(device)

    def make_step(grid):
        """(setup, step): setup builds what one volume needs, step is forward + backward."""
        f0, f1 = make_features(grid, args.batch, device)
        shape = (grid, grid, grid, grid)
        if kind == "sparse":
            coords, values = sparse_correlation(f0, f1, args.topk)

            def setup():
                return NeighbourMap.build(coords, shape, 3)

            def step(_):
                out = net.consensus(coords, values, shape)
                out.sum().backward()
            return setup, step, coords.shape[0]
        vol = torch.bmm(f0.flatten(2).transpose(1, 2), f1.flatten(2)).reshape(args.batch, 1, *shape)
        weights = [(me_kernel_to_dense(layer.weight).detach(), layer.bias.detach()) for layer in net.nc.layers]
        for w, b in weights:
            w.requires_grad_(True)
            b.requires_grad_(True)

        def stack(x):
            x = torch.relu(x)
            for w, b in weights:
                x = torch.relu(dense_conv4d(x, w, b))
            return x

        def step(_):
            out = stack(vol) + swap_ab(stack(swap_ab(vol)))
            out.sum().backward()
        return (lambda: None), step, vol.numel()

    if kind == "layer":
        return layer_child(grid, args)
    # Warm up every code path (library loading, thread pools, CSR kernels) on a tiny grid, so the
    # memory measured below is the configuration's own and not one-off process growth.
    setup, step, _ = make_step(6)
    step(setup())
    setup, step, points = make_step(grid)
    res: dict = {"kind": kind, "grid": grid, "points": points}
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    rss_before = _rss_now_mb()
    t = time.perf_counter()
    nmap = setup()
    _sync(device)
    res["map_s"] = time.perf_counter() - t
    if nmap is not None:
        res["neighbours_per_point"] = nmap.num_pairs / max(1, points)
    del nmap  # the model builds its own map inside each step (that time and memory are in step_s / peak)
    times = []
    for _ in range(args.repeat):
        net.zero_grad(set_to_none=True)
        _sync(device)
        t = time.perf_counter()
        step(None)
        _sync(device)
        times.append(time.perf_counter() - t)
    res["step_s"] = statistics.median(times)
    # Peak over map building and the steps (the map is rebuilt for every volume, so it counts).
    if device.startswith("cuda"):
        res["peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    else:
        res["peak_mb"] = max(0.0, _rss_peak_mb() - rss_before)
    return res


def layer_child(grid: int, args) -> dict:
    """One 3^4 16->16 submanifold layer on the sparse correlation volume: map, forward, backward times."""
    from segswap.train.ncnet import sparse_correlation
    from segswap.train.sparse4d import NeighbourMap, SubmanifoldConv4d

    device = args.device
    layer = SubmanifoldConv4d(16, 16).to(device)
    f0, f1 = make_features(grid, args.batch, device)
    coords, _ = sparse_correlation(f0, f1, args.topk)
    shape = (grid,) * 4
    NeighbourMap.build(coords[:100], shape, 3)  # warm-up
    maps, fwd, bwd = [], [], []
    for _ in range(args.repeat + 1):
        _sync(device)
        t = time.perf_counter()
        nmap = NeighbourMap.build(coords, shape, 3)
        _sync(device)
        maps.append(time.perf_counter() - t)
        x = torch.randn(coords.shape[0], 16, device=device, requires_grad=True)
        t = time.perf_counter()
        y = layer(x, nmap)
        _sync(device)
        fwd.append(time.perf_counter() - t)
        t = time.perf_counter()
        y.sum().backward()
        _sync(device)
        bwd.append(time.perf_counter() - t)
    med = statistics.median
    return {"kind": "layer", "grid": grid, "points": coords.shape[0], "map_s": med(maps[1:]),
            "forward_s": med(fwd[1:]), "backward_s": med(bwd[1:])}


def run_child(kind: str, grid: int, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, str(grid), "--device", args.device,
           "--topk", str(args.topk), "--batch", str(args.batch), "--repeat", str(args.repeat),
           "--channels", *map(str, args.channels)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    # A fixed mmap threshold makes glibc return every freed block of >= 64 KiB to the OS at once, so the
    # process's resident size follows the live tensors (the default adaptive threshold keeps freed
    # blocks in the heap and would charge whatever ran earlier to the configuration measured).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(f"child {kind} {grid} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grids", type=int, nargs="+", default=[30, 60])
    p.add_argument("--topk", type=int, default=10)
    p.add_argument("--batch", type=int, default=1, help="image pairs per step")
    p.add_argument("--channels", type=int, nargs="+", default=[16, 1])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--dense-60", action="store_true", help="measure dense at grids > 30 instead of estimating")
    p.add_argument("--no-dense", action="store_true", help="sparse only (e.g. at a training batch size)")
    p.add_argument("--layer", action="store_true", help="also time one 16->16 layer alone (map, forward, backward)")
    p.add_argument("--child", nargs=2, metavar=("KIND", "GRID"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args)))
        return 0

    print(f"device {args.device}, torch {torch.__version__}, threads {args.threads or torch.get_num_threads()}, "
          f"batch {args.batch}, topk {args.topk}, channels 1->{'->'.join(map(str, args.channels))}, symmetric, "
          f"step = forward + backward, median of {args.repeat}")
    print(f"{'grid':>5} {'kind':>7} {'points':>10} {'nbr/pt':>7} {'map s':>7} {'step s':>9} {'peak MB':>9}")
    dense_ref = None
    for grid in args.grids:
        sp = run_child("sparse", grid, args)
        print(f"{grid:>5} {'sparse':>7} {sp['points']:>10} {sp['neighbours_per_point']:>7.1f} {sp['map_s']:>7.3f} "
              f"{sp['step_s']:>9.3f} {sp['peak_mb']:>9.1f}")
        if args.no_dense:
            continue
        if grid <= 30 or args.dense_60:
            de = run_child("dense", grid, args)
            note = ""
            if dense_ref is None:
                dense_ref = (grid, de)
        else:
            g0, d0 = dense_ref
            scale = (grid / g0) ** 4  # cost and memory are proportional to the number of voxels
            de = {"points": grid ** 4 * args.batch, "step_s": d0["step_s"] * scale, "peak_mb": d0["peak_mb"] * scale}
            note = f"  (est: {g0}x{g0} x {scale:.0f})"
        print(f"{grid:>5} {'dense':>7} {de['points']:>10} {'':>7} {'':>7} {de['step_s']:>9.3f} {de['peak_mb']:>9.1f}{note}")
        print(f"{grid:>5} {'ratio':>7} {'':>10} {'':>7} {'':>7} {de['step_s'] / sp['step_s']:>8.1f}x "
              f"{de['peak_mb'] / max(sp['peak_mb'], 1e-3):>8.1f}x  dense / sparse")
    if args.layer:
        print("one 3^4 16->16 layer (input and weight gradients), median:")
        for grid in args.grids:
            r = run_child("layer", grid, args)
            print(f"{grid:>5} {r['points']:>8} points: map {r['map_s']:.3f} s, forward {r['forward_s']:.3f} s, "
                  f"backward {r['backward_s']:.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
