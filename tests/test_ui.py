"""`ddpmkit serve`: the server's own bounds and its reproduction command in-process; then a real server in a
subprocess, driven with gradio_client (the command reproduces the images bit for bit, bounds refused with their
message, two concurrent requests kept apart), with headless Chromium (colour guidance moves the images' colour;
a screenshot), and stopped with SIGINT / SIGTERM."""
from __future__ import annotations

import os
import re
from dataclasses import replace
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import make_micro_unet, save_plain_pipeline
from PIL import Image

from ddpmkit.runs import write_meta
from ddpmkit.cli import main
from ddpmkit.errors import UserError
from ddpmkit.guidance import parse_color
from ddpmkit.models import describe_model, model_path
from ddpmkit.serve import MAX_UPLOAD_MB, Request, Studio

CLASS_NAMES = ["red square", "blue circle"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "TOKENIZERS_PARALLELISM": "false", "GRADIO_ANALYTICS_ENABLED": "False", "TQDM_DISABLE": "1"}
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("DDPMKIT_ARTIFACTS", ROOT / "test-artifacts"))


def save_class_pipeline(folder: Path, names=CLASS_NAMES, size: int = 16, seed: int = 0) -> Path:
    """A micro class-conditioned pipeline (untrained) with its class names, as `ddpmkit train --class_column` saves."""
    from diffusers import DDPMPipeline, DDPMScheduler

    unet = make_micro_unet(size, num_class_embeds=len(names) + 1, seed=seed)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2")).save_pretrained(folder)
    write_meta(folder, {"class_names": list(names), "null_class": len(names)})
    return folder


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ui_models")
    save_class_pipeline(root / "cond16")
    save_plain_pipeline(root / "plain8")
    save_class_pipeline(root / "cond16-guide", seed=1)  # the same kind, other weights: a guide for autoguidance
    return root


@pytest.fixture(scope="module")
def studio(models_dir, tmp_path_factory):
    studio = Studio(str(models_dir / "cond16"), models_dir, output_dir=tmp_path_factory.mktemp("studio"))
    yield studio
    studio.close()


def write_png(path: Path, size=(24, 24), color=(200, 40, 90)) -> Path:
    Image.new("RGB", size, color).save(path)
    return path


def uint8(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def mean_color_distance(paths, hex_color: str) -> float:
    """Mean |per-image mean colour - target| in [0, 1] units."""
    target = np.array(parse_color(hex_color))
    means = [uint8(p).reshape(-1, 3).mean(0) / 255 for p in paths]
    return float(np.abs(np.array(means) - target).mean())


# ----------------------------------------------------------------------------- in-process: bounds and command
def test_every_bound_is_checked_by_the_server_with_a_message(studio, models_dir, tmp_path):
    cond = str((models_dir / "cond16").resolve())
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG" + b"\0" * (MAX_UPLOAD_MB * 2**20 + 1))
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    bomb = tmp_path / "bomb.png"
    Image.new("1", (20_000, 20_000)).save(bomb)  # 400 Mpixel in ~50 kB: refused before it is decoded
    assert bomb.stat().st_size < 2**20
    bad = {
        "steps must be a whole number from 1 to 1000 (got 0)": dict(steps=0),
        "steps must be a whole number from 1 to 1000 (got 1001)": dict(steps=1001),
        "steps must be a whole number from 1 to 1000 (got 2.5)": dict(steps=2.5),
        "images must be a whole number from 1 to 16 (got 17)": dict(num_images=17),
        "seed must be a whole number from 0 to 4294967295 (got -1)": dict(seed=-1),
        "color scale must be from 0 to 1000 (got 1001)": dict(color="#BB2266", color_scale=1001),
        "cfg scale must be from 0 to 20 (got 25)": dict(cfg_scale=25),
        "image scale must be from 0 to 1000 (got nan)": dict(image_scale=float("nan")),
        "guide every K steps must be a whole number from 1 to 1000 (got 0)": dict(guidance_every=0),
        "colour 'pink' is not a colour like #BB2266": dict(color="pink", color_scale=40),
        "unknown model '/etc'": dict(model="/etc"),
        "unknown scheduler 'magic'": dict(scheduler="magic"),
        "unknown class 'green star'": dict(class_label="green star"),
        "guidance method must be one of shortcut, full": dict(guidance_method="adam", color="#BB2266",
                                                              color_scale=40),
        f"upload one of at most {MAX_UPLOAD_MB} MB": dict(reference=str(big)),
        "the reference image cannot be read": dict(reference=str(not_image)),
        "the reference image was refused: too many pixels": dict(reference=str(bomb)),
    }
    for message, values in bad.items():
        with pytest.raises(UserError) as err:
            studio.check(Request(model=values.pop("model", cond), **values))
        assert message in str(err.value), (values, str(err.value))
        assert "\n" not in str(err.value)
    if studio.clip_reason:  # no CLIP weights in the cache here: a prompt is refused with the reason
        with pytest.raises(UserError, match="CLIP guidance is off: no CLIP weights"):
            studio.check(Request(model=cond, clip_prompt="a red rose"))
    # in bounds: values normalised as the command writes them
    ok = studio.check(Request(model=cond, steps=20.0, color="rgb(187, 34, 102)", color_scale=40, cfg_scale=3))
    assert (ok.steps, ok.color, ok.class_label, ok.cfg_scale) == (20, "#BB2266", "red square", 3.0)
    plain = studio.check(Request(model=str((models_dir / "plain8").resolve()), class_label="red square"))
    assert plain.class_label is None  # an unconditional model ignores the (hidden) class controls


def test_command_names_everything_that_changes_the_images(studio, models_dir, tmp_path):
    cond = str((models_dir / "cond16").resolve())
    request = studio.check(Request(model=cond, scheduler="ddim", steps=7, num_images=3, seed=11, cfg_scale=2.5,
                                   color="#44ccaa", color_scale=12.25, guidance_method="full", guidance_every=2,
                                   reference=str(write_png(tmp_path / "ref.jpg"))))
    command = request.command(cond, threads=2, reference_name="reference.jpg")
    assert command.startswith("OMP_NUM_THREADS=2 ddpmkit sample ")
    assert shlex.split(command)[1:] == [
        "ddpmkit", "sample", "--model", cond, "--scheduler", "ddim", "--steps", "7", "--num_images", "3",
        "--seed", "11", "--dtype", "fp32", "--class_label", "red square", "--cfg_scale", "2.5",
        "--guide", "color:#44CCAA:12.25", "--guide", "image:reference.jpg:20", "--guidance_method", "full",
        "--guidance_every", "2", "--out", "samples.png", "--save_individual"]


def test_autoguidance_and_the_interval_in_the_app_reproduce_from_the_command(studio, models_dir, tmp_path):
    """The page's autoguidance controls are `sample` arguments: a job with a guide and an interval is checked, its
    command names both, and that command makes the same images bit for bit."""
    cond, guide = (str((models_dir / name).resolve()) for name in ("cond16", "cond16-guide"))
    for message, values in {
        "unknown guide '/etc'": dict(autoguide="/etc"),
        "autoguidance and CFG both guide": dict(autoguide=guide, cfg_scale=3),
        "the guidance interval applies to CFG or autoguidance": dict(guidance_interval="0.3,5"),
        "must be LO,HI": dict(autoguide=guide, guidance_interval="5,1"),
        "autoguide scale must be from 0 to 10 (got 11)": dict(autoguide=guide, autoguide_scale=11),
    }.items():
        with pytest.raises(UserError, match=re.escape(message)):
            studio.check(Request(model=cond, **values))
    request = studio.check(Request(model=cond, scheduler="ddim", steps=6, num_images=2, seed=3, class_label="blue circle",
                                   autoguide=guide, autoguide_scale=2.5, guidance_interval="0.2,20"))
    result = studio.run(request)
    words = shlex.split(result.command)
    assert words[words.index("--autoguide") + 1:words.index("--autoguide") + 5] == [
        guide, "--autoguide_scale", "2.5", "--guidance_interval"] and "0.2,20" in words
    assert "+ " in result.summary and "of the guide" in result.summary  # the guide's calls are counted
    plain = studio.run(replace(request, autoguide="", guidance_interval=""))
    assert not all(np.array_equal(uint8(a), uint8(b)) for a, b in zip(result.singles, plain.singles))
    here = tmp_path / "cli"
    here.mkdir()
    run_command(result.command, here)
    for path in result.singles:
        np.testing.assert_array_equal(uint8(path), uint8(here / "samples" / Path(path).name))


def test_serve_without_gradio_says_what_to_install(models_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # as if not installed
    assert main(["serve", "--model", str(models_dir / "plain8")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "ddpmkit: error: ddpmkit serve needs Gradio: pip install 'ddpmkit[ui]' (or pip install gradio)"


def test_serve_without_the_bundled_model_says_what_to_give(tmp_path, monkeypatch, capsys):
    import ddpmkit.models

    monkeypatch.setattr(ddpmkit.models, "BUNDLED_DIR", tmp_path / "none")  # a copy without emoji32
    assert main(["serve"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ddpmkit: error: the bundled model emoji32 is not installed") and "--model" in err
    assert len(err.splitlines()) == 1
    assert main(["serve", "--models_dir", str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_the_studio_samples_on_the_gpu_by_default_and_reads_models_without_loading_them(models_dir, tmp_path,
                                                                                        monkeypatch):
    import torch

    import ddpmkit.devices

    monkeypatch.setattr(ddpmkit.devices, "cuda_available", lambda: True)  # as on a machine with a GPU
    monkeypatch.setattr(ddpmkit.devices, "mps_available", lambda: False)
    cond = str((models_dir / "cond16").resolve())
    studio = Studio(cond, models_dir, output_dir=tmp_path / "gpu")
    try:
        assert studio.device == torch.device("cuda")
        assert studio.loaded == []  # the picker comes from config files: nothing loaded (or moved) until a job
        assert studio.describe(cond).classes == tuple(CLASS_NAMES) and studio.describe(cond).image_size == 16
        plain = studio.describe(str((models_dir / "plain8").resolve()))
        assert (plain.classes, plain.image_size, plain.label) == ((), 8, "plain8")
        command = studio.command(studio.check(Request(model=cond)))
        assert "--device" not in command and "OMP_NUM_THREADS" not in command  # `ddpmkit sample` picks the GPU too
    finally:
        studio.close()
    pinned = Studio(cond, models_dir, output_dir=tmp_path / "cpu", device="cpu")
    try:  # on the CPU by request: the command says so, since `ddpmkit sample` would pick the GPU
        assert pinned.device == torch.device("cpu")
        command = shlex.split(pinned.command(pinned.check(Request(model=cond))))
        assert command[0].startswith("OMP_NUM_THREADS=") and command[command.index("--device") + 1] == "cpu"
    finally:
        pinned.close()
    with pytest.raises(UserError, match="--device mps"):
        Studio(cond, models_dir, output_dir=tmp_path / "mps", device="mps")


# ----------------------------------------------------------------------------- a real server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m ddpmkit serve ...` in a subprocess on a free localhost port."""

    def __init__(self, folder: Path, *args: str):
        pytest.importorskip("gradio", reason="ddpmkit serve needs the ui extra: pip install -e '.[ui]'")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.stderr_path = folder / f"serve_{self.port}.log"
        env = {**ENV, "GRADIO_TEMP_DIR": str(folder / "gradio")}
        self.process = subprocess.Popen([sys.executable, "-m", "ddpmkit", "serve", "--port", str(self.port), *args],
                                        stdout=subprocess.DEVNULL, stderr=self.stderr_path.open("w"), cwd=folder,
                                        env=env)
        deadline = time.monotonic() + 600  # imports take ~10 s on an idle machine, minutes on a busy one
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"ddpmkit serve exited with {self.process.returncode}: {self.stderr}")
            try:
                with urllib.request.urlopen(self.url, timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.stop(signal.SIGKILL)
        raise AssertionError(f"ddpmkit serve did not answer in time: {self.stderr}")

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def client(self, folder: Path):
        from gradio_client import Client

        return Client(self.url, analytics_enabled=False, verbose=False, download_files=str(folder))

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> tuple[int, float]:
        """(exit code, seconds from the signal to the exit)."""
        start = time.monotonic()
        if self.process.poll() is None:
            self.process.send_signal(sig)
        code = self.process.wait(timeout=timeout)
        return code, time.monotonic() - start


@pytest.fixture(scope="module")
def server(models_dir, tmp_path_factory):
    """One server for the module, showing first $DDPMKIT_UI_MODEL (make ui-screenshot: the bundled emoji32),
    else the small test model: emoji32's 1000-step job is too slow for the suite on a busy 2-core machine."""
    folder = tmp_path_factory.mktemp("serve")
    first = os.environ.get("DDPMKIT_UI_MODEL") or str(models_dir / "cond16")
    server = Server(folder, "--model", first, "--models_dir", str(models_dir))
    server.image_size = describe_model(model_path(first))["image_size"]
    yield server
    server.stop(signal.SIGKILL)


NO_DEFAULT = {"class_label": None, "clip_prompt": "", "reference": None}  # the API inputs without a default


def generate(client, **values):
    """One /generate call: (gallery paths, command, download paths)."""
    _, gallery, _, command, downloads = client.predict(**{**NO_DEFAULT, **values}, api_name="/generate")
    return [item["image"] for item in gallery], command, downloads


def run_command(command: str, cwd: Path) -> None:
    """Run the app's `ddpmkit sample ...` line as a shell would (VAR=value prefixes as environment)."""
    words = shlex.split(command)
    env = dict(ENV)
    while "=" in words[0]:
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    assert words[0] == "ddpmkit"
    result = subprocess.run([sys.executable, "-m", "ddpmkit", *words[1:]], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_the_command_shown_reproduces_the_images_bit_for_bit(server, models_dir, tmp_path):
    from gradio_client import handle_file

    cond = str((models_dir / "cond16").resolve())
    reference = write_png(tmp_path / "my photo.png", color=(30, 200, 160))
    client = server.client(tmp_path / "downloads")
    job = client.submit(model=cond, scheduler="ddim", steps=16, num_images=3, seed=7, class_label="blue circle",
                        cfg_scale=2, color="#BB2266", color_scale=40, clip_prompt="", reference=handle_file(reference),
                        image_scale=30, guidance_every=2, api_name="/generate")
    _, gallery, _, command, downloads = job.result(timeout=600)
    gallery = [item["image"] for item in gallery]
    previews = [out[0] for out in job.outputs()[:-1]]  # the predicted x0 while sampling: every 2nd of 16 steps
    assert 4 <= len(previews) <= 9 and all(uint8(p).shape[0] >= 200 for p in previews)  # (repeats left out)
    assert "--guide 'color:#BB2266:40' --guide image:reference.png:30" in command
    names = sorted(Path(p).name for p in downloads)
    assert names == ["reference.png", "sample_0000.png", "sample_0001.png", "sample_0002.png", "samples.png"]
    here = tmp_path / "cli"
    here.mkdir()
    shutil.copy(next(p for p in downloads if Path(p).name == "reference.png"), here / "reference.png")
    run_command(command, here)
    for path in downloads:
        name = Path(path).name
        mine = here / "samples.png" if name == "samples.png" else here / "samples" / name
        if name != "reference.png":
            np.testing.assert_array_equal(uint8(path), uint8(mine), err_msg=name)
    assert [uint8(p).shape for p in gallery] == [(16, 16, 3)] * 3
    assert all(len(np.unique(uint8(p))) > 50 for p in gallery)  # real images, not saturated: a fair comparison


@pytest.mark.slow
def test_out_of_bounds_requests_are_refused_with_the_message(server, models_dir, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    cond = str((models_dir / "cond16").resolve())
    client = server.client(tmp_path)
    refused = {  # the page's own limits answer first where it has them; the server's checks answer the rest
        "1000": dict(steps=5000),
        "16": dict(num_images=40),
        "colour 'pink' is not a colour like #BB2266": dict(color="pink", color_scale=40),
        "/etc is not in the list of choices": dict(model="/etc"),
    }
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image at all")
    refused["cannot be read"] = dict(reference=handle_file(not_image))
    for message, values in refused.items():
        with pytest.raises(AppError) as err:
            generate(client, **{"model": cond, **values})
        assert message in str(err.value), (values, str(err.value))
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG" + b"\0" * (MAX_UPLOAD_MB * 2**20 + 1))
    with pytest.raises(Exception, match="(?i)file size|too large|exceeds"):
        generate(client, model=cond, reference=handle_file(big))


@pytest.mark.slow
def test_two_concurrent_requests_are_both_served_and_kept_apart(server, studio, models_dir, tmp_path):
    cond, plain = (str((models_dir / name).resolve()) for name in ("cond16", "plain8"))
    requests = [dict(model=cond, steps=8, num_images=4, seed=1, class_label="red square", color="#BB2266",
                     color_scale=40),
                dict(model=plain, steps=8, num_images=2, seed=2)]
    jobs = [server.client(tmp_path / f"client{i}").submit(**{**NO_DEFAULT, **values},
                                                         api_name="/generate")
            for i, values in enumerate(requests)]
    results = [job.result(timeout=600) for job in jobs]
    for values, (_, gallery, _, _, _) in zip(requests, results):
        expected = studio.run(Request(**values))  # the same request alone, in this process
        got = np.stack([uint8(item["image"]) for item in gallery])
        np.testing.assert_array_equal(got, np.stack([uint8(p) for p in expected.singles]))
    assert [len(r[1]) for r in results] == [4, 2]


# records, every 100 ms, each predicted x0 the page shows while its progress bar counts the steps of a job
TRACK_PREVIEWS = """() => {
    window.seenPreviews = new Set();
    setInterval(() => {
        const img = document.querySelector('#preview img');
        if (img && /\\d+\\/1000 steps/.test(document.querySelector('#gallery').innerText)) {
            window.seenPreviews.add(img.src);
        }
    }, 100);
}"""


@pytest.mark.slow
def test_browser_colour_guidance_moves_the_images_colour(server, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip("no /usr/bin/chromium: 'make test' installs it as root (apt-get install chromium)")
    playwright = pytest.importorskip("playwright.sync_api", reason="needs the playwright package (the test extra)")
    target = "#44CCAA"
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(120_000)  # a busy 2-core machine can take many seconds per action
            outside = []
            page.on("request", lambda r: outside.append(r.url) if not r.url.startswith((server.url, "data:", "blob:"))
                    else None)
            page.goto(server.url, wait_until="networkidle", timeout=120_000)

            def choose_scheduler(name: str, steps: str) -> None:  # picking one sets its default steps
                page.get_by_label("scheduler").click()
                page.get_by_role("option", name=name, exact=True).click()
                page.wait_for_function(f"document.querySelector('#steps input[type=number]').value === '{steps}'")

            choose_scheduler("ddim", "500")  # its default; 50 steps are plenty for this check
            page.get_by_label("number input for steps").fill("50")
            page.get_by_label("number input for steps").press("Enter")
            page.get_by_label("number input for images").fill("4")
            page.get_by_label("number input for images").press("Enter")

            def generate_and_wait(expected: str) -> list[bytes]:
                page.locator("#generate").click()
                page.wait_for_function(f"document.querySelector('#command textarea').value.includes({expected!r})",
                                       timeout=300_000)
                page.wait_for_function("document.querySelectorAll('#gallery img').length >= 4", timeout=60_000)
                sources = page.locator("#gallery img").evaluate_all("els => els.map(e => e.src)")
                return [page.request.get(src).body() for src in sources[:4]]

            plain = generate_and_wait("--num_images 4 --seed 0")
            page.get_by_text(f"{target} at scale 40", exact=True).click()  # the course's colour, with its scale
            page.wait_for_function("document.querySelector('#color-scale input[type=number]').value === '40'")
            # then a scale for this model's size: 40 is for 32x32; the push per pixel goes as scale / (H W)
            scale = str(max(5, round(40 * (server.image_size / 32) ** 2)))
            page.get_by_label("number input for colour scale").fill(scale)
            page.get_by_label("number input for colour scale").press("Enter")
            guided = generate_and_wait(f"color:{target}:{scale}")
            assert page.locator("#preview img").count() == 1  # the last predicted x0 stays shown
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "ui.png"), full_page=True)

            # the README's picture: what the app does well, one class with classifier-free guidance at the defaults
            # (auto), colour guidance off; a model's class picked from the page's list
            choose_scheduler("auto", "40")
            page.get_by_label("number input for images").fill("8")
            page.get_by_label("number input for images").press("Enter")
            page.get_by_label("number input for colour scale").fill("0")
            page.get_by_label("number input for colour scale").press("Enter")
            page.get_by_label("class").click()
            wanted = os.environ.get("DDPMKIT_UI_CLASS", "Smileys & Emotion")
            options = page.get_by_role("option")
            names = options.all_inner_texts()
            options.nth(names.index(wanted) if wanted in names else 0).click()
            # a model with a stored default guidance (emoji32: autoguidance) keeps it, as a user finds the page;
            # another gets classifier-free guidance at 3
            preset = "--autoguide" in page.locator("#command textarea").input_value()
            if not preset:
                page.get_by_label("number input for CFG scale").fill("3")
                page.get_by_label("number input for CFG scale").press("Enter")
            page.locator("#generate").click()
            wanted_flag = "--autoguide" if preset else "--cfg_scale 3"
            page.wait_for_function(f"document.querySelector('#command textarea').value.includes({wanted_flag!r})"
                                   " && document.querySelector('#command textarea').value.includes('--class_label')"
                                   " && !document.querySelector('#command textarea').value.includes('--guide')",
                                   timeout=300_000)
            page.wait_for_function("document.querySelectorAll('#gallery img').length >= 8", timeout=60_000)
            page.screenshot(path=str(ARTIFACTS / "ui_cfg.png"), full_page=True)

            # a long job here, and a second page behind it: the first shows its steps and its predicted x0
            # while it runs; the second its place in the queue
            choose_scheduler("ddpm", "1000")
            other = browser.new_page(viewport={"width": 1400, "height": 1000})
            other.set_default_timeout(120_000)
            other.goto(server.url, wait_until="networkidle", timeout=120_000)
            page.evaluate(TRACK_PREVIEWS)
            page.locator("#generate").click()
            page.wait_for_function("/\\d+\\/1000 steps/.test(document.querySelector('#gallery').innerText)",
                                   timeout=120_000)
            other.locator("#generate").click()
            other.wait_for_function("document.querySelector('#gallery').innerText.includes('queue: 1/1')",
                                    timeout=60_000)
            page.wait_for_function("window.seenPreviews.size >= 3", timeout=120_000)  # new ones while it runs
        finally:
            browser.close()
    assert not outside, f"the page reached outside localhost: {outside[:5]}"
    paths = {}
    for name, images in (("plain", plain), ("guided", guided)):
        paths[name] = [tmp_path / f"{name}_{i}.png" for i in range(len(images))]
        for path, data in zip(paths[name], images):
            path.write_bytes(data)
    before, after = (mean_color_distance(paths[name], target) for name in ("plain", "guided"))
    assert after < before - 0.03, (before, after)
    if os.environ.get("DDPMKIT_UI_SCREENSHOT"):  # make ui-screenshot: docs/ui.png (guidance) and docs/ui_cfg.png
        shutil.copy(ARTIFACTS / "ui.png", os.environ["DDPMKIT_UI_SCREENSHOT"])
        shutil.copy(ARTIFACTS / "ui_cfg.png", Path(os.environ["DDPMKIT_UI_SCREENSHOT"]).with_name("ui_cfg.png"))


@pytest.mark.slow
@pytest.mark.long  # left out of make test for its time (make test-long, CI)
def test_sigint_stops_the_server_within_seconds_even_mid_job(models_dir, tmp_path):
    server = Server(tmp_path, "--model", str(models_dir / "cond16"))
    try:
        job = server.client(tmp_path).submit(**NO_DEFAULT, steps=1000, scheduler="ddpm", num_images=16,
                                             api_name="/generate")
        deadline = time.monotonic() + 120
        while job.status().progress_data is None and time.monotonic() < deadline:  # sampling has begun
            time.sleep(0.2)
        assert job.status().progress_data is not None, "the job never started"
        code, seconds = server.stop(signal.SIGINT)
    finally:
        server.stop(signal.SIGKILL)
    assert code == 0 and seconds < 10, (code, seconds, server.stderr)
    assert "Traceback" not in server.stderr


@pytest.mark.slow
def test_sigterm_stops_the_server_within_seconds(server):  # last: it stops the module's server
    code, seconds = server.stop(signal.SIGTERM)
    assert code == 0 and seconds < 10, (code, seconds, server.stderr)
    assert "Traceback" not in server.stderr.split("stopping")[-1]
