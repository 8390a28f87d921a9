"""ddpmkit: train, fine-tune, sample and guide pixel-space diffusion models (diffusers + accelerate).

    import ddpmkit
    run = ddpmkit.train(dataset="emoji", image_size=32, max_steps=2000, output_dir="runs/emoji32")
    pipe = ddpmkit.load_pipeline(run)
    out = ddpmkit.sample(pipe, scheduler="ddim", steps=40, num_images=16, seed=0)
    ddpmkit.save_grid(out.images, "samples.png")
"""
from ddpmkit.config import TrainConfig
from ddpmkit.data import ImageData, load_image_data, make_dataloader
from ddpmkit.errors import UserError
from ddpmkit.images import make_grid, save_grid
from ddpmkit.models import PRESETS, build_unet, load_pipeline
from ddpmkit.sampling import SampleOutput, denoise, predicted_x0, sample
from ddpmkit.schedulers import REGISTRY as SCHEDULERS, make_scheduler
from ddpmkit.train import Trainer, train

__version__ = "0.1.0"

__all__ = [
    "TrainConfig", "ImageData", "load_image_data", "make_dataloader", "UserError", "make_grid", "save_grid",
    "PRESETS", "build_unet", "load_pipeline", "SampleOutput", "denoise", "predicted_x0", "sample", "SCHEDULERS",
    "make_scheduler", "Trainer", "train", "__version__",
]
