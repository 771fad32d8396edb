#!/usr/bin/env python
"""Build the CIFAR-10 subset embedded in the package (``src/linvision/data/cifar10_subset.tar.gz``).

Reads the full JPEG CIFAR-10 archive (layout ``cifar10/{train,test}/<class>/NNNN.jpg``), picks a deterministic
seeded sample of ``--train-per-class`` / ``--test-per-class`` images per class, and writes a byte-reproducible
archive (layout ``train/<class>/*.jpg``, ``test/<class>/*.jpg``; original JPEG bytes, fixed mtimes/owners, gzip
header without timestamp) plus ``cifar10_subset.json`` with provenance, counts and sha256.

Usage::

    python scripts/make_embedded_subset.py [--source /work/shared/data/cifar10-jpeg.tar.gz]
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import random
import tarfile
from collections import defaultdict
from pathlib import Path

OUT_DIR = Path(__file__).resolve().parents[1] / "src" / "linvision" / "data"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="/work/shared/data/cifar10-jpeg.tar.gz")
    p.add_argument("--out-dir", type=Path, default=OUT_DIR)
    p.add_argument("--train-per-class", type=int, default=500)
    p.add_argument("--test-per-class", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()

    files: dict[tuple[str, str], dict[str, bytes]] = defaultdict(dict)  # (split, class) -> {name: bytes}
    with tarfile.open(a.source, "r:*") as tf:
        for m in tf:
            parts = Path(m.name).parts
            if m.isfile() and len(parts) == 4 and parts[1] in ("train", "test") and parts[3].lower().endswith(".jpg"):
                files[(parts[1], parts[2])][parts[3]] = tf.extractfile(m).read()

    rng = random.Random(a.seed)
    counts: dict[str, dict[str, int]] = {"train": {}, "test": {}}
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, compresslevel=9) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.USTAR_FORMAT) as out:
        for split, cls in sorted(files):
            n = a.train_per_class if split == "train" else a.test_per_class
            names = sorted(files[(split, cls)])
            if len(names) < n:
                raise SystemExit(f"{split}/{cls}: only {len(names)} images, need {n}")
            for name in sorted(rng.sample(names, n)):
                data = files[(split, cls)][name]
                info = tarfile.TarInfo(f"{split}/{cls}/{name}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                out.addfile(info, io.BytesIO(data))
            counts[split][cls] = n

    a.out_dir.mkdir(parents=True, exist_ok=True)
    archive = a.out_dir / "cifar10_subset.tar.gz"
    archive.write_bytes(buf.getvalue())
    meta = {
        "name": "cifar10_subset",
        "description": "Seeded per-class subset of CIFAR-10 (Krizhevsky 2009), 32x32 RGB JPEG (quality ~75); "
                       "original JPEG bytes, official train/test split",
        "source": Path(a.source).name,
        "source_sha256": hashlib.sha256(Path(a.source).read_bytes()).hexdigest(),
        "selection": f"random.Random({a.seed}).sample of each sorted class folder, split by split",
        "layout": "train/<class>/*.jpg, test/<class>/*.jpg",
        "classes": sorted(counts["train"]),
        "counts": {s: sum(c.values()) for s, c in counts.items()},
        "per_class": {"train": a.train_per_class, "test": a.test_per_class},
        "sha256": hashlib.sha256(buf.getvalue()).hexdigest(),
        "bytes": len(buf.getvalue()),
        "generator": "scripts/make_embedded_subset.py",
    }
    (a.out_dir / "cifar10_subset.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {archive} ({meta['bytes'] / 1e6:.2f} MB, {meta['counts']}, sha256 {meta['sha256'][:16]}...)")


if __name__ == "__main__":
    main()
