"""Peak memory of `ranke fid` against the number of images: features are streamed from the files,
so the peak resident set size should not grow with the folder (COCO-30K is 30,000 images a side).

    python benchmarks/fid_memory.py                      # 3,000 and 30,000 toy renders, --size 256
    python benchmarks/fid_memory.py --n 1000 30000 --size 64 --dir /tmp/fid_bench

The images are toy-world renders (`ranke toy sample`, written once into --dir, default
/tmp/ranke_fid_bench; a smaller count uses the first images through symlinks). Each count runs
`ranke fid DIR DIR --features toy --size S` (both sides the same folder, so every image is read
and featurised twice) under `/usr/bin/time -v` and prints its peak RSS and wall time.
`--size 256` resizes each image to the LlamaGen resolution first: loaded whole, 30,000 such
images would take 5.9 GB as uint8.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

from ranke.precision import machine_description


def ensure_renders(folder: Path, n: int) -> None:
    if len(list(folder.glob("*.png"))) >= n:
        return
    subprocess.run([sys.executable, "-m", "ranke.cli", "toy", "sample", "--n", str(n), "--out", str(folder)], check=True)


def first_images(folder: Path, n: int) -> Path:
    """A folder of symlinks to the first `n` images of `folder`."""
    subset = folder.parent / f"{folder.name}_{n}"
    subset.mkdir(exist_ok=True)
    for path in sorted(folder.glob("*.png"))[:n]:
        link = subset / path.name
        if not link.exists():
            link.symlink_to(path)
    return subset


def measure(folder: Path, size: int, batch_size: int) -> tuple[float, float, str]:
    """(peak RSS in GB, wall seconds, printed JSON) of one `ranke fid` run."""
    command = ["/usr/bin/time", "-v", sys.executable, "-m", "ranke.cli", "fid", str(folder), str(folder),
               "--features", "toy", "--size", str(size), "--batch-size", str(batch_size)]  # fmt: skip
    env = {**os.environ, "RANKE_NO_PROGRESS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", done.stderr).group(1)
    seconds = sum(float(part) * 60**i for i, part in enumerate(reversed(wall.split(":"))))
    return rss_kb / 1024**2, seconds, done.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[3000, 30000], help="image counts to measure")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dir", default="/tmp/ranke_fid_bench", help="where the renders are written (once)")
    args = parser.parse_args()

    folder = Path(args.dir)
    ensure_renders(folder, max(args.n))
    print(f"machine: {machine_description()}; ranke fid DIR DIR --features toy --size {args.size}")
    for n in args.n:
        subset = folder if n >= len(list(folder.glob("*.png"))) else first_images(folder, n)
        rss, seconds, printed = measure(subset, args.size, args.batch_size)
        print(f"n={n:>6} per side: peak RSS {rss:.2f} GB, {seconds:.0f} s  {printed}")


if __name__ == "__main__":
    main()
