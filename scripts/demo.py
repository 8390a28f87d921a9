"""`make demo`: Units 1 and 2 of the course on the bundled emoji32 model and the built-in emoji data, on a CPU.

Everything lands in demo-output/ (DEMO_OUT); open demo-output/index.html. DEMO_FT_STEPS and DEMO_SCRATCH_STEPS set
the two short training runs; DEMO_EVAL_IMAGES the eval count; DEMO_IMAGES the images per row and DEMO_DDPM_STEPS
the steps of the DDPM comparison (the page test's quick run makes them small).

Each picture comes from one `ddpmkit` command line, shown under it on the page as a user would type it. The demo
runs those command lines through `ddpmkit.cli.main`, the function the `ddpmkit` command calls, one after another in
this one Python process (inside OUT, as the page's commands run there): typed one at a time, each command first
spends about 10 s importing torch and diffusers on a 2-core CPU, and fourteen such starts did not fit the demo's
6 minutes. A command that fails stops the demo with its exit status.
"""
from __future__ import annotations

import contextlib
import io
import os
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import demo_page  # noqa: E402  (scripts/demo_page.py)

OUT = Path(os.environ.get("DEMO_OUT", "demo-output"))
FT_STEPS = int(os.environ.get("DEMO_FT_STEPS", "20"))
SCRATCH_STEPS = int(os.environ.get("DEMO_SCRATCH_STEPS", "16"))
EVAL_IMAGES = int(os.environ.get("DEMO_EVAL_IMAGES", "100"))
N = int(os.environ.get("DEMO_IMAGES", "6"))
DDPM_STEPS = int(os.environ.get("DEMO_DDPM_STEPS", "1000"))
U1 = "Unit 1: what a diffusion model does"
U2 = "Unit 2: fast samplers, guidance, classes, fine-tuning"
START = time.time()


def stamp(text: str) -> None:
    print(f"== [{int(time.time() - START)}s] {text}", flush=True)


def ddpmkit(command: str, tee: str | None = None) -> None:
    """Run one `ddpmkit ...` command line inside OUT, as the `ddpmkit` command would; stop the demo if it fails.
    tee: also write what it prints to this file in OUT (as `| tee FILE`)."""
    from ddpmkit.cli import main

    argv = shlex.split(command)
    assert argv[0] == "ddpmkit", command
    here = Path.cwd()
    printed = io.StringIO()
    os.chdir(OUT)
    try:
        with contextlib.redirect_stdout(printed) if tee else contextlib.nullcontext():
            code = main(argv[1:])
        if tee:  # what it printed, shown and kept (ddpmkit eval prints its figures at the end)
            sys.stdout.write(printed.getvalue())
            Path(tee).write_text(printed.getvalue())
    finally:
        os.chdir(here)
    if code:
        sys.exit(f"demo: `{command}` failed (exit status {code}); the pictures before it are in {OUT}")


def show(section: str, caption: str, files: str, command: str) -> None:
    """Run COMMAND and put FILES (space-separated, in OUT) on the page with its caption and the command."""
    stamp(caption)
    ddpmkit(command)
    demo_page.add(OUT, section, caption, command, *files.split())


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "manifest.jsonl").unlink(missing_ok=True)
    show(U1, "The forward process: the squaredcos_cap_v2 noise schedule (left) and one emoji noised at 8 timesteps "
         "(right).", "schedule.png schedule_noised.png",
         "ddpmkit -q schedule --dataset emoji --image_size 32 --out schedule.png")
    show(U1, "The bundled model emoji32 with the default sampler (auto: DPM-Solver++ SDE, Karras sigmas, 40 steps, 79 "
         f"model calls): one row per emoji category, {N} images each, seed 0. emoji32 samples by default with "
         "autoguidance (its guide emoji32-guide at scale 2: FID 25.6 against 31.8 plain at 2,000 images, "
         "docs/quality.md), which doubles the model calls; to fit its time this page samples without it "
         "(--autoguide none).", "samples_auto.png",
         f"ddpmkit -q sample --autoguide none --num_images {N} --seed 0 --out samples_auto.png")
    show(U1, f"The course's sampling loop: DDPM at {DDPM_STEPS} steps (the whole training chain), for comparison "
         "(2 smileys, seed 0), and the trajectory of those samples: x_t (noisy image) and the predicted x0 every "
         f"{DDPM_STEPS // 10} steps.", "samples_ddpm1000.png samples_ddpm1000_trajectory.png",
         f"ddpmkit -q sample --autoguide none --scheduler ddpm --steps {DDPM_STEPS} --class_label smileys-emotion "
         f"--num_images 2 --seed 0 --trajectory {DDPM_STEPS // 10} --out samples_ddpm1000.png")
    show(U2, "Fast samplers at few steps, same seed: each column a scheduler (DDIM 10, DPM++ 10, DEIS 10, DDIM 50): "
         "food & drink.", "compare_schedulers.png",
         "ddpmkit -q sample --autoguide none --class_label food-drink --compare ddim:10,dpm++:10,deis:10,ddim:50 "
         f"--num_images {min(N, 6)} --seed 0 --out compare_schedulers.png")
    show(U2, "Class-conditioned sampling with classifier-free guidance (scale 3): one row per category. Sampled with "
         "the fast sampler, DEIS at 15 steps (two model calls per step with CFG); from here on the demo uses it to "
         "fit its time.", "classes_cfg3.png",
         f"ddpmkit -q sample --scheduler deis --num_images {N} --cfg_scale 3 --seed 0 --out classes_cfg3.png")
    stamp("one category at three CFG scales")
    for w in (0, 1, 4):
        ddpmkit(f"ddpmkit -q sample --scheduler deis --class_label flags --num_images {N} --cfg_scale {w} --seed 0 "
                f"--out flags_cfg{w}.png")
    demo_page.add(OUT, U2, "One category (flags) at CFG scale 0 (unconditional), 1 (plain conditional) and 4 "
                  "(sharper), same seed, DEIS 15 steps.",
                  f"for w in 0 1 4; do ddpmkit sample --scheduler deis --class_label flags --num_images {N} "
                  "--cfg_scale $w --seed 0 --out flags_cfg$w.png; done",
                  "flags_cfg0.png", "flags_cfg1.png", "flags_cfg4.png")
    for c in ("BB2266", "44CCAA"):
        show(U2, f"Colour guidance towards #{c} (the course's colour loss on the predicted x0, scale 40 per image), "
             "DDIM 40 steps; the same seed without guidance is in the first row of the next picture.",
             f"guided_{c}.png",
             "ddpmkit -q sample --autoguide none --class_label none --scheduler ddim --steps 40 "
             f"--num_images {N} --seed 0 --guide 'color:#{c}:40' --out guided_{c}.png")
    show(U2, f"The same {N} unconditional samples without guidance (scale 0), for comparison; they are also the "
         "'before' of the fine-tune below.", "unguided.png",
         "ddpmkit -q sample --autoguide none --class_label none --scheduler ddim --steps 40 "
         f"--num_images {N} --seed 0 --out unguided.png")
    show(U2, f"Fine-tuning emoji32 on one category (flags) for {FT_STEPS} steps, the course's finetune_model.py (its "
         "loss curve).", "finetune/loss_curve.png",
         "ddpmkit -q finetune --start_model emoji32 --dataset emoji:flags --image_size 32 --batch_size 32 "
         f"--max_steps {FT_STEPS} --lr 5e-4 --cache_dir .cache --output_dir finetune --model_save_name emoji32-flags")
    show(U2, "After fine-tuning: the same unconditional samples as in the unguided picture above (seed 0, DDIM 40), "
         "now turned towards flags (stripes and blocks of flag colours).", "unguided.png finetune_after.png",
         "ddpmkit -q sample --model finetune/emoji32-flags --class_label none --scheduler ddim --steps 40 "
         f"--num_images {N} --seed 0 --out finetune_after.png")
    show(U1, f"Training from scratch, as Unit 1 does: a tiny UNet on the 4,009 emoji for only {SCRATCH_STEPS} steps "
         "(the loss curve). This is what early training looks like; emoji32 trained for far longer.",
         "scratch/loss_curve.png scratch/samples.png",
         f"ddpmkit -q train --dataset emoji --image_size 32 --preset tiny --batch_size 32 --max_steps {SCRATCH_STEPS} "
         "--lr 1e-3 --lr_scheduler cosine --lr_warmup_steps 5 --cache_dir .cache --output_dir scratch")
    stamp(f"ddpmkit eval of emoji32 ({EVAL_IMAGES} images a side)")
    command = (f"ddpmkit -q eval --autoguide none --scheduler deis --per_class --num_images {EVAL_IMAGES} "
               "--out eval.json")
    ddpmkit(command, tee="eval.txt")
    demo_page.add(OUT, "Quality", "ddpmkit eval: FID, KID, precision and recall of emoji32's samples (DEIS 15 steps; "
                  "each category in the data's proportions) against the emoji data, with the floor (two disjoint "
                  "halves of the data at the same count) beside them. The default sampler (auto, 79 calls) scores "
                  "about a fifth lower (docs/samplers.md).", command.replace(" -q ", " "), "eval.txt")
    seconds = int(time.time() - START)
    print(demo_page.render(OUT, str(seconds)))
    stamp(f"done in {seconds}s: open {OUT}/index.html")


if __name__ == "__main__":
    main()
