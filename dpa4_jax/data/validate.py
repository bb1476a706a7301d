"""The bad-frame policy: which frames a reader passes on, and what happens to the others.

A frame is bad when it cannot be built (NaN or infinite positions or labels, labels
of the wrong shape, no atoms: :class:`~dpa4_jax.data.frame.Frame` refuses it), when
two of its atoms are closer than ``min_pair_dist`` (such a pair is a broken
structure, and the model's edge directions are undefined at zero distance), or when
its file is truncated or corrupted from that point on. ``on_bad_frame="error"``
raises naming the file and frame; ``"skip"`` drops it and logs one warning with the
count and the first few. Every reader applies :func:`screen_frames`, so training,
evaluation and the on-disk store all get the same policy.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence

from dpa4_jax.graph import close_pairs, describe_close_pairs

from .frame import Frame, FrameError, UnreadableError
from .statistics import numbers_to_types

__all__ = ["BAD_FRAME_POLICIES", "check_frame", "screen_frames", "check_elements"]

log = logging.getLogger(__name__)

BAD_FRAME_POLICIES = ("error", "skip")
_SHOWN = 3  # bad frames named in the warning


def check_frame(frame: Frame, min_pair_dist: float) -> FrameError | None:
    """The problem of a frame that :class:`Frame` accepted (atoms closer than ``min_pair_dist`` Å), or None."""
    pairs, distances = close_pairs(frame.positions, frame.cell, frame.pbc, min_pair_dist, name=frame.source)
    if len(pairs):
        return FrameError(f"{frame.source or '<frame>'}: {describe_close_pairs(pairs, distances, min_pair_dist)}")
    return None


def screen_frames(items: Iterable[Frame | FrameError], where: str, min_pair_dist: float = 0.1,
                  on_bad_frame: str = "error") -> Iterator[Frame]:
    """The good frames of a reader's ``items`` (frames, or the errors of frames that could not be built).

    ``where`` names the source (a path) in the skip warning. The arguments are checked at once; the frames
    are screened lazily. With ``"skip"`` the warning is logged when the iterator ends or is closed.
    """
    if on_bad_frame not in BAD_FRAME_POLICIES:
        raise ValueError(f"on_bad_frame: one of {BAD_FRAME_POLICIES}, got {on_bad_frame!r}")
    if not min_pair_dist > 0:
        raise ValueError(f"min_pair_dist: must be positive (Å), got {min_pair_dist}")
    return _screen(items, where, min_pair_dist, on_bad_frame == "skip")


def _screen(items, where, min_pair_dist, skip):
    skipped: list[FrameError] = []
    try:
        for item in items:
            error = item if isinstance(item, FrameError) else check_frame(item, min_pair_dist)
            if error is None:
                yield item
            elif not skip:
                raise error
            else:
                skipped.append(error)
    finally:
        if skipped:
            _warn_skipped(where, skipped)


def _warn_skipped(where: str, skipped: list[FrameError]):
    unreadable = sum(isinstance(e, UnreadableError) for e in skipped)
    counts = f"{len(skipped) - unreadable} bad frame(s)" + (
        f" and {unreadable} unreadable rest(s) of a file" if unreadable else "")
    shown = "; ".join(str(e) for e in skipped[:_SHOWN]) + ("; ..." if len(skipped) > _SHOWN else "")
    log.warning("%s: skipped %s (data.on_bad_frame: skip): %s", where, counts, shown)


def check_elements(frames: Iterable[Frame], type_map: Sequence[str]) -> None:
    """Raise :class:`FrameError` naming the first frame holding an element that ``type_map`` lacks.

    Cheap (a table look-up per frame): run it on the whole data set before anything is compiled.
    """
    for frame in frames:
        numbers_to_types(frame.numbers, type_map, frame.source)
