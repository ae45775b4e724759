"""Tabular CSV data: split first, then fit the encoding on the training rows only.

Numeric columns are standardized with the training mean/std (missing values imputed
with the training median); non-numeric columns are one-hot encoded over the categories
seen in training (missing values become the category ``"missing"``, unseen values encode
as all zeros). ``--sensitive`` columns are kept as per-row group labels and are not
model inputs unless ``sensitive_as_feature`` is set; ``extra_groups`` columns are group
labels that remain model inputs. Everything is a pure function of
the spec, so a run reloading its spec gets the identical encoding.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from xdl.data.sampling import random_splits
from xdl.data.types import ColumnEncoding, DataSplits, Encoding, Split
from xdl.errors import XdlError

__all__ = ["MISSING", "encode_frame", "fit_encoding", "load_csv", "read_csv"]

MISSING = "missing"  # the category missing values of non-numeric columns become
NA_VALUES = ["?"]  # in addition to pandas' defaults ("", "NA", "NaN", "null", …): UCI's marker
MAX_CLASSES = 100


def read_csv(path: str | Path) -> pd.DataFrame:
    """Read a UTF-8 CSV, turning every problem into one XdlError line."""
    path = Path(path)
    try:
        frame = pd.read_csv(path, encoding="utf-8-sig", skipinitialspace=True, na_values=NA_VALUES)
    except UnicodeDecodeError as exc:
        raise XdlError(f"{path} is not UTF-8 text (bad byte at position {exc.start}); save it as UTF-8") from None
    except pd.errors.EmptyDataError:
        raise XdlError(f"{path} is empty") from None
    except pd.errors.ParserError as exc:
        message = str(exc).strip().splitlines()[-1] if str(exc).strip() else "parse error"
        raise XdlError(f"cannot parse {path} as CSV: {message}") from None
    except OSError as exc:
        raise XdlError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(frame) == 0:
        raise XdlError(f"{path} has a header but no data rows")
    frame.columns = [str(c) for c in frame.columns]
    for name in frame.columns:
        # 1e400 parses as inf: it would train "successfully" into NaN weights.
        count = int(np.isinf(frame[name].to_numpy(dtype=np.float64)).sum()) if _is_numeric(frame[name]) else 0
        if count:
            raise XdlError(f"{path}: column {name!r} holds {count} infinite values (inf, or numbers beyond 1e308); fix or remove them")
    return frame


def _is_numeric(series: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)


def _as_strings(series: pd.Series) -> pd.Series:
    """Category labels: strings, with missing values as MISSING."""
    return series.map(lambda v: MISSING if pd.isna(v) else str(v))


def fit_encoding(train: pd.DataFrame, columns: list[str]) -> Encoding:
    """Fit the per-column encoding on training rows only."""
    encoded = []
    for name in columns:
        series = train[name]
        missing = int(series.isna().sum())
        if _is_numeric(series):
            values = series.astype(np.float64)
            median = float(values.median()) if missing < len(values) else 0.0
            filled = values.fillna(median)
            mean = float(filled.mean()) if len(filled) else 0.0
            std = float(filled.std(ddof=0)) if len(filled) else 1.0
            # A constant column's std is rounding noise (0.1 repeated has std 1.4e-17, not 0), and
            # dividing by it would turn any other value into ~1e16: below float64's relative
            # precision of its mean, a column counts as constant and is only centred.
            if not np.isfinite(std) or std <= 1e-12 * abs(mean):
                std = 1.0
            encoded.append(ColumnEncoding(name, "numeric", mean=mean, std=std, fill=median, missing=missing))
        else:
            categories = sorted(set(_as_strings(series)))
            encoded.append(ColumnEncoding(name, "categorical", fill=MISSING, categories=categories, missing=missing))
    return Encoding(encoded)


def encode_frame(frame: pd.DataFrame, encoding: Encoding) -> np.ndarray:
    """Rows of a frame → float32 N×F model inputs under a fitted encoding."""
    blocks = []
    for column in encoding.columns:
        if column.name not in frame.columns:
            raise XdlError(f"the data has no column {column.name!r}, which the model was trained on")
        series = frame[column.name]
        if column.type == "numeric":
            values = pd.to_numeric(series, errors="coerce").astype(np.float64).fillna(column.fill)
            blocks.append(((values.to_numpy() - column.mean) / column.std)[:, None])
        else:
            codes = pd.Categorical(_as_strings(series), categories=column.categories).codes
            block = np.zeros((len(frame), len(column.categories)))
            seen = codes >= 0  # unseen categories (-1) stay all zeros
            block[np.flatnonzero(seen), codes[seen]] = 1.0
            blocks.append(block)
    if not blocks:
        return np.zeros((len(frame), 0), dtype=np.float32)
    return np.concatenate(blocks, axis=1).astype(np.float32)


def _class_labels(target: pd.Series, name: str) -> tuple[np.ndarray, list[str]]:
    missing = int(target.isna().sum())
    if missing:
        raise XdlError(f"target column {name!r} has {missing} missing values")
    if pd.api.types.is_float_dtype(target) and not (target == target.round()).all():
        raise XdlError(f"target column {name!r} holds non-integer numbers; xdl trains classifiers, so the target must hold classes")
    if pd.api.types.is_float_dtype(target):
        target = target.astype(np.int64)
    values = target.unique().tolist()
    try:
        values = sorted(values)
    except TypeError:  # mixed types: order by their text
        values = sorted(values, key=str)
    if len(values) < 2:
        raise XdlError(f"target column {name!r} has only one class ({values[0]!s}); need at least two")
    if len(values) > MAX_CLASSES:
        raise XdlError(f"target column {name!r} has {len(values)} distinct values; xdl supports at most {MAX_CLASSES} classes")
    names = [str(v) for v in values]
    index = {v: i for i, v in enumerate(values)}
    return np.array([index[v] for v in target.tolist()], dtype=np.int64), names


def load_csv(spec: dict) -> DataSplits:
    """Load a CSV: ``spec["target"]`` is the class column; ``spec["sensitive"]`` the group columns."""
    path = Path(spec["path"])
    target = spec.get("target")
    if not target:
        raise XdlError("CSV data needs --target COLUMN: the column holding the class to predict")
    frame = read_csv(path)
    columns = list(frame.columns)
    sensitive = spec.get("sensitive") or []
    if isinstance(sensitive, str):
        sensitive = [s for s in sensitive.split(",") if s]
    # Extra group columns stay model features: a report can group a finished run's rows by
    # them (``xdl report --sensitive``) without changing the encoding the model was trained on.
    extra = [c for c in spec.get("extra_groups") or [] if c not in sensitive]
    for name in [target, *sensitive, *extra]:
        if name not in frame.columns:
            raise XdlError(f"CSV has no column {name!r}; columns are: {', '.join(columns)}")
    if target in sensitive or target in extra:
        raise XdlError(f"column {target!r} cannot be both the target and a sensitive column")

    y, class_names = _class_labels(frame[target], target)
    skip = {target} if spec.get("sensitive_as_feature") else {target, *sensitive}
    features = [c for c in columns if c not in skip]
    if not features:
        raise XdlError(f"{path} has no feature columns besides the target{' and sensitive columns' if sensitive else ''}")
    groups = {s: _as_strings(frame[s]).to_numpy(dtype=object).astype(str) for s in [*sensitive, *extra]}

    # Split row indices first (stratified, seeded), then fit the encoding on train rows only.
    # random_splits hands back float32 tensors: row numbers stay exact below 2**24.
    if len(frame) >= 2**24:
        raise XdlError(f"{path} has {len(frame)} rows; xdl reads CSV files of up to {2**24 - 1} rows")
    rows = np.arange(len(frame), dtype=np.float64)[:, None]
    parts = random_splits(rows, y, spec, groups=groups)
    indices = [part.x[:, 0].long().numpy() for part in parts]
    # A run re-reading a changed file on purpose (--reencode) keeps the encoding it was trained with.
    saved = spec.get("encoding")
    encoding = Encoding.from_json(saved) if saved else fit_encoding(frame.iloc[indices[0]], features)
    splits = [
        Split(
            torch.from_numpy(encode_frame(frame.iloc[idx], encoding)),
            part.y,
            part.groups,
            idx,
        )
        for idx, part in zip(indices, parts)
    ]

    notes = []
    for column in encoding.columns:
        count = int(frame[column.name].isna().sum())
        if not count:
            continue
        if column.type == "numeric":
            notes.append(f"imputed {count} missing values in {column.name!r} with the training median {column.fill:g}")
        else:
            notes.append(f"encoded {count} missing values in {column.name!r} as the category {MISSING!r}")
    wide = [c.name for c in encoding.columns if c.type == "categorical" and len(c.categories) > 50]
    if wide:
        notes.append(f"columns with over 50 categories, one-hot encoded as many features: {', '.join(wide)}")
    return DataSplits(
        splits[0],
        splits[1],
        splits[2],
        "tabular",
        class_names,
        spec,
        feature_names=encoding.feature_names,
        encoding=encoding,
        notes=notes,
    )
