"""Transfer learning on real images, measured: 100 photos of two classes a network has never seen.

    .venv/bin/python examples/transfer_cifar.py [--cifar ../shared/data/cifar10] [--out runs/transfer]

1. Pretrain ResNet-20 on 8 CIFAR-10 classes (everything but cat and dog) with the fast recipe.
2. Build the target task: 50 cats + 50 dogs from CIFAR-10's training set; test on all 2,000
   cat and dog test images.
3. Compare on the same split: (a) training from scratch, (b) the pretrained base frozen with a new
   head, (c) the head first, then the last two stages unfrozen at a tenth of the learning rate.

Takes CPU-minutes (the pretraining dominates; it is skipped when its checkpoint exists). Writes
``results.json`` and prints a table of accuracy and time per method.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from reslab.config import load_config
from reslab.engine import fit
from reslab.transfer import finetune_config

SOURCE_CLASSES = ["airplane", "automobile", "bird", "deer", "frog", "horse", "ship", "truck"]
TARGET_CLASSES = ["cat", "dog"]


def build_target(cifar: Path, root: Path, per_class: int, seed: int) -> Path:
    """A small ImageFolder of symlinks: ``per_class`` training images per target class, all test images."""
    rng = random.Random(seed)
    for c in TARGET_CLASSES:
        files = sorted((cifar / "train" / c).iterdir())
        for split, chosen in (
            ("train", rng.sample(files, per_class)),
            ("test", sorted((cifar / "test" / c).iterdir())),
        ):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for f in chosen:
                if not (d / f.name).exists():
                    (d / f.name).symlink_to(f.resolve())
    return root


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--cifar", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10")
    )
    p.add_argument("--out", default="runs/transfer")
    p.add_argument("--pretrain-epochs", type=float, default=8)
    p.add_argument("--epochs", type=int, default=30, help="epochs over the 100 target images")
    p.add_argument("--per-class", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    out, cifar = Path(args.out), Path(args.cifar)
    source = out / "source"
    t0 = time.perf_counter()
    if not (source / "summary.json").exists():
        fit(
            load_config(
                "cifar10_fast",
                {
                    "data.name": "folder",
                    "data.dir": str(cifar),
                    "data.classes": SOURCE_CLASSES,
                    "epochs": args.pretrain_epochs,
                    "out": str(source),
                },
            )
        )
    pretrain_s = time.perf_counter() - t0
    source_err = json.loads((source / "summary.json").read_text())["eval_err"]
    target = build_target(cifar, out / "target", args.per_class, args.seed)
    common = {"epochs": args.epochs, "data.batch_size": 25, "seed": args.seed, "log_every": 4}
    ckpt = str(source / "last.pt")
    methods = {
        "a_scratch": lambda o: load_config(
            "finetune",
            {
                **common,
                "model": "resnet20",
                "data.dir": str(target),
                "optim.lr": 0.05,
                "finetune": None,
                "out": o,
            },
        ),
        "b_frozen_base_new_head": lambda o: finetune_config(
            ckpt, str(target), overrides={**common, "out": o}
        ),
        "c_head_then_last_two_stages": lambda o: finetune_config(
            ckpt,
            str(target),
            overrides={**common, "finetune.unfreeze_at": [f"{args.epochs // 3}:2"], "out": o},
        ),
    }
    results = {
        "source": {"classes": SOURCE_CLASSES, "test_error_8_classes": source_err, "seconds": pretrain_s},
        "target": {"classes": TARGET_CLASSES, "train_images": 2 * args.per_class, "test_images": 2000},
    }
    for name, make in methods.items():
        run_dir = out / name
        if not (run_dir / "summary.json").exists():
            fit(make(str(run_dir)))
        s = json.loads((run_dir / "summary.json").read_text())
        results[name] = {"test_accuracy": 1 - s["eval_err"], "seconds": s["train_seconds"]}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(
        f"\nsource: ResNet-20 on {len(SOURCE_CLASSES)} CIFAR-10 classes, test error {100 * source_err:.2f}%"
    )
    print(f"target: {2 * args.per_class} training images of {' vs '.join(TARGET_CLASSES)}, 2000 test images")
    for name in methods:
        r = results[name]
        print(f"  {name:30s} accuracy {100 * r['test_accuracy']:.2f}%   {r['seconds']:.1f}s of training")
    print(f"results: {out / 'results.json'}")


if __name__ == "__main__":
    main()
