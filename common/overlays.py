"""Quick-look PNGs: slices with their masks drawn over them, for a person, not for a viewer."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

CLASS_COLOURS = ("#00000000", "#2ca02c", "#d62728", "#1f77b4", "#ff7f0e")  # background clear; organ green, lesion red


def most_labelled_slices(mask: np.ndarray, count: int) -> list[int]:
    """The `count` slices with the most foreground, in slice order (the middle ones if none has any)."""
    area = (mask > 0).reshape(len(mask), -1).sum(axis=1)
    if not area.any():
        middle = len(mask) // 2
        return list(range(max(0, middle - count // 2), min(len(mask), middle + (count + 1) // 2)))
    return sorted(np.argsort(-area, kind="stable")[:count].tolist())


def draw_overlays(panels: Sequence[tuple[np.ndarray, np.ndarray, str]], class_names: Sequence[str], path: Path,
                  title: str, columns: int = 4) -> Path:
    """One PNG: each panel is (2D image, 2D mask, caption); the legend names the classes. The image is
    stretched over the mask's pixel grid, so a model-grid image carries a mask of the series' own grid."""
    rows = max(1, -(-len(panels) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.4 * columns, 2.7 * rows + 0.6), squeeze=False, layout="constrained")
    cmap = ListedColormap(CLASS_COLOURS[: len(class_names)])
    for ax in axes.flat:
        ax.axis("off")
    for ax, (image, mask, caption) in zip(axes.flat, panels):
        low, high = np.percentile(image, (1, 99))
        extent = (-0.5, mask.shape[1] - 0.5, mask.shape[0] - 0.5, -0.5)  # the mask's pixels, imshow's default for it
        ax.imshow(image, cmap="gray", vmin=low, vmax=high if high > low else low + 1, extent=extent)
        ax.imshow(np.ma.masked_equal(mask, 0), cmap=cmap, vmin=0, vmax=len(class_names) - 1, alpha=0.45, interpolation="nearest",
                  extent=extent)
        ax.set_title(caption, fontsize=8)
    handles = [plt.Rectangle((0, 0), 1, 1, color=CLASS_COLOURS[c], alpha=0.6) for c in range(1, len(class_names))]
    fig.legend(handles, list(class_names[1:]), loc="outside lower center", ncol=len(handles), frameon=False)
    fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
