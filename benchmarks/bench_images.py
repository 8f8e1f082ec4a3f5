"""Peak memory of decoding an RGBA PNG with ``segswap.core.images.load_rgb``.

    python benchmarks/bench_images.py --megapixels 16

Writes a ``W x W`` RGBA PNG (a gradient with a varying alpha, quick to encode), then in a fresh process
imports segswap, records its resident memory, decodes the file and records the peak. Prints the peak
growth and its ratio to the bytes of the uint8 RGB output (the issue's goal: a small multiple; the
float32 compositing it replaced cost ~20x, 6.3 GB for 100 megapixels).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np
from PIL import Image

# VmHWM (the peak resident set of this address space), not ru_maxrss: Linux carries ru_maxrss over
# exec from the parent that forked the child, which held the test image.
CHILD = r"""
import sys
from segswap.core.images import load_rgb
def hwm():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
before = hwm()
rgb = load_rgb(sys.argv[1], max_pixels=None)
print(before, hwm(), rgb.nbytes)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--megapixels", type=float, default=16.0)
    args = ap.parse_args()
    side = int((args.megapixels * 1e6) ** 0.5)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rgba.png")
        y, x = np.mgrid[0:side, 0:side].astype(np.uint32)
        rgba = np.stack([x % 256, y % 256, (x + y) % 256, (x * 7 + y) % 256], axis=2).astype(np.uint8)
        Image.fromarray(rgba, "RGBA").save(path, compress_level=1)
        del rgba, x, y
        out = subprocess.run([sys.executable, "-c", CHILD, path], capture_output=True, text=True, check=True)
    before, peak, nbytes = (int(v) for v in out.stdout.split())
    grew = peak - before
    print(f"{side}x{side} RGBA PNG ({side * side / 1e6:.1f} MP): output {nbytes / 2**20:.0f} MiB, "
          f"peak RSS growth while decoding {grew / 2**20:.0f} MiB = {grew / nbytes:.2f}x the output")


if __name__ == "__main__":
    main()
