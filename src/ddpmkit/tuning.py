"""Speed choices for sampling on this device: the UNet's dtype, memory format, micro-batch size and CUDA graphs.

`dtype="auto"` takes bf16 only where the hardware computes it natively (a CUDA GPU with bf16, or a CPU
with avx512_bf16 or AMX) and a measurement on this model says it is faster; elsewhere float32 (on an
AVX2-only CPU bf16 is emulated and far slower). Channels-last and the micro-batch size (the UNet batch
with the highest images/s) are measured too, once per device, architecture, size, dtype and thread
count, and kept in `autotune.json` under $DDPMKIT_CACHE (default ~/.cache/ddpmkit). Delete the file to
measure again; `batch_size=` and `channels_last=` override the measured choice. A measurement during which other work
took the CPU's cores (this process had under 60% of its threads' time) is used for that run only, not kept.

On a CUDA GPU, with `dtype="auto"`, the UNet calls are also replayed from CUDA graphs (`capture.GraphedUNet`) where
that measures faster than launching them; it is decided first, and the dtype, format and batch are then measured as
the calls would run. `dtype="fp32"` keeps DDPMPipeline's eager calls. The CPU never uses graphs.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import platform
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from ddpmkit import capture
from ddpmkit.errors import UserError

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)
BATCHES = (8, 16, 32, 64, 128, 256, 512)  # micro-batch sizes tried, up to the number of images (and all at once)
MAX_BATCH = {"cpu": 64, "cuda": 512}  # beyond 64 a 2-core CPU only loses cache locality
FORMAT_PROBE = {"cpu": 16, "cuda": 64}  # batch at which channels-last vs contiguous is decided
FASTER = 1.05  # a switch (bf16, channels-last, a micro-batch) is taken when at least 5% faster: less is noise
PROBE_VERSION = 3  # 2: the casts in and out timed with the forward; 3: calls slowed by other work left out (an entry
# measured before could hold a busy moment: 8: 5, 32: 370 img/s); a change measures again
ROUNDS = 3  # each setting is timed once per round, the rounds interleaved; its best round counts
BUSY_SHARE = 0.6  # a CPU call with less of its threads' time than this was slowed by other work: it does not count


@dataclass(frozen=True)
class SpeedChoice:
    """How `sample` calls the UNet: in `dtype`, channels-last or not, `batch_size` images per call, replayed from
    CUDA graphs or not."""

    dtype: torch.dtype
    channels_last: bool
    batch_size: int
    why: str
    graphs: bool = False

    def describe(self) -> str:
        name = next(k for k, v in DTYPES.items() if v == self.dtype)
        replayed = ", CUDA graphs" if self.graphs else ""
        return (f"{name}, {'channels-last' if self.channels_last else 'contiguous'}, micro-batch {self.batch_size}"
                f"{replayed} ({self.why})")


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@lru_cache(maxsize=1)
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def native_bf16(device: torch.device | str) -> bool:
    """True where bf16 matmuls run in hardware: a CUDA GPU that supports it, a CPU with avx512_bf16 or AMX."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})
    return False


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({os.cpu_count()} cores)" if device.type == "cpu" else device.type


def cache_file() -> Path:
    root = os.environ.get("DDPMKIT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ddpmkit"
    return Path(root) / "autotune.json"


def choose(unet, num_images: int, dtype: str = "auto", batch_size: int | None = None,
           channels_last: bool | None = None, graphs: bool | None = None) -> SpeedChoice:
    """The dtype, memory format, micro-batch and CUDA graphs for sampling `num_images` with `unet` on its device.

    `dtype="fp32"` keeps DDPMPipeline's arithmetic: contiguous float32, all images in one call (up to
    MAX_BATCH), eager calls, nothing measured. Micro-batches change the UNet's output by float rounding only
    (~1e-6): the scheduler always sees every image at once, so the images stay the same. `graphs`: None measures
    (CUDA, dtype auto), False or True decide (True needs a CUDA GPU); a replayed call computes what the eager one does.
    """
    if dtype not in DTYPE_CHOICES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)} (got {dtype!r})")
    if batch_size is not None and batch_size < 1:
        raise UserError(f"--batch_size must be at least 1 (got {batch_size})")
    device = unet.device
    analytic = not any(p.dim() == 4 for p in unet.parameters())  # no convolutions: nothing to measure or tune
    graphs, graphs_why = _resolve_graphs(unet, dtype, graphs, num_images)
    if analytic and dtype == "auto":  # its arithmetic as written (an exact denoiser in float64 stays float64)
        torch_dtype, why = unet.dtype, f"an analytic model: its own dtype {str(unet.dtype).removeprefix('torch.')}"
    else:
        torch_dtype, why = _resolve_dtype(unet, dtype, device, num_images, graphs)
    why += graphs_why
    if dtype in ("bf16", "fp16") and device.type == "cpu" and not native_bf16(device):
        logger.warning("--dtype %s on a CPU without native reduced precision (no avx512_bf16/AMX): it is emulated "
                       "and much slower than fp32; --dtype auto picks fp32 here", dtype)
    max_batch = min(num_images, MAX_BATCH.get(device.type, 64))
    if dtype == "fp32" and channels_last is None:  # asked for by name: DDPMPipeline's arithmetic, bit for bit
        channels_last, batch_size = False, batch_size or max_batch
    if analytic:
        return SpeedChoice(torch_dtype, False, batch_size or num_images, why, graphs)
    if batch_size is not None and channels_last is not None:
        return SpeedChoice(torch_dtype, channels_last, batch_size, why + "; batch size and format as given", graphs)
    if max_batch <= BATCHES[0] and batch_size is None:
        return SpeedChoice(torch_dtype, bool(channels_last), num_images, why + f"; {num_images} image(s): one call",
                           graphs)
    tuned = _tuned(unet, torch_dtype, max_batch, batch_size, channels_last, graphs)
    return SpeedChoice(torch_dtype, tuned[0], tuned[1], why + "; " + tuned[2], graphs)


def _resolve_graphs(unet, dtype: str, graphs: bool | None, num_images: int) -> tuple[bool, str]:
    """(replay the calls from CUDA graphs, why): measured on a CUDA GPU with dtype auto, eager elsewhere."""
    if capture.cuda_graphs(unet.device) is None:
        if graphs:
            raise UserError("CUDA graphs need a CUDA GPU: sample with graphs=None or False here")
        return False, ""
    if graphs is not None:
        return graphs, "; CUDA graphs as asked" if graphs else ""
    if dtype == "fp32" or not any(p.dim() == 4 for p in unet.parameters()):
        return False, ""  # fp32 by name: DDPMPipeline's calls; an analytic model: nothing to replay
    probe = min(num_images, FORMAT_PROBE.get(unet.device.type, 16))
    speeds = _cached_measurements(unet, "graphs", {mode: (unet.dtype, False, probe, mode == "graphs")
                                                   for mode in ("eager", "graphs")})
    ratio = speeds["graphs"] / speeds["eager"]
    return ratio >= FASTER, f"; CUDA graphs measured {ratio:.2f}x eager calls"


def _resolve_dtype(unet, dtype: str, device: torch.device, num_images: int,
                   graphs: bool = False) -> tuple[torch.dtype, str]:
    if dtype != "auto":
        return DTYPES[dtype], f"dtype {dtype} as asked"
    if unet.dtype != torch.float32:
        return unet.dtype, f"the model's own dtype {str(unet.dtype).removeprefix('torch.')}"
    if not native_bf16(device):
        where = "this GPU" if device.type == "cuda" else "this CPU (no avx512_bf16 or AMX)"
        return torch.float32, f"fp32: no native bf16 on {where}"
    probe = min(num_images, FORMAT_PROBE.get(device.type, 16))
    speeds = _cached_measurements(unet, "dtype" + _replayed(graphs), {name: (DTYPES[name], False, probe, graphs)
                                                                     for name in ("fp32", "bf16")})
    if speeds["bf16"] >= FASTER * speeds["fp32"]:
        return torch.bfloat16, f"bf16: native and measured {speeds['bf16'] / speeds['fp32']:.2f}x fp32"
    return torch.float32, f"fp32: bf16 is native but measured {speeds['bf16'] / speeds['fp32']:.2f}x fp32"


def _tuned(unet, dtype: torch.dtype, max_batch: int, batch_size: int | None,
           channels_last: bool | None, graphs: bool = False) -> tuple[bool, int, str]:
    """(channels_last, batch_size, why): the format at a probe batch, then the fastest batch in that format."""
    device = unet.device
    why = []
    if channels_last is None:
        probe = batch_size or min(max_batch, FORMAT_PROBE.get(device.type, 16))
        speeds = _cached_measurements(unet, f"format {dtype}{_replayed(graphs)}",
                                      {fmt: (dtype, fmt == "channels_last", probe, graphs)
                                       for fmt in ("contiguous", "channels_last")})
        channels_last = speeds["channels_last"] >= FASTER * speeds["contiguous"]
        why.append(f"channels-last measured {speeds['channels_last'] / speeds['contiguous']:.2f}x contiguous")
    if batch_size is None:
        candidates = sorted({b for b in BATCHES if b < max_batch} | {max_batch})  # all at once is a candidate too
        layout = "channels-last" if channels_last else "contiguous"
        speeds = _cached_measurements(unet, f"batch {dtype} {layout}{_replayed(graphs)}",
                                      {b: (dtype, channels_last, b, graphs) for b in candidates})
        best = max(candidates, key=lambda b: speeds[b])
        batch_size = best if speeds[best] >= FASTER * speeds[max_batch] else max_batch
        why.append("fastest of micro-batches " + ", ".join(f"{b}: {speeds[b]:.0f}" for b in candidates) + " img/s")
    return channels_last, batch_size, "; ".join(why)


def _replayed(graphs: bool) -> str:
    """The cache entries of replayed calls are their own (the CPU's keep their names)."""
    return " graphs" if graphs else ""


def _cache_key(unet, what: str) -> str:
    config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    text = json.dumps([what, PROBE_VERSION, device_name(unet.device), torch.__version__, torch.get_num_threads(),
                       str(unet.dtype), config], sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _cached_measurements(unet, what: str, settings: dict) -> dict:
    """images/s of each setting {name: (dtype, channels_last, batch, graphs)}, measured once and kept in the cache
    file."""
    path = cache_file()
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    key = _cache_key(unet, what)
    entry = cache.setdefault(key, {"device": device_name(unet.device), "what": what, "images_per_s": {}})
    known = entry["images_per_s"]
    missing = {name: s for name, s in settings.items() if str(name) not in known}
    if missing:
        logger.info("measuring the sampling speed of this model on %s (%s: %s), once; kept in %s",
                    entry["device"], what, ", ".join(map(str, missing)), path)
        rates, busy = _measure(unet, missing)
        if busy:  # a burst of other work makes nonsense rates (8: 5, 32: 370 img/s): good for this run, not kept
            logger.warning("the CPU was busy with other work while measuring the sampling speed (%s), so the choice "
                           "is kept for this run only and measured again next time", busy)
            return {name: rates[name] if name in rates else known[str(name)] for name in settings}
        known.update({str(name): rate for name, rate in rates.items()})
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache, indent=1) + "\n")
            tmp.replace(path)
        except OSError as err:  # a read-only home: measure again next time
            logger.warning("could not write the speed cache %s (%s)", path, err)
    return {name: known[str(name)] for name in settings}


def _measure(unet, settings: dict) -> tuple[dict, str]:
    """(images/s of each setting, why the measurement is not to be kept or ""). Each setting is timed once per round,
    the rounds interleaved, and its fastest call counts; on a CPU, a call during which this process had under
    BUSY_SHARE of its threads' time (other work took the cores: 1.0 of 2 threads' seconds a second under a training
    run, 1.7-2.1 alone) does not count unless a setting has no other."""
    models: dict = {}  # one copy of the UNet per (dtype, format), shared by the batch sizes
    runs = {name: _forward(unet, dtype, cl, batch, models, graphs=graphs)
            for name, (dtype, cl, batch, graphs) in settings.items()}
    calls: dict = {name: [] for name in runs}  # (seconds, share of its threads' time) of each timed call
    with torch.inference_mode():
        for name, run in runs.items():
            for _ in range(2 if settings[name][3] else 1):  # warm-up: kernels, allocator, caches (and the capture)
                run()
        for _ in range(ROUNDS):  # interleaved, so a busy moment of the machine hits every setting alike
            for name, run in runs.items():
                calls[name].append(_timed(run, unet.device))
    rates, disturbed = {}, []
    for name, timed in calls.items():
        clear = [seconds for seconds, share in timed if share >= BUSY_SHARE]
        if not clear:
            disturbed.append(max(share for _, share in timed))
        rates[name] = round(settings[name][2] / min(clear or [seconds for seconds, _ in timed]), 3)
    return rates, f"this process had {max(disturbed):.0%} of its threads' time" if disturbed else ""


def _cast(model, dtype: torch.dtype):
    """`model.to(dtype)` in place, without the warning diffusers prints on each cast of a model whose
    `_keep_in_fp32_modules` is a list, even the empty list UNet2DModel declares ("There are modules in UNet2DModel
    that should be kept in float32: []"); a model that names such modules goes through diffusers as before."""
    if getattr(model, "_keep_in_fp32_modules", None):
        return model.to(dtype)
    return torch.nn.Module.to(model, dtype)


def _forward(unet, dtype: torch.dtype, channels_last: bool, batch: int, models: dict, graphs: bool = False):
    """A UNet call at one setting as sampling makes it (float32 in, cast, forward, float32 out; replayed from a CUDA
    graph with `graphs`), on random inputs, as a function of nothing (on a copy of the UNet)."""
    if (dtype, channels_last) not in models:
        model = copy.deepcopy(unet)
        model = model if dtype == unet.dtype else _cast(model, dtype)
        models[dtype, channels_last] = model.to(memory_format=torch.channels_last) if channels_last else model
    model = models[dtype, channels_last]
    if graphs:  # its own graphs, kept while this measurement runs
        model = capture.GraphedUNet(model, capture.cuda_graphs(unet.device))
    size = unet.config.sample_size
    hw = (size, size) if isinstance(size, int) else tuple(size)
    x = torch.randn(batch, unet.config.in_channels, *hw, device=unet.device)  # the sampler's float32 x
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    t = torch.tensor(500, device=unet.device)
    labels = torch.zeros(batch, dtype=torch.long, device=unet.device) if unet.config.num_class_embeds else None
    # as `sampling.model_fn` calls it: the casts in and out count (on a GPU they decided bf16 against fp32 for a
    # small model, whose calls are bound by kernel launches)
    return lambda: model(x.to(dtype).contiguous(memory_format=memory_format), t, class_labels=labels).sample.to(x.dtype)


def _timed(run, device: torch.device) -> tuple[float, float]:
    """(seconds, the share of its threads' time this process had meanwhile: 1.0 on a GPU, where the CPU waits)."""
    _sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    run()
    _sync(device)
    seconds = time.perf_counter() - start
    if device.type != "cpu":
        return seconds, 1.0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = min(torch.get_num_threads(), cores)
    return seconds, (time.process_time() - cpu) / max(seconds, 1e-9) / max(threads, 1)


@contextmanager
def unet_for_sampling(unet, dtype: torch.dtype, channels_last: bool, graphs: bool = False):
    """The UNet to sample with: a copy when the dtype changes (the caller's weights stay as they are),
    else the module itself, switched to channels-last in place for the duration only; with `graphs` (CUDA), its
    calls replayed from CUDA graphs, one per input shape, released afterwards."""
    model = unet if dtype == unet.dtype else _cast(copy.deepcopy(unet), dtype)
    convs = [p for p in model.parameters() if p.dim() == 4]
    switch = channels_last and model is unet and not all(p.is_contiguous(memory_format=torch.channels_last)
                                                         for p in convs)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    backend = capture.cuda_graphs(model.device) if graphs else None
    try:
        with fixed_dtype(model):
            yield capture.GraphedUNet(model, backend) if backend is not None else model
    finally:
        if switch:
            unet.to(memory_format=torch.contiguous_format)


@contextmanager
def fixed_dtype(model):
    """`model.dtype` as a constant for the duration, then diffusers' property again.

    diffusers' `ModelMixin.dtype` walks every submodule (for casting hooks) and parameter, and
    `UNet2DModel.forward` reads it on every call: 0.5 ms (tiny) to 2 ms (course32) a call on a 2-core CPU,
    paid once per micro-batch and step.
    The weights do not change while sampling, so the instance gets a subclass whose `dtype` is the value
    read once; its class is restored afterwards, also on an exception. Models without the property, or
    already fixed (a nested call), are left alone.
    """
    cls = type(model)
    if not isinstance(getattr(cls, "dtype", None), property):
        yield model
        return
    model.__class__ = _fixed_dtype_class(cls, model.dtype)
    try:
        yield model
    finally:
        model.__class__ = cls


@lru_cache(maxsize=None)
def _fixed_dtype_class(cls: type, dtype: torch.dtype) -> type:
    return type(cls.__name__, (cls,), {"dtype": dtype, "__doc__": cls.__doc__})


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
