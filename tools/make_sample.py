"""Regenerate the MNIST sample bundled in fastmnist/data/sample from a full MNIST folder.

The sample is the first N training and first M test images of the standard release (roughly balanced over the
ten classes), written as gzipped IDX files under the four standard names. gzip is written with mtime 0 and no
file name, so the same source gives byte-identical files.

    python tools/make_sample.py /work/shared/data/mnist                       # 5000 train / 1000 test
    python tools/make_sample.py MNIST_DIR --train 5000 --test 1000 --out fastmnist/data/sample
"""

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from fastmnist.data import IDX_FILES, find_idx_files, load_idx, write_idx  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="folder with the four MNIST IDX files (raw or .gz; flat or MNIST/raw)")
    parser.add_argument("--train", type=int, default=5000, help="number of training images (the first ones)")
    parser.add_argument("--test", type=int, default=1000, help="number of test images (the first ones)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(HERE), "fastmnist", "data", "sample"))
    args = parser.parse_args(argv)
    found = find_idx_files(args.source, "mnist")
    if found is None:
        parser.error(f"{args.source}: the four MNIST IDX files are not there")
    os.makedirs(args.out, exist_ok=True)
    for split, count in (("train", args.train), ("test", args.test)):
        data = load_idx(*found[split]).take(count)
        if len(data) < count:
            parser.error(f"{found[split][0]} has only {len(data)} images, {count} asked")
        images_name, labels_name = IDX_FILES[split]
        write_idx(os.path.join(args.out, images_name + ".gz"), data.images)
        write_idx(os.path.join(args.out, labels_name + ".gz"), data.labels.to(dtype=data.images.dtype))
        counts = data.class_counts().tolist()
        print(f"{split}: {len(data)} images, per class {counts}")
    total = sum(os.path.getsize(os.path.join(args.out, n + ".gz")) for pair in IDX_FILES.values() for n in pair)
    print(f"wrote {args.out} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
