"""The web app's page: `build_app(studio)`, the Gradio Blocks of a `Studio`.

Controls on the left (sample) and in the middle (guide), each one `Request` field; previews of the predicted
x0, the images, the command and the downloads on the right. One function, `generate_images`, turns the
controls into a `Request` and runs it as a job; its parameter names are the API's (`/generate`). Gradio is
imported only here and in `serve()`: the rest of the app works, and is tested, without it.
"""
from __future__ import annotations

import logging
import os

from ddpmkit.errors import UserError
from ddpmkit.serve.jobs import Stopped, Studio, preview_every, run_in_thread
from ddpmkit.serve.request import MAX_IMAGES, MAX_SEED, MAX_STEPS, MAX_UPLOAD_MB, METHODS, SCALE_RANGES, Request

logger = logging.getLogger(__name__)

EXAMPLE_COLORS = (("#BB2266", 40.0), ("#44CCAA", 40.0))  # the course's two colours, at the default colour scale
CSS = ".pixelated img, .pixelated canvas { image-rendering: pixelated; }"
NO_GRADIO = "ddpmkit serve needs Gradio: pip install 'ddpmkit[ui]' (or pip install gradio)"


def has_gradio() -> bool:
    """Gradio is installed (found without importing it: the import takes seconds)."""
    import importlib.util

    try:
        return importlib.util.find_spec("gradio") is not None
    except (ImportError, ValueError):  # sys.modules["gradio"] is None: blocked
        return False


def import_gradio():
    """The gradio module, with its usage statistics off; a UserError saying what to install without it."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read when gradio is imported
    try:
        import gradio as gr
    except ImportError:
        raise UserError(NO_GRADIO) from None
    return gr


def build_app(studio: Studio):
    """The Gradio Blocks of `studio`: controls on the left, previews and results on the right."""
    gr = import_gradio()
    first = studio.describe(studio.default_model)
    with gr.Blocks(title="ddpmkit", analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        gr.Markdown("## ddpmkit: sample and guide a diffusion model\nEvery control is a `ddpmkit sample` flag; "
                    "the command under the images makes the same images again.")
        with gr.Row():
            controls = {**_sample_controls(gr, studio, first), **_guide_controls(gr, studio)}
            views = _result_views(gr)
        _connect(gr, app, studio, first, controls, views)
    return app


def _sample_controls(gr, studio: Studio, first) -> dict:
    """The left column: model, scheduler, steps, images, seed, class and CFG scale."""
    from ddpmkit.schedulers import default_steps, resolve, settings_label

    auto_name, auto_steps, auto_options = resolve("auto")
    with gr.Column(scale=2, min_width=300):
        gr.Markdown("### Sample")
        c = dict(model=gr.Dropdown([(m.label, m.value) for m in studio.models.values()], value=first.value,
                                   label="model", info="the bundled model and the pipelines under --models_dir"),
                 scheduler=gr.Dropdown(studio.schedulers, value="auto", label="scheduler",
                                       info=f"auto: {settings_label(auto_name, auto_options, auto_steps)}, the "
                                            "measured default"),
                 steps=gr.Slider(1, MAX_STEPS, value=default_steps("auto"), step=1, label="steps", elem_id="steps"),
                 num_images=gr.Slider(1, MAX_IMAGES, value=8, step=1, label="images"))
        with gr.Row(equal_height=True):
            c["seed"] = gr.Number(0, label="seed", precision=0, minimum=0, maximum=MAX_SEED, scale=3)
            c["random_seed"] = gr.Button("random", scale=1, min_width=60)
        # any value reaches the server (the API may name another model's class), which checks it;
        # empty means the model's first class
        c["class_label"] = gr.Dropdown(list(first.classes), value=None, allow_custom_value=True, label="class",
                                       visible=bool(first.classes))
        c["cfg_scale"] = gr.Slider(*SCALE_RANGES["cfg"], value=1.0, step=0.1, label="CFG scale",
                                   info="1 plain conditional, 0 unconditional, 2-5 sharper classes",
                                   visible=bool(first.classes))
        preset = _default_guidance(studio)  # the first model's stored default guidance, when its guide is on offer
        c["autoguide"] = gr.Dropdown([("none", "")] + [(m.label, m.value) for m in studio.models.values()],
                                     value=preset.get("autoguide", ""),
                                     label="autoguidance: guide with", elem_id="autoguide",
                                     info="a weaker model of the same kind (an earlier checkpoint; emoji32-guide for "
                                          "emoji32): guide + W (model - guide)")
        c["autoguide_scale"] = gr.Slider(*SCALE_RANGES["autoguide"], value=float(preset.get("autoguide_scale", 2.0)),
                                         step=0.1, label="autoguidance scale W")
        c["guidance_interval"] = gr.Textbox(preset.get("guidance_interval") or "", label="guidance interval", placeholder="e.g. 0.28,5.42",
                                            info="CFG / autoguidance only at noise levels LO < sigma <= HI (or "
                                                 "t:LO,HI timesteps); empty: every step")
    return c


def _guide_controls(gr, studio: Studio) -> dict:
    """The middle column: colour, guidance method, CLIP prompt, reference image, guide every K steps."""
    clip_off = studio.clip_reason
    with gr.Column(scale=2, min_width=300):
        gr.Markdown("### Guide")
        with gr.Row(equal_height=True):
            c = dict(color=gr.ColorPicker(EXAMPLE_COLORS[0][0], label="colour", scale=1, min_width=80),
                     color_scale=gr.Slider(*SCALE_RANGES["color"], value=0, step=1, label="colour scale", scale=3,
                                           info="0: off", elem_id="color-scale"))
        gr.Examples([list(e) for e in EXAMPLE_COLORS], [c["color"], c["color_scale"]], cache_examples=False,
                    label="the course's colours (click one)", elem_id="colour-examples",
                    example_labels=[f"{hex_color} at scale {scale:g}" for hex_color, scale in EXAMPLE_COLORS])
        c["guidance_method"] = gr.Radio(list(METHODS), value="shortcut", label="guidance method",
                                        info="shortcut: the course's, 1 UNet call a step; full: through the UNet, "
                                             "3x the cost, needs 3-4x the scale")
        c["clip_prompt"] = gr.Textbox("", label="CLIP prompt", placeholder="a red rose", interactive=clip_off is None,
                                      info=f"disabled: {clip_off}" if clip_off else "text guidance with CLIP")
        c["clip_scale"] = gr.Slider(*SCALE_RANGES["clip"], value=8, step=0.5, label="CLIP scale",
                                    interactive=clip_off is None)
        # a File, not an Image: Gradio would open an Image upload itself, and fail on a bad one
        # without saying why; ddpmkit's decoder checks it (check_upload) and says what is wrong
        c["reference"] = gr.File(file_types=["image"], type="filepath", height=120, elem_id="reference",
                                 label=f"reference image (png, jpg, webp; at most {MAX_UPLOAD_MB} MB)")
        c["image_scale"] = gr.Slider(*SCALE_RANGES["image"], value=20, step=1, label="reference image scale")
        c["guidance_every"] = gr.Number(1, label="guide every K steps", precision=0, minimum=1, maximum=MAX_STEPS)
    return c


def _result_views(gr) -> dict:
    """The right column: the Generate button, the predicted x0 while sampling, the images, command, downloads."""
    with gr.Column(scale=3, min_width=300):
        return dict(
            generate=gr.Button("Generate", variant="primary", elem_id="generate"),
            preview=gr.Image(label="predicted x0 while sampling", elem_id="preview", type="pil", format="png",
                             height=200, elem_classes="pixelated", interactive=False, buttons=[]),
            gallery=gr.Gallery(label="images", elem_id="gallery", columns=4, height=240, object_fit="contain",
                               elem_classes="pixelated", buttons=["download", "download_all", "fullscreen"],
                               format="png"),
            summary=gr.Markdown(label="what was made"),
            command=gr.Textbox(label="the same images from the command line", elem_id="command", buttons=["copy"],
                               lines=3, interactive=False),
            downloads=gr.File(label="downloads: the grid and each image", file_count="multiple", interactive=False,
                              height=140))


# the inputs of /generate, in the order of generate_images's parameters (the API's names)
INPUTS = ("model", "scheduler", "steps", "num_images", "seed", "class_label", "cfg_scale", "color", "color_scale",
          "guidance_method", "clip_prompt", "clip_scale", "reference", "image_scale", "guidance_every", "autoguide",
          "autoguide_scale", "guidance_interval")


def _connect(gr, app, studio: Studio, first, controls: dict, views: dict) -> None:
    """The page's events: Generate runs a job; picking a model shows its classes, a scheduler its steps."""
    from ddpmkit.schedulers import default_steps

    outputs = [views[name] for name in ("preview", "gallery", "summary", "command", "downloads")]
    # one job at a time; the progress bar and the queue place show on the gallery, so the preview stays seen
    views["generate"].click(_generate(gr, studio, views), [controls[name] for name in INPUTS], outputs,
                            api_name="generate", concurrency_limit=1, concurrency_id="sampling",
                            show_progress="full", show_progress_on=[views["gallery"]])
    controls["model"].change(_pick_model(gr, studio), controls["model"], [controls["class_label"],
                             controls["cfg_scale"]], queue=False, api_visibility="private")
    app.load(lambda: gr.update(value=first.classes[0] if first.classes else None), None, controls["class_label"],
             queue=False, api_visibility="private")  # the page shows the first class; the API's default stays empty
    controls["scheduler"].change(lambda name: gr.update(value=default_steps(name)), controls["scheduler"],
                                 controls["steps"], queue=False, api_visibility="private")
    controls["random_seed"].click(None, None, controls["seed"], js=f"() => Math.floor(Math.random() * {MAX_SEED})")


def _generate(gr, studio: Studio, views: dict):
    """The /generate handler: the controls -> a checked Request -> a job; previews while it runs, then results."""

    def generate_images(model, scheduler, steps, num_images, seed, class_label, cfg_scale, color, color_scale,
                        guidance_method, clip_prompt, clip_scale, reference, image_scale, guidance_every,
                        autoguide="", autoguide_scale=2.0, guidance_interval="", progress=gr.Progress()):
        request = Request(model=model, scheduler=scheduler, steps=steps, num_images=num_images, seed=seed,
                          class_label=class_label, cfg_scale=cfg_scale, color=color, color_scale=color_scale,
                          clip_prompt=clip_prompt or "", clip_scale=clip_scale, reference=reference,
                          image_scale=image_scale, guidance_method=guidance_method, guidance_every=guidance_every,
                          autoguide=autoguide or "", autoguide_scale=autoguide_scale,
                          guidance_interval=guidance_interval or "")
        try:
            request = studio.check(request)
        except UserError as err:
            raise gr.Error(str(err), print_exception=False) from None
        progress(0, desc="starting")
        for kind, payload in run_in_thread(studio, request, preview_every(request.steps)):
            if kind == "step":
                progress((payload["step"] + 1, payload["num_steps"]), desc="sampling", unit="steps")
                if payload["preview"] is not None:
                    yield {views["preview"]: payload["preview"]}
            elif kind == "error":
                raise _job_error(gr, payload)
            else:
                logger.info("%s", payload.summary)
                yield {views["gallery"]: [str(p) for p in payload.singles], views["summary"]: payload.summary,
                       views["command"]: payload.command, views["downloads"]: [str(p) for p in payload.downloads]}

    return generate_images


def _job_error(gr, err: BaseException):
    """The page's message for a job that failed: the UserError's line, 'stopped', or the unexpected error."""
    if isinstance(err, UserError):
        return gr.Error(str(err), print_exception=False)
    if isinstance(err, Stopped):
        return gr.Error("stopped: the server is shutting down", print_exception=False)
    logger.error("job failed", exc_info=err)
    return gr.Error(f"sampling failed: {type(err).__name__}: {err}")


def _pick_model(gr, studio: Studio):
    """Picking a model shows its classes (its first picked), or hides the class controls of an unconditional one."""

    def pick_model(value):
        info = studio.describe(value) if value in studio.models else None
        classes = list(info.classes) if info else []
        return (gr.update(choices=classes, value=classes[0] if classes else None, visible=bool(classes)),
                gr.update(visible=bool(classes)))

    return pick_model


def _default_guidance(studio: Studio) -> dict:
    """The default guidance stored with the model shown first (`models.default_guidance`: emoji32's), when its guide
    is one of the models on offer; {} otherwise. The page shows it in the controls, so its command line says it."""
    from ddpmkit.models import default_guidance

    preset = default_guidance(studio.default_model)
    offered = {m.value for m in studio.models.values()}
    return preset if preset.get("autoguide") in offered else {}
