"""encode_files / decode_files: round trip, exact bucketing, tiling, bad inputs, resume.

Uses the 16khz preset (seeded random weights, hop 320) and clips of at most 1 s.
"""

import math
import os
import time

import numpy as np
import pytest

sf = pytest.importorskip("soundfile")
pytest.importorskip("soxr")
pytest.importorskip("pyloudnorm")
torch = pytest.importorskip("torch")

from dac_fast import io as aio  # noqa: E402
from dac_fast.batch import UserError, decode_files, encode_files, load_model, model_rate_and_hop  # noqa: E402
from dac_fast.configuration import DacConfig  # noqa: E402
from dac_fast.dacfile import DacFile, load_any  # noqa: E402


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(2)
    return load_model("16khz", quiet=True)


class CountingModel:
    """Wraps a model and counts encode/decode calls and rows."""

    def __init__(self, m):
        self.m, self.config = m, m.config
        self.encode_calls, self.decode_calls, self.rows = 0, 0, []

    def encode(self, x, **kw):
        self.encode_calls += 1
        self.rows.append(x.shape[0])
        return self.m.encode(x, **kw)

    def decode(self, **kw):
        self.decode_calls += 1
        return self.m.decode(**kw)

    def parameters(self):
        return self.m.parameters()

    def eval(self):
        return self

    def to(self, *a, **k):
        return self


def _clip(path, sr, seconds, channels=1, seed=0, subtype=None):
    rng = np.random.default_rng(seed)
    n = int(round(sr * seconds))
    t = np.arange(n) / sr
    x = np.stack([0.3 * np.sin(2 * np.pi * (200 + 90 * c + 50 * seed) * t) + 0.02 * rng.standard_normal(n)
                  for c in range(channels)]).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, x.T, sr, subtype=subtype)
    return path


def _outputs(d):
    """Names of the outputs in ``d`` (not the hidden record of how they were made)."""
    return sorted(p.name for p in d.iterdir() if not p.name.startswith("."))


def test_roundtrip_restores_length_rate_channels(tmp_path, model):
    src = tmp_path / "in"
    specs = {"stereo.wav": (22050, 0.4, 2), "sub/mono.flac": (16000, 0.3, 1), "three.wav": (48000, 0.25, 3),
             "tiny.wav": (8000, 0.01, 1)}
    for i, (name, (sr, s, c)) in enumerate(specs.items()):
        _clip(src / name, sr, s, c, seed=i)
    rep = encode_files([src], tmp_path / "codes", model, batch_size=4, progress=False)
    assert rep.ok, rep.summary()
    assert len(rep.done) == 4 and rep.audio_seconds == pytest.approx(sum(s for _, s, _ in specs.values()), rel=1e-3)
    sr_m, hop = model_rate_and_hop(model)
    for name, (sr, s, c) in specs.items():
        f = DacFile.load((tmp_path / "codes" / name).with_suffix(".dac"))
        n = int(round(sr * s))
        assert f.codes.shape == (c, 12, math.ceil(math.ceil(n * sr_m / sr) / hop))
        assert (f.sample_rate, f.original_length, f.channels, f.chunk_length, f.padding) == (sr, n, c, f.frames, True)
    rep = decode_files([tmp_path / "codes"], tmp_path / "out", model, batch_size=4, progress=False)
    assert rep.ok, rep.summary()
    for name, (sr, s, c) in specs.items():
        info = sf.info(str((tmp_path / "out" / name).with_suffix(".wav")))
        assert (info.samplerate, info.channels, info.frames) == (sr, c, int(round(sr * s)))


def test_bucketed_batches_equal_per_file_codes(tmp_path, model):
    src = tmp_path / "in"
    # three items with the same frame count (one stereo), one shorter, one at another rate
    _clip(src / "a.wav", 16000, 0.4, 1, seed=1)
    _clip(src / "b.wav", 16000, 0.4, 2, seed=2)
    _clip(src / "c.wav", 16000, 0.39, 1, seed=3)  # 6240 samples -> 20 frames like 6400
    _clip(src / "d.wav", 16000, 0.25, 1, seed=4)
    _clip(src / "e.wav", 32000, 0.4, 1, seed=5)
    counted = CountingModel(model)
    rep = encode_files([src], tmp_path / "batched", counted, batch_size=8, progress=False)
    assert rep.ok
    assert max(counted.rows) >= 4  # a, b (2 rows), c, e share one batch: all 20 frames
    rep1 = encode_files([src], tmp_path / "single", model, batch_size=1, progress=False)
    assert rep1.ok
    for name in "abcde":
        cb = DacFile.load(tmp_path / "batched" / f"{name}.dac").codes
        cs = DacFile.load(tmp_path / "single" / f"{name}.dac").codes
        np.testing.assert_array_equal(cb, cs, err_msg=name)
    # and equal to calling the model directly on the file alone, as the original compress does
    audio, sr = aio.read_audio(src / "c.wav")
    x, _ = aio.prepare_for_encoding(audio, sr, 16000)
    n = x.shape[-1]
    x = np.pad(x, ((0, 0), (0, math.ceil(n / 320) * 320 - n)))
    with torch.inference_mode():
        direct = model.encode(torch.from_numpy(x)[:, None]).audio_codes.numpy()
    np.testing.assert_array_equal(DacFile.load(tmp_path / "batched" / "c.dac").codes, direct)


class MaskCountingModel(CountingModel):
    """CountingModel whose encode takes padding_mask, as dac_fast's does (and records whether it came)."""

    def encode(self, x, padding_mask=None, **kw):
        self.masks = getattr(self, "masks", []) + [padding_mask is not None]
        return super().encode(x, padding_mask=padding_mask, **kw)


def test_mask_bucket_batches_mixed_lengths_with_per_file_codes(tmp_path, model):
    src = tmp_path / "in"
    for name, seconds, channels, sr in [("a", 0.4, 1, 16000), ("b", 0.33, 2, 16000), ("c", 0.251, 1, 16000),
                                        ("d", 0.57, 1, 16000), ("e", 0.3, 1, 32000)]:
        _clip(src / f"{name}.wav", sr, seconds, channels, seed=len(name) + ord(name))
    counted = MaskCountingModel(model)
    rep = encode_files([src], tmp_path / "masked", counted, batch_size=8, bucket="mask", progress=False)
    assert rep.ok and counted.encode_calls == 1 and counted.rows == [6] and counted.masks == [True]
    rep1 = encode_files([src], tmp_path / "single", model, batch_size=1, progress=False)
    assert rep1.ok
    for name in "abcde":
        np.testing.assert_array_equal(DacFile.load(tmp_path / "masked" / f"{name}.dac").codes,
                                      DacFile.load(tmp_path / "single" / f"{name}.dac").codes, err_msg=name)
    # the same setup as "exact" (same codes): a re-run in the other mode trusts the outputs
    again = encode_files([src], tmp_path / "single", model, batch_size=8, bucket="mask", progress=False)
    assert again.ok and not again.done and len(again.skipped) == 5
    # a model without padding_mask cannot batch exactly this way: a clear error naming the argument
    with pytest.raises(UserError, match="bucket"):
        encode_files([src], tmp_path / "other", CountingModel(model), bucket="mask", progress=False)


def test_pad_bucket_mode_trims_to_own_frames(tmp_path, model):
    src = tmp_path / "in"
    _clip(src / "long.wav", 16000, 0.5, 1, seed=1)
    _clip(src / "short.wav", 16000, 0.21, 1, seed=2)
    counted = CountingModel(model)
    rep = encode_files([src], tmp_path / "o", counted, batch_size=2, bucket="pad", progress=False)
    assert rep.ok and counted.encode_calls == 1
    assert DacFile.load(tmp_path / "o" / "short.dac").frames == math.ceil(0.21 * 16000 / 320)
    assert DacFile.load(tmp_path / "o" / "long.dac").frames == 25


def test_tiled_long_file_codes_equal_whole_file_codes(tmp_path, model):
    import inspect

    if "tile_frames" not in inspect.signature(model.encode).parameters:
        pytest.skip("model has no tile_frames (stand-in model)")
    _clip(tmp_path / "in" / "long.wav", 16000, 0.8, 1, seed=7)
    encode_files([tmp_path / "in"], tmp_path / "whole", model, tile_frames=10**6, progress=False)
    encode_files([tmp_path / "in"], tmp_path / "tiled", model, tile_frames=12, progress=False)
    a = DacFile.load(tmp_path / "whole" / "long.dac").codes
    b = DacFile.load(tmp_path / "tiled" / "long.dac").codes
    assert a.shape == (1, 12, 40)
    np.testing.assert_array_equal(a, b)


def _make_bad(d):
    d.mkdir(parents=True, exist_ok=True)
    (d / "empty.wav").write_bytes(b"")
    (d / "corrupt.flac").write_bytes(os.urandom(3000))
    sf.write(d / "zero.wav", np.zeros((0, 1), np.float32), 16000)
    _clip(d / "full.wav", 16000, 0.5)
    b = (d / "full.wav").read_bytes()
    (d / "truncated.wav").write_bytes(b[: len(b) // 2])
    (d / "full.wav").unlink()
    x = np.full((1600, 1), 0.1, np.float32)
    x[5] = np.nan
    sf.write(d / "nan.wav", x, 16000, subtype="FLOAT")
    return {"empty.wav": "empty", "corrupt.flac": "unreadable", "zero.wav": "zero-length",
            "truncated.wav": "truncated", "nan.wav": "NaN"}


def test_bad_files_reported_and_skipped(tmp_path, model):
    src = tmp_path / "in"
    bad = _make_bad(src)
    _clip(src / "good1.wav", 16000, 0.2, seed=1)
    _clip(src / "good2.ogg", 24000, 0.2, 2, seed=2)
    rep = encode_files([src, tmp_path / "missing.wav", str(tmp_path / "nomatch*.wav")], tmp_path / "o", model,
                       progress=False)
    assert not rep.ok
    assert sorted(os.path.basename(o) for _, o in rep.done) == ["good1.dac", "good2.dac"]
    reasons = {os.path.basename(f.path): f.reason for f in rep.failures}
    for name, why in bad.items():
        assert why in reasons[name], (name, reasons.get(name))
    assert "no such file" in reasons["missing.wav"] and "glob matched no files" in reasons["nomatch*.wav"]
    assert str(src / "nan.wav") in rep.summary()
    assert _outputs(tmp_path / "o") == ["good1.dac", "good2.dac"]
    # decode side: a corrupt .dac among good ones
    (tmp_path / "o" / "broken.dac").write_bytes(b"\x93NUMPY garbage")
    rep = decode_files([tmp_path / "o"], tmp_path / "dec", model, progress=False)
    assert [os.path.basename(f.path) for f in rep.failures] == ["broken.dac"]
    assert _outputs(tmp_path / "dec") == ["good1.wav", "good2.wav"]


def test_resume_skips_complete_outputs_and_overwrite_redoes(tmp_path, model):
    src = tmp_path / "in"
    _clip(src / "a.wav", 16000, 0.2, seed=1)
    _clip(src / "b.wav", 16000, 0.3, seed=2)
    rep = encode_files([src], tmp_path / "o", model, progress=False)
    assert len(rep.done) == 2
    outs = [tmp_path / "o" / n for n in _outputs(tmp_path / "o")]
    mt = {p.name: p.stat().st_mtime_ns for p in outs}
    # a leftover temp file from a killed run is cleaned up, never taken for an output
    leftover = tmp_path / "o" / f"{aio.TMP_PREFIX}{aio._HOST}-999999999-c.x.dac"
    leftover.write_bytes(b"partial")
    counted = CountingModel(model)
    rep = encode_files([src], tmp_path / "o", counted, progress=False)
    assert rep.ok and len(rep.skipped) == 2 and not rep.done and counted.encode_calls == 0
    assert not leftover.exists()
    assert {p.name: p.stat().st_mtime_ns for p in outs} == mt
    time.sleep(0.01)
    rep = encode_files([src], tmp_path / "o", model, overwrite=True, progress=False)
    assert len(rep.done) == 2
    for p in outs:
        assert p.stat().st_mtime_ns > mt[p.name]
    # decode resumes too
    decode_files([tmp_path / "o"], tmp_path / "d", model, progress=False)
    rep = decode_files([tmp_path / "o"], tmp_path / "d", model, progress=False)
    assert len(rep.skipped) == 2 and not rep.done


def test_npy_format_encode_and_decode(tmp_path, model):
    _clip(tmp_path / "in" / "x.wav", 22050, 0.3, 2)
    rep = encode_files([tmp_path / "in"], tmp_path / "o", model, format="npy", n_quantizers=4, progress=False)
    assert rep.ok
    codes = np.load(tmp_path / "o" / "x.codes.npy", allow_pickle=False)
    assert codes.dtype == np.uint16 and codes.shape[:2] == (2, 4)
    f = load_any(tmp_path / "o" / "x.json")
    assert f.sample_rate == 22050 and f.extra["hop_length"] == 320
    rep = encode_files([tmp_path / "in"], tmp_path / "o", model, format="npy", n_quantizers=4, progress=False)
    assert len(rep.skipped) == 1
    rep = decode_files([tmp_path / "o"], tmp_path / "d", model, format="flac", progress=False)
    assert rep.ok
    info = sf.info(str(tmp_path / "d" / "x.flac"))
    assert (info.samplerate, info.channels, info.frames) == (22050, 2, int(0.3 * 22050))


def test_decode_batches_keep_codebook_counts_apart(tmp_path, model):
    """Files of one length but different codebook counts never share a decode batch; each decodes as alone."""
    for name, nq in (("a", 4), ("b", 12), ("c", 4), ("d", 7)):
        _clip(tmp_path / "in" / name / f"{name}.wav", 16000, 0.5, seed=len(name) + nq)
        encode_files([tmp_path / "in" / name], tmp_path / "codes", model, format="npy", n_quantizers=nq,
                     progress=False)
    counting = CountingModel(model)
    rep = decode_files([tmp_path / "codes"], tmp_path / "together", counting, subtype="float", batch_size=8,
                       progress=False)
    assert rep.ok and counting.decode_calls == 3  # a+c together, b alone, d alone
    for name in "abcd":
        decode_files([tmp_path / "codes" / f"{name}.json"], tmp_path / "alone", model, subtype="float",
                     progress=False)
        together, _ = sf.read(tmp_path / "together" / f"{name}.wav", dtype="float32")
        alone, _ = sf.read(tmp_path / "alone" / f"{name}.wav", dtype="float32")
        assert together.shape == alone.shape and np.abs(together - alone).max() <= 1e-5


def test_decode_restores_loudness(tmp_path, model):
    _clip(tmp_path / "in" / "q.wav", 16000, 1.0, 1)
    encode_files([tmp_path / "in"], tmp_path / "o", model, progress=False)
    f = DacFile.load(tmp_path / "o" / "q.dac")
    decode_files([tmp_path / "o"], tmp_path / "d", model, progress=False)
    y, sr = aio.read_audio(tmp_path / "d" / "q.wav")
    assert aio.loudness(y, sr) == pytest.approx(float(f.input_db[0]), abs=1.0)


def test_prefetch_memory_budget_bounds_loaded_audio(tmp_path, model):
    src = tmp_path / "in"
    for i in range(3):
        _clip(src / f"m{i}.wav", 16000, 0.2, seed=i)
    counted = CountingModel(model)
    # a 1-byte budget: one file loaded at a time, batches are flushed to free the budget
    rep = encode_files([src], tmp_path / "o", counted, batch_size=8, prefetch_memory=1, workers=2, progress=False)
    assert rep.ok and len(rep.done) == 3 and counted.encode_calls == 3
    rep = encode_files([src], tmp_path / "o2", model, batch_size=8, progress=False)
    for i in range(3):
        np.testing.assert_array_equal(DacFile.load(tmp_path / "o" / f"m{i}.dac").codes,
                                      DacFile.load(tmp_path / "o2" / f"m{i}.dac").codes)


def test_load_model_dispatch(tmp_path, monkeypatch, capsys):
    import dac_fast.job_model as B

    calls = []

    class Fake(torch.nn.Module):
        def __init__(self, how):
            super().__init__()
            self.how, self.config = how, None
            self.w = torch.nn.Parameter(torch.zeros(1))
            calls.append(how)

        @classmethod
        def from_preset(cls, name, seed=0):
            return cls(("preset", name, seed))

        @classmethod
        def from_pretrained(cls, spec):
            return cls(("pretrained", str(spec)))

        @classmethod
        def from_original(cls, path):
            return cls(("original", str(path)))

    monkeypatch.setattr(B, "_dac_model_class", lambda: Fake)
    with pytest.warns(UserWarning, match="RANDOM weights") as rec:
        assert B.load_model("24khz", seed=3).how == ("preset", "24khz", 3)
    assert "--" not in str(rec[0].message)  # no CLI advice from the Python API
    assert capsys.readouterr().err == ""
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(B.UserError, match="it has no config.json"):
        B.load_model(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    with pytest.raises(B.UserError, match=r"holds no model weights \(model.safetensors or pytorch_model.bin\)"):
        B.load_model(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"x")
    assert B.load_model(tmp_path / "ckpt").how == ("pretrained", str(tmp_path / "ckpt"))
    (tmp_path / "w.pth").write_bytes(b"x")
    assert B.load_model(str(tmp_path / "w.pth")).how == ("original", str(tmp_path / "w.pth"))
    assert B.load_model("descript/dac_16khz").how == ("pretrained", "descript/dac_16khz")
    with pytest.raises(B.UserError, match="does not exist") as ei:
        B.load_model(str(tmp_path / "missing.pth"))
    assert ei.value.argument == "model"
    m = B.load_model("44khz", dtype="bfloat16", quiet=True)
    assert m.w.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        B.load_model("44khz", dtype="int3", quiet=True)


def test_unloadable_checkpoint_is_a_user_error(tmp_path):
    (tmp_path / "broken.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match="cannot load model") as ei:
        load_model(tmp_path / "broken.pth")
    assert ei.value.argument == "model"


def test_decode_original_chunked_dac(tmp_path, model):
    """A file laid out like the original's chunked compress (padding=False, chunk_length < frames,
    written with plain np.save of the documented dict) decodes to the stored length/rate/channels."""
    rng = np.random.default_rng(0)
    art = {"codes": rng.integers(0, 1024, (2, 12, 30)).astype(np.uint16),
           "metadata": {"input_db": np.array([-25.0], np.float32), "original_length": 13000, "sample_rate": 22050,
                        "chunk_length": 10, "channels": 2, "padding": False, "dac_version": "1.0.0"}}
    (tmp_path / "c").mkdir()
    with open(tmp_path / "c" / "orig.dac", "wb") as fh:
        np.save(fh, art)
    rep = decode_files([tmp_path / "c" / "orig.dac"], tmp_path / "d", model, progress=False)
    assert rep.ok, rep.summary()
    info = sf.info(str(tmp_path / "d" / "orig.wav"))
    assert (info.samplerate, info.channels, info.frames) == (22050, 2, 13000)


def test_resume_trusts_only_outputs_it_can_vouch_for(tmp_path, model):
    """A changed source and a damaged output (at its recorded size) are redone; a file that nothing records
    and an output changed since it was written are not ours: failures, left as they are; outputs of another
    setup (n_quantizers, weights) stop the run before anything is written; overwrite redoes them all."""
    src = tmp_path / "in"
    for i, name in enumerate("abc"):
        _clip(src / f"{name}.wav", 16000, 0.1 + 0.03 * i, seed=i)
    out = tmp_path / "o"
    rep = encode_files([src], out, model, progress=False)
    assert len(rep.done) == 3
    good = {n: DacFile.load(out / n).codes for n in _outputs(out)}
    raw = (out / "a.dac").read_bytes()
    (out / "a.dac").write_bytes(raw[: len(raw) // 2])  # truncated (e.g. a copy cut short)
    time.sleep(0.01)
    _clip(src / "b.wav", 16000, 0.2, seed=7)  # the source changed since
    lines = (out / ".dac-fast-outputs.jsonl").read_text().splitlines()
    (out / ".dac-fast-outputs.jsonl").write_text("\n".join(l for l in lines if '"c.dac"' not in l) + "\n")
    c_bytes = (out / "c.dac").read_bytes()
    rep = encode_files([src], out, model, progress=False)
    failed = {os.path.basename(f.path): f.reason for f in rep.failures}
    assert set(failed) == {"a.wav", "c.wav"} and all("use --overwrite" in r for r in failed.values()), failed
    assert "changed since dac-fast wrote it" in failed["a.wav"] and "did not write it" in failed["c.wav"]
    assert (out / "a.dac").read_bytes() == raw[: len(raw) // 2] and (out / "c.dac").read_bytes() == c_bytes
    assert [(os.path.basename(f.path), f.reason) for f in rep.redone] == [("b.wav", "the source changed since its output was made")]
    assert DacFile.load(out / "b.dac").frames == math.ceil(0.2 * 16000 / 320)
    rep = encode_files([src], out, model, overwrite=True, progress=False)
    assert rep.ok and len(rep.done) == 3, rep.summary()
    np.testing.assert_array_equal(DacFile.load(out / "a.dac").codes, good["a.dac"])
    (out / "a.dac").write_bytes(bytes(len(raw)))  # damaged in place, at its recorded size: still ours
    rep = encode_files([src], out, model, progress=False)
    assert rep.ok and [os.path.basename(f.path) for f in rep.redone] == ["a.wav"] and len(rep.skipped) == 2
    assert "damaged" in rep.redone[0].reason
    np.testing.assert_array_equal(DacFile.load(out / "a.dac").codes, good["a.dac"])
    # another setup: refused, nothing touched
    before = {n: (out / n).stat().st_mtime_ns for n in _outputs(out)}
    with pytest.raises(UserError, match=r"n_quantizers: None then, 4 now") as ei:
        encode_files([src], out, model, n_quantizers=4, progress=False)
    assert ei.value.argument == "output_dir"
    other = CountingModel(load_model("16khz", seed=1, quiet=True))
    with pytest.raises(UserError, match="different setup"):
        encode_files([src], out, other, progress=False)
    assert {n: (out / n).stat().st_mtime_ns for n in _outputs(out)} == before and other.encode_calls == 0
    rep = encode_files([src], out, model, n_quantizers=4, overwrite=True, progress=False)
    assert len(rep.done) == 3 and DacFile.load(out / "c.dac").n_codebooks == 4
    assert len(encode_files([src], out, model, n_quantizers=4, progress=False).skipped) == 3
    # decoded audio: a truncated output is not ours any more (left alone) until --overwrite
    dec = tmp_path / "dec"
    decode_files([out], dec, model, progress=False)
    raw = (dec / "a.wav").read_bytes()
    (dec / "a.wav").write_bytes(raw[:-100])
    rep = decode_files([out], dec, model, progress=False)
    assert [os.path.basename(f.path) for f in rep.failures] == ["a.dac"] and len(rep.skipped) == 2
    assert (dec / "a.wav").read_bytes() == raw[:-100]
    rep = decode_files([out], dec, model, overwrite=True, progress=False)
    assert rep.ok and sf.info(str(dec / "a.wav")).frames == sf.info(str(src / "a.wav")).frames


class ConfigOnly:
    """A model that has a config and nothing else: any attempt to run it fails the test."""

    def __init__(self, preset):
        self.config = DacConfig.from_preset(preset)

    def encode(self, *a, **k):
        raise AssertionError("must not run")

    decode = encode

    def parameters(self):
        return iter([])

    def eval(self):
        return self


def test_decode_refuses_codes_of_another_model(tmp_path, model):
    _clip(tmp_path / "in" / "x.wav", 22050, 0.5, seed=1)
    _clip(tmp_path / "in" / "y.wav", 44100, 0.4, 2, seed=2)
    encode_files([tmp_path / "in"], tmp_path / "c", model, n_quantizers=4, progress=False)
    for preset, why in (("24khz", "the model makes 75.0 frames/s"), ("44khz", "the model makes 86.1 frames/s")):
        rep = decode_files([tmp_path / "c"], tmp_path / f"d{preset}", ConfigOnly(preset), progress=False)
        assert not rep.ok and not rep.done and len(rep.failures) == 2
        assert all(why in f.reason and "encoded by another model" in f.reason for f in rep.failures), rep.summary()
    # more codebooks than the model has: refused whatever the frame rate
    f = DacFile.load(tmp_path / "c" / "x.dac")
    DacFile(codes=np.concatenate([f.codes] * 3, 1), input_db=f.input_db, original_length=f.original_length,
            sample_rate=f.sample_rate, chunk_length=f.chunk_length, channels=f.channels).save(tmp_path / "c12" / "x.dac")
    rep = decode_files([tmp_path / "c12"], tmp_path / "d44", ConfigOnly("44khz"), progress=False)
    assert [f.reason for f in rep.failures] == ["has 12 codebooks, the model has 9"]


def test_nothing_to_do_is_not_success(tmp_path, model):
    (tmp_path / "empty").mkdir()
    rep = encode_files([tmp_path / "empty"], tmp_path / "o", ConfigOnly("16khz"), progress=False)
    assert not rep.ok and "no files" in rep.failures[0].reason
    _clip(tmp_path / "audio" / "a.wav", 16000, 0.2)
    encode_files([tmp_path / "audio"], tmp_path / "codes", model, progress=False)
    (tmp_path / "codes" / "notes.txt").write_text("x")
    rep = encode_files([tmp_path / "codes"], tmp_path / "o", ConfigOnly("16khz"), progress=False)
    assert not rep.ok and "it holds 1 .dac, 1 .txt" in rep.failures[0].reason, rep.failures
    rep = decode_files([tmp_path / "audio"], tmp_path / "o", ConfigOnly("16khz"), progress=False)
    assert not rep.ok and rep.failures[0].path == str(tmp_path / "audio")
    assert "no .dac/.json files found (it holds 1 .wav)" in rep.failures[0].reason


def test_bad_arguments_and_output_dir_fail_before_the_model_loads(tmp_path, monkeypatch):
    import dac_fast.job_model as B

    def no_model():
        raise AssertionError("the model must not be built")

    monkeypatch.setattr(B, "_dac_model_class", no_model)
    _clip(tmp_path / "in" / "a.wav", 16000, 0.2)
    (tmp_path / "file").write_text("x")
    cases = [
        (dict(output_dir=tmp_path / "file"), "output_dir", "exists and is not a directory"),
        (dict(output_dir=tmp_path / "file" / "sub"), "output_dir", "cannot write to"),
        (dict(n_quantizers=13), "n_quantizers", r"must be an integer in \[1, 12\]"),
        (dict(n_quantizers=0), "n_quantizers", "must be an integer >= 1, got 0"),
        (dict(batch_size=0), "batch_size", "must be >= 1"),
        (dict(format="mp3"), "format", "must be one of"),
        (dict(dtype="int8"), "dtype", "unknown dtype"),
    ]
    for kw, arg, msg in cases:
        kw = {"output_dir": tmp_path / "o", **kw}
        with pytest.raises(UserError, match=msg) as ei:
            encode_files([tmp_path / "in"], kw.pop("output_dir"), "16khz", progress=False, **kw)
        assert ei.value.argument == arg
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available") as ei:
            encode_files([tmp_path / "in"], tmp_path / "o", "16khz", device="cuda", progress=False)
        assert ei.value.argument == "device"


def test_summary_gives_rates_only_for_real_work(tmp_path, model):
    _clip(tmp_path / "in" / "tiny.wav", 16000, 0.004)
    rep = encode_files([tmp_path / "in"], tmp_path / "o", model, progress=False)
    assert rep.ok and "RTF" not in rep.summary() and "x real time" not in rep.summary()
    rep = encode_files([tmp_path / "in"], tmp_path / "o", model, progress=False)
    assert "RTF" not in rep.summary() and "1 skipped" in rep.summary()
    from dac_fast.batch import Report

    r = Report("encode", done=[("a", "b")], audio_seconds=30.0, wall_seconds=3.0)
    assert "RTF 0.1000" in r.summary() and "10.00x real time" in r.summary()


def test_decode_subtype(tmp_path, model):
    _clip(tmp_path / "in" / "a.wav", 16000, 0.2)
    encode_files([tmp_path / "in"], tmp_path / "c", model, progress=False)
    for subtype, fmt, expect in (("pcm24", "flac", "PCM_24"), ("float", "wav", "FLOAT")):
        out = tmp_path / f"d_{subtype}_{fmt}"
        assert decode_files([tmp_path / "c"], out, model, format=fmt, subtype=subtype, progress=False).ok
        assert sf.info(str(out / f"a.{fmt}")).subtype == expect
    with pytest.raises(UserError, match="need --format wav"):
        decode_files([tmp_path / "c"], tmp_path / "x", model, format="flac", subtype="float")
