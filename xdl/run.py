"""The run directory: what ``xdl train`` leaves and every other command reads.

    runs/NAME/
      run.json            model config, data spec, train config, seed, versions, metrics
      model.safetensors   weights and normalization buffers (no pickle anywhere)
      history.csv         one row per epoch
      explain/METHOD/  attack/METHOD/  report/METHOD/

Every file is written atomically, ``run.json`` last: a directory without it is not a run.
"""

from __future__ import annotations

import csv
import io
import platform
import shutil
from functools import cached_property
from importlib import metadata
from pathlib import Path

from torch import nn

from xdl.data.types import DataSplits
from xdl.errors import XdlError
from xdl.io import atomic_path, atomic_write, read_json, write_json

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
RESULT_KINDS = ("explain", "attack", "report")


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ("xdl", "torch", "numpy", "captum", "shap", "lime", "fairlearn"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return found


def save_weights(model: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    # safetensors refuses shared storage; contiguous CPU copies make every tensor its own.
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))


def load_weights(model: nn.Module, path: Path) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise XdlError(f"cannot read weights {path}: {exc}") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise XdlError(f"weights in {path} do not fit the model in run.json: {first[-1].strip()}") from None


def write_history(path: Path, history: list[dict]) -> None:
    columns = ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "train_eval_loss",
               "train_eval_accuracy", "lr", "seconds"]
    columns += sorted({k for row in history for k in row} - set(columns))
    out = io.StringIO()
    writer = csv.DictWriter(out, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    atomic_write(path, out.getvalue())


class Run:
    """A trained model's directory. ``model`` and ``data`` are rebuilt from run.json on first use."""

    def __init__(self, path: str | Path, reencode: bool = False):
        self.path = Path(path)
        self.reencode = reencode  # a changed data file: encode it with the saved encoding instead of refusing
        self.data_warning = ""  # set when it did
        info_path = self.path / "run.json"
        if not info_path.is_file():
            raise XdlError(f"{self.path} is not an xdl run (no run.json); train one with `xdl train --out {self.path}`")
        self.info: dict = read_json(info_path)
        version = self.info.get("format_version") if isinstance(self.info, dict) else None
        if not isinstance(version, int):
            raise XdlError(f"{info_path} has no format_version: not an xdl run")
        if version > FORMAT_VERSION:
            raise XdlError(
                f"{self.path} was written by a newer xdl (run format {version}, this xdl reads ≤ {FORMAT_VERSION}); "
                "upgrade xdl to read it"
            )
        missing = [k for k in ("model", "data", "train") if not isinstance(self.info.get(k), dict)]
        if missing:
            raise XdlError(f"{info_path} has no {missing[0]!r} section: the run is incomplete or damaged")

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def metrics(self) -> dict:
        return self.info.get("metrics", {})

    @property
    def seed(self) -> int:
        return int(self.info.get("train", {}).get("seed", 0))

    @cached_property
    def model(self) -> nn.Module:
        """The trained model on CPU, in eval mode, rebuilt from run.json with no flags."""
        from xdl.models import build_model

        cfg = self.info["model"]
        model = build_model(cfg, tuple(cfg["in_shape"]), cfg["num_classes"])
        load_weights(model, self.path / WEIGHTS)
        return model.eval()

    @cached_property
    def data(self) -> DataSplits:
        """The splits the model was trained on, rebuilt from the spec; a change to the data is refused.

        run.json keeps a digest of the splits as training saw them. A data file edited since
        then would otherwise be split and encoded afresh without a word; with ``reencode`` it
        is encoded with the saved encoding (where there is one) and a warning instead.
        """
        import sys

        from xdl.data import load_data
        from xdl.provenance import splits_digest

        data = load_data(self.info["data"])
        saved = self.info.get("data_sha256")
        if saved is None or splits_digest(data) == saved:
            return data
        where = self.info["data"].get("path") or self.info["data"].get("name")
        if not self.reencode:
            raise XdlError(f"the data {where} changed since {self.path} was trained on it; "
                           "pass --reencode to analyze it anyway with the saved encoding")
        if self.info.get("encoding"):
            data = load_data({**self.info["data"], "encoding": self.info["encoding"]})
        self.data_warning = f"the data {where} changed since training; it was encoded with the run's saved encoding"
        print(f"warning: {self.data_warning}", file=sys.stderr)
        return data

    @property
    def history(self) -> list[dict]:
        path = self.path / "history.csv"
        if not path.is_file():
            raise XdlError(f"{self.path} has no history.csv")
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        return [{k: _number(v) for k, v in row.items()} for row in rows]

    def result_dir(self, kind: str, method: str, force: bool = False) -> Path:
        """Where a new result goes: METHOD/, or METHOD-2/, -3/ … unless ``force`` replaces it."""
        base = self.path / kind / method
        if force or not base.exists():
            return base
        n = 2
        while (self.path / kind / f"{method}-{n}").exists():
            n += 1
        return self.path / kind / f"{method}-{n}"

    def results(self, kind: str | None = None) -> dict[str, Path]:
        """Saved results as {"kind/name": folder}, newest name for each method last."""
        found = {}
        for k in [kind] if kind else RESULT_KINDS:
            for folder in sorted((self.path / k).glob("*/result.json")):
                found[f"{k}/{folder.parent.name}"] = folder.parent
        return found


def _number(text: str) -> float | int | str:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def save_run(
    path: Path,
    model: nn.Module,
    data: DataSplits,
    model_cfg: dict,
    train_cfg: dict,
    history: list[dict],
    metrics: dict,
    extra: dict | None = None,
) -> Run:
    """Write a complete run directory; ``run.json`` goes last so a crash leaves no half-run."""
    from xdl.provenance import splits_digest

    path.mkdir(parents=True, exist_ok=True)
    save_weights(model, path / WEIGHTS)
    write_history(path / "history.csv", history)
    info = {
        "format_version": FORMAT_VERSION,
        "model": {**model_cfg, "in_shape": list(data.input_shape), "num_classes": data.num_classes},
        "data": data.spec,
        "dataset": {**data.describe(), "notes": data.notes},
        "encoding": data.encoding.to_json() if data.encoding else None,
        "data_sha256": splits_digest(data),
        "train": train_cfg,
        "metrics": metrics,
        "versions": versions(),
        **(extra or {}),
    }
    write_json(path / "run.json", info)
    return Run(path)


def new_run_path(root: str | Path = "runs", prefix: str = "run") -> Path:
    """A fresh name under ``root``: run-001, run-002, … (never an existing directory)."""
    root = Path(root)
    n = 1
    while (root / f"{prefix}-{n:03d}").exists():
        n += 1
    return root / f"{prefix}-{n:03d}"


def clear_run(path: Path) -> None:
    """Remove the files of an earlier run at ``path`` (``--force``), keeping nothing stale."""
    for child in ("run.json", WEIGHTS, "history.csv", "audit.html", "audit.json", *RESULT_KINDS):
        target = path / child
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def load(path: str | Path) -> Run:
    """Open a run directory (the model loads lazily, in eval mode)."""
    return Run(path)


def model_summary(model: nn.Module) -> dict:
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
