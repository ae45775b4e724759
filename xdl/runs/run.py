"""The run directory: what ``xdl train`` leaves and every other command reads.

    runs/NAME/
      run.json            model config, data spec, train config, seed, versions, metrics
      model.safetensors   weights and normalization buffers (no pickle anywhere)
      history.csv         one row per epoch
      explain/METHOD/  attack/METHOD/  report/METHOD/

Every file is written atomically, ``run.json`` last: a directory without it is not a run.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import os
import platform
import shutil
import sys
from functools import cached_property
from importlib import metadata
from pathlib import Path

from torch import nn

from xdl.data import DATASETS, FORMATS, load_data
from xdl.data.types import DataSplits
from xdl.errors import XdlError
from xdl.io import CLAIM, atomic_write, CSV_LINE_END, csv_safe, read_json, write_json
from xdl.models.builders import build_model
from xdl.models.imported import is_imported, load_model
from xdl.models.weights import WEIGHTS, load_weights, save_weights
from xdl.runs import checkpoint
from xdl.runs.provenance import STREAMED_DIGEST, splits_digest
from xdl.runs.schema import check_run_info
from xdl.trust import require_trust

FORMAT_VERSION = 1
RESULT_KINDS = ("explain", "attack", "report")


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ("xdl", "torch", "numpy", "captum", "shap", "lime", "fairlearn"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return found








def write_history(path: Path, history: list[dict]) -> None:
    columns = ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "train_eval_loss",
               "train_eval_accuracy", "lr", "seconds"]
    columns += sorted({k for row in history for k in row} - set(columns))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator=CSV_LINE_END)
    writer.writerow(csv_safe(c) for c in columns)
    writer.writerows([csv_safe(row.get(c, "")) for c in columns] for row in history)
    atomic_write(path, out.getvalue())


class Run:
    """A trained model's directory. ``model`` and ``data`` are rebuilt from run.json on first use.

    ``run.json`` is checked against :mod:`xdl.runs.schema` here, before anything is built from it.
    A run whose model is a user's ``package.module:factory`` builds only with ``trust_code``
    (or XDL_TRUST_CODE=1): a shared run directory must not run code on load.
    """

    def __init__(self, path: str | Path, trust_code: bool = False, reencode: bool = False):
        if not isinstance(path, (str, os.PathLike)):
            raise XdlError(f"expected a run directory (a path) or an nn.Module, got {type(path).__name__}")
        self.path = Path(path)
        self.trust_code = trust_code
        self.reencode = reencode  # a changed data file: encode it with the saved encoding instead of refusing
        self.data_warning = ""  # set when it did
        info_path = self.path / "run.json"
        if not info_path.is_file():
            raise XdlError(f"{self.path} is not an xdl run (no run.json); train one with `xdl train --out {self.path}`")
        self.info: dict = read_json(info_path)
        version = self.info.get("format_version") if isinstance(self.info, dict) else None
        if not isinstance(version, int) or isinstance(version, bool):
            raise XdlError(f"{info_path} has no format_version: not an xdl run")
        if version > FORMAT_VERSION:
            raise XdlError(
                f"{self.path} was written by a newer xdl (run format {version}, this xdl reads ≤ {FORMAT_VERSION}); "
                "upgrade xdl to read it"
            )
        missing = [k for k in ("model", "data", "train") if not isinstance(self.info.get(k), dict)]
        if missing:
            raise XdlError(f"{info_path} has no {missing[0]!r} section: the run is incomplete or damaged")
        check_run_info(str(info_path), self.info)

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
        if is_imported(self):  # a model xdl did not train (xdl import)
            return load_model(self, getattr(self, "trust_code", None))
        cfg = self.info["model"]
        if cfg["name"] == "custom":
            require_trust(f"{self.path / 'run.json'} (model factory {cfg['factory']!r})", self.trust_code)
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
        spec = self.info["data"]
        if spec["name"] not in DATASETS and spec["name"] not in FORMATS:
            raise XdlError(f"{self.path} was trained on data given in memory ({spec['name']!r}); xdl cannot reload it")
        data = self._named(load_data(spec))
        saved = self.info.get("data_sha256")
        if saved is None or splits_digest(data) == saved or self._legacy_digest(data) == saved:
            return data
        where = self.info["data"].get("path") or self.info["data"].get("name")
        if not self.reencode:
            raise XdlError(f"the data {where} changed since {self.path} was trained on it; "
                           "pass --reencode to analyze it anyway with the saved encoding")
        if self.info.get("encoding"):
            data = self._named(load_data({**self.info["data"], "encoding": self.info["encoding"]}))
        self.data_warning = f"the data {where} changed since training; it was encoded with the run's saved encoding"
        print(f"warning: {self.data_warning}", file=sys.stderr)
        return data

    def _legacy_digest(self, data: DataSplits) -> str | None:
        """A streamed folder's digest as runs saved before ``STREAMED_DIGEST`` computed it (its pixels)."""
        if not data.train.streamed or self.info.get("streamed_digest") == STREAMED_DIGEST:
            return None
        return splits_digest(data, pixels=True)

    def _named(self, data: DataSplits) -> DataSplits:
        """An imported model's own class names (from its config or --classes) over the data's."""
        imported = self.info.get("imported")
        if isinstance(imported, dict) and imported.get("classes"):
            data.class_names = list(imported["classes"])
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
        """Where a new result would go: METHOD/, or METHOD-2/, -3/ … unless ``force`` replaces it."""
        base = self.path / kind / method
        # A folder with no result.json holds only an analyzer's cache: the result belongs there.
        if force or not (base / "result.json").exists():
            return base
        n = 2
        while (self.path / kind / f"{method}-{n}" / "result.json").exists():
            n += 1
        return self.path / kind / f"{method}-{n}"

    def claim_result_dir(self, kind: str, method: str, force: bool = False) -> Path:
        """Claim a new result folder with ``mkdir``, which only one process can win.

        Checking for a free name and then writing it lets two concurrent analyses pick the
        same METHOD/; mkdir is atomic, so the loser moves on to METHOD-2/. ``force`` returns
        METHOD/ itself, for the result to replace.
        """
        self.check_writable(kind)
        folder = self.path / kind
        try:
            folder.mkdir(exist_ok=True)
            if force:
                return folder / method
            n = 1
            while True:
                target = folder / (method if n == 1 else f"{method}-{n}")
                try:
                    target.mkdir()
                    return target
                except FileExistsError:
                    # A folder holding only an analyzer's cache (privacy's reference models, made
                    # while this result was computed) is the result's own: claim it by a marker
                    # that mkdir, too, gives to one process only; Result.save drops it. An empty
                    # folder is another process's fresh claim, not a cache.
                    if target.is_dir() and any(target.iterdir()) and not (target / "result.json").exists():
                        try:
                            (target / CLAIM).mkdir()
                            return target
                        except FileExistsError:
                            pass
                    n += 1
        except OSError as exc:
            raise write_error(exc, folder) from None

    def check_writable(self, kind: str | None = None) -> None:
        """Refuse before any work when results could not be saved in the run."""
        for name in [kind] if kind else RESULT_KINDS:
            folder = self.path / name
            if folder.exists() and not folder.is_dir():
                raise XdlError(f"{folder} is a file, so results cannot be saved there; move it out of the run")
        folder = self.path / kind if kind else self.path
        probe = folder if folder.is_dir() else self.path
        if not os.access(probe, os.W_OK | os.X_OK):
            raise XdlError(f"{probe} is read-only, so results cannot be saved; copy the run somewhere writable")

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
        **({"streamed_digest": STREAMED_DIGEST} if data.train.streamed else {}),
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


# Everything xdl writes at the top of a run directory; nothing else there is xdl's to replace.
RUN_FILES = ("run.json", WEIGHTS, "history.csv", "audit.html", "audit.json")


def check_train_out(out: Path, force: bool, resume: bool) -> None:
    """Refuse a --out that would lose something: a user's files, a finished run, an unfinished one."""
    if out.exists() and not out.is_dir():
        raise XdlError(f"--out {out} is a file; a run is a directory")
    is_run = (out / "run.json").exists()
    unfinished = checkpoint.exists(out / checkpoint.FOLDER)
    if is_run and (resume or not force):
        if resume:
            raise XdlError(f"{out} has finished training; there is nothing to resume")
        raise XdlError(f"{out} already holds a run; choose another --out or pass --force to replace it")
    if resume:
        return
    if not force and unfinished:
        raise XdlError(f"{out} holds an unfinished run; pass --resume to continue it or --force to start over")
    started = (out / checkpoint.FOLDER / checkpoint.CONFIG).is_file()  # stopped before its first epoch
    if not force and started:
        raise XdlError(f"{out} holds a run that stopped before its first epoch; pass --force to start over")
    ours = [name for name in (*RUN_FILES, checkpoint.FOLDER, *RESULT_KINDS) if (out / name).exists()]
    if not force and ours:
        raise XdlError(f"--out {out} already holds {ours[0]} (not from an xdl run); choose another --out")
    if force and not (is_run or unfinished or started) and out.is_dir() and any(out.iterdir()):
        raise XdlError(f"--out {out} is not an xdl run (no run.json), so --force will not replace what is in it")


def clear_run(path: Path) -> None:
    """Remove what xdl wrote for an earlier run at ``path`` (``--force``); a user's own files stay."""
    for child in RUN_FILES:
        if (path / child).is_file():
            (path / child).unlink()
    for kind in RESULT_KINDS:
        folder = path / kind
        if not folder.is_dir():
            continue
        for result in folder.iterdir():
            if result.is_dir() and not result.is_symlink() and (result / "result.json").is_file():
                shutil.rmtree(result)
        with contextlib.suppress(OSError):  # still holds a user's file: keep it
            folder.rmdir()


def check_result_target(path: str | Path) -> Path:
    """``out=`` for a result: a new or empty folder, or an earlier xdl result (which it replaces)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise XdlError(f"out={path} is a file; a result is written to a folder")
    if path.is_dir() and any(path.iterdir()) and not (path / "result.json").is_file():
        raise XdlError(f"out={path} holds files that are not an xdl result; choose a new or empty folder")
    return path


def write_error(exc: OSError, where: Path) -> XdlError:
    """An OSError from saving, as the one line the user can act on."""
    reason = exc.strerror or errno.errorcode.get(exc.errno or 0, type(exc).__name__)
    return XdlError(f"cannot write in {exc.filename or where}: {reason}")


def save_result(result, folder: str | Path) -> Path:
    """``result.save(folder)`` with a full disk or a read-only folder as an XdlError."""
    try:
        return result.save(folder)
    except OSError as exc:
        raise write_error(exc, Path(folder)) from None


def load(path: str | Path, trust_code: bool = False) -> Run:
    """Open a run directory (the model loads lazily, in eval mode)."""
    return Run(path, trust_code=trust_code)


def model_summary(model: nn.Module) -> dict:
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
