"""Materialize ImageNet-100 (the CMC / solo-learn 100-class subset) as a tree of symlinks.

    python tools/make_imagenet100.py --imagenet /data/imagenet --out /data/imagenet100

makes ``OUT/train/<wnid>`` and ``OUT/val/<wnid>`` symlinks to the class folders of a full ImageNet
tree (``train/<wnid>/*.JPEG``, ``val/<wnid>/*.JPEG``), for the 100 classes listed in
``ssl_vision/resources/imagenet100_classes.txt``: no image is copied. Not needed by ssl-vision
itself (``data=imagenet100 data.path=/data/imagenet`` selects the classes on the fly); useful for
other tools that expect a 100-folder tree. Re-running is safe: existing correct links are kept.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ssl_vision.data import imagenet100_classes


def make_imagenet100(imagenet: Path, out: Path, classes: list[str] | None = None) -> int:
    """Create the symlink tree; returns the number of links made. Raises ``SystemExit`` with a
    one-line message when a source folder or class is missing, or ``out`` holds something else."""
    imagenet, out = Path(imagenet).expanduser().resolve(), Path(out).expanduser()
    classes = classes or imagenet100_classes()
    for split in ("train", "val"):
        if not (imagenet / split).is_dir():
            raise SystemExit(f"error: '{imagenet / split}' is not a folder; expected a full ImageNet tree "
                             "with train/<wnid>/ and val/<wnid>/")
        lost = [c for c in classes if not (imagenet / split / c).is_dir()]
        if lost:
            raise SystemExit(f"error: {len(lost)} of the {len(classes)} ImageNet-100 classes are missing under "
                             f"'{imagenet / split}' (e.g. {', '.join(lost[:3])})")
    made = 0
    for split in ("train", "val"):
        (out / split).mkdir(parents=True, exist_ok=True)
        for wnid in classes:
            link, target = out / split / wnid, imagenet / split / wnid
            if link.is_symlink() and Path(os.readlink(link)) == target:
                continue
            if link.exists() or link.is_symlink():
                raise SystemExit(f"error: '{link}' already exists and is not a link to '{target}'")
            link.symlink_to(target, target_is_directory=True)
            made += 1
    return made


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--imagenet", required=True, type=Path, help="full ImageNet folder with train/ and val/")
    p.add_argument("--out", required=True, type=Path, help="where to create the ImageNet-100 symlink tree")
    args = p.parse_args(argv)
    n = make_imagenet100(args.imagenet, args.out)
    print(f"{args.out}: {n} new class links (100 classes x train/val); use data=imagenet100 data.path={args.out}")


if __name__ == "__main__":
    sys.exit(main())
