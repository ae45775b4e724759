"""The Run section's cards: what a person needs from run.json, formatted for people.

run.json keeps every value exactly; a card keeps only the entries that apply to this run
(no augmentation parameters when nothing was augmented, no training fields for an imported
model) and turns long explanations into numbered footnotes, so one value can never make a
card taller than its neighbours.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

# A card cell longer than this becomes a footnote: at the cards' ~14 rem column width,
# 40 characters is about three lines, the most a cell may take before it dominates a card.
CELL_CHARS = 40
LIST_ITEMS = 8  # a longer list shows its first items and its length

# Training options that only mean something when another option turned them on.
AUGMENT_PARAMS = {"shift": "shift", "rotate": "rotate", "noise": "noise", "cutout": "cutout"}
ADVERSARIAL_PARAMS = ("adv_eps", "adv_steps")
# Always shown, even when zero or off: the recipe a reader needs to reproduce the run.
CORE_TRAIN = ("epochs", "batch_size", "lr", "optimizer", "schedule", "weight_decay", "device", "seed")


@dataclass
class Row:
    label: str
    value: str
    title: str = ""  # the exact value on hover, when ``value`` is rounded or shortened
    note: int | None = None  # footnote number


@dataclass
class Card:
    title: str
    rows: list[Row] = field(default_factory=list)


@dataclass
class Cards:
    cards: list[Card]
    notes: list[str]

    def add(self, card: Card, label: str, value: Any, key: str | None = None) -> None:
        """Add one entry; a long text value goes to the footnotes and the cell refers to it."""
        text = human(key or label, value)
        if len(text) > CELL_CHARS and isinstance(value, str):
            card.rows.append(self.footnote(Row(label, "see note"), text))
            return
        exact = "" if text == str(value) or isinstance(value, (list, dict, str)) else str(value)
        card.rows.append(Row(label, text, title=exact))

    def footnote(self, row: Row, text: str) -> Row:
        self.notes.append(text)
        row.note = len(self.notes)
        return row


def run_cards(header: dict[str, Any]) -> Cards:
    """The cards of the Run section, in page order."""
    out = Cards([], [])
    out.cards.append(_mapping_card(out, "Model", header.get("model", {})))
    out.cards.append(_data_card(out, header))
    if header.get("imported"):
        out.cards.append(_mapping_card(out, "Source", header["imported"]))
    elif header.get("train"):
        out.cards.append(_train_card(out, header["train"]))
    out.cards.append(_mapping_card(out, "Final metrics", header.get("metrics", {})))
    if header.get("compute"):
        out.cards.append(_compute_card(out, header["compute"]))
    out.cards.append(_mapping_card(out, "Versions", header.get("versions", {})))
    return out


def _mapping_card(out: Cards, title: str, mapping: dict[str, Any]) -> Card:
    card = Card(title)
    for key, value in mapping.items():
        if isinstance(value, dict):  # a nested setting: one row per leaf, dotted
            for sub, leaf in value.items():
                out.add(card, f"{_label(key)} {_label(sub)}", leaf, key=sub)
        else:
            out.add(card, _label(key), value, key=key)
    return card


def _data_card(out: Cards, header: dict[str, Any]) -> Card:
    card = _mapping_card(out, "Data", header.get("data", {}))
    dataset = header.get("dataset") or {}
    if dataset:
        out.add(card, "kind", dataset.get("kind", ""))
        out.add(card, "input shape", "×".join(str(d) for d in dataset.get("input_shape", [])))
        classes = dataset.get("classes", [])
        card.rows.append(Row("classes", str(len(classes)), title=", ".join(map(str, classes))))
        for split, size in (dataset.get("sizes") or {}).items():
            out.add(card, split, f"{size:,} samples")
        if dataset.get("groups"):
            out.add(card, "groups", dataset["groups"])
    return card


def applicable_training(train: dict[str, Any]) -> dict[str, Any]:
    """The training options that shaped this run: core recipe, plus whatever was switched on."""
    augment = train.get("augment") or []
    adversarial = train.get("adv_train") not in (None, "none")
    shown = {}
    for key, value in train.items():
        if key in CORE_TRAIN or key == "augment" and augment:
            shown[key] = value
        elif key in AUGMENT_PARAMS:
            if AUGMENT_PARAMS[key] in augment:
                shown[key] = value
        elif key in ADVERSARIAL_PARAMS:
            if adversarial and (key != "adv_steps" or train.get("adv_train") == "pgd"):
                shown[key] = value
        elif key == "amp":
            continue  # autocast runs on CUDA only; the device row says where the run trained
        elif _switched_on(value):  # any other option, e.g. a later release's: shown when it is on
            shown[key] = value
    return shown


def _train_card(out: Cards, train: dict[str, Any]) -> Card:
    return _mapping_card(out, "Training", applicable_training(train))


def _compute_card(out: Cards, c: dict[str, Any]) -> Card:
    """The compute card, its long explanations (how FLOPs, memory and energy were got) as footnotes."""
    card = Card("Compute")
    if "parameters" in c:
        trainable = c.get("trainable_parameters", c["parameters"])
        out.add(card, "parameters", c["parameters"], key="parameters")
        if trainable != c["parameters"]:
            out.add(card, "trainable", trainable, key="parameters")
    flops = [(k, label) for k, label in (("flops_forward_per_sample", "FLOPs / sample"),
                                         ("flops_training_total", "training FLOPs")) if k in c]
    for i, (key, label) in enumerate(flops):
        out.add(card, label, c[key], key=key)
        if i == 0 and c.get("flops_counted"):
            out.footnote(card.rows[-1], f"FLOPs: {c['flops_counted']}.")
    if c.get("train_seconds") is not None:
        out.add(card, "training time", c["train_seconds"], key="train_seconds")
    if c.get("samples_per_second"):
        out.add(card, "throughput", c["samples_per_second"], key="samples_per_second")
    if c.get("peak_memory_bytes") is not None:
        out.add(card, "peak memory", c["peak_memory_bytes"], key="peak_memory_bytes")
        if c.get("peak_memory_source"):
            out.footnote(card.rows[-1], f"Peak memory: {c['peak_memory_source']}.")
    device = c.get("device_name") or c.get("device")
    if device:
        devices = c.get("devices", 1) or 1
        out.add(card, "device", f"{c.get('device', '')} ({device})" + (f" × {devices}" if devices > 1 else ""))
    if c.get("energy_wh") is not None:
        out.add(card, "energy (estimate)", c["energy_wh"], key="energy_wh")
        if c.get("power_assumption"):
            watts = c.get("assumed_watts")
            out.footnote(card.rows[-1], f"Energy = assumed power × training time; assumed {human('watts', watts)}: "
                                        f"{c['power_assumption']}.")
    return card


def _switched_on(value: Any) -> bool:
    return value not in (None, False, 0, 0.0, "", "none", [], {})


def _label(key: str) -> str:
    return str(key).replace("_", " ")


# -----------------------------------------------------------------------------------------
# Numbers for people: the unit follows from the key's name, the exact value stays on hover
# -----------------------------------------------------------------------------------------


def human(key: str, value: Any) -> str:
    """``value`` as a person reads it, e.g. 421738 parameters → "422 k", 817500160 bytes → "780 MiB"."""
    key = str(key).lower()
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        shown = ", ".join(human("", v) for v in value[:LIST_ITEMS])
        return f"{shown}, … ({len(value)} in all)" if len(value) > LIST_ITEMS else (shown or "none")
    if isinstance(value, dict):
        return ", ".join(f"{k}={human(k, v)}" for k, v in value.items())
    if not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if key.endswith("bytes"):
        return _binary(value)
    if "flop" in key:
        return _si(value, "FLOP")
    if "parameters" in key:
        return _si(value, "")
    if "per_second" in key:
        return f"{value:,.0f} /s"
    if "seconds" in key:
        return _duration(value)
    if key.endswith("_wh"):
        return f"{value:.2g} Wh"
    if key == "watts":
        return f"{value:.0f} W"
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e6):
        return f"{value:.3g}"
    return f"{value:.4f}".rstrip("0").rstrip(".")


def _si(value: float, unit: str) -> str:
    for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}".rstrip()
    return f"{value:g} {unit}".rstrip()


def _binary(value: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {unit}" if value / scale < 100 else f"{value / scale:.0f} {unit}"
    return f"{value:.0f} B"


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.3g} s" if seconds < 10 else f"{seconds:.0f} s"
    minutes, rest = divmod(round(seconds), 60)
    if minutes < 120:
        return f"{minutes} min {rest} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"
