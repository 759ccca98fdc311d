"""Media decoding: audio to 16 kHz mono with the 10 s cap, image resizing and modes, video sampling."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from data_fixtures import good_record, make_dataset, write_jpg, write_wav
from echoink.data import load_dataset
from echoink.data.media import (
    MAX_PIXELS,
    MIN_PIXELS,
    SAMPLE_RATE,
    MediaError,
    audio_duration,
    image_size,
    load_audio,
    load_image,
    load_record_media,
    load_video,
    load_video_audio,
    smart_resize,
)
from echoink.data.synth import encode_mp4

# ---- audio ------------------------------------------------------------------------------------------


def test_long_stereo_44k_is_capped_mono_16k(tmp_path):
    path = tmp_path / "long.wav"
    rate = 44_100
    t = np.arange(60 * rate) / rate
    left, right = 0.5 * np.sin(2 * np.pi * 440 * t), 0.5 * np.sin(2 * np.pi * 440 * t + np.pi)  # opposite phase
    stereo = np.stack([left, right], axis=1).astype(np.float32)
    stereo[:, 0] += 0.2  # a DC offset on one channel survives the downmix as 0.1
    sf.write(str(path), np.clip(stereo, -1, 1), rate, subtype="PCM_16")
    audio = load_audio(path)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert audio.shape == (10 * SAMPLE_RATE,)
    assert abs(float(audio[1000:-1000].mean()) - 0.1) < 0.01  # channels were averaged
    assert audio_duration(path) == pytest.approx(60.0)
    assert load_audio(path, max_seconds=2.5).shape == (40_000,)


@pytest.mark.parametrize(("suffix", "fmt", "subtype"), [(".flac", "FLAC", "PCM_16"), (".mp3", "MP3", "MPEG_LAYER_III"),
                                                         (".ogg", "OGG", "VORBIS"), (".wav", "WAV", "FLOAT")])
def test_audio_formats_resampled_to_16k(tmp_path, suffix, fmt, subtype):
    path = write_wav(tmp_path / f"tone{suffix}", seconds=1.0, rate=22_050, channels=2, frequency=1000.0,
                     subtype=subtype, fmt=fmt)
    audio = load_audio(path)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) - SAMPLE_RATE) < 0.1 * SAMPLE_RATE  # mp3 adds encoder padding
    spectrum = np.abs(np.fft.rfft(audio[: 8000]))
    assert np.argmax(spectrum) * SAMPLE_RATE / 8000 == pytest.approx(1000, abs=10)


def test_no_cap_keeps_everything(tmp_path):
    path = write_wav(tmp_path / "a.wav", seconds=12.0, rate=8000)
    assert load_audio(path, max_seconds=None).shape == (12 * SAMPLE_RATE,)


@pytest.mark.parametrize(("content", "match"), [(b"", "empty"), (b"RIFF....WAVEfmt garbage" * 3, "cannot decode"),
                                                (None, "no samples")])
def test_corrupt_or_empty_audio_names_the_file(tmp_path, content, match):
    path = tmp_path / "bad.wav"
    if content is None:  # a valid header with zero frames
        sf.write(str(path), np.zeros((0,), dtype=np.float32), 16_000)
    else:
        path.write_bytes(content)
    with pytest.raises(MediaError, match=match) as caught:
        load_audio(path)
    assert str(path) in str(caught.value)


def test_missing_audio_file(tmp_path):
    with pytest.raises(MediaError, match="not found"):
        load_audio(tmp_path / "nope.wav")


def test_non_finite_audio_is_rejected(tmp_path):
    path = tmp_path / "nan.wav"
    data = np.zeros(1600, dtype=np.float32)
    data[10] = np.nan
    sf.write(str(path), data, 16_000, subtype="FLOAT")
    with pytest.raises(MediaError, match="NaN"):
        load_audio(path)


# ---- images -----------------------------------------------------------------------------------------


def _check_grid(image: Image.Image, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS) -> None:
    width, height = image.size
    assert image.mode == "RGB"
    assert width % 28 == 0 and height % 28 == 0
    assert min_pixels <= width * height <= max_pixels


def test_huge_image_is_capped(tmp_path):
    path = tmp_path / "huge.jpg"
    Image.new("RGB", (8000, 8000), (10, 120, 200)).save(path, quality=70)
    image = load_image(path)
    _check_grid(image)
    assert image.size == (448, 448) and image.size[0] * image.size[1] <= 200_704
    assert np.abs(np.asarray(image, dtype=int)[200, 200] - [10, 120, 200]).max() < 8
    assert image_size(path) == (8000, 8000)


def test_aspect_ratio_is_kept(tmp_path):
    image = load_image(write_jpg(tmp_path / "wide.jpg", size=(1600, 400)))
    _check_grid(image)
    assert image.size[0] / image.size[1] == pytest.approx(4.0, rel=0.1)


def test_tiny_image_is_upscaled(tmp_path):
    image = load_image(write_jpg(tmp_path / "tiny.jpg", size=(10, 10)))
    _check_grid(image)
    assert image.size == (56, 56)


def test_custom_pixel_bounds(tmp_path):
    image = load_image(write_jpg(tmp_path / "a.jpg", size=(640, 480)), min_pixels=28 * 28, max_pixels=64 * 28 * 28)
    _check_grid(image, 28 * 28, 64 * 28 * 28)


def test_cmyk_palette_alpha_and_16_bit(tmp_path):
    Image.new("CMYK", (60, 40), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    red = np.asarray(load_image(tmp_path / "cmyk.jpg"), dtype=int)[10, 10]
    assert red[0] > 200 and red[1] < 60 and red[2] < 60

    palette = Image.new("P", (60, 40), 1)
    palette.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    palette.paste(0, (0, 0, 30, 40))
    palette.save(tmp_path / "p.png", transparency=0)  # index 0 is transparent
    pixels = np.asarray(load_image(tmp_path / "p.png"), dtype=int)
    assert tuple(pixels[5, 2]) == (255, 255, 255) and tuple(pixels[5, -3]) == (0, 200, 0)

    rgba = Image.new("RGBA", (60, 40), (0, 0, 255, 0))
    rgba.paste((0, 0, 255, 255), (30, 0, 60, 40))
    rgba.save(tmp_path / "rgba.png")
    pixels = np.asarray(load_image(tmp_path / "rgba.png"), dtype=int)
    assert tuple(pixels[5, 2]) == (255, 255, 255) and tuple(pixels[5, -3]) == (0, 0, 255)

    Image.fromarray(np.full((40, 60), 65535 // 2, np.uint16)).save(tmp_path / "deep.png")
    grey = np.asarray(load_image(tmp_path / "deep.png"), dtype=int)[5, 5]
    assert all(abs(v - 128) <= 2 for v in grey)

    Image.new("L", (60, 40), 90).save(tmp_path / "grey.png")
    assert tuple(np.asarray(load_image(tmp_path / "grey.png"))[3, 3]) == (90, 90, 90)


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.new("RGB", (280, 140), (0, 0, 0)).save(tmp_path / "rot.jpg", exif=exif)
    assert load_image(tmp_path / "rot.jpg").size == (140, 280)


@pytest.mark.parametrize(("content", "match"), [(b"", "empty"), (b"not an image at all", "cannot decode image")])
def test_corrupt_images_name_the_file(tmp_path, content, match):
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(MediaError, match=match) as caught:
        load_image(path)
    assert str(path) in str(caught.value)


def test_truncated_jpeg(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(buffer, "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[:400])
    with pytest.raises(MediaError, match="cut.jpg"):
        load_image(path)


@pytest.mark.parametrize(("height", "width"), [(1, 1), (27, 29), (480, 640), (720, 1280), (8000, 8000), (100, 5000),
                                               (5000, 30), (3000, 4000), (10, 2000), (28, 28 * 200)])
def test_smart_resize_properties(height, width):
    new_h, new_w = smart_resize(height, width)
    assert new_h % 28 == 0 and new_w % 28 == 0
    assert new_h * new_w <= MAX_PIXELS
    if max(height, width) / min(height, width) < 50:
        assert new_h * new_w >= MIN_PIXELS
    if min(height, width) >= 200:
        assert new_w / new_h == pytest.approx(width / height, rel=0.35)


def test_smart_resize_rules():
    assert smart_resize(448, 448) == (448, 448)  # already fine: unchanged
    assert smart_resize(279, 341) == (280, 336)  # rounded to the nearest multiple
    assert smart_resize(10, 10) == (56, 56)  # scaled up to min_pixels, rounded up
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 3000)
    with pytest.raises(ValueError, match="positive"):
        smart_resize(0, 10)
    with pytest.raises(ValueError, match="min_pixels"):
        smart_resize(10, 10, min_pixels=100, max_pixels=50)


# ---- video ------------------------------------------------------------------------------------------


def _frames(count: int, size: tuple[int, int] = (64, 96)) -> np.ndarray:
    frames = np.zeros((count, *size, 3), dtype=np.uint8)
    for k in range(count):
        frames[k, :, :, 0] = (k * 37) % 256
    return frames


def test_video_frames_and_track(tmp_path):
    path = tmp_path / "clip.mp4"
    track = (0.4 * np.sin(2 * np.pi * 600 * np.arange(24_000) / 24_000)).astype(np.float32)  # 1 s at 24 kHz
    path.write_bytes(encode_mp4(_frames(12, (120, 160)), fps=4, audio=track, sample_rate=24_000))  # 3 s
    video = load_video(path)
    frames = video.frames
    assert frames.dtype == np.uint8 and frames.ndim == 4 and frames.shape[-1] == 3
    assert frames.shape[0] == 6 and video.fps == pytest.approx(2.0)  # 3 s x 2 fps
    assert frames.shape[1] % 28 == 0 and frames.shape[2] % 28 == 0
    assert frames.shape[1] * frames.shape[2] <= 128 * 28 * 28
    audio = load_video_audio(path)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) - SAMPLE_RATE) < 0.1 * SAMPLE_RATE
    spectrum = np.abs(np.fft.rfft(audio[2000:10000]))
    assert np.argmax(spectrum) * SAMPLE_RATE / 8000 == pytest.approx(600, abs=10)


def test_video_frame_count_bounds(tmp_path):
    short = tmp_path / "short.mp4"
    short.write_bytes(encode_mp4(_frames(2), fps=4))  # 0.5 s: padded up to the 4-frame minimum
    assert load_video(short).frames.shape[0] == 4
    long = tmp_path / "long.mp4"
    long.write_bytes(encode_mp4(_frames(40), fps=4))  # 10 s: 20 frames at 2 fps, capped at 16
    video = load_video(long)
    assert video.frames.shape[0] == 16 and video.fps == pytest.approx(1.6)
    odd = load_video(long, fps=0.7)  # 7 frames wanted: rounded to an even count
    assert odd.frames.shape[0] % 2 == 0


def test_video_without_audio_track_and_corrupt_video(tmp_path):
    silent = tmp_path / "silent.mp4"
    silent.write_bytes(encode_mp4(_frames(4), fps=4))
    with pytest.raises(MediaError, match="no audio track"):
        load_video_audio(silent)
    for content, match in [(b"", "empty"), (b"\x00\x00\x00\x18ftypmp42 junk junk junk", "silent|cannot decode")]:
        bad = tmp_path / "bad.mp4"
        bad.write_bytes(content)
        with pytest.raises(MediaError) as caught:
            load_video(bad)
        assert "bad.mp4" in str(caught.value)


def test_record_media_errors_name_the_record(tmp_path):
    path = make_dataset(tmp_path, [good_record(0), good_record(1)])
    records = load_dataset(path)
    loaded = load_record_media(records[0])
    assert set(loaded) == {"image", "audio"}
    assert loaded["audio"].dtype == np.float32
    (tmp_path / "images/sample_1.jpg").write_bytes(b"garbage")
    with pytest.raises(MediaError) as caught:
        load_record_media(records[1])
    assert str(caught.value).startswith(f"{path}:1:path.image: ")
