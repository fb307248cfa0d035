"""Slot-batched streaming (dac_fast.slots): random schedules of pushes, joins, leaves and slot reuse.

Every stream that ends is checked against the offline path run on its own input alone: the decoder's audio
within 1e-5 of ``model.decode``, the encoder's codes identical to ``model.encode``. The schedules are seeded,
drawn over two presets, short (a few frames per stream) to keep the full-size presets fast.
"""

import numpy as np
import pytest
import torch

from dac_fast import DacModel
from dac_fast.slots import SlotDecoder, SlotEncoder
from tests.reference import synth_audio

ATOL = 1e-5
_models = {}


def model_for(preset: str) -> DacModel:
    if preset not in _models:
        _models[preset] = DacModel.from_preset(preset, seed=3)
    return _models[preset]


def run_schedule(slotted, rng, new_input, piece, enough=(3, 3), max_ticks: int = 40):
    """Drive ``slotted`` through random ticks: each free slot may start a stream (``new_input()`` -> its whole
    input), each busy slot may push its next ``piece(rng)`` elements, end (flush), or sit out; until ``enough``
    = (streams finished, ticks that pushed several streams at once) or ``max_ticks``. Returns [(input, output
    pieces)] of every finished stream, and how many ticks pushed several streams at once."""
    slots = slotted.slots
    streams = [None] * slots  # slot -> [input, consumed, outputs]
    done, shared_ticks = [], 0
    for _ in range(max_ticks):
        if len(done) >= enough[0] and shared_ticks >= enough[1]:
            break
        for slot in range(slots):
            if streams[slot] is None and rng.random() < 0.5:
                streams[slot] = [new_input(), 0, []]
        inputs, flushing = [None] * slots, []
        for slot, stream in enumerate(streams):
            if stream is None:
                continue
            whole, consumed, _ = stream
            left = whole.shape[-1] - consumed
            roll = rng.random()
            if left == 0 or (roll < 0.1 and consumed > 0):
                flushing.append(slot)
            elif roll < 0.8:
                size = min(left, piece(rng))
                inputs[slot] = whole[..., consumed : consumed + size]
                stream[1] += size
        if sum(x is not None for x in inputs) > 1:
            shared_ticks += 1
        if any(x is not None for x in inputs):
            for slot, out in enumerate(slotted.push(inputs)):
                if out is not None:
                    streams[slot][2].append(out)
                    # each output is returned as soon as it is final (what the server's coalescing relies on)
                    returned = sum(o.shape[-1] for o in streams[slot][2])
                    assert returned == slotted.final_outputs(streams[slot][1])
        if flushing:
            for slot, out in enumerate(slotted.flush(flushing)):
                if out is not None:
                    whole, consumed, outs = streams[slot]
                    done.append((whole[..., :consumed], outs + [out]))
                    streams[slot] = None
    busy = [slot for slot in range(slots) if streams[slot] is not None]
    if busy:
        for slot, out in enumerate(slotted.flush(busy)):
            if out is not None:
                whole, consumed, outs = streams[slot]
                done.append((whole[..., :consumed], outs + [out]))
    return [item for item in done if item[0].shape[-1] > 0], shared_ticks


@pytest.mark.parametrize("preset,seed", [("16khz", 0), ("44khz", 1)])
def test_slot_decoder_random_schedule_is_exact(preset, seed):
    model = model_for(preset)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    n_codebooks = model.config.n_codebooks

    def new_codes():
        n = int(rng.integers(1, n_codebooks + 1)) if rng.random() < 0.3 else n_codebooks
        return torch.randint(0, model.config.codebook_size, (n, int(rng.integers(3, 8))), generator=gen)

    dec = SlotDecoder(model, slots=3)
    done, shared = run_schedule(dec, rng, new_codes, lambda r: int(r.choice([1, 2, 4])))
    assert len(done) >= 3 and shared >= 3, "the schedule must finish streams and batch several per tick"
    for codes, outs in done:
        with torch.inference_mode():
            expected = model.decode(audio_codes=codes[None]).audio_values[0]
        audio = torch.cat(outs)
        assert audio.shape == expected.shape
        assert (audio - expected).abs().max().item() <= ATOL
        assert expected.abs().max().item() > 0.05, "non-trivial audio"


@pytest.mark.parametrize("preset,seed", [("16khz", 2), ("44khz", 3)])
def test_slot_encoder_random_schedule_codes_identical(preset, seed):
    model = model_for(preset)
    rng = np.random.default_rng(seed)
    sr, hop = model.config.sampling_rate, model.config.hop_length

    def new_audio():
        return torch.from_numpy(synth_audio(int(rng.integers(1, 5 * hop)), sr, seed=int(rng.integers(1 << 30))))

    enc = SlotEncoder(model, slots=3)
    piece = lambda r: int(r.choice([hop, 2 * hop, int(r.integers(1, 2 * hop))]))  # noqa: E731
    done, shared = run_schedule(enc, rng, new_audio, piece)
    assert len(done) >= 3 and shared >= 3
    for audio, outs in done:
        with torch.inference_mode():
            expected = model.encode(audio[None, None]).audio_codes[0]
        codes = torch.cat(outs, dim=-1)
        assert torch.equal(codes, expected)


def test_inactive_slots_do_not_move_and_bad_input_changes_nothing():
    model = model_for("16khz")
    codes = torch.randint(0, 1024, (2, 12, 9), generator=torch.Generator().manual_seed(7))
    dec = SlotDecoder(model, slots=2)
    first = dec.push(codes[..., :4], active=[0])
    assert first[1] is None and dec.pushed(1) == 0 and dec.pushed(0) == 4
    bad = [
        ([codes[0, :, 4:6], codes[1, :5, :2].float()], TypeError, "slot 1: audio_codes must be an integer"),
        ([codes[0, :, 4:6], codes[1, :, :2] + 1024], ValueError, r"slot 1: .*\[0, 1024\)"),
        ([codes[0, :5, 4:6], None], ValueError, "slot 0: codes have 5 codebooks"),
        ([codes[0, :, 4:6], None, None], ValueError, "sequence of 2"),
        (codes[0], ValueError, "slots=2"),
    ]
    for value, error, message in bad:
        with pytest.raises(error, match=message):
            dec.push(value)
    with pytest.raises(ValueError, match="active slots \\[1\\] have no input"):
        dec.push([codes[0, :, 4:6], None], active=[0, 1])
    assert dec.pushed(0) == 4 and dec.pushed(1) == 0  # nothing moved
    outs = [first[0]]
    for out in (dec.push([codes[0, :, 4:], codes[1, :, :3]]), dec.push([None, codes[1, :, 3:]]), dec.flush([0, 1])):
        for slot in range(2):
            if out[slot] is not None:
                outs.append((slot, out[slot]))
    with torch.inference_mode():
        expected = model.decode(audio_codes=codes).audio_values
    audio0 = torch.cat([first[0]] + [o for s, o in outs[1:] if s == 0])
    audio1 = torch.cat([o for s, o in outs[1:] if s == 1])
    assert (audio0 - expected[0]).abs().max().item() <= ATOL
    assert (audio1 - expected[1]).abs().max().item() <= ATOL


def staggered_pushes(dec, codes: torch.Tensor) -> list:
    """Slots joining at ticks 0, 2, 3, slot 1 sitting out ticks 5-6, 4-frame pushes, every slot flushed at the end:
    the steady group sizes change (1, 2, 3, 2, 3 streams). Returns every push's per-slot outputs and the frames
    each slot pushed."""
    joins, pushed, outs = (0, 2, 3), [0, 0, 0], []
    for tick in range(12):
        inputs = [None] * 3
        for slot, join in enumerate(joins):
            if tick >= join and not (slot == 1 and tick in (5, 6)) and pushed[slot] < codes.shape[-1]:
                inputs[slot] = codes[slot, :, pushed[slot] : pushed[slot] + 4]
                pushed[slot] += 4
        outs.append(dec.push(inputs))
    outs.append(dec.flush([0, 1, 2]))
    return outs, pushed


def test_recorded_group_steps_replay_exactly():
    """``cuda_graphs``' bookkeeping on the CPU with a recorder that replays eagerly: one recorded step per group
    size in steady state, and every output equals the eager slot decoder's exactly."""
    from dac_fast.cuda_graphs import StepGraphs

    model = model_for("16khz")
    codes = torch.randint(0, 1024, (3, 12, 40), generator=torch.Generator().manual_seed(9))
    expected, _ = staggered_pushes(SlotDecoder(model, slots=3), codes)
    dec = SlotDecoder(model, slots=3)
    recorded = []
    dec._graphs = StepGraphs(lambda run: recorded.append(run) or run, size=6)
    outs, pushed = staggered_pushes(dec, codes)
    assert 2 <= len(recorded) <= 3, "one recorded step per steady group size"
    for tick, (out, ref) in enumerate(zip(outs, expected)):
        for slot in range(3):
            assert (out[slot] is None) == (ref[slot] is None)
            if out[slot] is not None:
                assert torch.equal(out[slot], ref[slot]), f"tick {tick} slot {slot}"
    for slot in range(3):
        audio = torch.cat([o[slot] for o in outs if o[slot] is not None])
        with torch.inference_mode():
            alone = model.decode(audio_codes=codes[slot : slot + 1, :, : pushed[slot]]).audio_values[0]
        assert audio.shape == alone.shape and (audio - alone).abs().max().item() <= ATOL


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_slot_steps_equal_eager():
    model = DacModel.from_preset("16khz", seed=3).cuda()
    codes = torch.randint(0, 1024, (3, 12, 40), generator=torch.Generator().manual_seed(9)).cuda()
    expected, _ = staggered_pushes(SlotDecoder(model, slots=3), codes)
    dec = SlotDecoder(model, slots=3, cuda_graphs=True)
    outs, _ = staggered_pushes(dec, codes)
    assert len(dec._graphs.steps) >= 2
    for out, ref in zip(outs, expected):
        for slot in range(3):
            if ref[slot] is not None:
                assert (out[slot] - ref[slot]).abs().max().item() <= ATOL
