"""The report ``echoink data validate`` prints: validation problems plus dataset statistics.

Statistics: records per ``data_type`` and ``problem_type`` (and per ``needs`` when present), the answer-letter distribution,
audio durations and image sizes (read from file headers). With ``check_media=True`` every media file
is also fully decoded with the training loaders (:mod:`echoink.data.media`), and any failure is a
problem ``FILE:INDEX:path.KIND: reason``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

from echoink.data.media import MAX_AUDIO_SECONDS, MAX_PIXELS, MediaError, audio_duration, image_size, load_record_media
from echoink.data.records import Record, validate_dataset

__all__ = ["DatasetReport", "SummaryStats", "build_report", "decode_all_media"]


@dataclass
class SummaryStats:
    """count / min / mean / max of a list of numbers (all zero when empty)."""

    count: int = 0
    minimum: float = 0.0
    mean: float = 0.0
    maximum: float = 0.0

    @classmethod
    def of(cls, values: list[float]) -> "SummaryStats":
        if not values:
            return cls()
        return cls(len(values), min(values), sum(values) / len(values), max(values))


@dataclass
class DatasetReport:
    """Everything ``echoink data validate`` shows. ``ok`` is True when there are no problems."""

    path: str
    records: list[Record]
    problems: list[str]
    data_types: Counter = field(default_factory=Counter)
    needs: Counter = field(default_factory=Counter)
    problem_types: Counter = field(default_factory=Counter)
    answer_letters: Counter = field(default_factory=Counter)
    audio_seconds: SummaryStats = field(default_factory=SummaryStats)
    audio_over_cap: int = 0
    image_pixels: SummaryStats = field(default_factory=SummaryStats)
    image_widths: SummaryStats = field(default_factory=SummaryStats)
    image_heights: SummaryStats = field(default_factory=SummaryStats)
    images_over_cap: int = 0
    media_checked: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems


def build_report(path: str | Path, check_media: bool = False) -> DatasetReport:
    """Validate ``path`` and compute statistics on the records that passed."""
    records, problems = validate_dataset(path)
    report = DatasetReport(path=str(path), records=records, problems=list(problems), media_checked=check_media)
    report.data_types = Counter(record.data_type for record in records)
    report.needs = Counter(record.needs for record in records if record.needs is not None)
    report.problem_types = Counter(record.problem_type for record in records)
    report.answer_letters = Counter(record.answer for record in records if record.is_multiple_choice)

    durations: list[float] = []
    sizes: list[tuple[int, int]] = []
    for record in records:
        if "audio" in record.media:
            try:
                durations.append(audio_duration(record.media["audio"]))
            except MediaError as exc:
                report.problems.append(f"{record.source}:{record.index}:path.audio: {exc}")
        if "image" in record.media:
            try:
                sizes.append(image_size(record.media["image"]))
            except MediaError as exc:
                report.problems.append(f"{record.source}:{record.index}:path.image: {exc}")
    report.audio_seconds = SummaryStats.of(durations)
    report.audio_over_cap = sum(1 for seconds in durations if seconds > MAX_AUDIO_SECONDS)
    report.image_pixels = SummaryStats.of([float(w * h) for w, h in sizes])
    report.image_widths = SummaryStats.of([float(w) for w, _ in sizes])
    report.image_heights = SummaryStats.of([float(h) for _, h in sizes])
    report.images_over_cap = sum(1 for w, h in sizes if w * h > MAX_PIXELS)
    if check_media:
        reported = {_location(problem) for problem in report.problems}
        report.problems.extend(p for p in decode_all_media(records) if _location(p) not in reported)
    return report


def decode_all_media(records: list[Record]) -> list[str]:
    """Decode every media file of every record; return one problem string per file that fails."""
    problems = []
    for record in records:
        for kind, path in record.media.items():
            try:
                load_record_media(replace(record, media={kind: path}))
            except MediaError as exc:
                problems.append(str(exc))
    return problems


def _location(problem: str) -> str:
    """``FILE:INDEX:FIELD`` of a problem string (the part before ": ")."""
    return problem.split(": ", 1)[0]
