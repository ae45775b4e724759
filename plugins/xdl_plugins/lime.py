"""LIME: which superpixels (images) or columns (tables) the local linear surrogate weighs.

Images: lime's own segmentation wrapper and lime's surrogate (``LimeBase``'s weighted ridge
with ``LimeImageExplainer``'s kernel width and cosine distance, solved in closed form), but
the perturbed images are built as one tensor product — masks (N×S) times one-hot
superpixels (S×HW) — and classified in large batches on the model's device, instead of one
image copy per sample. A mask drawn twice is classified once: with few superpixels most of
lime's 1,000 draws repeat (lime's default quickshift cuts a 28×28 digit into 1–3
superpixels, so at most 8 distinct images), and the fit still sees every draw, so the
weights are lime's. Each image's masks are drawn exactly as lime draws them from
``random_state=seed + i``, so ``LimeImageExplainer(random_state=seed + i)`` fed the same
segmentation gives the same
weights. Tables: ``LimeTabularExplainer`` with the training statistics, summed per column.

    >>> result = xdl.explain(run, "lime", samples=4, params={"segmentation": "slic"})  # doctest: +SKIP
    >>> result.arrays["weights"].shape                                                # doctest: +SKIP
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from xdl.analysis.base import Analyzer, Context, Result, figures_wanted
from xdl.limits import at_most
from xdl_plugins.shap import POINTS_PER_BATCH, require_classifier

# lime's own defaults: LimeImageExplainer and LimeTabularExplainer.explain_instance.
IMAGE_SAMPLES, TABLE_SAMPLES = 1000, 5000
KERNEL_WIDTH, RIDGE_ALPHA = 0.25, 1.0  # LimeImageExplainer's kernel width; LimeBase's surrogate Ridge(alpha=1)


@dataclass
class LimeParams:
    segmentation: Literal["quickshift", "slic"] = "quickshift"
    kernel_size: float = 4.0  # quickshift; 4, 200 and 0.2 are LimeImageExplainer's defaults
    max_dist: float = 200.0
    ratio: float = 0.2
    n_segments: int = 50  # slic
    compactness: float = 10.0  # slic, for images in [0, 1]
    num_samples: int | None = None  # perturbed samples per input (None: lime's default, 1000 images / 5000 tables)
    hide_color: float | None = None  # value of a hidden superpixel; None: its own mean, as lime does
    top: int = 5  # superpixels outlined per sign in the figure

    def __post_init__(self) -> None:
        if self.num_samples is not None and self.num_samples < 10:
            raise ValueError(f"num_samples must be >= 10 for a meaningful local fit, got {self.num_samples}")
        if self.top < 1 or self.n_segments < 1:
            raise ValueError("top and n_segments must be >= 1")
        at_most("num_samples", self.num_samples, 100_000)
        at_most("n_segments", self.n_segments, 1_000)
        at_most("top", self.top, 1_000)


class Lime(Analyzer):
    """Weights of a local linear surrogate for the target class's probability."""

    kind = "explain"
    Params = LimeParams
    samples = 8
    sharding = "samples"
    description = "LIME: superpixel (images) or column (tables) weights of a local linear surrogate"
    guide = (
        "Weights of a simple linear model fitted to the classifier around this one input (Ribeiro et al. "
        "2016). A low surrogate R² means the linear story does not describe the model here; do not read the "
        "weights then."
    )
    check_params = {"segmentation": "slic", "n_segments": 8, "num_samples": 50}

    @classmethod
    def attributions(cls, result: Result, x: torch.Tensor) -> np.ndarray | None:
        """Per-feature weights for tables; for images each pixel takes its superpixel's weight."""
        weights, segments, shape = result.arrays.get("weights"), result.arrays.get("segments"), tuple(x.shape)
        if weights is not None and tuple(weights.shape) == shape:
            return weights
        if weights is None or segments is None or x.dim() != 4:
            return None
        flat = segments.reshape(len(segments), -1)
        per_pixel = np.take_along_axis(weights, flat, axis=1).reshape(len(x), 1, *x.shape[2:])
        return np.broadcast_to(per_pixel, shape)

    @classmethod
    def passes(cls, params: LimeParams, shape) -> float | None:
        """Forward passes only, one per perturbed sample (at most: repeated masks are evaluated once)."""
        return (params.num_samples or (IMAGE_SAMPLES if len(shape) == 3 else TABLE_SAMPLES)) / 3

    @classmethod
    def seconds_beside_model(cls, params: LimeParams, sample: torch.Tensor) -> float:
        """The segmentation runs outside the model: lime's quickshift takes about a second per
        224 px photo, more than the model's share on a ResNet-18."""
        if sample.dim() != 3:
            return 0.0
        # Their imports (once per process, a second on a cold start) are not a per-sample cost.
        import lime.wrappers.scikit_image  # noqa: F401
        import skimage.color  # noqa: F401

        started = time.perf_counter()
        segment(sample, params, 0)
        return time.perf_counter() - started

    def run(self, ctx: Context, params: LimeParams) -> Result:
        require_classifier(ctx)
        targets = ctx.targets()
        result = self.result()
        if ctx.kind == "tabular":
            explain_rows(ctx, params, targets, result)
            return result
        segments = [segment(image, params, ctx.seed) for image in ctx.x]
        count = params.num_samples or IMAGE_SAMPLES
        weights = np.zeros((len(ctx.x), max(s.max() + 1 for s in segments)))
        scores = np.zeros(len(ctx.x))
        evaluated = 0
        for s in ctx.batches(batch_size=ctx.samples_per_call(count, POINTS_PER_BATCH)):
            index = range(s.start, s.stop)
            masks = [lime_masks(ctx.seed + i, count, segments[i].max() + 1) for i in index]
            probs, distinct = perturb_and_predict(ctx, ctx.x[s], segments[s], masks, params.hide_color)
            evaluated += distinct
            for k, i in enumerate(index):
                w, scores[i] = fit(masks[k], probs[k], int(targets[i]))
                weights[i, : len(w)] = w  # zero-padded: images have different superpixel counts
        result.arrays.update(weights=weights, segments=np.stack(segments), target=targets.numpy())
        result.metrics.update(mean_superpixels=float(np.mean([s.max() + 1 for s in segments])), mean_r2=float(scores.mean()),
                              model_evaluations_per_image=evaluated / len(ctx.x))
        if result.metrics["mean_superpixels"] < 5:
            result.warnings.append(
                f"the segmentation cut these images into {result.metrics['mean_superpixels']:.1f} superpixels on average "
                "(lime's quickshift defaults are made for photos); -p segmentation=slic gives a finer explanation")
        result.summary = f"LIME on {len(ctx.x)} images ({count} perturbations each); surrogate R² {scores.mean():.2f} on average"
        if figures_wanted():  # the outlines cost more than a fit; skipped when only the weights are wanted
            result.add_figure("lime", outline_figure(ctx, segments, weights, targets, params.top))
        return result


def segment(image: torch.Tensor, params: LimeParams, seed: int) -> np.ndarray:
    """Superpixel ids (H×W) from lime's skimage wrapper; lime segments RGB, so gray is repeated."""
    from lime.wrappers.scikit_image import SegmentationAlgorithm
    from skimage.color import gray2rgb

    pixels = image.numpy().astype(np.float64)
    rgb = np.moveaxis(pixels, 0, -1) if len(pixels) == 3 else gray2rgb(pixels.mean(0))
    if params.segmentation == "quickshift":
        algorithm = SegmentationAlgorithm(
            "quickshift", kernel_size=params.kernel_size, max_dist=params.max_dist, ratio=params.ratio, random_seed=seed
        )
    else:
        algorithm = SegmentationAlgorithm("slic", n_segments=params.n_segments, compactness=params.compactness, start_label=0)
    return np.unique(algorithm(rgb), return_inverse=True)[1].reshape(rgb.shape[:2])  # ids 0..S-1


def lime_masks(seed: int, count: int, superpixels: int) -> np.ndarray:
    """Which superpixels each sample keeps, drawn as LimeImageExplainer.data_labels draws them."""
    masks = np.random.RandomState(seed).randint(0, 2, count * superpixels).reshape(count, superpixels)
    masks[0] = 1  # the first sample is the unperturbed image
    return masks


@torch.inference_mode()
def perturb_and_predict(ctx: Context, x: torch.Tensor, segments: list[np.ndarray], masks: list[np.ndarray],
                        hide_color: float | None) -> tuple[list[np.ndarray], int]:
    """Class probabilities (N×K per image) of every masked copy of a batch of images, and how
    many distinct copies were classified; each distinct mask is built and classified once."""
    flat = x.to(ctx.device).flatten(2)  # B×C×HW
    images, inverses = [], []
    for k, (seg, m) in enumerate(zip(segments, masks)):
        distinct, inverse = np.unique(m, axis=0, return_inverse=True)
        onehot = torch.nn.functional.one_hot(torch.as_tensor(seg, device=ctx.device).flatten(), m.shape[1]).float().T  # S×HW
        keep = (torch.as_tensor(distinct, dtype=torch.float32, device=ctx.device) @ onehot)[:, None]  # U×1×HW
        if hide_color is None:  # each superpixel's mean, per channel, as lime's "fudged image"
            hidden = (flat[k] @ onehot.T / onehot.sum(1).clamp_min(1)) @ onehot
        else:
            hidden = torch.full_like(flat[k], hide_color)
        images.append(keep * flat[k] + (1 - keep) * hidden)
        inverses.append(inverse.reshape(-1))
    images = torch.cat(images).view(-1, *x.shape[1:])
    model = ctx.fast_model()
    probs = torch.cat([torch.softmax(model(images[s]).float(), 1).cpu()
                       for s in ctx.batches(len(images), POINTS_PER_BATCH * ctx.batch_size)]).numpy()
    starts = np.cumsum([0] + [i.max() + 1 for i in inverses])
    return [probs[start + inverse] for start, inverse in zip(starts, inverses)], len(images)


def fit(masks: np.ndarray, probs: np.ndarray, target: int) -> tuple[np.ndarray, float]:
    """lime's surrogate for one image, solved in closed form: (weight per superpixel, R²).

    What ``LimeImageExplainer`` fits with every superpixel as a feature: each sample
    weighted by lime's kernel, sqrt(exp(-d²/0.25²)), of its cosine distance d to the
    unperturbed mask (all ones, so d = 1 - sqrt(kept/S)); a ridge of alpha 1 with an
    intercept on the target's probability; R² weighted the same. Going through lime's
    ``LimeBase`` and scikit-learn's Ridge gave the same numbers and cost 2 s of SciPy
    imports per process and 20 ms per image (tested equal to lime's fit).
    """
    kept = masks.astype(np.float64)
    distance = 1.0 - np.sqrt(kept.sum(1) / kept.shape[1])
    weight = np.sqrt(np.exp(-(distance**2) / KERNEL_WIDTH**2))
    y = probs[:, target].astype(np.float64)
    x_mean, y_mean = weight @ kept / weight.sum(), weight @ y / weight.sum()
    root = np.sqrt(weight)
    xc, yc = (kept - x_mean) * root[:, None], (y - y_mean) * root
    coef = np.linalg.solve(xc.T @ xc + RIDGE_ALPHA * np.eye(kept.shape[1]), xc.T @ yc)
    residual, spread = weight @ (y - y_mean - (kept - x_mean) @ coef) ** 2, weight @ (y - y_mean) ** 2
    # scikit-learn's convention for a constant target: R² 1 when the fit is exact, else 0.
    r2 = 1.0 - residual / spread if spread > 0 else float(residual == 0)
    return coef, float(r2)


def outline_figure(ctx: Context, segments: list[np.ndarray], weights: np.ndarray, targets: torch.Tensor, top: int):
    """Each image with its `top` most positive superpixels outlined green, most negative red."""
    from skimage.color import gray2rgb
    from skimage.segmentation import mark_boundaries

    from xdl.plotting import image_grid

    panels = []
    for image, seg, w in zip(ctx.x[:16].numpy(), segments, weights):
        rgb = np.moveaxis(image, 0, -1) if len(image) == 3 else gray2rgb(image.mean(0))
        # Upscale small images (nearest) so one-pixel outlines do not cover the digit itself.
        zoom = max(1, 112 // min(seg.shape))
        rgb, seg = (a.repeat(zoom, 0).repeat(zoom, 1) for a in (rgb, seg))
        order = np.argsort(w[: seg.max() + 1])
        positive, negative = order[::-1][:top], order[:top]
        for chosen, colour in ((positive[w[positive] > 0], (0, 1, 0)), (negative[w[negative] < 0], (1, 0, 0))):
            rgb = mark_boundaries(rgb, np.where(np.isin(seg, chosen), seg + 1, 0), color=colour)
        panels.append(np.moveaxis(rgb, -1, 0))
    names = ctx.class_names or [str(i) for i in range(int(targets.max()) + 1)]
    return image_grid(np.stack(panels), [f"class {names[t]}" for t in targets[:16].tolist()])


def explain_rows(ctx: Context, params: LimeParams, targets: torch.Tensor, result: Result) -> None:
    """LimeTabularExplainer per row, with the training split's statistics; weights summed per column."""
    from lime.lime_tabular import LimeTabularExplainer

    from xdl.plotting import bar_chart

    train = (ctx.data.train.x if ctx.data is not None else ctx.x).numpy()
    categorical = np.flatnonzero(~ctx.encoding.numeric_mask()).tolist() if ctx.encoding else None
    explainer = LimeTabularExplainer(
        train, feature_names=ctx.feature_names or None, class_names=ctx.class_names or None,
        categorical_features=categorical, random_state=ctx.seed,
    )

    def predict(rows: np.ndarray) -> np.ndarray:
        return ctx.predict(torch.as_tensor(rows, dtype=torch.float32)).numpy()

    count = params.num_samples or TABLE_SAMPLES
    weights = np.zeros(tuple(ctx.x.shape))
    for i, (row, target) in enumerate(zip(ctx.x.numpy(), targets.tolist())):
        found = explainer.explain_instance(row, predict, labels=(target,), num_features=row.shape[0], num_samples=count)
        for feature, weight in found.as_map()[target]:
            weights[i, feature] = weight
    columns = ctx.encoding.sum_to_columns(weights) if ctx.encoding else weights
    names = ctx.encoding.original_names if ctx.encoding else ctx.feature_names or [f"x{i}" for i in range(weights.shape[1])]
    result.arrays.update(weights=weights, column_weights=columns, target=targets.numpy())
    result.tables["lime_columns"] = [
        {"column": n, "mean_weight": float(m), "mean_abs_weight": float(a)}
        for n, m, a in zip(names, columns.mean(0), np.abs(columns).mean(0))
    ]
    first = ctx.class_names[targets[0]] if ctx.class_names else int(targets[0])
    result.add_figure("lime", bar_chart(names, columns[0], f"LIME weights, sample 0 (class {first})", "weight"))
    result.summary = f"LIME on {len(ctx.x)} rows ({count} perturbations each); weights per original column"
