"""Write a few real Fashion-MNIST test images as PNG files, for the demo's `edgekd classify` step."""

import sys
from pathlib import Path

from PIL import Image

from edgekd.data.sources import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, read_idx


def main(out: Path, count: int = 8) -> None:
    images = read_idx(Path(FASHION_MNIST_DIR) / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(Path(FASHION_MNIST_DIR) / "t10k-labels-idx1-ubyte.gz")
    out.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        name = FASHION_MNIST_CLASSES[labels[i]].replace("/", "-").replace(" ", "_")
        Image.fromarray(images[i], "L").save(out / f"test{i:02d}_{name}.png")
    print(f"wrote {count} Fashion-MNIST test images (true class in the file name) to {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
