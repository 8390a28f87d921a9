"""Images out: [-1, 1] tensors -> uint8 -> grids, trajectory strips and plots (PNG)."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image


def bars_enabled(wanted: bool = True) -> bool:
    """Progress bars on unless unwanted or silenced with tqdm's own TQDM_DISABLE=1 (what `ddpmkit -q` sets)."""
    return wanted and os.environ.get("TQDM_DISABLE", "").lower() in ("", "0", "false")


def to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> uint8 numpy (B, H, W, C), rounded as `DDPMPipeline.numpy_to_pil` does."""
    return to_uint8_nchw(images).permute(0, 2, 3, 1).numpy()


def to_uint8_nchw(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) float in [-1, 1] (what `sample` returns) or uint8 -> uint8 tensor (B, C, H, W) on the CPU,
    rounded as `DDPMPipeline.numpy_to_pil` does (what evaluation and the saved PNGs see)."""
    if images.dtype == torch.uint8:
        return images.cpu()
    return ((images.detach().float().cpu() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    arrays = to_uint8_hwc(images)
    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arrays]


def make_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2, scale: int = 1) -> Image.Image:
    """A grid of (B, C, H, W) images in [-1, 1]; `nrow` images per row (square-ish by default)."""
    arrays = to_uint8_hwc(images)
    b, h, w, c = arrays.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(b)))
    rows = math.ceil(b / nrow)
    grid = np.full((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), 255, dtype=np.uint8)
    for i, a in enumerate(arrays):
        r, col = divmod(i, nrow)
        grid[padding + r * (h + padding):padding + r * (h + padding) + h,
             padding + col * (w + padding):padding + col * (w + padding) + w] = a
    image = Image.fromarray(grid[..., 0] if c == 1 else grid)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    return image


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, scale: int = 1) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    make_grid(images, nrow=nrow, scale=scale).save(path)
    return path


def save_individual(images: torch.Tensor, folder: str | Path, prefix: str = "sample") -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(to_pil(images)):
        paths.append(folder / f"{prefix}_{i:04d}.png")
        image.save(paths[-1])
    return paths


def labelled_rows(rows: Sequence[torch.Tensor], labels: Sequence[str], path: str | Path, scale: int = 2) -> Path:
    """Rows of images (each (N, C, H, W)) with a text label left of each row: comparisons and strips."""
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default(size=12)
    anchor = "lm" if isinstance(font, ImageFont.FreeTypeFont) else None  # Pillow without FreeType: its bitmap font
    space = max(font.getlength(" "), 4.0)  # the default font's own space is 1-2 px at this size: words ran together

    def words(label: str) -> list[tuple[float, str]]:  # (x, word): drawn one by one, a readable space apart
        out, x = [], 0.0
        for word in label.split(" "):
            out.append((x, word))
            x += font.getlength(word) + space
        return out

    placed = [words(label) for label in labels]
    label_w = int(max([10.0] + [8 + x + font.getlength(w) for p in placed for x, w in p[-1:]]))
    grids = [make_grid(r, nrow=r.shape[0], scale=scale).convert("RGB") for r in rows]
    width = label_w + max(g.width for g in grids)
    canvas = Image.new("RGB", (width, sum(g.height for g in grids)), "white")
    draw = ImageDraw.Draw(canvas)
    y = 0
    for grid, label_words in zip(grids, placed):
        canvas.paste(grid, (label_w, y))
        for x, word in label_words:
            draw.text((4 + x, y + grid.height // 2 - (0 if anchor else 6)), word, fill="black", font=font,
                      anchor=anchor)
        y += grid.height
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def save_trajectory(trajectory: list[dict], path: str | Path, max_images: int = 4) -> Path:
    """Two rows per image: x_t and the predicted x0 (`pred_original_sample`) at the recorded steps."""
    rows, labels = [], []
    for n in range(min(max_images, trajectory[0]["sample"].shape[0])):
        rows.append(torch.stack([s["sample"][n] for s in trajectory]))
        labels.append(f"x_t #{n}")
        rows.append(torch.stack([s["pred_original_sample"][n].clamp(-1, 1) for s in trajectory]))
        labels.append(f"x0 #{n}")
    return labelled_rows(rows, labels, path)


def plot_lines(series: dict[str, tuple[Sequence[float], Sequence[float]]], path: str | Path, title: str,
               xlabel: str, ylabel: str, logy: bool = False) -> Path:
    """A line plot (matplotlib, no display needed) of name -> (x values, y values)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, label=name, linewidth=1)
    if logy:
        ax.set_yscale("log")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if len(series) > 1:
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_loss_curve(steps: Sequence[int], losses: Sequence[float], path: str | Path) -> Path:
    """Per-step loss (faint) and its moving average over up to 50 steps (a tenth of the run: none under 20 steps,
    where it would be the loss itself)."""
    window = min(50, len(losses) // 10)
    series = {"loss": (steps, losses)}
    if window > 1:
        smooth = np.convolve(np.asarray(losses, dtype=float), np.ones(window) / window, mode="valid")
        series[f"mean of {window}"] = (steps[window - 1:], smooth)
    return plot_lines(series, path, "training loss", "step", "MSE", logy=True)
