"""dac_fast.distributed on a local Ray (2 CPUs, no GPU): outputs, exact codes, errors, resume.

Small generated files and the 16khz preset (random weights); one Ray instance for the module.
"""

import os

import numpy as np
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")
pytest.importorskip("pyarrow")
sf = pytest.importorskip("soundfile")
pytest.importorskip("soxr")
pytest.importorskip("pyloudnorm")

from dac_fast import distributed as dist  # noqa: E402
from dac_fast.batch import encode_files  # noqa: E402
from dac_fast.dacfile import DacFile  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

MODEL = "16khz"
ENC = "enc_fault"  # encoder fault-injection token: paths with enc_fault_once / _always / _hang, model _init


def _write(path, sr, dur, ch, f0, rng, subtype=None):
    t = np.arange(int(sr * dur)) / sr
    x = 0.3 * np.sin(2 * np.pi * f0 * t)[:, None] + 0.05 * rng.standard_normal((len(t), ch))
    sf.write(str(path), x.astype(np.float32), sr, subtype=subtype)


@pytest.fixture(scope="module")
def ray_local():
    if ray.is_initialized():
        ray.shutdown()
    os.environ[dist.CRASH_ENV] = "crash_me"  # inherited by the local Ray's workers
    os.environ[dist.ENCODER_CRASH_ENV] = ENC
    ray.init(num_cpus=2, include_dashboard=False, runtime_env=dist.worker_runtime_env(), log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    (d / "sub").mkdir()
    _write(d / "a.wav", 16000, 1.0, 1, 220, rng)
    _write(d / "b.wav", 16000, 1.0, 1, 330, rng)  # same length as a: batched together
    _write(d / "sub" / "c.flac", 22050, 0.7, 2, 440, rng)  # stereo, resampled
    _write(d / "d.wav", 44100, 1.3, 1, 550, rng)
    (d / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEgarbage" * 3)
    x = np.zeros((8000, 1), np.float32)
    x[100] = np.nan
    sf.write(str(d / "nan.wav"), x, 16000, subtype="FLOAT")
    return d


GOOD = ("a.wav", "b.wav", "sub/c.flac", "d.wav")
BAD = ("corrupt.wav", "nan.wav")


@pytest.fixture(scope="module")
def single_machine(corpus, tmp_path_factory):
    """Codes of the single-machine path (dac_fast.batch.encode_files)."""
    out = tmp_path_factory.mktemp("single")
    rep = encode_files([str(corpus)], out, MODEL, batch_size=4, workers=1, progress=False)
    assert len(rep.done) == len(GOOD)
    return {str((corpus / g).resolve()): DacFile.load(out / (g.rsplit(".", 1)[0] + ".dac")).codes for g in GOOD}


def test_encode_outputs_errors_and_resume(ray_local, corpus, single_machine, tmp_path):
    out = tmp_path / "codes"
    rep = dist.encode_dataset([str(corpus)], out, model=MODEL, batch_size=2, concurrency=1, write_dac=True,
                              progress=False)
    assert len(rep.done) == len(GOOD)
    assert sorted(f.path for f in rep.failures) == sorted(str((corpus / b).resolve()) for b in BAD)
    assert not rep.ok and rep.audio_seconds == pytest.approx(1.0 + 1.0 + 0.7 + 1.3, abs=1e-3)

    # shards: the documented columns, codes equal the single-machine path bit for bit
    import pyarrow.parquet as pq

    shards = sorted((out / dist.SHARDS_DIR).glob("part-*.parquet"))
    assert shards
    assert set(dist.SHARD_COLUMNS) <= set(pq.read_schema(shards[0]).names)
    codes = dist.read_codes(out)
    assert set(codes) == set(single_machine)
    for path, ref in single_machine.items():
        assert codes[path].dtype == np.uint16
        np.testing.assert_array_equal(codes[path], ref)
    stereo = str((corpus / "sub" / "c.flac").resolve())
    assert codes[stereo].shape[:2] == (2, 12)

    # .dac files mirror the tree and hold the same codes + metadata
    f = DacFile.load(out / dist.DAC_DIR / "sub" / "c.dac")
    np.testing.assert_array_equal(f.codes, single_machine[stereo])
    assert (f.sample_rate, f.channels, f.original_length) == (22050, 2, int(22050 * 0.7))

    # manifest and errors table
    man = {r["path"]: r for r in dist.read_manifest(out)}
    assert set(man) == set(single_machine)
    errs = {r["path"]: r["reason"] for r in dist.read_errors(out)}
    assert set(errs) == {str((corpus / b).resolve()) for b in BAD}
    assert "unreadable" in errs[str((corpus / "corrupt.wav").resolve())]
    assert "NaN" in errs[str((corpus / "nan.wav").resolve())]

    # resume: nothing completed is redone; the bad inputs are retried (and fail again)
    rep2 = dist.encode_dataset([str(corpus)], out, model=MODEL, batch_size=2, concurrency=1, write_dac=True,
                               progress=False)
    assert rep2.done == [] and len(rep2.skipped) == len(GOOD) and len(rep2.failures) == len(BAD)
    assert sorted((out / dist.SHARDS_DIR).glob("part-*.parquet")) == shards

    # a new input joins an existing output: only it is encoded
    extra = tmp_path / "extra.wav"
    _write(extra, 16000, 0.5, 1, 660, np.random.default_rng(1))
    rep3 = dist.encode_dataset([str(corpus), str(extra)], out, model=MODEL, batch_size=2, concurrency=1,
                               progress=False)
    assert [d[0] for d in rep3.done] == [str(extra.resolve())]
    assert len(dist.read_manifest(out)) == len(GOOD) + 1
    assert len(dist.read_codes(out)) == len(GOOD) + 1

    # a resume with a different model setup is refused
    with pytest.raises(ValueError, match="different setup"):
        dist.encode_dataset([str(corpus)], out, model=MODEL, n_quantizers=4, progress=False)


def test_dataset_input_two_workers(ray_local, corpus, single_machine, tmp_path):
    """An existing Ray Dataset (file bytes + path), two CPU actors, n_quantizers."""
    files = [str((corpus / g).resolve()) for g in GOOD] + [str((corpus / "corrupt.wav").resolve())]
    ds = ray.data.read_binary_files(files, include_paths=True)
    out = tmp_path / "codes"
    rep = dist.encode_dataset(ds, out, model=MODEL, batch_size=2, concurrency=2, n_quantizers=4, progress=False)
    assert len(rep.done) == len(GOOD)
    assert [f.path.endswith("corrupt.wav") for f in rep.failures] == [True]
    codes = dist.read_codes(out)
    assert len(codes) == len(GOOD)
    for path, ref in single_machine.items():
        key = next(k for k in codes if k.endswith(path.rsplit("/", 1)[-1]))
        np.testing.assert_array_equal(codes[key], ref[:, :4])
    assert [r["path"] for r in dist.read_errors(out)] == [f.path for f in rep.failures]


def test_bad_arguments(ray_local, tmp_path):
    with pytest.raises(ValueError):
        dist.encode_dataset([str(tmp_path)], tmp_path / "o", model=MODEL, batch_size=0)
    with pytest.raises(ValueError):
        dist.encode_dataset([str(tmp_path)], tmp_path / "o", model=MODEL, n_quantizers=13)
    # actors that would hold every CPU starve the read tasks (the job would hang): refused up front
    with pytest.raises(ValueError, match="would hang"):
        dist.encode_dataset([str(tmp_path)], tmp_path / "o", model=MODEL, concurrency=2, num_cpus_per_worker=1)
    with pytest.raises(ValueError, match="GPU"):
        dist.encode_dataset([str(tmp_path)], tmp_path / "o", model=MODEL, num_gpus_per_worker=1)
    # nothing to do: a missing input is an error row, not an exception
    rep = dist.encode_dataset([str(tmp_path / "missing.wav")], tmp_path / "o", model=MODEL, progress=False)
    assert [f.reason for f in rep.failures] == ["no such file or directory"]
    assert dist.read_errors(tmp_path / "o") == [{"path": str(tmp_path / "missing.wav"), "reason": "no such file or directory"}]


@pytest.mark.skipif(not os.environ.get("DAC_FAST_RAY_CRASH_TEST"),
                    reason="kills a Ray worker; Ray's recovery can stall for many minutes on a loaded 2-core "
                           "machine (seen in CI), so opt-in: DAC_FAST_RAY_CRASH_TEST=1")
def test_worker_crash_is_listed_as_lost_and_retried(ray_local, tmp_path):
    """A read worker that dies on one input (past Ray's retries) costs only that input's block;
    the input is listed in the errors table as lost, the others complete."""
    d = tmp_path / "in"
    d.mkdir()
    rng = np.random.default_rng(2)
    _write(d / "ok.wav", 16000, 0.5, 1, 200, rng)
    _write(d / "crash_me.wav", 16000, 0.5, 1, 300, rng)
    out = tmp_path / "codes"
    rep = dist.encode_dataset([str(d)], out, model=MODEL, batch_size=1, max_retries=1, files_per_block=1,
                              progress=False)
    assert [x[0] for x in rep.done] == [str((d / "ok.wav").resolve())]
    errs = dist.read_errors(out)
    assert [e["path"] for e in errs] == [str((d / "crash_me.wav").resolve())]
    assert errs[0]["reason"].startswith("lost")


def test_cli_hook(ray_local, corpus, single_machine, tmp_path, capsys):
    """add_ray_arguments + run_from_cli, as dac_fast.cli wires them (`dac-fast encode --ray ...`)."""
    import argparse

    from dac_fast import cli

    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    enc = sub.choices["encode"]
    if not any("--ray" in a.option_strings for a in enc._actions):
        dist.add_ray_arguments(enc)
    out = tmp_path / "o"
    args = parser.parse_args(["encode", str(corpus / "sub"), str(corpus / "corrupt.wav"), "-o", str(out),
                              "--model", MODEL, "--ray", "--ray-workers", "1", "--no-progress", "--json"])
    assert args.ray == ""  # Ray's default address lookup (here: the running local Ray)
    assert dist.run_from_cli(args) == 1  # the corrupt input failed
    report = __import__("json").loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["written"] == 1 and [f["path"] for f in report["failed"]] == [str((corpus / "corrupt.wav").resolve())]
    np.testing.assert_array_equal(DacFile.load(out / "dac" / "c.dac").codes,
                                  single_machine[str((corpus / "sub" / "c.flac").resolve())])
    args = parser.parse_args(["encode", str(corpus), "-o", str(out), "--ray", "--overwrite"])
    assert dist.run_from_cli(args) == 2


def test_dataset_of_samples_equals_model_encode(ray_local, tmp_path):
    """A Dataset holding decoded samples (audio + sample_rate columns): codes equal model.encode."""
    import torch

    from dac_fast import io as aio
    from dac_fast.batch import load_model

    x = (0.2 * np.random.default_rng(3).standard_normal((1, 2 * 16000 - 77))).astype(np.float32)
    ds = ray.data.from_items([{"path": "mem://a", "audio": x, "sample_rate": 16000}])
    rep = dist.encode_dataset(ds, tmp_path / "o", model=MODEL, progress=False)
    assert rep.ok and len(rep.done) == 1
    y, _ = aio.prepare_for_encoding(x, 16000, 16000)
    buf = torch.zeros(1, 1, -(-y.shape[-1] // 320) * 320)
    buf[0, 0, : y.shape[-1]] = torch.from_numpy(y[0])
    with torch.inference_mode():
        ref = load_model(MODEL, "cpu", quiet=True).encode(buf).audio_codes.numpy()
    np.testing.assert_array_equal(dist.read_codes(tmp_path / "o")["mem://a"], ref)
