"""`ddpmkit serve`: a Gradio app for sampling and guidance, a thin view over `sampling.sample` as cli.py is.

Four pieces, each readable alone:
- `request`: one job as a `Request` (every control a `sample` argument), the bounds the server checks itself,
  and the `ddpmkit sample` command that makes the same images bit for bit;
- `catalog`: the models on offer and what the page shows of each, read by `ddpmkit.models` from config files;
- `jobs`: the `Studio` that runs a Request as one `sample` call (on a CUDA GPU when there is one), one job at a
  time in a worker thread, with previews of the predicted x0 and cancellation;
- `page`: the Gradio page (`build_app`), and `server`: `serve()`, which starts it and stops on SIGINT/SIGTERM.
Gradio is imported only by `build_app` and `serve`: the rest works, and is tested, without it.
"""
from ddpmkit.serve.catalog import ModelInfo, clip_unavailable_reason, find_models
from ddpmkit.serve.jobs import PREVIEWS, QUEUE_SIZE, Result, Stopped, Studio, preview_image, run_in_thread
from ddpmkit.serve.page import EXAMPLE_COLORS, NO_GRADIO, build_app
from ddpmkit.serve.request import (MAX_IMAGES, MAX_PROMPT_CHARS, MAX_SEED, MAX_STEPS, MAX_UPLOAD_MB, METHODS,
                                   SCALE_RANGES, Request, check_upload, normalise_color, number_text)
from ddpmkit.serve.server import serve

__all__ = ["EXAMPLE_COLORS", "MAX_IMAGES", "MAX_PROMPT_CHARS", "MAX_SEED", "MAX_STEPS", "MAX_UPLOAD_MB", "METHODS",
           "NO_GRADIO", "PREVIEWS", "QUEUE_SIZE", "SCALE_RANGES", "ModelInfo", "Request", "Result", "Stopped",
           "Studio", "build_app", "check_upload", "clip_unavailable_reason", "find_models", "normalise_color",
           "number_text", "preview_image", "run_in_thread", "serve"]
