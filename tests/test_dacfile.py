""".dac files: original layout both ways, restricted unpickling, dataset (npy) format."""

import importlib.util
import io
import os
import sys
import types

import numpy as np
import pytest

from dac_fast.dacfile import DacFile, DacFileError, UnsafeDacFileError, load_any, read_npy_object


def _example(channels=2, n_cb=9, frames=13, seed=0):
    rng = np.random.default_rng(seed)
    return DacFile(codes=rng.integers(0, 1024, (channels, n_cb, frames)), input_db=np.array([-21.25], np.float32),
                   original_length=frames * 512 - 77, sample_rate=48000, chunk_length=frames, channels=channels)


def _original_artifacts(codes, input_db=-19.5, original_length=12345, sample_rate=44100, chunk_length=None,
                        channels=None, padding=True):
    """The dict the original DACFile.save pickles: uint16 codes (channels, n_codebooks, frames) and metadata."""
    codes = np.asarray(codes)
    return {
        "codes": codes.astype(np.uint16),
        "metadata": {
            "input_db": np.array([input_db], dtype=np.float32),
            "original_length": original_length,
            "sample_rate": sample_rate,
            "chunk_length": chunk_length if chunk_length is not None else codes.shape[-1],
            "channels": channels if channels is not None else codes.shape[0],
            "padding": padding,
            "dac_version": "1.0.0",
        },
    }


def test_save_layout_matches_original_and_np_load_reads_it(tmp_path):
    f = _example()
    p = f.save(tmp_path / "x.wav")  # suffix forced to .dac like the original
    assert p.name == "x.dac"
    art = np.load(p, allow_pickle=True)[()]
    assert set(art) == {"codes", "metadata"}
    assert art["codes"].dtype == np.uint16 and art["codes"].shape == (2, 9, 13)
    np.testing.assert_array_equal(art["codes"], f.codes)
    m = art["metadata"]
    assert list(m) == ["input_db", "original_length", "sample_rate", "chunk_length", "channels", "padding", "dac_version"]
    assert m["input_db"].dtype == np.float32 and m["dac_version"] == "1.0.0" and m["padding"] is True
    assert m["chunk_length"] == 13 and m["sample_rate"] == 48000 and m["original_length"] == 13 * 512 - 77
    assert all(type(m[k]) is int for k in ("original_length", "sample_rate", "chunk_length", "channels"))


def test_load_reads_plain_np_save_of_original_dict(tmp_path):
    codes = np.random.default_rng(1).integers(0, 1024, (1, 12, 40))
    p = tmp_path / "orig.dac"
    with open(p, "wb") as fh:
        np.save(fh, _original_artifacts(codes, chunk_length=10, padding=False))
    f = DacFile.load(p)
    np.testing.assert_array_equal(f.codes, codes)
    assert f.chunk_length == 10 and f.padding is False and f.sample_rate == 44100 and f.channels == 1
    assert f.input_db.dtype == np.float32 and f.input_db[0] == np.float32(-19.5)


def test_roundtrip(tmp_path):
    f = _example(channels=3, n_cb=32, frames=1)
    g = DacFile.load(f.save(tmp_path / "r.dac"))
    np.testing.assert_array_equal(g.codes, f.codes)
    assert (g.original_length, g.sample_rate, g.chunk_length, g.channels, g.padding) == \
        (f.original_length, f.sample_rate, f.chunk_length, f.channels, True)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvalEvil:
    def __reduce__(self):
        return (eval, ("__import__('os').getpid()",))


@pytest.mark.parametrize("where", ["codes", "metadata", "top"])
def test_malicious_pickle_rejected_without_running(tmp_path, where):
    marker = tmp_path / "pwned"
    art = _original_artifacts(np.zeros((1, 2, 3)))
    if where == "codes":
        art["codes"] = _Evil(marker)
    elif where == "metadata":
        art["metadata"]["input_db"] = _Evil(marker)
    else:
        art = _Evil(marker)
    p = tmp_path / "evil.dac"
    with open(p, "wb") as fh:
        np.save(fh, np.array(art, dtype=object) if where == "top" else art, allow_pickle=True)
    with pytest.raises(UnsafeDacFileError, match="refusing"):
        DacFile.load(p)
    assert not marker.exists()


def test_malicious_eval_and_raw_pickle_payloads(tmp_path):
    # hand-built .npy header + a pickle calling builtins.eval
    for obj in (_EvalEvil(), {"codes": _EvalEvil()}):
        buf = io.BytesIO()
        np.save(buf, np.array(obj, dtype=object) if not isinstance(obj, dict) else obj, allow_pickle=True)
        with pytest.raises(UnsafeDacFileError):
            read_npy_object(buf.getvalue())
    # subprocess via a protocol-0 GLOBAL opcode
    payload = b"csubprocess\ncheck_output\n(S'true'\ntR."
    header = b"{'descr': '|O', 'fortran_order': False, 'shape': (), }"
    header += b" " * (64 - 10 - len(header) - 1) + b"\n"
    raw = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + payload
    with pytest.raises(UnsafeDacFileError, match="subprocess"):
        read_npy_object(raw)


def test_malformed_files(tmp_path):
    f = _example()
    good = f.save(tmp_path / "g.dac").read_bytes()
    cases = {
        "empty.dac": b"",
        "garbage.dac": b"hello world, not numpy",
        "truncated.dac": good[: len(good) // 2],
        "header_only.dac": good[:40],
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DacFileError) as ei:
            DacFile.load(tmp_path / name)
        assert name in str(ei.value)
    # numeric .npy (no pickle) is not a .dac
    np.save(tmp_path / "num.npy", np.zeros(3))
    with pytest.raises(DacFileError, match="not a pickled-object"):
        DacFile.load(tmp_path / "num.npy")
    # wrong version
    art = _original_artifacts(np.zeros((1, 2, 3)))
    art["metadata"]["dac_version"] = "0.9"
    with open(tmp_path / "v.dac", "wb") as fh:
        np.save(fh, art)
    with pytest.raises(DacFileError, match="dac_version"):
        DacFile.load(tmp_path / "v.dac")


def test_npy_dataset_format(tmp_path):
    f = _example()
    f.extra = {"source": "a.wav"}
    codes_path, json_path = f.save_npy(tmp_path / "a")
    assert codes_path.name == "a.codes.npy" and json_path.name == "a.json"
    arr = np.load(codes_path, allow_pickle=False)
    assert arr.dtype == np.uint16 and arr.shape == (2, 9, 13)
    for p in (json_path, codes_path):
        g = load_any(p)
        np.testing.assert_array_equal(g.codes, f.codes)
        assert g.sample_rate == 48000 and g.extra["source"] == "a.wav"


# ------------------------------------------------------------------ against the original package
def _original_dacfile_class(monkeypatch):
    """Load descript-audio-codec's DACFile from dac/model/base.py without importing `dac`
    (whose import pulls audiotools -> torchaudio, which does not install here)."""
    spec = importlib.util.find_spec("dac")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("descript-audio-codec not installed (pip install --no-deps descript-audio-codec==1.0.0)")
    base = os.path.join(list(spec.submodule_search_locations)[0], "model", "base.py")
    if not os.path.exists(base):
        pytest.skip("descript-audio-codec layout unexpected")
    torch = pytest.importorskip("torch")
    pytest.importorskip("tqdm")
    stub = types.ModuleType("audiotools")
    stub.AudioSignal = type("AudioSignal", (), {})  # only used in type hints of compress/decompress
    monkeypatch.setitem(sys.modules, "audiotools", stub)
    mspec = importlib.util.spec_from_file_location("_original_dac_base", base)
    mod = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(mod)
    return mod.DACFile, torch


def test_original_dacfile_reads_ours(tmp_path, monkeypatch):
    DACFile, torch = _original_dacfile_class(monkeypatch)
    f = _example(channels=2, n_cb=12, frames=21)
    p = f.save(tmp_path / "ours.dac")
    o = DACFile.load(p)
    assert torch.equal(o.codes, torch.from_numpy(f.codes.astype(np.int64)))
    assert (o.chunk_length, o.original_length, o.channels, o.sample_rate, o.padding, o.dac_version) == \
        (21, f.original_length, 2, 48000, True, "1.0.0")
    np.testing.assert_array_equal(np.asarray(o.input_db), f.input_db)


def test_we_read_original_dacfile(tmp_path, monkeypatch):
    DACFile, torch = _original_dacfile_class(monkeypatch)
    codes = torch.randint(0, 1024, (1, 9, 30))
    o = DACFile(codes=codes, chunk_length=10, original_length=15000, input_db=torch.tensor([-30.5]),
                channels=1, sample_rate=44100, padding=False, dac_version="1.0.0")
    p = o.save(tmp_path / "theirs")
    f = DacFile.load(p)
    np.testing.assert_array_equal(f.codes, codes.numpy())
    assert (f.chunk_length, f.original_length, f.channels, f.sample_rate, f.padding) == (10, 15000, 1, 44100, False)
    assert f.input_db[0] == np.float32(-30.5)
