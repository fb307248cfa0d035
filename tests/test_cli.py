"""dac-fast CLI: help, exit codes, failure listing, interrupted runs leave no partial files."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sf = pytest.importorskip("soundfile")
pytest.importorskip("soxr")
pytest.importorskip("pyloudnorm")
torch = pytest.importorskip("torch")

from dac_fast import io as aio  # noqa: E402
from dac_fast.cli import build_parser, main  # noqa: E402
from dac_fast.dacfile import DacFile  # noqa: E402
from dac_fast.resume import RECORD_FILE  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _clip(path, sr=16000, seconds=0.3, channels=1, seed=0):
    rng = np.random.default_rng(seed)
    x = (0.1 * rng.standard_normal((int(sr * seconds), channels))).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, x, sr)
    return path


@pytest.mark.parametrize("argv", [["--help"], ["encode", "--help"], ["decode", "--help"], ["info", "--help"]])
def test_help_exits_zero(argv, capsys):
    with pytest.raises(SystemExit) as ei:
        main(argv)
    assert ei.value.code == 0
    out = capsys.readouterr().out
    assert "dac-fast" in out
    if argv[0] == "encode":
        for opt in ("--model", "--device", "--batch-size", "--n-quantizers", "--dtype", "--workers", "--overwrite",
                    "--format", "RANDOM", "--random-weights", "--bucket"):
            assert opt in out


def test_decode_help_is_its_own(capsys):
    helps = {}
    for cmd in ("encode", "decode"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        helps[cmd] = capsys.readouterr().out
    dec = helps["decode"]
    assert "Decode .dac files" in dec and "--subtype" in dec and ".dac files (or npy-format" in dec
    assert "--bucket" not in dec and "dac-fast encode corpus/" not in dec and "reading and resampling" not in dec
    assert "--subtype" not in helps["encode"] and "dac-fast decode codes/" not in helps["encode"]


@pytest.mark.parametrize("argv", [[], ["encode"], ["encode", "x.wav"], ["frobnicate"], ["encode", "x", "-o", "o", "--dtype", "int8"],
                                  ["encode", "x", "-o", "o"], ["decode", "x", "-o", "o"]])
def test_usage_errors_exit_two(argv, capsys):
    with pytest.raises(SystemExit) as ei:
        main(argv)
    assert ei.value.code == 2


def test_encode_decode_info_exit_codes(tmp_path, capsys):
    src = tmp_path / "in"
    _clip(src / "good.wav")
    (src / "bad.wav").write_bytes(b"RIFF....WAVEjunk")
    run = ["--model", "16khz", "--random-weights", "--no-progress"]
    rc = main(["encode", str(src), "-o", str(tmp_path / "c"), *run, "--json"])
    cap = capsys.readouterr()
    assert rc == 1
    assert "RANDOM weights" in cap.err and f"{src / 'bad.wav'}: unreadable audio" in cap.err
    rep = json.loads(cap.out.strip().splitlines()[-1])
    assert rep["written"] == 1 and rep["failed"][0]["path"] == str(src / "bad.wav")
    rc = main(["decode", str(tmp_path / "c"), "-o", str(tmp_path / "d"), *run])
    assert rc == 0 and (tmp_path / "d" / "good.wav").exists()
    rc = main(["info", str(tmp_path / "c" / "good.dac"), "--json"])
    d = json.loads(capsys.readouterr().out)
    assert rc == 0 and d["sample_rate"] == 16000 and d["original_length"] == 4800 and d["n_codebooks"] == 12
    (tmp_path / "evil.dac").write_bytes(b"\x93NUMPY\x01\x00" + b"v\x00" + b"{'descr': '|O', 'fortran_order': False, 'shape': (), }".ljust(117) + b"\n" + b"cos\nsystem\n(S'true'\ntR.")
    rc = main(["info", str(tmp_path / "evil.dac")])
    assert rc == 1 and "refusing to unpickle global os.system" in capsys.readouterr().err


def _no_model(monkeypatch):
    import dac_fast.job_model as B

    def fail():
        raise AssertionError("the model must not be built")

    monkeypatch.setattr(B, "_dac_model_class", fail)


def test_user_errors_exit_two_without_traceback_before_the_model_loads(tmp_path, capsys, monkeypatch):
    src = tmp_path / "in"
    _clip(src / "a.wav")
    (tmp_path / "file").write_text("x")
    _no_model(monkeypatch)
    out = str(tmp_path / "o")
    cases = [
        (["--model", "16khz"], "pass --random-weights"),
        (["--model", "16khz", "--random-weights", "--n-quantizers", "99"], "--n-quantizers: must be an integer in [1, 12] (the model's codebooks), got 99"),
        (["--model", "16khz", "--random-weights", "--n-quantizers", "0"], "--n-quantizers: must be an integer >= 1, got 0"),
        (["--model", "16khz", "--random-weights", "--batch-size", "0"], "--batch-size: must be >= 1"),
        (["--model", str(tmp_path / "nope.pth")], "nope.pth does not exist"),
        (["--model", "no_such_model"], "presets with random weights: 16khz, 24khz, 44khz, 44khz_16kbps"),
        (["--model", "16khz", "--random-weights", "-o", str(tmp_path / "file")], "--output-dir: "),
        (["--model", "16khz", "--random-weights", "-o", str(tmp_path / "file" / "x")], "--output-dir: cannot write"),
        (["--model", "16khz", "--random-weights", "--device", "nonsense"], "--device: not a torch device"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--model", "16khz", "--random-weights", "--device", "cuda"], "--device: 'cuda' requested but CUDA is not available"))
    for extra, msg in cases:
        for cmd in ("encode", "decode"):
            rc = main([cmd, str(src), "-o", out, "--no-progress", *extra])
            err = capsys.readouterr().err
            assert rc == 2, (extra, err)
            assert msg in err and "Traceback" not in err, (extra, err)


def test_nothing_found_exits_nonzero(tmp_path, capsys, monkeypatch):
    _no_model(monkeypatch)
    (tmp_path / "empty").mkdir()
    _clip(tmp_path / "audio" / "a.wav")
    run = ["--model", "16khz", "--random-weights", "--no-progress", "-o", str(tmp_path / "o")]
    assert main(["encode", str(tmp_path / "empty"), *run]) == 1
    assert "no audio files found (it holds no files)" in capsys.readouterr().err
    assert main(["decode", str(tmp_path / "audio"), *run]) == 1
    assert "no .dac/.json files found (it holds 1 .wav)" in capsys.readouterr().err


def test_info_on_a_directory(tmp_path, capsys):
    # what encoding a 0.5 s 16 kHz mono file and a 0.3 s 44.1 kHz stereo file with 4 of the 16 kHz model's codebooks writes
    rng = np.random.default_rng(0)
    for name, sr, n, channels in (("a", 16000, 8000, 1), ("sub/b", 44100, 13230, 2)):
        frames = -(-(-(-n * 16000 // sr)) // 320)
        DacFile(codes=rng.integers(0, 1024, (channels, 4, frames)), input_db=[-20.0], original_length=n,
                sample_rate=sr, chunk_length=frames, channels=channels).save(tmp_path / "c" / f"{name}.dac")
    assert main(["info", str(tmp_path / "c"), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [Path(r["path"]).name for r in rows] == ["a.dac", "b.dac"]
    for r in rows:
        assert (r["model_sample_rate"], r["frame_rate"], r["bitrate_kbps"]) == (16000, 50.0, 2.0)
    assert rows[1]["sample_rate"] == 44100 and rows[1]["duration_seconds"] == pytest.approx(0.3)
    assert main(["info", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "(of the encoded audio, not the model's)" in out and "inferred from frames and duration" in out


def test_output_piped_into_a_closed_pipe_is_no_traceback(tmp_path):
    """`dac-fast info DIR | head -1`: the reader goes away; the CLI stops quietly as Unix tools do."""
    rng = np.random.default_rng(1)
    for i in range(300):
        DacFile(codes=rng.integers(0, 1024, (1, 2, 5)), input_db=[-20.0], original_length=1600, sample_rate=16000,
                chunk_length=5, channels=1).save(tmp_path / f"f{i:03d}.dac")
    proc = subprocess.Popen([sys.executable, "-m", "dac_fast.cli", "info", str(tmp_path)], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(REPO))
    proc.stdout.readline()
    proc.stdout.close()  # what `head -1` does after its line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) != 0 and "Traceback" not in err, err


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def _start(src, out):
    cmd = [sys.executable, "-m", "dac_fast.cli", "encode", str(src), "-o", str(out), "--model", "16khz",
           "--random-weights", "--batch-size", "1", "--workers", "1", "--no-progress"]
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(REPO))


def _final_outputs(out):
    """Finished .dac files (pathlib's glob also matches the hidden temporaries of writes in flight)."""
    return sorted(p for p in out.glob("*.dac") if not p.name.startswith(aio.TMP_PREFIX))


def _wait_for_outputs(proc, out, n, timeout=90):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if out.exists() and len(_final_outputs(out)) >= n:
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    return False


def _check_complete(out, n_inputs):
    finals = _final_outputs(out)
    for p in finals:
        f = DacFile.load(p)  # every output present is complete and valid
        assert f.codes.shape[1] == 12
    return finals


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_interrupted_run_leaves_no_partial_files(tmp_path, sig):
    src = tmp_path / "in"
    n = 14
    for i in range(n):
        _clip(src / f"f{i:02d}.wav", seconds=0.2 + 0.02 * i, seed=i)
    out = tmp_path / "out"
    proc = _start(src, out)
    try:
        started = _wait_for_outputs(proc, out, 2)
        if not started:
            proc.wait(5)
            pytest.fail(f"run ended early: rc={proc.returncode} {proc.stderr.read().decode()[-2000:]}")
        proc.send_signal(sig)
        rc = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read().decode()
    finals = _check_complete(out, n)
    if rc == 0:  # the machine was fast enough to finish before the signal landed
        assert len(finals) == n
        return
    temps = [p for p in out.iterdir() if p.name.startswith(aio.TMP_PREFIX)]
    others = [p for p in out.iterdir() if p.suffix != ".dac" and not p.name.startswith(aio.TMP_PREFIX)
              and p.name != RECORD_FILE]
    assert not others
    if sig == signal.SIGKILL:
        assert rc == -signal.SIGKILL
        # a SIGKILLed process cannot clean up: at most one hidden temporary (the write in flight)
        assert len(temps) <= 1
    else:
        assert rc == 130, err[-2000:]
        assert "interrupted" in err
        assert not temps, temps
    assert len(finals) < n or rc == 0
    # re-running the same command finishes the job, skipping what is done, removing temporaries
    proc = _start(src, out)
    rc2 = proc.wait(180)
    err2 = proc.stderr.read().decode()
    assert rc2 == 0, err2[-2000:]
    # a SIGKILL may land between an output's rename and its record: that output is redone, not trusted
    skipped = int(re.search(r"(\d+) skipped", err2).group(1))
    assert skipped == len(finals) or (sig == signal.SIGKILL and skipped == len(finals) - 1), err2
    assert len(_check_complete(out, n)) == n
    assert not [p for p in out.iterdir() if p.name.startswith(aio.TMP_PREFIX)]


def test_parser_defaults():
    a = build_parser().parse_args(["encode", "x", "-o", "y", "--model", "m"])
    assert (a.batch_size, a.workers, a.format, a.bucket, a.overwrite, a.random_weights) == (8, 2, "dac", "exact", False, False)
    a = build_parser().parse_args(["decode", "x", "-o", "y", "--model", "m", "--format", "flac"])
    assert (a.format, a.subtype) == ("flac", "pcm16")


def test_version_and_doctor(capsys):
    from dac_fast import __version__
    import dac_fast.ops as ops

    with pytest.raises(SystemExit) as ei:
        main(["--version"])
    assert ei.value.code == 0 and capsys.readouterr().out.strip() == f"dac-fast {__version__}"
    assert main(["doctor", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["torch"].startswith(torch.__version__) and d["dac_fast"].startswith(__version__)
    cpu = d["kernels cpu"]
    assert cpu.startswith("active") if "cpu" in ops._KERNEL_DEVICES else cpu.startswith("not active: ")
    if not torch.cuda.is_available():
        assert d["cuda device"].startswith("none")
        assert d["kernels cuda"].startswith("not active") or "no CUDA device is visible" in d["kernels cuda"]
    assert "DAC_FAST_JIT" in d["backend"] and ("M_MMAP_MAX" in d["allocator"] or "not tuned" in d["allocator"])
    assert main(["doctor"]) == 0 and "kernels cpu" in capsys.readouterr().out


def test_help_and_version_do_not_import_torch():
    """--help/--version must be quick: the CLI imports torch only for commands that run a model."""
    probe = "import sys, dac_fast; print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=_env(), cwd=str(REPO))
    if r.stdout.strip() == "True":
        pytest.skip("importing the dac_fast package itself imports torch (its lazy __init__ lands separately)")
    for argv in (["--help"], ["--version"], ["encode", "--help"], ["decode", "--help"]):
        code = ("import sys\nfrom dac_fast.cli import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass\n"
                "assert 'torch' not in sys.modules, 'torch imported'" % (argv,))
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), cwd=str(REPO))
        assert r.returncode == 0, (argv, r.stderr[-2000:])
