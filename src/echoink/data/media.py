"""Decoding media files into what the model's processor expects, with EchoInk-R1's caps.

* audio (wav, flac, mp3, ogg) -> mono float32 at 16 kHz (resampled with soxr), cut to
  ``max_seconds`` (10 s by default, EchoInk-R1's cap);
* images -> RGB (CMYK, palette, 16-bit and alpha handled, EXIF orientation applied), resized keeping
  the aspect ratio so that both sides are multiples of 28 and the pixel count lies within
  ``[min_pixels, max_pixels]`` (defaults 4*28*28 and 256*28*28 = 200,704);
* video (mp4, webm, mkv, avi, mov; decoded with PyAV) -> frames sampled at 2 fps, 4 to 16 of them
  (always an even count), each resized to at most 128*28*28 pixels; returned as one uint8 array
  ``[F, H, W, 3]`` with the effective sampling rate (:class:`LoadedVideo`);
* a video's own audio track -> mono float32 at 16 kHz (:func:`load_video_audio`), for
  ``use_audio_in_video``.

Every failure (unreadable, empty, zero-length, no track of the needed kind, non-finite samples) raises
:class:`MediaError` naming the file. :func:`load_record_media` adds the record (``FILE:INDEX:path.KIND``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, NamedTuple

import av
import numpy as np
import soundfile as sf
import soxr
from PIL import Image, ImageOps

__all__ = [
    "FRAME_FACTOR",
    "IMAGE_FACTOR",
    "MAX_ASPECT_RATIO",
    "MAX_AUDIO_SECONDS",
    "MAX_PIXELS",
    "MIN_PIXELS",
    "SAMPLE_RATE",
    "VIDEO_FPS",
    "VIDEO_MAX_FRAMES",
    "VIDEO_MAX_PIXELS",
    "VIDEO_MIN_FRAMES",
    "VIDEO_MIN_PIXELS",
    "LoadedVideo",
    "MediaError",
    "audio_duration",
    "image_size",
    "load_audio",
    "load_image",
    "load_record_media",
    "load_video",
    "load_video_audio",
    "smart_resize",
]

SAMPLE_RATE = 16_000  # Hz; what Qwen2.5-Omni's Whisper-style audio encoder expects
MAX_AUDIO_SECONDS = 10.0  # EchoInk-R1's audio cap
IMAGE_FACTOR = 28  # patch 14 x spatial merge 2
MIN_PIXELS = 4 * IMAGE_FACTOR * IMAGE_FACTOR  # 3,136
MAX_PIXELS = 256 * IMAGE_FACTOR * IMAGE_FACTOR  # 200,704 (EchoInk-R1's cap)
MAX_ASPECT_RATIO = 200  # longer side / shorter side; beyond that the image is rejected
VIDEO_FPS = 2.0
VIDEO_MIN_FRAMES = 4
VIDEO_MAX_FRAMES = 16
FRAME_FACTOR = 2  # temporal patch size: the frame count is always even
VIDEO_MIN_PIXELS = 4 * IMAGE_FACTOR * IMAGE_FACTOR
VIDEO_MAX_PIXELS = 128 * IMAGE_FACTOR * IMAGE_FACTOR  # 100,352 per frame

_HIGH_BIT_DEPTH_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


class MediaError(ValueError):
    """A media file could not be decoded or is empty; the message names the file."""


class LoadedVideo(NamedTuple):
    """Sampled video frames: ``frames`` is uint8 ``[F, H, W, 3]`` (F even, H and W multiples of 28);
    ``fps`` is the effective sampling rate (frames kept per second of video)."""

    frames: np.ndarray
    fps: float


# ---- geometry ---------------------------------------------------------------------------------------


def smart_resize(
    height: int,
    width: int,
    factor: int = IMAGE_FACTOR,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
) -> tuple[int, int]:
    """Target ``(height, width)`` for an image: multiples of ``factor``, aspect ratio kept as far as
    rounding allows, pixel count within ``[min_pixels, max_pixels]``.

    The Qwen2-VL rule: round each side to the nearest multiple of ``factor`` (at least ``factor``);
    if that is above ``max_pixels`` scale both sides down by the same ratio and round down; if below
    ``min_pixels`` scale up and round up. One addition: for very elongated images where the rounded
    short side alone would break ``max_pixels``, the long side is trimmed further so the cap holds.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if min_pixels > max_pixels:
        raise ValueError(f"min_pixels ({min_pixels}) is larger than max_pixels ({max_pixels})")
    if max_pixels < factor * factor:
        raise ValueError(f"max_pixels ({max_pixels}) is below one {factor}x{factor} patch")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ValueError(f"aspect ratio {ratio:.0f}:1 exceeds {MAX_ASPECT_RATIO}:1 ({height}x{width})")

    def nearest(value: float) -> int:
        return max(factor, round(value / factor) * factor)

    def down(value: float) -> int:
        return max(factor, math.floor(value / factor) * factor)

    def up(value: float) -> int:
        return max(factor, math.ceil(value / factor) * factor)

    new_h, new_w = nearest(height), nearest(width)
    if new_h * new_w > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        new_h, new_w = down(height / scale), down(width / scale)
    elif new_h * new_w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        new_h, new_w = up(height * scale), up(width * scale)
    if new_h * new_w > max_pixels:  # only for extreme aspect ratios: trim the long side
        if new_h >= new_w:
            new_h = down(max_pixels / new_w)
        else:
            new_w = down(max_pixels / new_h)
    return new_h, new_w


# ---- audio ------------------------------------------------------------------------------------------


def load_audio(path: str | Path, max_seconds: float | None = MAX_AUDIO_SECONDS) -> np.ndarray:
    """Decode an audio file to mono float32 at 16 kHz, keeping at most ``max_seconds`` (None: all).

    WAV, FLAC, MP3 and OGG are read with soundfile (libsndfile); anything it cannot read is tried with
    PyAV. Channels are averaged; resampling uses soxr (high quality).
    """
    path = Path(path)
    _check_nonempty_file(path, "audio")
    try:
        samples, rate = _decode_with_soundfile(path, max_seconds)
    except (sf.LibsndfileError, RuntimeError, TypeError) as sf_error:
        try:
            samples, rate = _decode_audio_track(path, max_seconds)
        except MediaError as av_error:
            raise MediaError(f"{path}: cannot decode audio ({sf_error}; {av_error})") from None
    return _to_model_audio(samples, rate, path, max_seconds)


def load_video_audio(path: str | Path, max_seconds: float | None = MAX_AUDIO_SECONDS) -> np.ndarray:
    """Decode a video's own audio track to mono float32 at 16 kHz (at most ``max_seconds``)."""
    path = Path(path)
    _check_nonempty_file(path, "video")
    samples, rate = _decode_audio_track(path, max_seconds)
    return _to_model_audio(samples, rate, path, max_seconds)


def audio_duration(path: str | Path) -> float:
    """Duration in seconds from the file header (no full decode when libsndfile can read it)."""
    path = Path(path)
    try:
        info = sf.info(str(path))
        if info.samplerate > 0 and info.frames > 0:
            return info.frames / info.samplerate
    except (sf.LibsndfileError, RuntimeError, TypeError):
        pass
    samples, rate = _decode_audio_track(path, None)
    return len(samples) / rate


def _decode_with_soundfile(path: Path, max_seconds: float | None) -> tuple[np.ndarray, int]:
    with sf.SoundFile(str(path)) as handle:
        rate = handle.samplerate
        frames = -1 if max_seconds is None else math.ceil(max_seconds * rate)
        data = handle.read(frames=frames, dtype="float32", always_2d=True)
    return data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0], rate


def _decode_audio_track(path: Path, max_seconds: float | None) -> tuple[np.ndarray, int]:
    """Decode the first audio stream of any container PyAV reads; returns mono float32 and its rate."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise MediaError(f"{path}: has no audio track")
            stream = container.streams.audio[0]
            to_float = av.AudioResampler(format="fltp")
            chunks: list[np.ndarray] = []
            total = 0
            rate = 0
            for frame in container.decode(stream):
                for converted in to_float.resample(frame):
                    rate = converted.sample_rate
                    planes = converted.to_ndarray()  # [channels, samples]
                    chunks.append(planes.mean(axis=0, dtype=np.float32))
                    total += planes.shape[1]
                if max_seconds is not None and rate and total >= max_seconds * rate:
                    break
    except MediaError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise MediaError(f"{path}: cannot decode audio track: {exc}") from None
    if not chunks or total == 0 or rate <= 0:
        raise MediaError(f"{path}: audio track has no samples")
    return np.concatenate(chunks), rate


def _to_model_audio(samples: np.ndarray, rate: int, path: Path, max_seconds: float | None) -> np.ndarray:
    if samples.size == 0:
        raise MediaError(f"{path}: audio has no samples (zero length)")
    if not np.isfinite(samples).all():
        raise MediaError(f"{path}: audio contains NaN or infinite samples")
    if rate != SAMPLE_RATE:
        samples = soxr.resample(samples.astype(np.float32, copy=False), rate, SAMPLE_RATE, quality="HQ")
    if max_seconds is not None:
        samples = samples[: int(round(max_seconds * SAMPLE_RATE))]
    if samples.size == 0:
        raise MediaError(f"{path}: audio is too short to resample (0 samples at {SAMPLE_RATE} Hz)")
    return np.ascontiguousarray(samples, dtype=np.float32)


# ---- images -----------------------------------------------------------------------------------------


def load_image(path: str | Path, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode an image to RGB, resized (aspect kept) to sides that are multiples of 28 with
    ``min_pixels <= height * width <= max_pixels``.

    Transparent pixels are composited onto white; CMYK, palette, grey and 16-bit images are converted;
    the EXIF orientation is applied; animated images give their first frame. Large JPEGs are decoded
    at a reduced scale first (libjpeg's DCT scaling), so an 8000x8000 photo is cheap to load.
    """
    path = Path(path)
    _check_nonempty_file(path, "image")
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width <= 0 or height <= 0:
                raise MediaError(f"{path}: image has zero size")
            transposed = image.getexif().get(0x0112, 1) in (5, 6, 7, 8)
            shown_h, shown_w = (width, height) if transposed else (height, width)
            target_h, target_w = smart_resize(shown_h, shown_w, IMAGE_FACTOR, min_pixels, max_pixels)
            if image.format == "JPEG":
                image.draft("RGB", (target_h, target_w) if transposed else (target_w, target_h))
            image.seek(0)
            upright = ImageOps.exif_transpose(image)
            if upright.mode in _HIGH_BIT_DEPTH_MODES and upright.size != (target_w, target_h):
                upright = _resize_high_bit_depth(upright, (target_w, target_h))  # convert the small copy only
            rgb = _to_rgb(upright)
    except MediaError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        raise MediaError(f"{path}: cannot decode image: {exc}") from None
    if rgb.size != (target_w, target_h):
        rgb = rgb.resize((target_w, target_h), Image.Resampling.BICUBIC)
    return rgb


def image_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` from the image header, without decoding the pixels."""
    try:
        with Image.open(path) as image:
            return image.size
    except Image.DecompressionBombError as exc:
        raise MediaError(f"{path}: image too large to decode safely: {exc}") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise MediaError(f"{path}: cannot read image header: {exc}") from None


def _resize_high_bit_depth(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize a 16/32-bit image in its own mode (no full-resolution float copy); modes Pillow cannot
    resample directly go through 32-bit integers ("I")."""
    try:
        return image.resize(size, Image.Resampling.BICUBIC)
    except ValueError:
        return image.convert("I").resize(size, Image.Resampling.BICUBIC)


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _HIGH_BIT_DEPTH_MODES:
        values = np.asarray(image, dtype=np.float32)
        peak = 65535.0 if values.max(initial=0) > 255 else 255.0
        grey = np.clip(values / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "La", "RGBa", "PA") or (mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


# ---- video ------------------------------------------------------------------------------------------


def load_video(
    path: str | Path,
    fps: float = VIDEO_FPS,
    min_frames: int = VIDEO_MIN_FRAMES,
    max_frames: int = VIDEO_MAX_FRAMES,
    max_pixels_per_frame: int = VIDEO_MAX_PIXELS,
    min_pixels_per_frame: int = VIDEO_MIN_PIXELS,
) -> LoadedVideo:
    """Sample frames uniformly at about ``fps`` frames per second.

    The count is ``round(duration * fps)`` clamped to ``[min_frames, max_frames]`` and rounded to an
    even number; frames are picked at evenly spaced indices (a very short video repeats frames).
    Every frame is resized with :func:`smart_resize` to at most ``max_pixels_per_frame`` pixels.
    """
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if not FRAME_FACTOR <= min_frames <= max_frames:
        raise ValueError(f"need {FRAME_FACTOR} <= min_frames <= max_frames, got {min_frames}, {max_frames}")
    path = Path(path)
    _check_nonempty_file(path, "video")
    try:
        total, native_fps = _count_video_frames(path)
        duration = total / native_fps
        wanted = round(duration * fps)
        low = math.ceil(min_frames / FRAME_FACTOR) * FRAME_FACTOR
        high = math.floor(max_frames / FRAME_FACTOR) * FRAME_FACTOR
        count = min(max(round(wanted / FRAME_FACTOR) * FRAME_FACTOR, low), high)
        indices = np.linspace(0, total - 1, count).round().astype(int)
        frames = _decode_frames(path, indices, min_pixels_per_frame, max_pixels_per_frame)
    except MediaError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise MediaError(f"{path}: cannot decode video: {exc}") from None
    return LoadedVideo(frames=frames, fps=count / duration)


def _count_video_frames(path: Path) -> tuple[int, float]:
    """Number of video frames (counted from the packets, no decoding) and the native frame rate."""
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise MediaError(f"{path}: has no video track")
        stream = container.streams.video[0]
        total = sum(1 for packet in container.demux(stream) if packet.size > 0)
        rate = stream.average_rate or stream.guessed_rate
        container_seconds = container.duration / 1_000_000 if container.duration else 0.0
    if total == 0:
        raise MediaError(f"{path}: video has no frames")
    native_fps = float(rate) if rate else (total / container_seconds if container_seconds > 0 else 0.0)
    if native_fps <= 0:
        raise MediaError(f"{path}: cannot determine the video frame rate")
    return total, native_fps


def _decode_frames(path: Path, indices: np.ndarray, min_pixels: int, max_pixels: int) -> np.ndarray:
    last_needed = int(indices.max())
    picked: dict[int, np.ndarray] = {}
    wanted = set(int(i) for i in indices)
    size: tuple[int, int] | None = None
    last: np.ndarray | None = None
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        for position, frame in enumerate(container.decode(stream)):
            if position in wanted or size is None:
                image = frame.to_image()
                if size is None:
                    height, width = smart_resize(image.height, image.width, IMAGE_FACTOR, min_pixels, max_pixels)
                    size = (width, height)
                if image.size != size:
                    image = image.resize(size, Image.Resampling.BICUBIC)
                last = np.asarray(image.convert("RGB"), dtype=np.uint8)
                if position in wanted:
                    picked[position] = last
            if position >= last_needed:
                break
    if last is None:
        raise MediaError(f"{path}: video has no decodable frames")
    # a container may hold fewer decodable frames than packets: reuse the nearest earlier frame
    frames = []
    for index in indices:
        index = int(index)
        while index not in picked and index > 0:
            index -= 1
        frames.append(picked.get(index, last))
    return np.stack(frames)


# ---- records ----------------------------------------------------------------------------------------


def load_record_media(
    record: Any,
    *,
    max_audio_seconds: float | None = MAX_AUDIO_SECONDS,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
    video_fps: float = VIDEO_FPS,
    video_min_frames: int = VIDEO_MIN_FRAMES,
    video_max_frames: int = VIDEO_MAX_FRAMES,
    video_max_pixels: int = VIDEO_MAX_PIXELS,
) -> dict[str, Any]:
    """Decode all media of a :class:`~echoink.data.records.Record`.

    Returns a dict with the keys present among ``"image"`` (PIL image), ``"audio"`` (float32 array),
    ``"video"`` (:class:`LoadedVideo`) and, for ``video_audio`` records, ``"video_audio"`` (the video's
    track). A failure raises :class:`MediaError` prefixed with ``FILE:INDEX:path.KIND:``.
    """
    loaded: dict[str, Any] = {}
    for kind, path in record.media.items():
        try:
            if kind == "image":
                loaded["image"] = load_image(path, min_pixels, max_pixels)
            elif kind == "audio":
                loaded["audio"] = load_audio(path, max_audio_seconds)
            elif kind == "video":
                loaded["video"] = load_video(path, video_fps, video_min_frames, video_max_frames, video_max_pixels)
                if record.data_type == "video_audio":
                    loaded["video_audio"] = load_video_audio(path, max_audio_seconds)
        except MediaError as exc:
            raise MediaError(f"{record.source}:{record.index}:path.{kind}: {exc}") from None
    return loaded


def _check_nonempty_file(path: Path, kind: str) -> None:
    if not path.exists():
        raise MediaError(f"{path}: {kind} file not found")
    if not path.is_file():
        raise MediaError(f"{path}: not a regular file")
    if path.stat().st_size == 0:
        raise MediaError(f"{path}: {kind} file is empty (0 bytes)")
