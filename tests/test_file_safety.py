"""The file tools never destroy a user's file (issue 21): outputs never replace files the tools did not write,
globs and file lists keep trees, collisions are refused with the real reason, user-caused failures are one-line
messages (also as a non-root user), a full disk stops the run cleanly, codes of every integer dtype decode, and
a fault-injection run (bad files, collisions, foreign and read-only files, SIGINT at random points) leaves every
input untouched and every output complete and correct, or absent.

A tiny DAC (hop 16, 3 codebooks) with seeded random weights keeps every run short; transformers' DacModel with
the same weights is the reference.
"""

import contextlib
import errno
import hashlib
import json
import math
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest

sf = pytest.importorskip("soundfile")
pytest.importorskip("soxr")
pytest.importorskip("pyloudnorm")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from dac_fast import DacConfig, DacModel  # noqa: E402
from dac_fast import dacfile  # noqa: E402
from dac_fast import io as aio  # noqa: E402
from dac_fast.batch import UserError, decode_files, encode_files  # noqa: E402
from dac_fast.planning import AUDIO_EXTENSIONS, expand_inputs, output_collisions  # noqa: E402
from dac_fast.cli import main  # noqa: E402
from dac_fast.dacfile import DacFile, DacFileError, load_any  # noqa: E402
from dac_fast.loading import randomize_  # noqa: E402
from tests.reference import hf_config, synth_audio  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY = dict(encoder_hidden_size=8, downsampling_ratios=[2, 2, 4], decoder_hidden_size=32, n_codebooks=3,
            codebook_dim=4, sampling_rate=16000)


@pytest.fixture(scope="module")
def pair():
    """(transformers reference, dac_fast model) with the same seeded random weights."""
    torch.set_num_threads(2)
    hf = transformers.DacModel(hf_config(DacConfig(**TINY)))
    randomize_(hf, 5)
    hf.eval()
    return hf, DacModel.from_transformers(hf).eval()


@pytest.fixture(scope="module")
def ckpt(pair, tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    pair[1].save_pretrained(d)
    return d


def _wav(path: Path, seconds: float, seed: int, sr: int = 16000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, synth_audio(int(sr * seconds), sr, seed), sr)
    return path


def _reference_codes(hf, path: Path) -> np.ndarray:
    """transformers' codes of one file, preprocessed as encode_files does (resample, loudness, pad to the hop)."""
    audio, sr = aio.read_audio(path)
    x, _ = aio.prepare_for_encoding(audio, sr, hf.config.sampling_rate, -16.0)
    hop = int(np.prod(hf.config.downsampling_ratios))
    x = np.pad(x, ((0, 0), (0, math.ceil(x.shape[-1] / hop) * hop - x.shape[-1])))
    with torch.no_grad():
        return hf.encode(torch.from_numpy(x)[:, None]).audio_codes.numpy()


def _digests(root: Path) -> dict:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def _cli(capsys, *argv) -> tuple[int, str]:
    rc = main([*map(str, argv), "--no-progress"])
    return rc, capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# issue case 1: an output never replaces a file the tools did not write
# ----------------------------------------------------------------------------------------------
def test_decode_into_the_input_folder_keeps_the_users_audio(tmp_path, ckpt, capsys):
    corpus = tmp_path / "corpus3"
    for i, name in enumerate(("en_speech", "de_speech", "music")):
        _wav(corpus / f"{name}.wav", 0.11 + 0.037 * i, seed=i)
    rc, err = _cli(capsys, "encode", corpus, "-o", corpus, "--model", ckpt)
    assert rc == 0, err  # codes beside the audio: fine
    originals = {n: (corpus / f"{n}.wav").read_bytes() for n in ("en_speech", "de_speech", "music")}
    rc, err = _cli(capsys, "decode", corpus, "-o", corpus, "--model", ckpt)
    assert rc == 1 and "Traceback" not in err
    for name, raw in originals.items():
        assert (corpus / f"{name}.wav").read_bytes() == raw
        assert f"{corpus / name}.wav exists and dac-fast did not write it" in err
    assert err.count("use --overwrite") == 3 and "3 failed" in err
    # the user says so: replaced
    rc, err = _cli(capsys, "decode", corpus, "-o", corpus, "--model", ckpt, "--overwrite")
    assert rc == 0, err
    assert all((corpus / f"{n}.wav").read_bytes() != raw for n, raw in originals.items())


def test_a_foreign_file_at_an_output_path_is_a_per_file_error(tmp_path, pair):
    """A user's own .dac (e.g. from the original package) and a user's npy codes are never replaced."""
    hf, model = pair
    src = tmp_path / "in"
    for i in range(3):
        _wav(src / f"c{i}.wav", 0.07 + 0.03 * i, seed=10 + i)
    out = tmp_path / "out"
    out.mkdir()
    theirs = DacFile(codes=np.ones((1, 3, 4), np.uint16), input_db=[-20.0], original_length=64, sample_rate=16000,
                     chunk_length=4, channels=1)
    theirs.save(out / "c0.dac")
    before = (out / "c0.dac").read_bytes()
    rep = encode_files([src], out, model, progress=False)
    assert [os.path.basename(f.path) for f in rep.failures] == ["c0.wav"] and not rep.ok
    assert "did not write it" in rep.failures[0].reason and "overwrite" in rep.failures[0].reason
    assert (out / "c0.dac").read_bytes() == before and len(rep.done) == 2
    for i in (1, 2):
        np.testing.assert_array_equal(DacFile.load(out / f"c{i}.dac").codes, _reference_codes(hf, src / f"c{i}.wav"))
    # npy format: a foreign NAME.codes.npy alone (no NAME.json) is protected too
    npy = tmp_path / "npy"
    npy.mkdir()
    np.save(npy / "c1.codes.npy", np.zeros((1, 3, 2), np.uint16))
    before = (npy / "c1.codes.npy").read_bytes()
    rep = encode_files([src], npy, model, format="npy", progress=False)
    assert [os.path.basename(f.path) for f in rep.failures] == ["c1.wav"]
    assert (npy / "c1.codes.npy").read_bytes() == before
    # a recorded output changed since it was written (here: replaced by the user's file of another size)
    (out / "c2.dac").write_bytes(before)
    rep = encode_files([src], out, model, progress=False)
    assert sorted(os.path.basename(f.path) for f in rep.failures) == ["c0.wav", "c2.wav"]
    assert (out / "c2.dac").read_bytes() == before and rep.skipped == [(str(src / "c1.wav"), str(out / "c1.dac"))]


def test_an_output_that_is_an_input_is_refused_whatever_the_flags(tmp_path, pair):
    out = tmp_path / "out"
    out.mkdir()
    for link in (os.symlink, os.link):  # out/a.dac is the input itself: a symbolic, then a hard link to it
        src = _wav(tmp_path / "in" / "a.wav", 0.1, seed=1)
        raw = src.read_bytes()
        link(src, out / "a.dac")
        for overwrite in (False, True):
            with pytest.raises(UserError, match=r"the output of .*a\.wav would be .*a\.dac, which is the input "
                                                r".*a\.wav; nothing was done") as ei:
                encode_files([src], out, pair[1], overwrite=overwrite, progress=False)
            assert ei.value.argument == "output_dir"
        assert src.read_bytes() == raw and os.path.samefile(out / "a.dac", src)
        (out / "a.dac").unlink()


# ----------------------------------------------------------------------------------------------
# issue case 2: globs and file lists keep trees; collisions name the real reason
# ----------------------------------------------------------------------------------------------
def test_globs_and_file_lists_mirror_the_tree(tmp_path, pair, monkeypatch):
    hf, model = pair
    monkeypatch.chdir(tmp_path)
    for i, rel in enumerate(("corpus4/a/clip.wav", "corpus4/b/clip.wav", "corpus4/b/deep/x.wav", "corpus/sub/fr.wav")):
        _wav(Path(rel), 0.05 + 0.013 * i, seed=20 + i)
    rels = lambda inputs: sorted(str(r) for _, r in expand_inputs(inputs, AUDIO_EXTENSIONS)[0])  # noqa: E731
    assert rels(["corpus4/**/*.wav"]) == ["a/clip.wav", "b/clip.wav", "b/deep/x.wav"]
    assert rels(["corpus4/*/clip.wav"]) == ["a/clip.wav", "b/clip.wav"]
    assert rels(["corpus/**/*.wav"]) == ["sub/fr.wav"]  # below the pattern's folder, as `corpus/` gives
    assert rels(["corpus/"]) == rels([str(tmp_path / "corpus" / "**" / "*.wav")]) == ["sub/fr.wav"]
    assert rels(["corpus4/a/clip.wav", "corpus4/b/clip.wav"]) == ["a/clip.wav", "b/clip.wav"]
    assert rels(["corpus4/b/deep/x.wav"]) == ["x.wav"]  # one file: its own folder
    rep = encode_files(["corpus4/**/*.wav"], "codes4", model, progress=False)
    assert rep.ok and len(rep.done) == 3, rep.summary()
    for rel in ("a/clip", "b/clip", "b/deep/x"):
        got = DacFile.load(Path("codes4") / f"{rel}.dac").codes
        np.testing.assert_array_equal(got, _reference_codes(hf, Path("corpus4") / f"{rel}.wav"))


def test_inputs_sharing_an_output_are_refused_with_the_reason(tmp_path, pair):
    a, b = _wav(tmp_path / "a" / "clip.wav", 0.05, seed=1), _wav(tmp_path / "b" / "clip.wav", 0.06, seed=2)
    ogg = tmp_path / "m" / "music.ogg"
    ogg.parent.mkdir()
    sf.write(ogg, synth_audio(1200, 16000, 3), 16000)
    flac = tmp_path / "m" / "music.flac"
    sf.write(flac, synth_audio(1300, 16000, 4), 16000)
    solo = _wav(tmp_path / "m" / "solo.wav", 0.05, seed=5)
    out = tmp_path / "out"
    rep = encode_files([tmp_path / "a", tmp_path / "b", tmp_path / "m"], out, pair[1], progress=False)
    why = {f.path: f.reason for f in rep.failures}
    assert set(why) == {str(a), str(b), str(ogg), str(flac)}
    for p in (a, b):
        assert "one relative path under different input folders" in why[str(p)] and str(a) in why[str(p)] and str(b) in why[str(p)]
    for p in (ogg, flac):
        assert "different extensions of one stem" in why[str(p)] and str(ogg) in why[str(p)] and str(flac) in why[str(p)]
    assert [p.name for p in out.rglob("*.dac")] == ["solo.dac"] and rep.done == [(str(solo), str(out / "solo.dac"))]
    kept, failures = output_collisions([("x.wav", "o/x.dac"), ("y.wav", "o/y.dac")])
    assert kept == [("x.wav", "o/x.dac"), ("y.wav", "o/y.dac")] and not failures


# ----------------------------------------------------------------------------------------------
# issue cases 3 and 4: user-caused failures are one line, as a non-root user too
# ----------------------------------------------------------------------------------------------
_AS_NOBODY = r"""
import contextlib, io, json, sys
sys.path.insert(0, sys.argv[1])
from dac_fast.cli import main
work, results = sys.argv[2], {}
def run(name, *argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(list(argv) + ["--no-progress"])
    results[name] = [rc, err.getvalue()]
run("model", "encode", work + "/in", "-o", work + "/o1", "--model", work + "/ckpt_private")
run("no_weights", "encode", work + "/in", "-o", work + "/o2", "--model", work + "/ckpt_empty")
run("audio", "encode", work + "/in", "-o", work + "/o3", "--model", work + "/ckpt")
run("codes", "decode", work + "/codes", "-o", work + "/o4", "--model", work + "/ckpt")
print(json.dumps(results))
"""


def _nobody_runner():
    """The argv prefix that runs a command as user nobody, or None (not root, or no setpriv)."""
    if os.geteuid() != 0:
        return ["env"]  # already unprivileged: permissions apply as they are
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    return [setpriv, "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


def test_unreadable_files_are_one_line_errors_as_a_non_root_user(ckpt, pair):
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((ckpt / "model.safetensors").stat().st_mode) == 0o666 & ~umask  # safetensors' 0600 undone
    prefix = _nobody_runner()
    if prefix is None:
        pytest.skip("running as root without setpriv: cannot drop privileges to test permissions")
    work = Path(tempfile.mkdtemp(prefix="dacfast-nobody-"))
    try:
        shutil.copytree(ckpt, work / "ckpt")
        shutil.copytree(ckpt, work / "ckpt_private")
        (work / "ckpt_empty").mkdir()
        shutil.copy(ckpt / "config.json", work / "ckpt_empty")
        _wav(work / "in" / "ok.wav", 0.06, seed=1)
        _wav(work / "in" / "secret.wav", 0.06, seed=2)
        assert encode_files([work / "in" / "ok.wav"], work / "codes", pair[1], progress=False).ok
        shutil.copy(work / "codes" / "ok.dac", work / "codes" / "secret.dac")
        secrets = {work / "ckpt_private" / "model.safetensors", work / "in" / "secret.wav", work / "codes" / "secret.dac"}
        for p in [work, *work.rglob("*")]:
            p.chmod(0o600 if p in secrets else 0o777 if p.is_dir() else 0o666)
        env = dict(os.environ, OMP_NUM_THREADS="1", HOME=str(work))
        r = subprocess.run([*prefix, sys.executable, "-c", _AS_NOBODY, str(REPO), str(work)], capture_output=True,
                           text=True, env=env, cwd=str(work), timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        res = json.loads(r.stdout.strip().splitlines()[-1])
        for name, (rc, err) in res.items():
            assert "Traceback" not in err, (name, err)
        rc, err = res["model"]
        assert rc == 2 and err.strip() == (f"dac-fast encode: --model: cannot read "
                                           f"{work / 'ckpt_private' / 'model.safetensors'}: permission denied")
        rc, err = res["no_weights"]
        assert rc == 2 and "holds no model weights (model.safetensors or pytorch_model.bin)" in err
        rc, err = res["audio"]
        assert rc == 1 and f"{work / 'in' / 'secret.wav'}: permission denied" in err and "1 written" in err
        rc, err = res["codes"]
        assert rc == 1 and f"{work / 'codes' / 'secret.dac'}: permission denied" in err and "1 written" in err
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_missing_and_directory_inputs_say_so(tmp_path):
    (tmp_path / "d.wav").mkdir()
    for path, reason in ((tmp_path / "gone.wav", "no such file"), (tmp_path / "d.wav", "is a directory")):
        with pytest.raises(aio.AudioError) as ei:
            aio.read_audio(path)
        assert ei.value.reason == reason and str(ei.value) == f"{path}: {reason}"
    with pytest.raises(DacFileError, match=r"gone\.dac: no such file$"):
        DacFile.load(tmp_path / "gone.dac")
    codes_file, meta = DacFile(codes=np.zeros((1, 3, 2), np.uint16), input_db=[-20.0], original_length=32,
                               sample_rate=16000, chunk_length=2, channels=1).save_npy(tmp_path / "pair")
    codes_file.unlink()
    with pytest.raises(DacFileError, match=r"pair\.json: its codes file pair\.codes\.npy: no such file$"):
        load_any(meta)


# ----------------------------------------------------------------------------------------------
# a full disk: the partial output is removed, the run stops with the reason
# ----------------------------------------------------------------------------------------------
def test_full_disk_removes_the_partial_output_and_stops(tmp_path, pair, monkeypatch):
    hf, model = pair
    src = tmp_path / "in"
    n = 6
    for i in range(n):
        _wav(src / f"f{i}.wav", 0.05 + 0.011 * i, seed=40 + i)
    out = tmp_path / "out"
    real_atomic_write, writes = dacfile.atomic_write, []

    @contextlib.contextmanager
    def filling_up(path, mode="wb"):
        with real_atomic_write(path, mode) as f:
            writes.append(path)
            if len(writes) != 3:
                yield f
                return

            class Full:  # the disk fills up halfway through the third file
                def write(self, data):
                    f.write(data[: len(data) // 2])
                    f.flush()
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            yield Full()

    monkeypatch.setattr(dacfile, "atomic_write", filling_up)
    rep = encode_files([src], out, model, batch_size=1, workers=1, progress=False)
    assert not rep.ok and rep.stopped == f"no space left on device writing {writes[2]}"
    assert [f.reason for f in rep.failures] == [f"write failed: no space left on device ({writes[2]}); no partial output left"]
    assert len(rep.done) < n - 1 and "stopped early: no space left on device" in rep.summary()
    assert not [p for p in out.iterdir() if p.name.startswith(aio.TMP_PREFIX)] and not writes[2].exists()
    monkeypatch.setattr(dacfile, "atomic_write", real_atomic_write)
    rep = encode_files([src], out, model, progress=False)  # space again: the re-run finishes the job
    assert rep.ok and len(rep.done) + len(rep.skipped) == n, rep.summary()
    for i in range(n):
        np.testing.assert_array_equal(DacFile.load(out / f"f{i}.dac").codes, _reference_codes(hf, src / f"f{i}.wav"))


# ----------------------------------------------------------------------------------------------
# issue case 5: codes in every integer dtype that holds them
# ----------------------------------------------------------------------------------------------
def test_codes_of_every_integer_dtype_decode_like_int64(pair, tmp_path):
    hf, model = pair
    rng = np.random.default_rng(7)
    codes = rng.integers(0, 1024, (2, 3, 13))
    with torch.no_grad():
        expected = hf.decode(audio_codes=torch.from_numpy(codes)).audio_values
    wide = model.decode(audio_codes=torch.from_numpy(codes)).audio_values
    torch.testing.assert_close(wide, expected, rtol=1e-4, atol=1e-5)
    small = torch.from_numpy(rng.integers(0, 256, (1, 3, 9)))
    for dtype in (torch.uint8, torch.int16, torch.uint16, torch.int32, torch.int64):
        c = (small if dtype == torch.uint8 else torch.from_numpy(codes)).to(dtype)
        ref = model.decode(audio_codes=c.long()).audio_values
        assert torch.equal(model.decode(audio_codes=c).audio_values, ref), dtype
        stream = model.streaming_decoder(batch_size=c.shape[0])
        streamed = torch.cat([stream.push(c[..., :5]), stream.push(c[..., 5:]), stream.flush()], -1)
        stream = model.streaming_decoder(batch_size=c.shape[0])
        wide_stream = torch.cat([stream.push(c[..., :5].long()), stream.push(c[..., 5:].long()), stream.flush()], -1)
        assert torch.equal(streamed, wide_stream), dtype
    negative = torch.from_numpy(codes).to(torch.int16)
    negative[0, 0, 0] = -1
    for bad, match in ((negative, r"\[0, 1024\), got values in \[-1, "),
                       (torch.full((1, 3, 4), 1024, dtype=torch.int16), r"got values in \[1024, 1024\]")):
        with pytest.raises(ValueError, match=match):
            model.decode(audio_codes=bad)
        with pytest.raises(ValueError, match=match):
            model.streaming_decoder(batch_size=bad.shape[0]).push(bad)
    for dtype in (torch.float32, torch.bool):
        with pytest.raises(TypeError, match=f"audio_codes must be an integer tensor, got dtype {dtype}"):
            model.decode(audio_codes=torch.zeros(1, 3, 4, dtype=dtype))
        with pytest.raises(TypeError, match=f"got dtype {dtype}"):
            model.streaming_decoder().push(torch.zeros(1, 3, 4, dtype=dtype))
    # the file tools: .dac / npy codes of any integer dtype; floats and bools refused by name
    meta = dict(input_db=[-18.0], original_length=13 * 16, sample_rate=16000, chunk_length=13, channels=2)
    for dtype in (np.uint8, np.int16, np.int32, np.int64):
        c = (codes.clip(0, 255) if dtype == np.uint8 else codes).astype(dtype)
        codes_file, _ = DacFile(codes=c, **meta).save_npy(tmp_path / "codes" / np.dtype(dtype).name)
        np.save(codes_file, c)  # as a user's own tool may store them
        assert load_any(codes_file).codes.dtype == np.uint16
    rep = decode_files([tmp_path / "codes"], tmp_path / "wav", model, progress=False)
    assert rep.ok and len(rep.done) == 4, rep.summary()
    for dtype in (np.float32, np.bool_):
        with pytest.raises(DacFileError, match=f"codes must be integers, got dtype {np.dtype(dtype)}"):
            DacFile(codes=codes.astype(dtype), **meta)


# ----------------------------------------------------------------------------------------------
# fault injection over the whole file pipeline
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _sigint_after(seconds: float | None):
    """SIGINT to this process after ``seconds`` while the block runs; a KeyboardInterrupt only inside it."""
    armed = [True]

    def handler(signum, frame):
        if armed[0]:
            armed[0] = False
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handler)
    timer = threading.Timer(seconds or 0.0, os.kill, (os.getpid(), signal.SIGINT))
    if seconds is not None:  # None: the block sends it itself
        timer.start()
    try:
        try:
            yield
        finally:
            armed[0] = False
    finally:
        timer.cancel()
        if timer.is_alive():
            timer.join()
        signal.signal(signal.SIGINT, previous)


class _SigintOnCall:
    """A model that sends this process SIGINT during its ``call``-th encode (the rest delegates to ``model``)."""

    def __init__(self, model, call: int):
        self.model, self.call = model, call

    def encode(self, *args, **kwargs):
        self.call -= 1
        if self.call == 0:
            os.kill(os.getpid(), signal.SIGINT)
        return self.model.encode(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)


@contextlib.contextmanager
def _sigint_on_call(model, call: int):
    with _sigint_after(None):
        yield _SigintOnCall(model, call)


def test_fault_injection_never_destroys_and_reports_every_problem(tmp_path, pair):
    hf, model = pair
    rng = np.random.default_rng(2026)
    src, out = tmp_path / "in", tmp_path / "out"
    good = [_wav(src / ("" if i == 0 else rng.choice(["", "a", "a/b"])) / f"g{i}.wav", float(rng.uniform(0.04, 0.12)),
                 seed=60 + i) for i in range(7)]
    bad = {src / "empty.wav": "empty file (0 bytes)", src / "a" / "garbage.wav": "unreadable audio"}
    (src / "empty.wav").write_bytes(b"")
    (src / "a" / "garbage.wav").write_bytes(rng.bytes(300))
    twin = [_wav(src / "a" / "twin.wav", 0.05, seed=90), src / "a" / "twin.flac"]
    sf.write(twin[1], synth_audio(900, 16000, 91), 16000)
    # an earlier complete run of one file, its output then made read-only: still trusted, skipped
    assert encode_files([good[0]], out, model, progress=False).ok
    first = out / "g0.dac"
    first.chmod(0o444)
    foreign = out / os.path.relpath(good[1], src).replace(".wav", ".dac")  # the user's file at an output path
    foreign.parent.mkdir(parents=True, exist_ok=True)
    foreign.write_bytes(b"not yours " * 7)
    foreign.chmod(0o444)
    inputs_before, foreign_before = _digests(src), foreign.read_bytes()
    expected_problems = {str(p) for p in [*bad, *twin, good[1]]}

    # SIGINT at a random model call (always lands), then at a random time (lands when the run is still going)
    with pytest.raises(KeyboardInterrupt), _sigint_on_call(model, int(rng.integers(1, 4))) as interrupting:
        encode_files([src], out, interrupting, batch_size=2, workers=2, progress=False)
    assert not [p for p in out.rglob(aio.TMP_PREFIX + "*")]  # no partial file left
    with contextlib.suppress(KeyboardInterrupt), _sigint_after(float(rng.uniform(0.02, 0.5))):
        encode_files([src], out, model, batch_size=2, workers=2, progress=False)
    assert not [p for p in out.rglob(aio.TMP_PREFIX + "*")]
    rep = encode_files([src], out, model, batch_size=2, workers=2, progress=False)

    assert _digests(src) == inputs_before and foreign.read_bytes() == foreign_before
    assert {f.path for f in rep.failures} == expected_problems, rep.summary()
    assert not rep.ok and len(rep.done) + len(rep.skipped) == len(good) - 1
    assert (str(good[0]), str(first)) in rep.skipped
    for p, reason in bad.items():
        assert reason in {f.path: f.reason for f in rep.failures}[str(p)]
    written = {p for p in out.rglob("*.dac") if not p.name.startswith(aio.TMP_PREFIX)}
    assert written == {out / os.path.relpath(g, src).replace(".wav", ".dac") for g in good}
    for g in good[:1] + good[2:]:
        np.testing.assert_array_equal(DacFile.load(out / os.path.relpath(g, src).replace(".wav", ".dac")).codes,
                                      _reference_codes(hf, g))
    assert not [p for p in out.rglob(aio.TMP_PREFIX + "*")]


def test_a_claim_vouches_only_for_files_written_after_it(tmp_path):
    """A run killed between an output's rename and its record left a claim: that file is redone; a file older
    than the claim (there before the run started writing) is still not ours."""
    from dac_fast.resume import RECORD_FILE, OutputLog

    setup = {"task": "encode", "model": {"preset": "16khz", "seed": 0}}
    src = _wav(tmp_path / "a.wav", 0.02, seed=1)
    old = tmp_path / "old.dac"
    old.write_bytes(b"theirs")
    os.utime(old, ns=(1, 10**9))  # 1970: long before any claim
    new = tmp_path / "new.dac"
    log = OutputLog(tmp_path, setup)
    for out in (new, old):
        log.claim(out)
    new.write_bytes(b"ours, not recorded yet")
    # killed here: neither a record nor close()
    after_kill = OutputLog(tmp_path, setup)
    assert after_kill.verdict(src, new, lambda *a: None, [new])[0] == "redo"
    verdict, why = after_kill.verdict(src, old, lambda *a: None, [old])
    assert verdict == "not ours" and f"nothing in {RECORD_FILE} records it" in why
    log.close()  # a run that ends withdraws the claims it did not record: they vouch for nothing after it
    assert OutputLog(tmp_path, setup).verdict(src, new, lambda *a: None, [new])[0] == "not ours"
