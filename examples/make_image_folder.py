"""A folder of PNG images to try the image-folder route on: ``OUT/train/<class>/*.png`` and
``OUT/test/<class>/*.png``, 10 classes of 28x28 greyscale digits.

    python -m examples.make_image_folder --out data/my_images

The images are scikit-learn's bundled 8x8 handwritten digits (1797), enlarged to 28x28
(bilinear) and split 1437 / 360 as ``utils.write_beton --dataset digits`` splits them; the
class folders are named ``zero`` .. ``nine``.  A stand-in for one's own folder: nothing
here is needed when you have one.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SIZE = 28


def make_image_folder(out) -> Path:
    from PIL import Image

    from utils.data.sources import DIGITS, ReadOptions
    out = Path(out)
    train, test = DIGITS.read(None, ReadOptions())
    for split, source in (("train", train), ("test", test)):
        for index in range(len(source)):
            image, label = source[index]
            folder = out / split / NAMES[label]
            folder.mkdir(parents=True, exist_ok=True)
            big = Image.fromarray(np.asarray(image)[..., 0]).resize((SIZE, SIZE), Image.BILINEAR)
            big.save(folder / f"{index:04d}.png")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.make_image_folder", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the folder to create (train/ and test/ inside)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        print(f"{out}: exists and is not empty; nothing written", file=sys.stderr)
        return 0
    make_image_folder(out)
    print(f"{out}: {sum(1 for _ in out.rglob('*.png'))} PNG images in train/ and test/, 10 class folders each")
    return 0


if __name__ == "__main__":
    sys.exit(main())
