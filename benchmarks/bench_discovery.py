"""Discovery at scale: seconds and peak memory of graph building, eigen-decomposition and K-means.

A synthetic correspondence graph (tests/synthetic_graph.py: groups of images sharing a planted
pattern, perfect-ish predictions for every pair of a group plus spurious confident cells) is grown to
the requested number of vertices, then the three stages of ``segswap-discover`` run on it:

  graph   extract_vertices + build_graph (Eq. 4, vectorised)
  eigen   N_eig leading eigenvectors of the regularised normalised adjacency (exact, per connected
          component: batched dense eigh for components up to 1500 vertices, ARPACK above)
  kmeans  K-means on the row-normalised embedding (MiniBatchKMeans above 50k vertices)

Each size runs in a fresh process; peak memory is the peak resident set size above the process's
size at the stage start, sampled every 20 ms. As a sanity check it prints the fraction of vertices
that got a cluster (only components owning one of the N_eig leading eigenvectors do: with thousands of
planted groups and N_eig = 100 that is a small fraction, by design of the method) and the adjusted Rand
index of those clusters against the planted groups.

    python benchmarks/bench_discovery.py                      # 100k, 300k, 1M vertices
    python benchmarks/bench_discovery.py --nodes 20000 50000  # quicker
    python benchmarks/bench_discovery.py --nodes 100000 --group-size 20   # ~1.9k-vertex components (ARPACK path)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))  # test oracles and fixtures


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for ln in f:
            if ln.startswith("VmRSS:"):
                return int(ln.split()[1]) / 1024
    return float("nan")


class PeakRSS:
    def __init__(self):
        self.base = rss_mb()
        self.peak = self.base
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb())
            time.sleep(0.02)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_mb())


def one_size(nodes: int, n_eig: int, k: int, group_size: int, pattern: int, solver: str, seed: int) -> dict:
    import numpy as np
    from synthetic_graph import make_planted, vertex_truth  # a test fixture, in tests/

    from segswap.apps.graph import build_graph, extract_vertices
    from segswap.apps.spectral import kmeans, spectral_embedding

    per_pair = pattern * pattern + 1
    n_groups = max(2, round(nodes / (per_pair * group_size * (group_size - 1) / 2)))
    preds, group, offset = make_planted(n_groups, group_size, grid=(16, 16), pattern=pattern, noise_cells=1,
                                        seed=seed)
    out = {"target_nodes": nodes, "images": int(len(group)), "pairs": int(len(preds.pairs))}
    with PeakRSS() as m:
        t = time.time()
        verts = extract_vertices(preds, np.arange(len(preds.pairs)), 0.5)
        adj, stats = build_graph(verts, preds, sigma=1.0, min_weight=0.01)
        out["graph_s"] = time.time() - t
    out.update(vertices=len(verts), edges=stats["edges"], graph_peak_mb=m.peak - m.base)
    del preds
    with PeakRSS() as m:
        t = time.time()
        emb = spectral_embedding(adj, n_eig, method=solver, seed=seed)
        out["eigen_s"] = time.time() - t
    out["eigen_peak_mb"] = m.peak - m.base
    with PeakRSS() as m:
        t = time.time()
        labels = kmeans(emb, k, seed=seed)
        out["kmeans_s"] = time.time() - t
    out["kmeans_peak_mb"] = m.peak - m.base
    truth = vertex_truth(verts, group, offset, pattern)
    from sklearn.metrics import adjusted_rand_score

    sel = (truth >= 0) & (labels >= 0)
    out["clustered"] = float((labels >= 0).mean())
    out["ari_vs_planted"] = float(adjusted_rand_score(truth[sel], labels[sel])) if sel.any() else float("nan")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, nargs="+", default=[100_000, 300_000, 1_000_000])
    p.add_argument("--n-eig", type=int, default=100)
    p.add_argument("--clusters", type=int, default=500)
    p.add_argument("--group-size", type=int, default=5, help="images per planted group (5: each image's top-4)")
    p.add_argument("--pattern", type=int, default=3, help="planted pattern side in cells (3: 9 vertices per pair)")
    p.add_argument("--solver", default="components", choices=["components", "eigsh"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--_one", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._one is not None:
        print(json.dumps(one_size(a._one, a.n_eig, a.clusters, a.group_size, a.pattern, a.solver, a.seed)))
        return
    print(f"cores: {os.cpu_count()}  N_eig={a.n_eig}  K={a.clusters}  solver={a.solver}")
    hdr = (f"{'vertices':>9} {'edges':>10} {'images':>7} | {'graph s':>8} {'MB':>6} | {'eigen s':>8} {'MB':>6} | "
           f"{'kmeans s':>8} {'MB':>6} | {'total s':>8} | {'clustered':>9} {'ARI':>5}")
    print(hdr)
    print("-" * len(hdr))
    for n in a.nodes:
        cmd = [sys.executable, __file__, "--_one", str(n), "--n-eig", str(a.n_eig), "--clusters", str(a.clusters),
               "--group-size", str(a.group_size), "--pattern", str(a.pattern), "--solver", a.solver,
               "--seed", str(a.seed)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            print(f"{n:>9} failed:\n{r.stderr[-2000:]}")
            continue
        o = json.loads(r.stdout.strip().splitlines()[-1])
        total = o["graph_s"] + o["eigen_s"] + o["kmeans_s"]
        print(f"{o['vertices']:>9} {o['edges']:>10} {o['images']:>7} | {o['graph_s']:>8.1f} {o['graph_peak_mb']:>6.0f} | "
              f"{o['eigen_s']:>8.1f} {o['eigen_peak_mb']:>6.0f} | {o['kmeans_s']:>8.1f} {o['kmeans_peak_mb']:>6.0f} | "
              f"{total:>8.1f} | {o['clustered']:>9.3f} {o['ari_vs_planted']:>5.2f}", flush=True)


if __name__ == "__main__":
    main()
