"""Slot-batched exact streaming: a fixed number of independent streams, any subset of which advances per call.

``StreamingDecoder`` / ``StreamingEncoder`` move all their streams in lockstep (one shared frame grid). A
server's clients do not: their frames arrive at their own times, they join and leave. Here each slot keeps its
own per-layer state (the same state ``streaming.LayerStreams`` keeps, for one stream), and ``push(...,
active=mask)`` runs the active slots together: slots outside the mask do not move (state, counts and pending
output unchanged), as Moshi's ``exec_mask`` does.

How one call batches: the active slots are grouped by the shape of their state and input (every kept context's
length, the samples still to crop, the pushed frame or sample count, the codebook count). Each group is ONE
batched call of the model's inference forward with the group's kept contexts concatenated along the batch; the
new contexts are split back. Slots in the same phase (the usual case: equal push sizes past the first pushes)
form one group, so a tick reads the weights once for all of them; slots with other counts run as their own
groups in the same call rather than wait (no padding: a padded frame would change the audio). Nothing is
masked inside a group, so each slot computes exactly what it would alone: the decoder's audio equals
``model.decode`` of its codes to fp32 rounding, the encoder's codes equal ``model.encode`` of its audio.

A call is atomic: every input is validated first, every group runs on copies, and the slots' states change only
once all groups succeeded (an exception leaves every slot as it was).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .checks import check_codes, check_stream_samples
from .modeling import DacModel
from .streaming import (
    LayerStreams,
    StreamingDecoder,
    StreamingEncoder,
    _check_batch_size,
    _check_streams,
    encode_step,
)
from .tiles import encoded_frames


@dataclass
class _SlotState:
    """One slot's stream: the per-layer kept inputs and crops of ``LayerStreams``, and its counts."""

    context: dict = field(default_factory=dict)
    to_crop: dict = field(default_factory=dict)
    pushed: int = 0  # frames (decoder) or samples (encoder) pushed
    emitted: int = 0  # samples (decoder) or frames (encoder) returned
    n_codebooks: int | None = None

    def signature(self) -> tuple:
        """Slots with equal signatures (and equal inputs' shapes) run as one batch."""
        shapes = tuple(sorted((name, tuple(t.shape[1:])) for name, t in self.context.items()))
        return shapes, tuple(sorted(self.to_crop.items()))


class _Slots:
    """The slot bookkeeping shared by ``SlotDecoder`` and ``SlotEncoder``."""

    def __init__(self, model: DacModel, slots: int, root, rates: dict, packed: bool):
        self.model = model
        self.config = model.config
        self.slots = _check_batch_size(slots)
        self._root, self._rates, self._packed = root, rates, packed
        self._states = [_SlotState() for _ in range(self.slots)]

    def reset(self, streams=None) -> None:
        """Free slots: ``None`` all of them, else a bool mask (slots,) or indices. A freed slot starts a new
        stream with its next push."""
        mask = torch.ones(self.slots, dtype=torch.bool) if streams is None else _check_streams(streams, self.slots)
        self._free(mask.nonzero().flatten().tolist())

    def _free(self, slots: list) -> None:
        for slot in slots:
            self._states[slot] = _SlotState()

    def pushed(self, slot: int) -> int:
        """Frames (decoder) or samples (encoder) pushed into ``slot`` since it was last freed."""
        return self._states[slot].pushed

    def _active(self, active, inputs) -> list[int]:
        if active is None:
            return [i for i, x in enumerate(inputs) if x is not None]
        chosen = _check_streams(active, self.slots).nonzero().flatten().tolist()
        missing = [i for i in chosen if inputs[i] is None]
        if missing:
            raise ValueError(f"active slots {missing} have no input in this push")
        return chosen

    def _rows(self, inputs, name: str, rank: int) -> list:
        """A batched tensor (slots, ...) or a sequence of per-slot tensors (None: no input) -> a list of
        per-slot tensors of ``rank`` dimensions, or None."""
        if isinstance(inputs, torch.Tensor):
            if inputs.dim() != rank + 1 or inputs.shape[0] != self.slots:
                raise ValueError(f"{name} as a tensor must have shape (slots={self.slots}, ...) with {rank + 1} "
                                 f"dimensions, got {tuple(inputs.shape)}")
            return list(inputs.unbind(0))
        if not isinstance(inputs, (list, tuple)) or len(inputs) != self.slots:
            raise ValueError(f"{name} must be a tensor (slots, ...) or a sequence of {self.slots} per-slot tensors "
                             f"or None, got {type(inputs).__name__}")
        return list(inputs)

    def _run(self, work: dict, step, final: bool = False) -> dict:
        """``work``: slot -> (state, input (1, C, T)). Runs every group of equal signatures as one batch through
        ``step(inputs (G, C, T), layers) -> outputs (G, ...)``; returns slot -> (new state, output (...)) without
        touching ``self._states``."""
        groups: dict = {}
        for slot, (state, x) in work.items():
            groups.setdefault((state.signature(), tuple(x.shape[1:])), []).append(slot)
        results = {}
        for slots in groups.values():
            states = [work[s][0] for s in slots]
            layers = LayerStreams(self._root, len(slots), self._rates, packed=self._packed)
            layers.context = {n: torch.cat([st.context[n] for st in states]) for n in states[0].context}
            layers.position = {n: 0 for n in layers.context}  # read only by restart masks, never used by slots
            layers.to_crop = dict(states[0].to_crop)
            layers.final = final
            out = step(torch.cat([work[s][1] for s in slots]), layers)
            for row, (slot, state) in enumerate(zip(slots, states)):
                # copies: a recorded step's context lives in static buffers its next replay overwrites
                context = {n: t[row : row + 1].clone() for n, t in layers.context.items()}
                new = _SlotState(context, dict(layers.to_crop), state.pushed, state.emitted, state.n_codebooks)
                results[slot] = (new, out[row])
        return results

    def _commit(self, results: dict) -> None:
        for slot, (state, _) in results.items():
            self._states[slot] = state


def check_slot_codes(model: DacModel, slot: int, codes, known_codebooks: int | None) -> torch.Tensor:
    """One slot's codes (n, f) validated against ``model`` and the codebook count of the slot's earlier pushes
    (None: no push yet) -> (1, n, f) int64 on the model's device. Raises TypeError/ValueError naming the slot."""
    if not isinstance(codes, torch.Tensor) or codes.dim() != 2:
        shape = tuple(codes.shape) if isinstance(codes, torch.Tensor) else type(codes).__name__
        raise ValueError(f"slot {slot}: codes must be a tensor of shape (n_codebooks, frames), got {shape}")
    try:
        codes = check_codes(codes[None], model.config)[0]
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"slot {slot}: {exc}") from None
    if known_codebooks is not None and codes.shape[0] != known_codebooks:
        raise ValueError(f"slot {slot}: codes have {codes.shape[0]} codebooks; its earlier pushes had "
                         f"{known_codebooks}")
    return codes[None].to(model.device)


class SlotDecoder(_Slots):
    """Decode up to ``slots`` independent code streams; ``push(codes, active=)`` advances any subset at once.

    Each slot's concatenated output (pushes then ``flush``) equals ``model.decode(audio_codes=its codes)``
    within fp32 rounding (<= 1e-5), whatever the interleaving of pushes, flushes and slot reuse."""

    def __init__(self, model: DacModel, slots: int, cuda_graphs: bool = False):
        one = StreamingDecoder(model, 1, cuda_graphs)  # its argument checks, layer rates and lookahead
        super().__init__(model, slots, model.decoder, one._layer_rates(), packed=True)
        self.lookahead_samples, self.lookahead_frames = one.lookahead_samples, one.lookahead_frames
        # cuda_graphs: a steady group step replays a graph recorded for its key (group size, push size, context
        # shapes): one graph per slot count in use, as cuda_graphs.StepGraphs does for a lockstep decoder
        self._graphs = one._graphs
        if self._graphs is not None:
            self._graphs.size = 2 * self.slots

    def final_outputs(self, frames: int) -> int:
        """Samples a stream has returned after pushes of ``frames`` frames in all (before its flush): every
        sample is returned as soon as the frames it depends on are in."""
        return max(0, frames * self.config.hop_length - self.lookahead_samples)

    def check_input(self, slot: int, codes) -> torch.Tensor:
        """One slot's codes (n, f) validated against the model and the slot's earlier pushes -> (1, n, f) on the
        model's device. Raises TypeError/ValueError naming the slot."""
        return check_slot_codes(self.model, slot, codes, self._states[slot].n_codebooks)

    def push(self, audio_codes, active=None) -> list:
        """``audio_codes``: a tensor (slots, n, f) or a sequence of ``slots`` per-slot tensors (n, f_i) or None.
        ``active``: a bool mask (slots,) or indices of the slots to advance (default: every slot given codes).
        Returns a list with, per slot, the samples (k,) now final (k >= 0), or None for slots not advanced."""
        rows = self._rows(audio_codes, "audio_codes", 2)
        return self.push_checked({slot: self.check_input(slot, rows[slot]) for slot in self._active(active, rows)})

    def push_checked(self, inputs: dict) -> list:
        """``push`` of inputs already validated by ``check_input``: slot -> codes (1, n, f)."""
        work = {slot: (self._states[slot], codes) for slot, codes in inputs.items()}

        def step(codes, layers):
            latent = self.model.quantizer.from_codes(codes)[0]
            if self._graphs is None:
                return self.model.decoder.inference(latent, layers)
            return self._graphs.step(self.model.decoder, latent, layers)

        with torch.inference_mode(), self.model._backend_scope():
            results = self._run(work, step)
        outputs = [None] * self.slots
        for slot, (state, audio) in results.items():
            state.pushed += work[slot][1].shape[-1]
            state.n_codebooks = work[slot][1].shape[1]
            state.emitted += audio.shape[-1]
            outputs[slot] = audio.squeeze(0)
        self._commit(results)
        return outputs

    def flush(self, streams) -> list:
        """The remaining samples (k,) of the chosen slots (a bool mask or indices), None for the others; the
        chosen slots are freed (their next push starts a new stream)."""
        chosen = _check_streams(streams, self.slots).nonzero().flatten().tolist()
        empty = torch.zeros(1, self.config.hidden_size, 0, dtype=self.model.dtype, device=self.model.device)
        work = {s: (self._states[s], empty) for s in chosen if self._states[s].pushed}
        with torch.inference_mode(), self.model._backend_scope():
            results = self._run(work, self.model.decoder.inference, final=True)
        outputs = [None] * self.slots
        for slot in chosen:
            outputs[slot] = results[slot][1].squeeze(0) if slot in results else empty.new_zeros(0)
        self._free(chosen)
        return outputs


class SlotEncoder(_Slots):
    """Encode up to ``slots`` independent audio streams; ``push(audio, active=)`` advances any subset at once.

    Each slot's concatenated codes (pushes then ``flush``) are identical to ``model.encode(its audio)`` on CPU in
    fp32, whatever the interleaving."""

    def __init__(self, model: DacModel, slots: int, n_quantizers: int | None = None):
        one = StreamingEncoder(model, 1, n_quantizers)
        super().__init__(model, slots, model.encoder, one._layer_rates(), packed=False)
        self.n_quantizers = one.n_quantizers
        self.lookahead_samples = one.lookahead_samples

    def _step(self, audio, layers):
        return encode_step(self.model, audio, layers, self.n_quantizers)

    def final_outputs(self, samples: int) -> int:
        """Frames a stream has returned after pushes of ``samples`` samples in all (before its flush): frame f
        is returned once samples through f * hop_length + lookahead_samples are in."""
        return max(0, (samples - self.lookahead_samples - 1) // self.config.hop_length + 1)

    def check_input(self, slot: int, audio) -> torch.Tensor:
        """One slot's samples (s,) validated -> (1, 1, s) in the model's dtype and device. Raises
        TypeError/ValueError naming the slot."""
        if not isinstance(audio, torch.Tensor) or audio.dim() != 1:
            shape = tuple(audio.shape) if isinstance(audio, torch.Tensor) else type(audio).__name__
            raise ValueError(f"slot {slot}: audio must be a tensor of shape (samples,), got {shape}")
        try:
            check_stream_samples(audio)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"slot {slot}: {exc}") from None
        return audio.to(device=self.model.device, dtype=self.model.dtype).view(1, 1, -1)

    def push(self, audio, active=None) -> list:
        """``audio``: a tensor (slots, 1, s) or a sequence of ``slots`` per-slot tensors (s_i,) or None, floating
        point in [-1, 1]. ``active`` as in ``SlotDecoder.push``. Returns per slot the codes (n_quantizers, f) of
        the frames now final (f >= 0), or None for slots not advanced."""
        if isinstance(audio, torch.Tensor) and audio.dim() == 3:
            if audio.shape[1] != 1:
                raise ValueError(f"audio as a tensor must have shape (slots, 1, samples), got {tuple(audio.shape)}")
            audio = audio[:, 0]
        rows = self._rows(audio, "audio", 1)
        return self.push_checked({slot: self.check_input(slot, rows[slot]) for slot in self._active(active, rows)})

    def push_checked(self, inputs: dict) -> list:
        """``push`` of inputs already validated by ``check_input``: slot -> audio (1, 1, s)."""
        work = {slot: (self._states[slot], audio) for slot, audio in inputs.items()}
        with torch.inference_mode(), self.model._backend_scope():
            results = self._run(work, self._step)
        return self._finish(results, {s: x.shape[-1] for s, (_, x) in work.items()})

    def _finish(self, results: dict, samples: dict) -> list:
        outputs = [None] * self.slots
        for slot, (state, codes) in results.items():
            state.pushed += samples.get(slot, 0)
            state.emitted += codes.shape[-1]
            outputs[slot] = codes
        self._commit(results)
        return outputs

    def flush(self, streams) -> list:
        """The codes (n_quantizers, f) of the remaining frames of the chosen slots (None for the others); the
        chosen slots are freed. A stream shorter than one frame's samples is zero-padded to one hop first, as
        ``encode`` pads it."""
        chosen = _check_streams(streams, self.slots).nonzero().flatten().tolist()
        hop, dtype, device = self.config.hop_length, self.model.dtype, self.model.device
        live = [s for s in chosen if self._states[s].pushed]
        with torch.inference_mode(), self.model._backend_scope():
            short = {s: hop - self._states[s].pushed for s in live
                     if encoded_frames(self.config, self._states[s].pushed) < 1}
            padded = self._run({s: (self._states[s], torch.zeros(1, 1, n, dtype=dtype, device=device))
                                for s, n in short.items()}, self._step)
            states = {s: padded[s][0] if s in padded else self._states[s] for s in live}
            empty = torch.zeros(1, 1, 0, dtype=dtype, device=device)
            rest = self._run({s: (states[s], empty) for s in live}, self._step, final=True)
        outputs = [None] * self.slots
        for slot in chosen:
            parts = [padded[slot][1]] if slot in padded else []
            parts.append(rest[slot][1] if slot in rest else torch.zeros(self.n_quantizers, 0, dtype=torch.long))
            outputs[slot] = torch.cat(parts, dim=-1)
        self._free(chosen)
        return outputs
