"""Reference implementations that need help to import here (not tests themselves)."""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from typing import Any


def grad_cam(setitem: Callable[[dict, str, Any], None] | None = None) -> tuple[type, type]:
    """pytorch-grad-cam's ``GradCAM`` and ``ClassifierOutputTarget``.

    The package imports torchvision at its top, for image helpers and detection targets that
    GradCAM never calls; torchvision does not import beside the CPU torch wheel, so those
    names are stubbed in ``sys.modules`` — through ``setitem`` (pytest's
    ``monkeypatch.setitem``, to take them out again after a test), else for good.
    """
    put = setitem or (lambda mapping, key, value: mapping.__setitem__(key, value))
    stub = types.ModuleType("torchvision")
    stub.transforms = types.SimpleNamespace(Compose=None, Normalize=None, ToTensor=None, functional=None)
    stub.ops = types.SimpleNamespace(box_iou=None)
    for name, module in {"torchvision": stub, "torchvision.transforms": stub.transforms,
                         "torchvision.transforms.functional": types.SimpleNamespace(resize=None)}.items():
        put(sys.modules, name, module)
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    return GradCAM, ClassifierOutputTarget
