"""Fault injection: kills at every write step, concurrency, damaged and hostile
inputs, outputs that must not be touched, and the one-line errors for all.

Every case ends in the right answer or a clean refusal: a non-zero exit, one
line, nothing written and the inputs unchanged.
"""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import zipfile
from concurrent.futures import ThreadPoolExecutor

import keras
import numpy as np
import pytest

import surgery
from surgery import cli
from surgery.data.sources import list_images, open_source
from surgery.files.atomic import _HOST, WORK_PREFIX, atomic_path
from surgery.files.rowstore import CacheLock, RowWriter, read_fingerprint
from surgery.files.statsfile import load_stats, save_stats
from surgery.numerics.moments import Moments

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
X = np.random.default_rng(0).normal(size=(45, 6)).astype("float32")


def _model(seed=0, name="small"):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation="relu", name="fc1"),
            keras.layers.Dense(5, activation="relu", name="fc2"),
            keras.layers.Dense(3, name="out"),
        ],
        name=name,
    )


def _files(tmp_path, seed=0):
    """A saved model and a .npy of its data."""
    model_path, data_path = tmp_path / "m.keras", tmp_path / "x.npy"
    _model(seed).save(model_path)
    np.save(data_path, X)
    return model_path, data_path


def _run(capsys, *argv):
    """Run the CLI; returns (exit code, stderr)."""
    code = cli.main([*map(str, argv)])
    return code, capsys.readouterr().err.strip()


def _convert(model_path, data_path, out, *flags) -> list:
    """`convert` of the test model after fc1, on the test data, to `out`."""
    return [
        "convert",
        model_path,
        "--after",
        "fc1",
        "--data",
        data_path,
        *flags,
        "--out",
        out,
    ]


def _refused(capsys, argv, code=1, match=""):
    got, err = _run(capsys, *argv)
    assert got == code, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert match in err, err
    return err


def _rows(path):
    return np.concatenate(list(surgery.open_features(str(path), batch_size=7)))


def _child(code, *args, **kwargs):
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        **kwargs,
    )


# ---------------------------------------------------------------- caches

# Writes precomputed batches through the cache's RowWriter and SIGKILLs itself
# just before the k-th write step (k = 0: never). Prints the number of steps.
_KILL_AT_STEP = """
import json, os, shutil, signal, sys
import numpy as np
import surgery.files.rowstore as rs

path, batches, kill_at = sys.argv[1], np.load(sys.argv[2]), int(sys.argv[3])
fingerprints = json.load(open(sys.argv[2] + ".json"))
rs._chunk_rows = lambda row: 10  # chunks that batches of 16 straddle
steps = [0]

def step(fn):
    def wrapped(*a, **k):
        steps[0] += 1
        if steps[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return fn(*a, **k)
    return wrapped

for name in ("replace", "fsync", "remove", "unlink", "write", "ftruncate"):
    setattr(os, name, step(getattr(os, name)))
shutil.rmtree = step(shutil.rmtree)
if path.endswith(".h5"):  # import only the library the format needs: faster
    import h5py
    for cls, names in ((h5py.File, ("__init__", "flush")),
                       (h5py.Dataset, ("resize", "__setitem__"))):
        for name in names:
            setattr(cls, name, step(getattr(cls, name)))
else:
    import zarr.storage._local as zarr_local
    zarr_local._put = step(zarr_local._put)
with rs.CacheLock(path):
    writer = rs.RowWriter(path)
    for i in range(len(batches.files)):
        writer.append(batches[f"b{i}"], fingerprints[i])
    writer.finish()
print(steps[0])
"""


@pytest.mark.parametrize("name", ["f.zarr", "f.h5"])
def test_a_kill_at_every_write_step_resumes_to_the_uninterrupted_cache(
    tmp_path, name, monkeypatch
):
    model = _model()
    fingerprints = []  # what cache_features commits with each batch
    append = RowWriter.append

    def recording(self, rows, fingerprint=None):
        fingerprints.append(fingerprint)
        return append(self, rows, fingerprint)

    with monkeypatch.context() as m:
        m.setattr(RowWriter, "append", recording)
        reference = surgery.cache_features(
            model, X, str(tmp_path / ("ref_" + name)), batch_size=16, verbose=0
        )
    expected = _rows(reference)
    batches = {
        f"b{i}": np.asarray(model.predict_on_batch(X[lo : lo + 16]))
        for i, lo in enumerate(range(0, len(X), 16))
    }
    np.savez(tmp_path / "batches.npz", **batches)
    (tmp_path / "batches.npz.json").write_text(json.dumps(fingerprints))
    clean = _child(_KILL_AT_STEP, tmp_path / name, tmp_path / "batches.npz", 0)
    assert clean.returncode == 0, clean.stderr
    assert np.array_equal(_rows(tmp_path / name), expected)
    steps = int(clean.stdout)
    assert steps >= 4 * len(batches)  # data, fsync, record, rename for each

    def kill_at(k):
        (tmp_path / f"kill{k}").mkdir()
        path = tmp_path / f"kill{k}" / name
        return _child(_KILL_AT_STEP, path, tmp_path / "batches.npz", k)

    with ThreadPoolExecutor(max_workers=2) as pool:
        killed = list(pool.map(kill_at, range(1, steps + 1)))
    for k, child in enumerate(killed, start=1):
        assert child.returncode == -signal.SIGKILL, (k, child.stderr)
        folder = tmp_path / f"kill{k}"
        path = folder / name
        surgery.cache_features(model, X, str(path), batch_size=16, verbose=0)
        assert np.array_equal(_rows(path), expected), f"killed at step {k}"
        assert os.listdir(folder) == [name], (k, os.listdir(folder))


def test_zarr_rows_written_after_the_last_commit_are_not_trusted(tmp_path):
    """zarr's append writes the new shape first: a resume must not trust it."""
    import zarr

    model = _model()
    path = str(tmp_path / "f.zarr")
    expected = _rows(surgery.cache_features(model, X, path, batch_size=16, verbose=0))
    first = str(tmp_path / "first.zarr")  # what a run records after 16 rows
    surgery.cache_features(model, X, first, max_samples=16, verbose=0)
    fingerprint = read_fingerprint(zarr.open_array(first, mode="r"))
    os.replace(path, path + ".partial")
    with open(path + ".partial.json", "w") as f:
        record = {"rows": 16, "shape": [3], "dtype": "float32"}
        json.dump({**record, "fingerprint": fingerprint}, f)
    array = zarr.open_array(path + ".partial", mode="r+")
    array[16:] = 0  # the rows after the commit "never reached the disk"
    surgery.cache_features(model, X, path, batch_size=16, verbose=0)
    assert np.array_equal(_rows(path), expected)


_HOLD_LOCK = """
import sys, time
from surgery.files.rowstore import CacheLock
with CacheLock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_a_second_writer_is_refused_with_the_holder_named(tmp_path):
    model = _model()
    path = str(tmp_path / "f.zarr")
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, path],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(surgery.SurgeryError, match=f"pid {holder.pid} on "):
            surgery.cache_features(model, X, path, batch_size=16, verbose=0)
        assert not os.path.exists(path) and not os.path.exists(path + ".partial")
    finally:
        holder.kill()
        holder.wait()
    # the kernel released the dead holder's lock: the next run just works
    surgery.cache_features(model, X, path, batch_size=16, verbose=0)
    assert sorted(os.listdir(tmp_path)) == ["f.zarr"]
    with CacheLock(path):  # in one process too: a second lock is refused
        with pytest.raises(surgery.SurgeryError, match=f"pid {os.getpid()}"):
            surgery.cache_features(model, X, path, verbose=0)


def test_a_damaged_partial_is_reported_with_the_fix(tmp_path):
    model = _model()
    path = str(tmp_path / "f.h5")
    expected = _rows(surgery.cache_features(model, X, path, batch_size=16, verbose=0))
    os.remove(path)
    with open(path + ".partial", "wb") as f:
        f.write(b"\x89HDF\r\n\x1a\n" + bytes(100))  # killed while creating it
    with open(path + ".partial.json", "w") as f:
        json.dump({"rows": 16, "shape": [3], "dtype": "float32"}, f)
    with pytest.raises(surgery.SurgeryError, match="damaged.*restart=True") as e:
        surgery.cache_features(model, X, path, batch_size=16, verbose=0)
    assert len(str(e.value).splitlines()) == 1
    surgery.cache_features(model, X, path, batch_size=16, verbose=0, restart=True)
    assert np.array_equal(_rows(path), expected)
    # without a committed record the partial file holds nothing: it is redone
    os.replace(path, path + ".partial")
    with open(path + ".partial", "r+b") as f:
        f.truncate(50)
    surgery.cache_features(model, X, path, batch_size=16, verbose=0)
    assert np.array_equal(_rows(path), expected)


# ---------------------------------------------------------------- inputs


def test_a_stored_npz_member_with_flipped_bytes_fails_its_crc(tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, x=X)
    assert np.array_equal(np.asarray(open_source(str(path))[0]), X[:32])
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(surgery.SurgeryError, match="CRC"):
        open_source(str(path))
    path.write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(surgery.SurgeryError, match="not a readable .npz"):
        open_source(str(path))


def test_a_zarr_array_with_a_missing_chunk_is_refused(tmp_path):
    import zarr

    path = tmp_path / "x.zarr"
    array = zarr.create_array(
        store=str(path), shape=X.shape, chunks=(10, 6), dtype="f4"
    )
    array[:] = X
    assert np.array_equal(np.asarray(open_source(str(path))[0]), X[:32])
    os.remove(path / "c" / "2" / "0")
    with pytest.raises(surgery.SurgeryError, match="missing 1 of its 5 zarr chunks"):
        open_source(str(path))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_data_is_refused_even_where_a_fused_relu_hides_it(bad):
    model = _model()
    x = X.copy()
    x[20, 3] = bad
    # the fused MatMul+ReLU can turn NaN into 0: the taps alone would not see it
    with pytest.raises(surgery.SurgeryError, match="non-finite value.*batch 1"):
        surgery.activation_stats(model, ["fc1"], x, batch_size=16, verbose=0)


def test_bad_npy_files_get_messages_that_say_what_is_wrong(tmp_path):
    path = tmp_path / "x.npy"
    path.write_bytes(b"not numpy at all" * 10)
    with pytest.raises(surgery.SurgeryError, match="not a .npy file") as e:
        open_source(str(path))
    assert "pickle" not in str(e.value)
    np.save(path, X)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(surgery.SurgeryError, match="truncated"):
        open_source(str(path))


def _stats_file(tmp_path, model, name="s.npz", **meta):
    stats = surgery.activation_stats(model, ["fc1"], X, verbose=0)
    path = tmp_path / name
    save_stats(str(path), stats, **meta)
    return path, stats


@pytest.mark.parametrize(
    "count, mean, m2, message",
    [
        (-5, 0.0, 1.0, "count is -5"),
        (0, 0.0, 1.0, "count is 0"),
        (10, 0.0, -1.0, "M2 of unit 0 is -1.0 < 0"),
        (10, np.nan, 1.0, "mean of unit 0 is nan"),
        (10, 0.0, np.inf, "M2 of unit 0 is inf"),
    ],
)
def test_impossible_statistics_are_refused(tmp_path, count, mean, m2, message):
    bad = Moments(count, np.full(8, mean), np.full(8, m2))
    path = tmp_path / "s.npz"
    save_stats(str(path), {"fc1": bad})
    with pytest.raises(surgery.SurgeryError, match=message):
        load_stats(str(path))
    with pytest.raises(surgery.SurgeryError, match=message):
        surgery.insert_identity_bn(_model(), ["fc1"], stats={"fc1": bad})


def test_insert_refuses_stats_of_another_model_with_the_same_widths(tmp_path, capsys):
    model_path, data_path = _files(tmp_path)
    other = tmp_path / "other.keras"
    _model(seed=1).save(other)
    stats = tmp_path / "s.npz"
    argv = ["stats", other, "--data", data_path, "--layers", "fc1", "--out", stats]
    assert _run(capsys, *argv)[0] == 0
    out = tmp_path / "bn.keras"
    _refused(
        capsys,
        ["insert", model_path, "--stats", stats, "--out", out],
        match="measured on another model",
    )
    assert not out.exists()
    assert _run(capsys, "insert", other, "--stats", stats, "--out", out)[0] == 0


def test_merge_refuses_one_unsharded_file_twice_or_its_copy(tmp_path, capsys):
    path, _ = _stats_file(tmp_path, _model())
    copy = tmp_path / "copy.npz"
    copy.write_bytes(path.read_bytes())
    out = tmp_path / "m.npz"
    _refused(capsys, ["merge", path, path, "--out", out], match="given twice")
    _refused(capsys, ["merge", path, copy, "--out", out], match="same statistics")
    assert not out.exists()


def test_malformed_statistics_files_are_one_line_errors(tmp_path):
    path = tmp_path / "s.npz"
    for header in ["{", '{"format": "surgery-stats", "taps": 5}', "[1]"]:
        np.savez(path, header=np.array(header))
        with pytest.raises(surgery.SurgeryError, match="not a statistics file"):
            load_stats(str(path))
    path.write_bytes(b"garbage")
    with pytest.raises(surgery.SurgeryError, match="not a statistics file"):
        load_stats(str(path))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--epsilon", "nan"], "--epsilon must be a finite number > 0"),
        (["--epsilon", "-1"], "--epsilon must be a finite number > 0"),
        (["--momentum", "5"], "--momentum must be between 0 and 1"),
        (["--image-size", "0x0"], "--image-size 0x0"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
    ],
)
def test_bad_option_values_are_usage_errors_before_any_work(
    tmp_path, capsys, flags, message
):
    model_path, data_path = _files(tmp_path)
    out = tmp_path / "bn.keras"
    _refused(
        capsys, _convert(model_path, data_path, out, *flags), code=2, match=message
    )
    assert not out.exists()


@pytest.mark.parametrize(
    "option, message",
    [
        ({"epsilon": float("nan")}, "epsilon must be a finite number > 0"),
        ({"epsilon": -1.0}, "epsilon must be a finite number > 0"),
        ({"momentum": 5.0}, "momentum must be between 0 and 1"),
    ],
)
def test_bad_bn_options_are_refused_by_the_api_before_the_data_pass(option, message):
    def data():  # a generator that would notice being read
        raise AssertionError("the data was read")
        yield

    with pytest.raises(surgery.SurgeryError, match=message):
        surgery.insert_identity_bn(_model(), ["fc1"], data(), **option)


def test_verify_never_passes_nan_outputs(tmp_path, capsys):
    model_path, data_path = _files(tmp_path)
    broken = _model()
    kernel, bias = broken.get_layer("out").get_weights()
    bias[1] = np.nan
    broken.get_layer("out").set_weights([kernel, bias])
    report = surgery.verify(_model(), broken, X, verbose=0)
    assert not report.identical
    assert report.max_abs_diff == np.inf and report.nonfinite_mismatches == len(X)
    assert "NaN/inf" in str(report)
    assert surgery.verify(broken, broken, X, verbose=0).identical  # NaN == NaN
    broken_path = tmp_path / "broken.keras"
    broken.save(broken_path)
    argv = ["verify", model_path, broken_path, "--data", data_path]
    assert (
        cli.main(["--format", "json", *map(str, argv), "--max-ulp", "2000000000"]) == 1
    )
    result = json.loads(capsys.readouterr().out, parse_constant=_no_constants)
    assert result["ok"] is False and result["max_abs_diff"] == "inf"
    _refused(capsys, [*argv, "--max-ulp", "-1"], code=2, match="--max-ulp")


def _no_constants(name):
    raise AssertionError(f"{name} is not JSON")


def test_family_weights_that_are_a_whole_model_are_refused(tmp_path, capsys):
    model_path, data_path = _files(tmp_path)
    out = tmp_path / "bn.keras"
    argv = ["convert", "vgg16", "--weights", model_path, "--data", data_path]
    _refused(capsys, [*argv, "--out", out], code=2, match="is a whole model")
    assert not out.exists()


def test_the_image_walker_lists_each_regular_file_once_without_hanging(tmp_path):
    images = tmp_path / "images"
    (images / "cats").mkdir(parents=True)
    keras.utils.save_img(images / "cats" / "a.png", np.zeros((4, 4, 3)))
    keras.utils.save_img(images / "b.png", np.zeros((4, 4, 3)))
    os.symlink(images, images / "cats" / "loop")  # a loop back to the top
    os.symlink(".", images / "here")  # a link to . (counted 41 times before)
    os.symlink(images / "b.png", images / "c.png")  # the same file twice
    os.mkfifo(images / "fifo.png")  # opening it would block forever
    os.mkdir(images / "dir.png")
    os.symlink(tmp_path / "gone.png", images / "dangling.png")
    assert [os.path.relpath(p, images) for p in list_images(str(images))] == [
        "b.png",
        os.path.join("cats", "a.png"),
    ]


def test_a_fifo_given_as_data_is_refused_not_waited_on(tmp_path):
    os.mkfifo(tmp_path / "x.npy")
    with pytest.raises(surgery.SurgeryError, match="not a regular file"):
        open_source(str(tmp_path / "x.npy"))


def test_a_corrupt_image_or_a_decompression_bomb_names_the_file(tmp_path):
    import PIL.Image

    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "bad.png").write_bytes(b"garbage, not an image")
    data = open_source(str(folder), image_size=(4, 4))
    with pytest.raises(surgery.SurgeryError, match="bad.png': not a readable image"):
        data[0]
    os.remove(folder / "bad.png")
    PIL.Image.new("L", (300, 300)).save(folder / "big.png")
    limit = PIL.Image.MAX_IMAGE_PIXELS
    PIL.Image.MAX_IMAGE_PIXELS = 1000  # 90000 pixels is over twice the limit
    try:
        with pytest.raises(surgery.SurgeryError, match="big.png': it has too many"):
            open_source(str(folder), image_size=(4, 4))[0]
    finally:
        PIL.Image.MAX_IMAGE_PIXELS = limit


def test_a_lambda_model_converts_with_unsafe(tmp_path, capsys):
    inputs = keras.Input((6,))
    x = keras.layers.Dense(8, activation="relu", name="fc1")(inputs)
    x = keras.layers.Lambda(lambda t: t * 2.0, name="double")(x)
    outputs = keras.layers.Dense(3, name="fc2")(x)
    path, data_path = tmp_path / "lambda.keras", tmp_path / "x.npy"
    keras.Model(inputs, outputs).save(path)
    np.save(data_path, X)
    out = tmp_path / "bn.keras"
    argv = ["convert", path, "--data", data_path, "--after", "fc1", "--out", out]
    _refused(capsys, argv, match="--unsafe")
    assert _run(capsys, *argv, "--unsafe")[0] == 0
    assert out.exists()


# ---------------------------------------------------------------- outputs


def test_plot_obeys_force_and_never_overwrites_an_input_image(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    model_path, data_path = _files(tmp_path)
    plot = tmp_path / "report.png"
    plot.write_bytes(b"keep me")
    out = tmp_path / "bn.keras"
    argv = ["convert", model_path, "--after", "fc1", "--data", data_path, "--out", out]
    _refused(capsys, [*argv, "--plot", plot], match="exists; pass --force")
    assert plot.read_bytes() == b"keep me" and not out.exists()
    _refused(capsys, [*argv, "--plot", tmp_path / "r.gif"], code=2, match="--plot")
    images = tmp_path / "images"
    (images / "cats").mkdir(parents=True)
    keras.utils.save_img(images / "cats" / "a.png", np.zeros((32, 32, 3)))
    before = (images / "cats" / "a.png").read_bytes()
    img_argv = ["convert", "--data", images, "--out", out, "--force"]
    _refused(
        capsys,
        [*img_argv, "--plot", images / "cats" / "a.png"],
        code=2,
        match="is an input",
    )
    _refused(
        capsys, [*img_argv, "--plot", images / "new.png"], code=2, match="is an input"
    )
    assert (images / "cats" / "a.png").read_bytes() == before
    assert sorted(os.listdir(images)) == ["cats"] and not out.exists()


def test_an_output_may_never_be_an_input(tmp_path, capsys):
    model_path, data_path = _files(tmp_path)
    before = model_path.read_bytes()
    for argv in (
        _convert(model_path, data_path, model_path),
        ["fold", model_path, "--out", model_path],
        ["recalibrate", model_path, "--data", data_path, "--out", model_path],
    ):
        _refused(capsys, [*argv, "--force"], code=2, match="is an input")
    path, _ = _stats_file(tmp_path, _model())
    _refused(capsys, ["merge", path, "--out", path, "--force"], code=2)
    assert model_path.read_bytes() == before


def test_convert_writes_nothing_when_the_result_is_not_identical(
    tmp_path, capsys, monkeypatch
):
    model_path, data_path = _files(tmp_path)
    out = tmp_path / "bn.keras"
    out.write_bytes(b"the good model from yesterday")
    real = surgery.convert

    def broken(*args, **kwargs):
        result = real(*args, **kwargs)
        report = surgery.Report(False, 1.0, 7, result.report.samples)
        return dataclasses.replace(result, report=report)

    monkeypatch.setattr(surgery, "convert", broken)
    code, err = _run(capsys, *_convert(model_path, data_path, out, "--force"))
    assert code == 1 and "nothing was written" in err.splitlines()[-1]
    assert out.read_bytes() == b"the good model from yesterday"


def test_of_two_writers_of_one_output_exactly_one_wins(tmp_path):
    out = tmp_path / "out.npz"
    with pytest.raises(surgery.SurgeryError, match="appeared while"):
        with atomic_path(str(out), overwrite=False) as tmp:
            with open(tmp, "w") as f:
                f.write("second")
            with atomic_path(str(out), overwrite=False) as other:  # the first
                with open(other, "w") as f:
                    f.write("first")
    assert out.read_text() == "first"
    assert os.listdir(tmp_path) == ["out.npz"]


_KILLED_WHILE_SAVING = """
import os, signal, sys, tempfile
from surgery.files.atomic import atomic_path
with atomic_path(sys.argv[1], suffix=".keras", capture_tempfiles=True) as tmp:
    open(tmp, "wb").write(b"half a model")
    tempfile.NamedTemporaryFile(delete=False).write(b"a library's scratch file")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_save_killed_midway_leaves_nothing_the_next_write_does_not_remove(
    tmp_path,
):
    out = tmp_path / "bn.keras"
    killed = _child(_KILLED_WHILE_SAVING, out)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    (work,) = os.listdir(tmp_path)  # the scratch file went there too
    assert work.startswith(WORK_PREFIX) and len(os.listdir(tmp_path / work)) == 2
    _stats_file(tmp_path, _model())
    assert os.listdir(tmp_path) == ["s.npz"]


_WRITE_AT = """
import os, sys, time
from surgery.files.atomic import atomic_path
from surgery.errors import SurgeryError
out, start = sys.argv[1], float(sys.argv[2])
try:
    with atomic_path(out, overwrite=False) as tmp:
        open(tmp, "w").write(str(os.getpid()))
        time.sleep(max(0.0, start - time.time()))  # both finish writing, then race
except SurgeryError as e:
    print(e)
    sys.exit(1)
"""


def test_two_processes_writing_one_output_exactly_one_wins(tmp_path):
    import time

    out = tmp_path / "out.npz"
    start = str(time.time() + 2.0)
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITE_AT, out, start],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for _ in range(2)
    ]
    codes = [w.wait(timeout=60) for w in writers]
    assert sorted(codes) == [0, 1]
    winner, loser = writers[codes.index(0)], writers[codes.index(1)]
    assert out.read_text() == str(winner.pid)
    assert "appeared while" in loser.stdout.read()
    assert os.listdir(tmp_path) == ["out.npz"]


def test_outputs_honour_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        path, _ = _stats_file(tmp_path, _model())
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o640


def test_temp_files_of_a_killed_run_are_cleaned_up_and_saving_leaves_none(
    tmp_path, capsys, monkeypatch
):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"{WORK_PREFIX}{_HOST}-{dead.pid}-abc123"
    live = tmp_path / f"{WORK_PREFIX}{_HOST}-{os.getpid()}-def456"
    for folder in (stale, live):
        folder.mkdir()
        (folder / "bn.keras.keras").write_bytes(b"half a model")
    model_path, data_path = _files(tmp_path)
    out = tmp_path / "bn.keras"
    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    assert _run(capsys, *_convert(model_path, data_path, out))[0] == 0
    assert not stale.exists() and live.exists()
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["m.keras", "x.npy", "bn.keras", live.name, "system-tmp"]
    )
    assert os.listdir(system_tmp) == []


def test_a_read_only_output_folder_is_refused_before_any_work(tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root can write into a read-only folder")
    model_path, data_path = _files(tmp_path)
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        argv = [
            "convert",
            model_path,
            "--data",
            data_path,
            "--out",
            folder / "bn.keras",
        ]
        _refused(capsys, argv, match="not writable")
    finally:
        folder.chmod(0o700)


# ---------------------------------------------------------------- errors


def test_ctrl_c_exits_130_with_one_line(tmp_path, capsys, monkeypatch):
    model_path, data_path = _files(tmp_path)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(surgery, "convert", interrupted)
    out = tmp_path / "bn.keras"
    argv = ["convert", model_path, "--after", "fc1", "--data", data_path, "--out", out]
    err = _refused(capsys, argv, code=130, match="interrupted")
    assert "Traceback" not in err and not out.exists()


def test_an_unexpected_exception_is_still_one_line(tmp_path, capsys, monkeypatch):
    model_path, data_path = _files(tmp_path)

    def bug(*args, **kwargs):
        raise RuntimeError("something deep\nand more")

    monkeypatch.setattr(surgery, "convert", bug)
    argv = _convert(model_path, data_path, tmp_path / "b.keras")
    _refused(capsys, argv, match="RuntimeError: something deep")


def test_zip_damage_in_a_data_npz_is_a_one_line_cli_error(tmp_path, capsys):
    model_path, _ = _files(tmp_path)
    data = tmp_path / "x.npz"
    np.savez(data, x=X)
    with zipfile.ZipFile(data) as z:
        offset = z.getinfo("x.npy").header_offset
    raw = bytearray(data.read_bytes())
    raw[offset + 200] ^= 0x01
    data.write_bytes(bytes(raw))
    out = tmp_path / "bn.keras"
    _refused(
        capsys,
        ["convert", model_path, "--after", "fc1", "--data", data, "--out", out],
        match="CRC",
    )
    assert not out.exists()
