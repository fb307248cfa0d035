"""Orpheus-style windowed streaming decode: the baseline a server runs with ``decode_mode="windows"``.

Orpheus TTS (and audio.cpp) stream codec audio by decoding overlapping windows offline: every ``new`` (7) frames
they decode a window of ``left`` (7) frames before them, the ``new`` frames and ``right`` (14) frames after, and
keep only the new frames' samples. It is inexact by design: a window's edges see the decoder's zero padding,
not the neighbouring frames, so the audio differs from ``model.decode`` of the whole stream near every seam
(the benchmarks report the max abs error); each frame is decoded 28 / 7 = 4 times, and the first audio waits
for ``new + right`` frames.

``window_plan`` is the one window arithmetic: ``decode_windows`` runs it over known codes (bench_stream's
offline baseline) and ``WindowDecoder`` per slot as frames arrive; both decode the same windows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..modeling import DacModel
from ..slots import check_slot_codes
from ..streaming import StreamingDecoder, _check_batch_size, _check_streams

NEW_FRAMES, LEFT_FRAMES, RIGHT_FRAMES = 7, 7, 14  # Orpheus' 28-frame window


@dataclass(frozen=True)
class Window:
    """Frames [lo, hi) decoded; the samples of frames [first, first + new) kept, or to the end of the window's
    audio when ``last`` (the stream's final window)."""

    lo: int
    hi: int
    first: int
    last: bool

    def samples(self, audio: torch.Tensor, hop: int, new: int = NEW_FRAMES) -> torch.Tensor:
        """The samples this window emits from its decoded ``audio`` (..., samples)."""
        stop = audio.shape[-1] if self.last else (self.first + new - self.lo) * hop
        return audio[..., (self.first - self.lo) * hop : stop]


def window_plan(emitted: int, available: int, final: bool, new: int = NEW_FRAMES, left: int = LEFT_FRAMES,
                right: int = RIGHT_FRAMES) -> list[Window]:
    """The windows due once frames [0, ``available``) are known and the frames before ``emitted`` are out: while
    streaming (``final`` False) those with ``right`` frames after their new ones; at the end of the stream every
    remaining one, cut at ``available``."""
    windows = []
    first = emitted
    while first < available and (final or first + new + right <= available):
        last = final and first + new >= available
        windows.append(Window(max(0, first - left), min(available, first + new + right), first, last))
        first += new
    return windows


def decode_windows(model: DacModel, codes: torch.Tensor):
    """Yield, window by window, the samples of codes (B, n, F) decoded Orpheus-style (one ``model.decode`` per
    window); together they are as long as ``model.decode(audio_codes=codes)``'s audio."""
    for window in window_plan(0, codes.shape[-1], final=True):
        audio = model.decode(audio_codes=codes[..., window.lo : window.hi]).audio_values
        yield window.samples(audio, model.config.hop_length)


class WindowDecoder:
    """Up to ``slots`` independent code streams decoded in Orpheus-style windows, with ``SlotDecoder``'s
    interface for the serving scheduler (``check_input``, ``push_checked``, ``flush``, ``reset``).

    Each slot keeps its codes from ``left`` frames before its next window. A push decodes every window it made
    due, all slots' windows of equal length (and codebook count) in ONE ``model.decode`` call: in the steady
    state every window is 28 frames, so a tick is one call without padding. A call is atomic: the slots change
    only once every decode succeeded."""

    def __init__(self, model: DacModel, slots: int, cuda_graphs: bool = False):
        StreamingDecoder(model, 1, cuda_graphs)  # its argument checks (cuda_graphs needs a CUDA model)
        self.model, self.cuda_graphs = model, cuda_graphs
        self.slots = _check_batch_size(slots)
        self._codes: list = [None] * self.slots  # per slot (1, n, f): its frames from self._start[slot] on
        self._start = [0] * self.slots
        self._emitted = [0] * self.slots  # frames whose samples were returned

    def reset(self, streams=None) -> None:
        """Free slots: ``None`` all of them, else a bool mask (slots,) or indices."""
        mask = torch.ones(self.slots, dtype=torch.bool) if streams is None else _check_streams(streams, self.slots)
        for slot in mask.nonzero().flatten().tolist():
            self._codes[slot], self._start[slot], self._emitted[slot] = None, 0, 0

    def pushed(self, slot: int) -> int:
        """Frames pushed into ``slot`` since it was last freed."""
        return 0 if self._codes[slot] is None else self._start[slot] + self._codes[slot].shape[-1]

    def final_outputs(self, frames: int) -> int:
        """Samples a stream has returned after pushes of ``frames`` frames in all (before its flush): ``new``
        frames' samples per window due."""
        windows = max(0, (frames - NEW_FRAMES - RIGHT_FRAMES) // NEW_FRAMES + 1)
        return windows * NEW_FRAMES * self.model.config.hop_length

    def check_input(self, slot: int, codes) -> torch.Tensor:
        """As ``SlotDecoder.check_input``: codes (n, f) -> (1, n, f) on the model's device."""
        known = None if self._codes[slot] is None else self._codes[slot].shape[1]
        return check_slot_codes(self.model, slot, codes, known)

    def push_checked(self, inputs: dict) -> list:
        """Slot -> codes (1, n, f) from ``check_input``. Returns per slot the samples (k,) of the windows now due
        (k may be 0), None for slots not pushed."""
        codes = {slot: x if self._codes[slot] is None else torch.cat([self._codes[slot], x], -1)
                 for slot, x in inputs.items()}
        plans = {slot: window_plan(self._emitted[slot], self._start[slot] + x.shape[-1], final=False)
                 for slot, x in codes.items()}
        outputs = self._decode(codes, plans)
        for slot, kept in codes.items():
            self._emitted[slot] += NEW_FRAMES * len(plans[slot])
            drop = max(0, self._emitted[slot] - LEFT_FRAMES) - self._start[slot]  # no window reads them again
            self._codes[slot], self._start[slot] = kept[..., drop:], self._start[slot] + drop
        return outputs

    def flush(self, streams) -> list:
        """The remaining samples (k,) of the chosen slots (a bool mask or indices), None for the others; the
        chosen slots are freed."""
        chosen = _check_streams(streams, self.slots).nonzero().flatten().tolist()
        codes = {slot: self._codes[slot] for slot in chosen if self._codes[slot] is not None}
        plans = {slot: window_plan(self._emitted[slot], self._start[slot] + x.shape[-1], final=True)
                 for slot, x in codes.items()}
        outputs = self._decode(codes, plans)
        for slot in chosen:
            if outputs[slot] is None:
                outputs[slot] = torch.zeros(0, dtype=self.model.dtype, device=self.model.device)
        self.reset(chosen)
        return outputs

    def _decode(self, codes: dict, plans: dict) -> list:
        """Decode every slot's planned windows, one batched ``model.decode`` per (window length, codebooks);
        returns per slot its windows' samples in order (None for slots not in ``codes``)."""
        groups: dict = {}
        for slot, windows in plans.items():
            for index, window in enumerate(windows):
                key = (window.hi - window.lo, codes[slot].shape[1])
                groups.setdefault(key, []).append((slot, index, window))
        pieces = {}
        with torch.inference_mode():
            for members in groups.values():
                batch = torch.cat([codes[slot][..., w.lo - self._start[slot] : w.hi - self._start[slot]]
                                   for slot, _, w in members])
                audio = self.model.decode(audio_codes=batch, cuda_graphs=self.cuda_graphs).audio_values
                for row, (slot, index, window) in enumerate(members):
                    pieces[slot, index] = window.samples(audio[row], self.model.config.hop_length)
        outputs = [None] * self.slots
        empty = torch.zeros(0, dtype=self.model.dtype, device=self.model.device)
        for slot, windows in plans.items():
            outputs[slot] = torch.cat([empty] + [pieces[slot, index] for index in range(len(windows))])
        return outputs
