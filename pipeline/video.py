"""Video frames for `predict --video`: PyAV (FFmpeg) opens and decodes, frames come out upright as players show them.

    probe_video(path) -> VideoInfo      checks the file before any model loads (a first frame must decode)
    video_frames(path, step)            (frame index, time in s or None, upright RGB image) of every step-th frame

Only the frames asked for are converted to images, so a long video needs the memory of one frame. Every failure is
a one-line DataError naming the file (missing, a folder, not a video, no video stream, truncated part way).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from sam3.errors import DataError

# Only to tell a user who passes a video to --image, or a folder of videos, to use --video.
VIDEO_SUFFIXES = (".mp4", ".mov", ".m4v", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp")


@dataclass(frozen=True)
class VideoInfo:
    """What is known of a video before decoding it: its file, frame rate (None if unknown) and frame count (None if
    the container does not say)."""

    path: Path
    fps: float | None
    frames: int | None


def _open_video(path: Path):  # -> av.container.InputContainer
    """The opened container; DataError for a missing file, a folder, a file FFmpeg cannot read, no video stream."""
    import av

    if not path.exists():
        raise DataError(f"{path}: video file not found")
    if path.is_dir():
        raise DataError(f"{path}: is a folder; --video takes video files")
    try:
        container = av.open(str(path))
    except av.FFmpegError as err:
        raise DataError(f"{path}: cannot read as a video ({err.strerror or err})") from None
    if not container.streams.video:
        kinds = sorted({stream.type for stream in container.streams})
        container.close()
        if kinds:
            raise DataError(f"{path}: holds no video stream (only {', '.join(kinds)}); --video takes video files")
        raise DataError(f"{path}: FFmpeg finds no streams in it; is the file complete (a truncated MP4 has none)?")
    return container


def probe_video(path: Path) -> VideoInfo:
    """Check that `path` is a video whose first frame decodes (DataError otherwise); its frame rate and count."""
    import av

    with _open_video(path) as container:
        stream = container.streams.video[0]
        try:
            first = next(container.decode(stream), None)
        except av.FFmpegError as err:
            raise DataError(f"{path}: cannot decode its video stream ({err.strerror or err})") from None
        if first is None:
            raise DataError(f"{path}: its video stream holds no frames")
        fps = float(stream.average_rate) if stream.average_rate else None
        return VideoInfo(path, fps=fps, frames=stream.frames or None)


def upright_frame(image: Image.Image, rotation: int) -> Image.Image:
    """A decoded frame as players show it: turned `rotation` degrees counterclockwise (the stream's display matrix,
    as PyAV's `VideoFrame.rotation` gives it, e.g. -90 for a phone held upright: turned 90 degrees clockwise)."""
    turns = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180, -180: Image.Transpose.ROTATE_180}
    turns[-90] = turns[270] = Image.Transpose.ROTATE_270
    if rotation == 0:
        return image
    if rotation in turns:
        return image.transpose(turns[rotation])  # exact, no resampling
    return image.rotate(rotation, resample=Image.Resampling.BILINEAR, expand=True)


def video_frames(path: Path, step: int) -> Iterator[tuple[int, float | None, Image.Image]]:
    """(frame index, time in seconds or None, upright RGB image) of frames 0, step, 2 * step, ... in decoding order.

    Every frame is decoded (inter frames need their predecessors) but only these are converted and yielded.
    DataError when decoding fails part way (a truncated or damaged file).
    """
    import av

    with _open_video(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame-parallel decoding: the frames come out in the same order
        index = -1
        try:
            for index, frame in enumerate(container.decode(stream)):
                if index % step == 0:
                    yield index, frame.time, upright_frame(frame.to_image(), frame.rotation)
        except av.FFmpegError as err:
            message = err.strerror or err
            raise DataError(f"{path}: decoding failed after frame {index} ({message}); is the file complete?") from None
