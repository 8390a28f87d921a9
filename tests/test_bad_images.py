"""A corpus of bad and unusual images, made here: each one is converted correctly (RGB, EXIF orientation applied,
alpha on white, first frame, 16-bit and float scaled) or skipped; one summary line names the skipped; a decompression bomb is
refused without being decoded; and training on the folder goes on."""
from __future__ import annotations

import io
import logging
import struct
import types
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from ddpmkit.data import load_image_data

RED, GREEN, BLUE, WHITE, BLACK = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)


def _png_bomb(path: Path, side: int) -> None:
    """A side x side 1-bit PNG of zeros: a few kB on disk, side**2 pixels once decoded (written by hand, in rows)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row, packer = b"\0" * (1 + (side + 7) // 8), zlib.compressobj(9)
    data = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def _halves(left, right, width: int = 8, height: int = 8, mode: str = "RGB") -> Image.Image:
    array = np.zeros((height, width, len(left)), np.uint8)
    array[:, :width // 2], array[:, width // 2:] = left, right
    return Image.fromarray(array.squeeze(-1) if len(left) == 1 else array, mode)


def _encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def make_corpus(folder: Path) -> tuple[dict[str, object], set[str]]:
    """name -> expected 8x8 RGB pixels (an array, or a check function) for the files that must be converted;
    and the names that must be skipped."""
    folder.mkdir()
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    png, jpeg = _encoded(noise, "PNG"), _encoded(noise, "JPEG", quality=90)
    (folder / "a_zero_bytes.png").write_bytes(b"")
    (folder / "b_truncated.png").write_bytes(png[:len(png) // 2])
    (folder / "c_truncated.jpg").write_bytes(jpeg[:len(jpeg) // 2])
    (folder / "d_text.png").write_text("this is not a picture\n")
    _png_bomb(folder / "e_bomb.png", 12_000)  # 144 Mpx: over Pillow's limit, where Pillow itself only warns
    _png_bomb(folder / "f_bomb_huge.png", 20_000)  # 400 Mpx: where Pillow raises DecompressionBombError
    skipped = {"a_zero_bytes.png", "b_truncated.png", "c_truncated.jpg", "d_text.png", "e_bomb.png", "f_bomb_huge.png"}

    expected: dict[str, object] = {}

    def solid(colour):
        return np.broadcast_to(np.array(colour, np.uint8), (8, 8, 3))

    def halves(left, right):
        return np.asarray(_halves(left, right))

    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(folder / "g_cmyk.jpg", quality=95)
    expected["g_cmyk.jpg"] = ("close", solid(RED), 8)
    Image.fromarray(np.full((8, 8), 30_000, np.uint16)).save(folder / "h_16bit.png")
    assert Image.open(folder / "h_16bit.png").mode == "I;16"
    expected["h_16bit.png"] = solid((117,) * 3)  # round(30000 / 257): Pillow's own convert would clip it to 255
    palette = _halves((0,), (1,), mode="L").convert("P")
    palette.putpalette([0, 0, 0, *GREEN] + [0] * 762)
    palette.save(folder / "i_palette_transparent.png", transparency=0)
    expected["i_palette_transparent.png"] = halves(WHITE, GREEN)
    Image.new("L", (8, 8), 77).save(folder / "j_gray.png")
    expected["j_gray.png"] = solid((77,) * 3)
    _halves((0, 0), (0, 255), mode="LA").save(folder / "k_gray_alpha.png")
    expected["k_gray_alpha.png"] = halves(WHITE, BLACK)
    _halves((255, 0, 0, 128), (0, 0, 255, 255), mode="RGBA").save(folder / "l_rgba.png")
    expected["l_rgba.png"] = ("close", halves((255, 127, 127), BLUE), 1)  # half-transparent red on white
    frames = [Image.new("RGB", (8, 8), RED), Image.new("RGB", (8, 8), BLUE)]
    frames[0].save(folder / "m_animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(folder / "m_animated.gif").n_frames == 2
    expected["m_animated.gif"] = solid(RED)  # the first frame
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    _halves(RED, BLUE, width=16, height=8).save(folder / "n_exif_rotated.jpg", quality=95, exif=exif)
    # stored 16 wide x 8 high, red left; shown 8 wide x 16 high with red on top: resized, rows 0-2 red, 5-7 blue
    expected["n_exif_rotated.jpg"] = lambda a: (np.abs(a[:3].astype(int) - RED).max() <= 12
                                                and np.abs(a[5:].astype(int) - BLUE).max() <= 12)
    Image.new("RGB", (1, 1), (10, 200, 30)).save(folder / "o_one_pixel.png")
    expected["o_one_pixel.png"] = solid((10, 200, 30))
    _halves(WHITE, BLACK, width=10_000, height=10).save(folder / "p_wide.png")
    expected["p_wide.png"] = lambda a: (a[:, :3] == 255).all() and (a[:, 5:] == 0).all()
    Image.new("RGB", (8, 8), (30, 160, 160)).save(folder / "q_image.webp", lossless=True)
    expected["q_image.webp"] = solid((30, 160, 160))
    (folder / "r_jpeg_named.png").write_bytes(_encoded(Image.new("RGB", (8, 8), (200, 100, 50)), "JPEG", quality=95))
    expected["r_jpeg_named.png"] = ("close", solid((200, 100, 50)), 6)
    Image.fromarray(np.full((8, 8), 0.7, np.float32), "F").save(folder / "s_float.tiff")
    expected["s_float.tiff"] = solid((178,) * 3)  # round(0.7 * 255): Pillow's own convert would give 0 (black)
    return expected, skipped


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad") / "corpus"
    expected, skipped = make_corpus(folder)
    return types.SimpleNamespace(folder=folder, expected=expected, skipped=skipped)


def test_each_image_is_converted_right_or_skipped_in_one_line(corpus, monkeypatch, caplog):
    decoded_sizes = []
    original_load = ImageFile.ImageFile.load

    def load(self):
        decoded_sizes.append(self.size)
        return original_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    with caplog.at_level(logging.WARNING, logger="ddpmkit"):
        data = load_image_data(str(corpus.folder), 8)
    monkeypatch.undo()

    assert max(w * h for w, h in decoded_sizes) <= Image.MAX_IMAGE_PIXELS, "a decompression bomb was decoded"
    expected = corpus.expected
    assert data.skipped == len(corpus.skipped) and len(data) == len(expected)
    for name, image in zip(sorted(expected), data.images):
        pixels = image.permute(1, 2, 0).numpy()
        want = expected[name]
        if callable(want):
            assert want(pixels), f"{name}:\n{pixels[..., 0]}"
        elif isinstance(want, tuple):
            _, colours, tolerance = want
            assert np.abs(pixels.astype(int) - colours.astype(int)).max() <= tolerance, f"{name}:\n{pixels[0]}"
        else:
            assert np.array_equal(pixels, want), f"{name}: got\n{pixels[0]}\nwant\n{want[0]}"

    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    line = warnings[0]
    assert f"skipped 6 of {6 + len(expected)} images" in line and "and 3 more" in line
    assert f"{corpus.folder / 'a_zero_bytes.png'} (empty file)" in line
    assert f"{corpus.folder / 'b_truncated.png'} (truncated or corrupt" in line


def test_bombs_are_refused_with_the_reason(corpus):
    from ddpmkit.data import ImageRefused, decode_image

    with pytest.raises(ImageRefused, match="12000x12000, over Pillow's limit"):
        decode_image(corpus.folder / "e_bomb.png", 8)
    with pytest.raises(ImageRefused, match="too many pixels"):
        decode_image(corpus.folder / "f_bomb_huge.png", 8)


@pytest.mark.slow
def test_training_on_the_corpus_goes_on(corpus, forked_cli, tmp_path):
    """The bug as a new user found it: one decompression bomb among good images ended training with exit 1."""
    code, stderr = forked_cli.run("-q", "train", "--dataset", corpus.folder, "--preset", "micro", "--image_size", 8,
                                  "--max_steps", 1, "--batch_size", 4, "--num_sample_images", 2,
                                  "--sample_steps", 1, "--output_dir", tmp_path / "run")
    assert code == 0, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and "skipped 6 of" in lines[0] and "Traceback" not in stderr, stderr
    assert (tmp_path / "run" / "model_index.json").exists()
