"""CUDA graphs: the training step and the sampling UNet call, captured once and replayed (CUDA only).

A small UNet on a GPU is bound by kernel launches, not by the card: a `tiny` training step issues about 1,900
operators, each a launch with Python in front of it. A CUDA graph records them once and replays them in one launch.
What a graph replays is fixed at capture: the same tensors (static shapes and addresses), the same Python numbers.
So everything that changes between steps is a tensor on the device that the graph reads: the batch (copied into
static buffers), the learning rate, the EMA decay, and the random numbers (from generators registered with the graph,
which advance on every replay as they would eagerly).

- `CapturedStep` is `Trainer.run_step` with `--compile` on CUDA: forward and backward in one graph; gradient clipping,
  AdamW (fused, capturable) and the EMA update in a second, replayed only when the step is not skipped
  (--skip_nonfinite reads the loss in between, as the eager step does). The first `WARMUP_STEPS` steps run eagerly.
- `GraphedUNet` is the UNet as sampling calls it: one graph per input shape (a micro-batch, a CFG pair), replayed.
- `cuda_graphs(device)` is the seam: torch.cuda's graphs on a CUDA device, None elsewhere (the CPU keeps its eager
  path unchanged); tests give a CPU stand-in that records and replays the ATen calls.
"""
from __future__ import annotations

import contextlib
import logging

import torch

logger = logging.getLogger(__name__)

WARMUP_STEPS = 3  # eager steps before the capture: cuDNN's and cuBLAS's lazy set-up, the optimizer's state


class CudaGraphs:
    """torch.cuda's graphs, as `Replayed` uses them (a test stand-in has the same four members)."""

    capturable = True  # AdamW(capturable=True): its step count lives on the device

    def new_graph(self):
        return torch.cuda.CUDAGraph()

    def capture(self, graph, generators=(), pool=None):
        for generator in generators:  # their offsets advance on every replay, as eagerly
            graph.register_generator_state(generator)
        return torch.cuda.graph(graph, pool=pool)

    @contextlib.contextmanager
    def side_stream(self):
        """Eager warm-up on a side stream, as PyTorch's whole-network capture recipe does it."""
        stream, current = torch.cuda.Stream(), torch.cuda.current_stream()
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            yield
        current.wait_stream(stream)


def cuda_graphs(device: torch.device | str):
    """The graph backend for `device`: CUDA graphs on a CUDA device, None elsewhere (nothing is captured)."""
    return CudaGraphs() if torch.device(device).type == "cuda" else None


class Replayed:
    """`fn()` on static tensors: run eagerly `warmup` times (on a side stream), then captured once; every later call
    replays the graph and returns the same output tensors, overwritten (copy them before the next call)."""

    def __init__(self, fn, backend, warmup: int = 1, generators=(), pool=None):
        self.fn, self.backend, self.warmup, self.generators, self.pool = fn, backend, warmup, list(generators), pool
        self.runs, self.graph, self.output = 0, None, None

    def __call__(self):
        if self.graph is None and self.runs < self.warmup:
            self.runs += 1
            with self.backend.side_stream():
                return self.fn()
        if self.graph is None:  # capturing runs nothing: the replay below is this call's work
            self.graph = self.backend.new_graph()
            with self.backend.capture(self.graph, self.generators, self.pool):
                self.output = self.fn()
        self.graph.replay()
        return self.output

    def reset(self) -> None:
        """Capture again at the next call (the tensors it reads have moved)."""
        self.graph, self.output = None, None


# ---------------------------------------------------------------------- the training step
def training_graphs(config, accelerator):
    """The graph backend for the training step, or None: the eager step (on a CPU, without --compile, or where a
    step cannot be captured, said once). With one, accelerate's autocast runs without its weight cache, which a
    graph must not keep between replays."""
    backend = cuda_graphs(accelerator.device) if config.compile else None
    if backend is None:
        return None
    why_not = ("several processes (DDP)" if accelerator.num_processes > 1 else
               "--grad_accumulation_steps > 1" if config.grad_accumulation_steps > 1 else
               "--mixed_precision fp16 (its loss scaling reads the gradients back every step; use bf16)"
               if config.mixed_precision == "fp16" else None)
    if why_not:
        logger.info("--compile: the step is not captured in a CUDA graph with %s; torch.compile compiles the UNet's "
                    "forward instead", why_not)
        return None
    from accelerate.utils import AutocastKwargs

    accelerator.autocast_handler = AutocastKwargs(cache_enabled=False)
    return backend


def optimizer_options(backend) -> dict:
    """AdamW's options for a captured step: fused (one kernel per step), capturable (its step count on the device);
    none for the eager step."""
    return {} if backend is None else {"fused": True, "capturable": backend.capturable}


class CapturedStep:
    """`Trainer.run_step` replayed from two graphs (module docstring); the same steps, losses, checkpoints and
    resume as the eager step, to float rounding (the fused AdamW kernel; on a CPU stand-in, bit for bit between a run
    and its resume)."""

    def __init__(self, trainer, backend, warmup: int = WARMUP_STEPS):
        self.trainer, self.backend = trainer, backend
        self.optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # torch's, inside accelerate's
        self.params = list(trainer.unet.parameters())
        device = trainer.accelerator.device
        self.lrs = [torch.zeros((), device=device) for _ in self.optimizer.param_groups]
        self.one_minus_decay = torch.zeros((), device=device)
        self.static: dict | None = None  # the batch the graphs read
        self.pointers: list[int] = []
        self.forward_backward = Replayed(self._forward_backward, backend, warmup, generators=[trainer.generator])
        self.update = Replayed(self._update, backend, warmup)
        dropped = trainer.batches.dropped
        logger.info("--compile: the training step is captured in CUDA graphs after %d eager steps (forward and "
                    "backward; clipping, AdamW and the EMA update); batches of %d images only: %s", warmup,
                    trainer.batches.batch_size, f"each epoch's last {dropped} image(s) are left out (a new order "
                    "every epoch)" if dropped else "no image is left out")

    def run_step(self, batch: dict) -> torch.Tensor:
        """One optimizer step: the batch copied in, forward and backward replayed, the loss recorded, and unless the
        step is skipped, the update replayed with this step's learning rate and EMA decay."""
        t = self.trainer
        if self.static is None:
            self._start(batch)
        elif self.pointers and self.pointers != [p.data_ptr() for p in self.params]:
            # the weights were given new memory (sampling switched them to channels-last and back): capture again
            self.forward_backward.reset()
            self.update.reset()
            self.pointers = []
        for key, value in batch.items():
            self.static[key].copy_(value)
        with t.accelerator.accumulate(t.unet):
            loss = self.forward_backward().clone()  # the graph's loss is overwritten by the next step
            t.losses.add(loss)
            if t.losses.skip_step():  # no update: weights, optimizer, LR and EMA as they were
                return loss
            for lr, group in zip(self.lrs, self.optimizer.param_groups):
                lr.fill_(group["lr"])
            decay = t.ema.get_decay(t.ema.optimization_step + 1) if t.ema is not None else None
            if decay is not None:
                self.one_minus_decay.fill_(1 - decay)
            self.update()
            t.lr_scheduler.step()
            if decay is not None:  # as EMAModel.step keeps them
                t.ema.optimization_step += 1
                t.ema.cur_decay_value = decay
        if not self.pointers and self.update.graph is not None:  # what the graphs read
            self.pointers = [p.data_ptr() for p in self.params]
        return loss

    def _start(self, batch: dict) -> None:
        """Static buffers shaped like the batch; the optimizer's state ready for capture (after a resume, too)."""
        self.static = {key: torch.empty_like(value) for key, value in batch.items()}
        for group in self.optimizer.param_groups:  # a checkpoint of the eager step loads its own options
            group.update(fused=True, foreach=None, capturable=self.backend.capturable)
        for p, state in self.optimizer.state.items():
            if "step" in state:
                state["step"] = state["step"].to(p.device, torch.float32)

    def _forward_backward(self) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)  # backward writes the gradients afresh (in a capture: its memory)
        return self.trainer.forward_backward(self.static).detach()

    @torch.no_grad()
    def _update(self) -> None:
        t = self.trainer
        if t.config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, t.config.max_grad_norm)
        groups = self.optimizer.param_groups
        floats = [group["lr"] for group in groups]
        for group, lr in zip(groups, self.lrs):  # the graph reads the rate from the device; the scheduler sets floats
            group["lr"] = lr
        try:
            self.optimizer.step()
        finally:
            for group, value in zip(groups, floats):
                group["lr"] = value
        if t.ema is not None:  # EMAModel.step's s -= (1 - decay) * (s - p), with the decay read from the device
            difference = torch._foreach_sub(t.ema.shadow_params, self.params)
            torch._foreach_mul_(difference, self.one_minus_decay)
            torch._foreach_sub_(t.ema.shadow_params, difference)


# ---------------------------------------------------------------------- the sampling UNet call
class GraphedUNet:
    """The UNet as sampling calls it (`model(x, t, class_labels=...).sample`), replayed from one graph per input
    shape: its first call at a shape runs eagerly (the warm-up), the second is captured. With gradients on (loss
    guidance through the UNet) it runs eagerly. Every other attribute is the UNet's."""

    def __init__(self, unet, backend):
        self.unet, self.backend = unet, backend
        self.graphs: dict = {}  # shape key -> (Replayed, static inputs)
        self.pool = None  # one memory pool for all shapes: they run one after another

    def __getattr__(self, name):
        return getattr(self.unet, name)

    def __call__(self, sample: torch.Tensor, timestep, class_labels: torch.Tensor | None = None):
        if torch.is_grad_enabled():
            return self.unet(sample, timestep, class_labels=class_labels)
        timestep = _as_tensor(timestep, sample.device)
        key = (tuple(sample.shape), sample.dtype, sample.stride(), timestep.dtype, tuple(timestep.shape),
               None if class_labels is None else tuple(class_labels.shape))
        if key not in self.graphs:
            static = {"sample": torch.empty_like(sample), "timestep": torch.empty_like(timestep),
                      "class_labels": None if class_labels is None else torch.empty_like(class_labels)}
            self.graphs[key] = (Replayed(lambda s=static: self.unet(**s).sample, self.backend, warmup=1,
                                         pool=self._pool()), static)
        replayed, static = self.graphs[key]
        static["sample"].copy_(sample)
        static["timestep"].copy_(timestep)
        if class_labels is not None:
            static["class_labels"].copy_(class_labels)
        return _Output(replayed().clone())  # the graph's output is overwritten by the next call

    def _pool(self):
        if self.pool is None and isinstance(self.backend, CudaGraphs):
            self.pool = torch.cuda.graph_pool_handle()
        return self.pool


class _Output:
    """What diffusers' UNet2DModel returns, as far as sampling reads it."""

    def __init__(self, sample: torch.Tensor):
        self.sample = sample


def _as_tensor(timestep, device: torch.device) -> torch.Tensor:
    """t as a tensor on the device (a Python number would be a constant of the graph), typed as UNet2DModel types it."""
    if torch.is_tensor(timestep):
        return timestep.to(device)
    return torch.tensor(timestep, dtype=torch.float32 if isinstance(timestep, float) else torch.long, device=device)
