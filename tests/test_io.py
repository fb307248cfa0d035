"""Audio I/O: reading, error reporting, resampling, loudness, atomic writes."""

import importlib.util
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest

sf = pytest.importorskip("soundfile")
pytest.importorskip("soxr")
pyln = pytest.importorskip("pyloudnorm")

from dac_fast import io as aio  # noqa: E402


def _tone(sr, seconds, channels=1, freq=440.0, amp=0.3):
    t = np.arange(int(sr * seconds)) / sr
    x = amp * np.sin(2 * np.pi * freq * t)
    return np.stack([x * (1 + 0.1 * c) for c in range(channels)]).astype(np.float32)


@pytest.mark.parametrize("ext,subtype", [("wav", "PCM_16"), ("flac", "PCM_16"), ("ogg", "VORBIS"), ("wav", "FLOAT")])
def test_read_formats(tmp_path, ext, subtype):
    x = _tone(22050, 0.5, channels=2)
    p = tmp_path / f"a.{ext}"
    sf.write(p, x.T, 22050, subtype=subtype)
    y, sr = aio.read_audio(p)
    assert sr == 22050 and y.dtype == np.float32 and y.shape[0] == 2
    assert abs(y.shape[1] - x.shape[1]) <= (0 if ext != "ogg" else 2048)
    if ext != "ogg":
        np.testing.assert_allclose(y, x, atol=1e-3)


def _bad_files(d: Path) -> dict:
    d.mkdir(parents=True, exist_ok=True)
    files = {}
    (d / "empty.wav").write_bytes(b"")
    files["empty"] = d / "empty.wav"
    (d / "corrupt.wav").write_bytes(b"RIFF\x00\x01\x00\x00WAVEnot really a wave file" * 3)
    files["corrupt"] = d / "corrupt.wav"
    sf.write(d / "zero.wav", np.zeros((0, 1), np.float32), 16000)
    files["zero"] = d / "zero.wav"
    sf.write(d / "full.wav", _tone(16000, 1.0).T, 16000)
    b = (d / "full.wav").read_bytes()
    (d / "truncated.wav").write_bytes(b[: len(b) // 2])
    files["truncated"] = d / "truncated.wav"
    sf.write(d / "full.flac", _tone(16000, 1.0).T, 16000)
    b = (d / "full.flac").read_bytes()
    (d / "truncated.flac").write_bytes(b[: len(b) // 2])
    files["truncated_flac"] = d / "truncated.flac"
    x = _tone(16000, 0.5)
    x[0, 100] = np.nan
    sf.write(d / "nan.wav", x.T, 16000, subtype="FLOAT")
    files["nan"] = d / "nan.wav"
    x = _tone(16000, 0.5)
    x[0, 7] = np.inf
    sf.write(d / "inf.wav", x.T, 16000, subtype="FLOAT")
    files["inf"] = d / "inf.wav"
    (d / "full.wav").unlink()
    (d / "full.flac").unlink()
    return files


def test_bad_audio_errors_name_path_and_reason(tmp_path):
    files = _bad_files(tmp_path)
    expect = {"empty": "empty file", "corrupt": "unreadable", "zero": "zero-length", "truncated": "truncated",
              "truncated_flac": "unreadable", "nan": "NaN", "inf": "NaN/Inf"}
    for kind, p in files.items():
        with pytest.raises(aio.AudioError) as ei:
            aio.read_audio(p)
        assert str(p) in str(ei.value) and expect[kind] in ei.value.reason, (kind, str(ei.value))
    with pytest.raises(aio.AudioError, match="no such file"):
        aio.read_audio(tmp_path / "missing.wav")


def test_resample_soxr_length_and_pitch():
    x = _tone(44100, 1.0, channels=2, freq=1000.0)
    y = aio.resample(x, 44100, 16000)
    assert y.shape == (2, 16000) and y.dtype == np.float32
    spec = np.abs(np.fft.rfft(y[0]))
    assert abs(np.argmax(spec) - 1000) <= 1  # 1 Hz bins
    assert aio.resample(x, 44100, 44100) is not None and aio.resample(x, 44100, 44100).shape == x.shape
    assert aio.resample(x[0], 44100, 22050).shape == (22050,)


def test_loudness_matches_pyloudnorm_and_normalizes():
    x = _tone(16000, 2.0, channels=2)
    ref = pyln.Meter(16000).integrated_loudness(x.T.astype(np.float64))
    assert aio.loudness(x, 16000) == pytest.approx(ref, abs=1e-6)
    y, db = aio.prepare_for_encoding(x, 16000, 16000, -16.0)
    assert db == pytest.approx(ref, abs=1e-6)
    assert aio.loudness(y, 16000) == pytest.approx(-16.0, abs=0.05)


def _audiotools_meter(monkeypatch):
    """audiotools' own Meter (the code the original compress measures input_db with), loaded from
    the installed descript-audiotools with torchaudio's lfilter stubbed by scipy's (torchaudio does
    not install next to torch 2.14); the framing and gating code under test is audiotools'."""
    spec = importlib.util.find_spec("audiotools")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("descript-audiotools not installed (pip install --no-deps descript-audiotools julius)")
    pytest.importorskip("julius")
    torch = pytest.importorskip("torch")
    from scipy.signal import lfilter

    def _lfilter(waveform, a_coeffs, b_coeffs, clamp=True, batching=True):
        y = lfilter(b_coeffs.double().numpy(), a_coeffs.double().numpy(), waveform.double().numpy(), axis=-1)
        return torch.from_numpy(y).float()

    ta = types.ModuleType("torchaudio")
    ta.functional = types.SimpleNamespace(lfilter=_lfilter)
    monkeypatch.setitem(sys.modules, "torchaudio", ta)
    path = os.path.join(list(spec.submodule_search_locations)[0], "core", "loudness.py")
    mspec = importlib.util.spec_from_file_location("_audiotools_loudness", path)
    mod = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(mod)
    return mod.Meter, torch


@pytest.mark.parametrize("sr,seconds,channels", [(16000, 1.05, 1), (44100, 2.37, 2), (24000, 0.63, 5), (22050, 3.0, 2)])
def test_loudness_matches_audiotools_meter(monkeypatch, sr, seconds, channels):
    Meter, torch = _audiotools_meter(monkeypatch)
    rng = np.random.default_rng(sr)
    x = _tone(sr, seconds, channels) * np.linspace(0.05, 1.0, int(sr * seconds), dtype=np.float32)
    x += 0.01 * rng.standard_normal(x.shape).astype(np.float32)
    x[:, : int(0.3 * sr)] *= 1e-4  # a quiet lead-in exercises the gates
    ref = Meter(sr).integrated_loudness(torch.from_numpy(x.T.copy())[None])
    ref = max(float(ref[0]), -70.0)
    assert aio.loudness(x, sr) == pytest.approx(ref, abs=2e-3)


def test_loudness_short_and_silent_clips_are_finite():
    short = _tone(16000, 0.1)  # shorter than one 400 ms block: zero-padded to 0.5 s
    v = aio.loudness(short, 16000)
    assert np.isfinite(v) and v > -70
    assert aio.loudness(np.zeros((1, 16000), np.float32), 16000) == -70.0
    assert aio.loudness(np.zeros((2, 10), np.float32), 16000) == -70.0
    y, db = aio.prepare_for_encoding(np.zeros((1, 800), np.float32), 16000, 16000)
    assert db == -70.0 and np.isfinite(y).all()


def test_ensure_max_of_audio_per_channel():
    x = np.array([[0.5, -2.0, 1.0], [0.1, 0.2, -0.3]], np.float32)
    y = aio.ensure_max_of_audio(x)
    np.testing.assert_allclose(y[0], x[0] / 2.0)
    np.testing.assert_allclose(y[1], x[1])


def test_restore_after_decoding_shape_rate_and_loudness():
    recon = _tone(16000, 1.0, channels=2) * 0.2
    y = aio.restore_after_decoding(recon, 16000, np.array([-23.0], np.float32), 22050, 22000, 2)
    assert y.shape == (2, 22000)
    assert aio.loudness(y[:1], 22050) == pytest.approx(-23.0, abs=0.3)


class Boom(Exception):
    pass


@pytest.mark.parametrize("exc", [Boom, KeyboardInterrupt])
def test_atomic_write_leaves_nothing_on_error(tmp_path, exc):
    target = tmp_path / "out.bin"
    with pytest.raises(exc):
        with aio.atomic_write(target) as f:
            f.write(b"partial")
            raise exc()
    assert os.listdir(tmp_path) == []
    target.write_bytes(b"old complete")
    with pytest.raises(exc):
        with aio.atomic_write(target) as f:
            f.write(b"new partial")
            raise exc()
    assert target.read_bytes() == b"old complete" and os.listdir(tmp_path) == ["out.bin"]


def test_atomic_write_success_and_cleanup(tmp_path):
    aio.atomic_write_bytes(tmp_path / "sub" / "x.bin", b"abc")
    assert (tmp_path / "sub" / "x.bin").read_bytes() == b"abc"
    mode = (tmp_path / "sub" / "x.bin").stat().st_mode & 0o777
    assert mode == 0o666 & ~aio._UMASK  # normal permissions, not mkstemp's 0600
    dead = tmp_path / "sub" / f"{aio.TMP_PREFIX}{aio._HOST}-999999999-x.abc.bin"  # its process is gone
    dead.write_bytes(b"junk")
    mine = tmp_path / "sub" / f"{aio.TMP_PREFIX}{aio._HOST}-{os.getpid()}-y.abc.bin"  # a write in flight
    mine.write_bytes(b"in flight")
    other = tmp_path / "sub" / f"{aio.TMP_PREFIX}otherhost-12-z.abc.bin"  # another host: only when stale
    other.write_bytes(b"remote")
    assert aio.cleanup_temp_files(tmp_path) == 1 and not dead.exists() and mine.exists() and other.exists()
    os.utime(other, (1, 1))
    assert aio.cleanup_temp_files(tmp_path) == 1 and not other.exists() and mine.exists()


def test_write_audio_roundtrip(tmp_path):
    x = _tone(24000, 0.3, channels=3)
    aio.write_audio(tmp_path / "y.flac", x, 24000)
    y, sr = aio.read_audio(tmp_path / "y.flac")
    assert sr == 24000 and y.shape == x.shape
    np.testing.assert_allclose(y, x, atol=1e-4)
