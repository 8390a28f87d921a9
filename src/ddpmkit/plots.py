"""Unit 1's pictures of the forward process: the noise schedule and one image noised at 8 timesteps."""
from __future__ import annotations

from pathlib import Path

import torch

from ddpmkit.images import labelled_rows, plot_lines


def plot_schedule(model: str | None = None, beta_schedule: str = "squaredcos_cap_v2", dataset: str | None = None,
                  image_size: int = 64, out: str | Path = "schedule.png", seed: int = 0) -> list[Path]:
    """Plot sqrt(alphas_cumprod) (signal) and sqrt(1 - alphas_cumprod) (noise) over t; optionally a noised strip."""
    from ddpmkit.models import load_pipeline, new_noise_scheduler

    scheduler = load_pipeline(model).scheduler if model else new_noise_scheduler(beta_schedule)
    ab = scheduler.alphas_cumprod
    t = list(range(len(ab)))
    name = model or beta_schedule
    out = Path(out)
    paths = [plot_lines({"sqrt(alphas_cumprod)  (signal)": (t, ab.sqrt().tolist()),
                         "sqrt(1 - alphas_cumprod)  (noise)": (t, (1 - ab).sqrt().tolist())},
                        out, f"noise schedule: {name}", "timestep t", "scale")]
    if dataset:
        from ddpmkit.data import load_image_data

        data = load_image_data(dataset, image_size, max_images=64)
        x0 = data.images[:1].float() / 127.5 - 1
        steps = torch.linspace(0, len(ab) - 1, 8).long()
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
        noisy = torch.cat([scheduler.add_noise(x0, noise, s[None]) for s in steps])
        label = f"t=0..{len(ab) - 1}"  # 8 evenly spaced timesteps, left (clean) to right (noise)
        paths.append(labelled_rows([noisy.clamp(-1, 1)], [label], out.with_name(out.stem + "_noised.png")))
    return paths
