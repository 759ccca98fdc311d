"""A numpy/PIL video processor for Qwen2.5-Omni (transformers' own one needs torchvision).

Input: videos already decoded and sampled by `echoink.data.media.load_video` — one array
`[F, H, W, 3]` uint8 per video, F even, H and W multiples of 28. Output matches
`Qwen2VLVideoProcessor` exactly in layout:

    pixel_values_videos  [sum_v (F_v/tp) * (H_v/p) * (W_v/p),  3 * tp * p * p]   float32
    video_grid_thw       [V, 3]  = (F_v / tp, H_v / p, W_v / p)                   int64

with p = patch_size (14), tp = temporal_patch_size (2), and patches ordered
(t, h-block, w-block, h-in-merge, w-in-merge) so that `merge_size x merge_size` neighbours are
contiguous — the order the vision tower's patch merger expects.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from transformers.feature_extraction_utils import BatchFeature
from transformers.video_processing_utils import VideoProcessorMixin

from echoink.data.media import smart_resize

#: The transformers class whose saved settings `NumpyQwenVideoProcessor.to_dict` writes (torchvision-based).
PUBLISHED_VIDEO_PROCESSOR = "Qwen2VLVideoProcessor"
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class NumpyQwenVideoProcessor(VideoProcessorMixin):
    """Patchifies pre-sampled frames like Qwen2VLVideoProcessor, with numpy and PIL only."""

    model_input_names = ["pixel_values_videos", "video_grid_thw"]

    def __init__(
        self,
        patch_size: int = 14,
        temporal_patch_size: int = 2,
        merge_size: int = 2,
        min_pixels: int = 128 * 28 * 28,
        max_pixels: int = 768 * 28 * 28,
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
        **kwargs,
    ) -> None:
        for unused in ("size", "do_resize", "do_rescale", "do_normalize", "rescale_factor", "resample",
                       "do_convert_rgb", "do_sample_frames", "fps", "min_frames", "max_frames",
                       "video_processor_type", "processor_class", "image_processor_type", "return_metadata",
                       "input_data_format", "data_format", "default_to_square", "crop_size", "do_center_crop",
                       "device"):
            kwargs.pop(unused, None)
        super().__init__(**kwargs)
        self.patch_size = patch_size
        self.temporal_patch_size = temporal_patch_size
        self.merge_size = merge_size
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)

    def __call__(self, videos, **kwargs) -> BatchFeature:
        return self.preprocess(videos, **kwargs)

    def preprocess(self, videos, return_tensors=None, **kwargs) -> BatchFeature:
        """videos: one `[F, H, W, 3]` uint8 array (or list of PIL frames) per video."""
        if isinstance(videos, np.ndarray) and videos.ndim == 4:
            videos = [videos]
        patches, grids = [], []
        for video in videos:
            frames = self._to_frames(video)
            flat, grid = self._patchify(frames)
            patches.append(flat)
            grids.append(grid)
        return BatchFeature(
            data={"pixel_values_videos": np.concatenate(patches, axis=0),
                  "video_grid_thw": np.asarray(grids, dtype=np.int64)},
            tensor_type=return_tensors,
        )

    def _to_frames(self, video) -> np.ndarray:
        """-> `[F, H', W', 3]` float32 in [0, 1], resized to multiples of patch*merge, F a multiple of tp."""
        if isinstance(video, np.ndarray):
            arrays = list(video)
        else:
            arrays = [np.asarray(frame.convert("RGB") if isinstance(frame, Image.Image) else frame) for frame in video]
        if not arrays:
            raise ValueError("video has no frames")
        height, width = arrays[0].shape[:2]
        factor = self.patch_size * self.merge_size
        new_h, new_w = smart_resize(height, width, factor=factor, min_pixels=self.min_pixels,
                                    max_pixels=self.max_pixels)
        if (new_h, new_w) != (height, width):
            arrays = [np.asarray(Image.fromarray(a).resize((new_w, new_h), Image.BICUBIC)) for a in arrays]
        while len(arrays) % self.temporal_patch_size:
            arrays.append(arrays[-1])  # pad by repeating the last frame, as Qwen does
        return np.stack(arrays).astype(np.float32) / 255.0

    def _patchify(self, frames: np.ndarray) -> tuple[np.ndarray, list[int]]:
        mean = np.asarray(self.image_mean, dtype=np.float32)
        std = np.asarray(self.image_std, dtype=np.float32)
        x = ((frames - mean) / std).transpose(0, 3, 1, 2)  # [F, C, H, W]
        f, c, h, w = x.shape
        p, tp, m = self.patch_size, self.temporal_patch_size, self.merge_size
        gt, gh, gw = f // tp, h // p, w // p
        x = x.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
        x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # [gt, gh/m, gw/m, m, m, C, tp, p, p]
        return x.reshape(gt * gh * gw, c * tp * p * p), [gt, gh, gw]

    def to_dict(self) -> dict:
        """The settings as transformers' own `Qwen2VLVideoProcessor` saves them, naming that class: the file
        echoink writes (video_preprocessor_config.json) is the published checkpoints' kind, which
        `AutoProcessor` loads wherever torchvision is installed; echoink reads it back into this class."""
        return {
            "video_processor_type": PUBLISHED_VIDEO_PROCESSOR,
            "do_resize": True,
            "size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels},
            "min_pixels": self.min_pixels,
            "max_pixels": self.max_pixels,
            "resample": 3,  # bicubic: how echoink.data.media resizes frames
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": self.image_mean,
            "image_std": self.image_std,
            "do_convert_rgb": True,
            "do_sample_frames": False,  # echoink samples the frames when it decodes the video
            "patch_size": self.patch_size,
            "temporal_patch_size": self.temporal_patch_size,
            "merge_size": self.merge_size,
        }
