"""The whole audit on architectures xdl did not build (issue 30's bar), on real MNIST digits.

1. The seed's Keras model — Flatten → Dense(128, relu) → Dense(10, softmax), 5 epochs of
   Keras 3 ``fit`` on the torch backend — saved as ``model.keras``, then ``xdl import
   model.keras --data mnist`` and ``xdl audit RUN``.
2. A Hugging Face ResNet built from its config, ``xdl import hf:DIR --data PHOTOS`` on a folder
   of the real digits written as RGB PNGs, then ``xdl audit RUN``.

Each row is met when ``audit.json`` has no failed section, the feature-based sections
(embedding, duplicates, OOD) were computed on penultimate features (not the logits), and,
for Keras, the activations section covers both Dense layers. Whole ``xdl`` processes.

    python benchmarks/bench_architectures.py [--quick] [--mnist-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from real_mnist import DEFAULT, write_real_mnist

FEATURE_SECTIONS = ("explain/embedding", "report/duplicates", "report/ood")
XDL = [sys.executable, "-m", "xdl"]


def audited(run: Path, samples: int | None) -> tuple[dict, float]:
    start = time.perf_counter()
    subprocess.run([*XDL, "audit", str(run), "-q", *(["--samples", str(samples)] if samples else [])], check=True)
    return json.loads((run / "audit.json").read_text()), time.perf_counter() - start


def verdict(audit: dict) -> dict:
    sections = {f"{s['kind']}/{s['method']}": s for s in audit["sections"]}
    failed = [key for key, s in sections.items() if s["status"] == "failed"]
    features = {key: (sections.get(key) or {}).get("metrics", {}).get("features_from", "not run") for key in FEATURE_SECTIONS}
    return {"failed": failed, "features_from": features, "not_applicable": audit["not_applicable"],
            "on_features": all(str(v).startswith("the input of ") for v in features.values()), "sections": sections}


def keras_row(data: Path, root: Path, train: int, samples: int | None) -> dict:
    os.environ["KERAS_BACKEND"] = "torch"
    import keras

    from xdl.data import load_data

    keras.utils.set_random_seed(0)
    splits = load_data("mnist", data_dir=str(data))
    model = keras.Sequential([keras.Input((28, 28)), keras.layers.Flatten(), keras.layers.Dense(128, activation="relu"),
                              keras.layers.Dense(10, activation="softmax")])
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(splits.train.x[:, 0].numpy(), splits.train.y.numpy(), epochs=5, batch_size=32, verbose=0)
    model.save(root / "model.keras")
    run = root / "keras-run"
    subprocess.run([*XDL, "import", str(root / "model.keras"), "--data", "mnist", "--data-dir", str(data), "--out", str(run),
                    "-q"], check=True)
    audit, seconds = audited(run, samples)
    found = verdict(audit)
    layers = (found["sections"].get("explain/activations") or {}).get("tables", {}).get("layers", [])
    dense = [row["layer"] for row in layers if row["type"] == "Dense"]
    print(f"keras: failed {found['failed'] or 'none'}; features {found['features_from']}; dense layers {dense}; "
          f"not applicable {found['not_applicable']}", file=sys.stderr)
    return {
        "workload": f"seed's Keras model (Dense 128) on {train} real MNIST digits: xdl import + xdl audit",
        "xdl": len(found["failed"]), "baseline": None, "ratio": None, "seconds": round(seconds, 1),
        "target": "0 failed sections; embedding, duplicates, OOD on penultimate features; activations of both Dense layers",
        "met": not found["failed"] and found["on_features"] and len(dense) == 2,
    }


def resnet_row(data: Path, root: Path, photos: int, samples: int | None) -> dict:
    import numpy as np
    from PIL import Image
    from transformers import ResNetConfig, ResNetForImageClassification

    from xdl.data import load_data

    splits = load_data("mnist", data_dir=str(data))
    folder = root / "photos"
    for i, (image, label) in enumerate(zip(splits.test.x[:photos], splits.test.y[:photos], strict=True)):
        (folder / str(int(label))).mkdir(parents=True, exist_ok=True)
        gray = (image[0].numpy() * 255).astype(np.uint8)
        Image.fromarray(np.stack([gray] * 3, -1)).resize((32, 32)).save(folder / str(int(label)) / f"{i}.png")
    names = {i: str(i) for i in range(10)}
    config = ResNetConfig(layer_type="basic", depths=[1, 1, 1], hidden_sizes=[16, 32, 64], embedding_size=16,
                          num_labels=10, id2label=names, label2id={v: k for k, v in names.items()})
    ResNetForImageClassification(config).save_pretrained(root / "resnet")
    run = root / "resnet-run"
    subprocess.run([*XDL, "import", f"hf:{root / 'resnet'}", "--data", str(folder), "--out", str(run), "--input-size", "32",
                    "-q"], check=True)
    audit, seconds = audited(run, samples)
    found = verdict(audit)
    gradcam = (found["sections"].get("explain/gradcam") or {}).get("status")
    print(f"resnet: failed {found['failed'] or 'none'}; features {found['features_from']}; gradcam {gradcam}; "
          f"not applicable {found['not_applicable']}", file=sys.stderr)
    return {
        "workload": f"HF ResNet (config-built) on a folder of {photos} real MNIST digits as RGB PNGs: xdl import + xdl audit",
        "xdl": len(found["failed"]), "baseline": None, "ratio": None, "seconds": round(seconds, 1),
        "target": "0 failed sections; embedding, duplicates, OOD on penultimate features; Grad-CAM computed",
        "met": not found["failed"] and found["on_features"] and gradcam == "computed",
    }


def main(quick: bool = False, mnist_dir: str = str(DEFAULT)) -> list[dict]:
    train = 1000 if quick else 4000
    samples = 4 if quick else None
    with tempfile.TemporaryDirectory(prefix="xdl-bench-arch-") as tmp:
        root = Path(tmp)
        data = write_real_mnist(root / "mnist", train=train, source=Path(mnist_dir))
        return [keras_row(data, root, train, samples), resnet_row(data, root, 200 if quick else 1000, samples)]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1,000 training digits, 200 photos, audits of 4 samples")
    parser.add_argument("--mnist-dir", default=str(DEFAULT))
    args = parser.parse_args()
    for row in main(args.quick, args.mnist_dir):
        print(json.dumps(row))
