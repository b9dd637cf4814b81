"""Outputs that are safe to write: locks that follow no link, paired outputs
that appear together after any kill, a full disk, long names, and one error
type for every I/O failure (issue 24).

The full-disk cases mount a 1 MB tmpfs (root only; skipped otherwise) and run
the writers in a child process where HDF5 could crash it.
"""

import argparse
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import keras
import numpy as np
import pytest

import surgery
from surgery import cli
from surgery.cli.outputs import check_output, save_model
from surgery.errors import UsageError
from surgery.files.atomic import WORK_PREFIX, remove_stale_work
from surgery.files.models import load_with_architecture
from surgery.files.statsfile import save_stats
from surgery.numerics.moments import Moments

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
X = np.random.default_rng(0).normal(size=(45, 6)).astype("float32")


def _model(seed=0, wide=8):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation="relu", name="fc1"),
            keras.layers.Dense(wide, name="out"),
        ],
        name="small",
    )


def _files(tmp_path, seed=0, wide=8):
    model_path, data_path = tmp_path / "m.keras", tmp_path / "x.npy"
    _model(seed, wide).save(model_path)
    np.save(data_path, X)
    return model_path, data_path


def _child(code, *args):
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )


def _one_line(capsys, argv, code=1):
    got = cli.main([*map(str, argv)])
    err = capsys.readouterr().err.strip()
    assert got == code, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# ---------------------------------------------------------------- locks


def _refused_lock(tmp_path, make):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    path = tmp_path / "f.zarr"
    lock = tmp_path / "f.zarr.lock"
    make(lock, notes)
    with pytest.raises(surgery.SurgeryError, match="f.zarr.lock") as e:
        surgery.cache_features(_model(), X, str(path), verbose=0)
    assert len(str(e.value).splitlines()) == 1 and "move it away" in str(e.value)
    assert notes.read_text() == "my notes\n"
    assert not os.path.exists(path) and not os.path.exists(f"{path}.partial")
    return lock


def test_a_symlinked_lock_is_refused_and_its_target_kept(tmp_path):
    lock = _refused_lock(tmp_path, lambda lock, notes: lock.symlink_to(notes))
    assert lock.is_symlink() and os.readlink(lock) == str(tmp_path / "notes.txt")


def test_a_dangling_lock_link_creates_nothing(tmp_path):
    target = tmp_path / "elsewhere.txt"
    _refused_lock(tmp_path, lambda lock, notes: lock.symlink_to(target))
    assert not target.exists()


@pytest.mark.parametrize(
    "make",
    [
        lambda lock, notes: os.link(notes, lock),
        lambda lock, notes: lock.write_text("a file the user keeps here\n"),
        lambda lock, notes: lock.mkdir(),
        lambda lock, notes: os.mkfifo(lock),
    ],
    ids=["hard-link", "user-file", "folder", "fifo"],
)
def test_a_lock_path_that_is_not_our_lock_is_refused_untouched(tmp_path, make):
    lock = _refused_lock(tmp_path, make)
    if lock.is_file() and lock.stat().st_nlink == 1:
        assert lock.read_text() == "a file the user keeps here\n"


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path):
    path = tmp_path / "f.zarr"
    (tmp_path / "f.zarr.lock").write_text("pid 1 on host since 2026-01-01 00:00:00")
    surgery.cache_features(_model(), X, str(path), verbose=0)
    assert sorted(os.listdir(tmp_path)) == ["f.zarr"]


# ---------------------------------------------------------------- paired outputs

# Saves m.keras's model as a .weights.h5 + .json pair and SIGKILLs itself just
# before its k-th write step (k = 0: never). Prints each step's kind, in order.
_KILL_IN_SAVE = """
import builtins, os, signal, sys
import h5py, keras
from surgery.cli.outputs import save_model

model_path, out, kill_at, force = sys.argv[1:5]
model = keras.saving.load_model(model_path)
steps = []

def step(fn, kind, writes_only=False):
    def wrapped(*a, **k):
        mode = a[1] if len(a) > 1 else k.get("mode", "r")
        if not writes_only or any(c in str(mode) for c in "wax+"):
            steps.append(kind)
            if len(steps) == int(kill_at):
                os.kill(os.getpid(), signal.SIGKILL)
        return fn(*a, **k)
    return wrapped

for name in ("rename", "replace", "link", "unlink", "fsync", "chmod", "mkdir"):
    setattr(os, name, step(getattr(os, name), name))
builtins.open = step(builtins.open, "open", writes_only=True)
h5py.File.__init__ = step(h5py.File.__init__, "h5open")
h5py.File.close = step(h5py.File.close, "h5close")
save_model(model, out, force=force == "1")
print(" ".join(steps))
"""


def _weights(path):
    json_path = str(path)[: -len(".weights.h5")] + ".json"
    return load_with_architecture(json_path, str(path)).get_weights()


def _same(a, b):
    return len(a) == len(b) and all(
        np.array_equal(x, y) for x, y in zip(a, b, strict=True)
    )


MOVES = ("link", "rename", "replace")


def _sample(kinds):
    """The steps (1-based) a kill at which the default run tries: the first;
    one half-way through writing the new files; each from the first move
    (link, rename, replace) to the third after the last, where the pair is
    half in place and the commit follows; and the last."""
    moves = [k for k, kind in enumerate(kinds, 1) if kind in MOVES]
    assert moves, kinds
    window = range(moves[0], moves[-1] + 4)
    return sorted({1, moves[0] // 2, *window, len(kinds)} & {*range(1, len(kinds) + 1)})


def _kill_at_steps(tmp_path, model_path, every_step):
    """Run the save once to list its steps, then once per step tried (all of
    them, or `_sample`'s) killed there, each in a folder of its own."""

    def run(k):
        folder = tmp_path / f"kill{k}"
        folder.mkdir()
        return folder, _child(_KILL_IN_SAVE, model_path, folder / "x.weights.h5", k, 0)

    folder, clean = run(0)
    assert clean.returncode == 0, clean.stderr
    kinds = clean.stdout.split()
    assert len(kinds) >= 6  # two files, the journal, two moves, the commit
    tried = range(1, len(kinds) + 1) if every_step else _sample(kinds)
    with ThreadPoolExecutor(max_workers=2) as pool:
        killed = list(pool.map(run, tried))
    for folder, child in killed:
        assert child.returncode == -signal.SIGKILL, (folder, child.stderr)
    return [folder for folder, _ in killed]


# Each kill is a fresh process that imports Keras (about 10 s on 2 cores): the
# default run kills at a sample of the ~19 steps (about 1 min), `-m slow` at
# every one (about 3 min).
@pytest.mark.parametrize(
    "every_step", [False, pytest.param(True, marks=pytest.mark.slow)],
    ids=["sampled", "every-step"],
)  # fmt: skip
def test_a_kill_at_any_step_of_a_paired_save_leaves_a_state_the_rerun_clears(
    tmp_path, capsys, every_step
):
    model_path, data_path = _files(tmp_path)
    new = keras.saving.load_model(model_path).get_weights()
    original = keras.saving.load_model(model_path)(X).numpy()
    kept = set()
    for folder in _kill_at_steps(tmp_path, model_path, every_step):
        out = folder / "x.weights.h5"
        remove_stale_work(str(folder))  # what the rerun's output check does
        left = sorted(os.listdir(folder))
        assert left in ([], ["x.json", "x.weights.h5"]), (folder, left)
        kept.add(bool(left))
        if left:  # killed after the commit: the new pair, whole
            assert _same(_weights(out), new), folder
            for name in left:
                os.remove(folder / name)
        argv = ["convert", model_path, "--after", "fc1", "--data", data_path]
        assert cli.main([*map(str, argv), "--out", str(out)]) == 0, folder
        capsys.readouterr()
        assert sorted(os.listdir(folder)) == ["x.json", "x.weights.h5"], folder
        converted = load_with_architecture(str(folder / "x.json"), str(out))
        assert np.array_equal(converted.predict(X, verbose=0), original)
    assert kept == {False, True}  # kills on both sides of the commit


class _Killed(BaseException):
    """Stands for SIGKILL in-process: nothing after it runs, not even cleanup."""


def _dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_kill_while_force_replaces_a_pair_leaves_the_old_or_the_new_pair(
    tmp_path, monkeypatch
):
    """Killed (in-process: the cleanup a kill skips is switched off, and the
    work folder is given a dead process's id) at every step of replacing an
    old pair with --force, the folder holds the old or the new pair once
    the next run's output check rolled back, and the rerun succeeds."""
    import h5py

    import surgery.files.atomic as atomic

    old, new = _model(seed=1, wide=5), _model(seed=0)  # a mixed pair cannot load
    dead = _dead_pid()
    finished, k = False, 0
    while not finished:
        k += 1
        folder = tmp_path / f"kill{k}"
        folder.mkdir()
        out = folder / "x.weights.h5"
        save_model(old, str(out))
        steps = [0]

        def step(fn, k=k, steps=steps):
            def wrapped(*a, **kw):
                steps[0] += 1
                if steps[0] == k:
                    raise _Killed
                return fn(*a, **kw)

            return wrapped

        with monkeypatch.context() as m:
            for name in ("rename", "replace", "link", "unlink", "fsync", "chmod"):
                m.setattr(os, name, step(getattr(os, name)))
            m.setattr(h5py.File, "__init__", step(h5py.File.__init__))
            m.setattr(atomic, "_write_durably", step(atomic._write_durably))
            m.setattr(atomic, "roll_back", lambda work: None)
            m.setattr(atomic, "_release_space", lambda work: None)
            m.setattr(atomic.shutil, "rmtree", lambda *a, **kw: None)
            try:
                save_model(new, str(out), force=True)
                finished = True
            except _Killed:
                pass
        for name in os.listdir(folder):
            if name.startswith(WORK_PREFIX):
                gone = name.replace(f"-{os.getpid()}-", f"-{dead}-")
                os.rename(folder / name, folder / gone)
        args = argparse.Namespace(out=str(out), force=True, model=None, data=None)
        check_output(args)  # rolls back a save killed between its moves
        assert sorted(os.listdir(folder)) == ["x.json", "x.weights.h5"], k
        got = _weights(out)
        if finished:
            assert _same(got, new.get_weights()), k
        else:
            assert _same(got, old.get_weights()) or _same(got, new.get_weights()), k
        save_model(new, str(out), force=True)  # the rerun
        assert _same(_weights(out), new.get_weights())
        assert sorted(os.listdir(folder)) == ["x.json", "x.weights.h5"]
    assert k >= 8  # aside, weights, aside, .json, journal, commit, ...


@pytest.mark.parametrize("fail_at", range(1, 5))
def test_a_move_that_fails_puts_everything_back(tmp_path, monkeypatch, fail_at):
    import surgery.files.atomic as atomic

    out = str(tmp_path / "x.weights.h5")
    old = _model(seed=1)
    save_model(old, out)
    before = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)}
    calls = [0]

    def failing(fn):
        def wrapped(*a, **k):
            calls[0] += 1
            if calls[0] == fail_at:
                raise OSError(5, "Input/output error", a[0])
            return fn(*a, **k)

        return wrapped

    for name in ("rename", "replace"):  # aside, weights, aside, .json
        monkeypatch.setattr(atomic.os, name, failing(getattr(os, name)))
    with pytest.raises(surgery.SurgeryError, match="cannot write .*x\\.") as e:
        save_model(_model(), out, force=True)
    assert len(str(e.value).splitlines()) == 1
    monkeypatch.undo()
    assert {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)} == before


def test_a_json_alone_is_the_users_and_is_kept(tmp_path, capsys):
    model_path, data_path = _files(tmp_path)
    (tmp_path / "x.json").write_text("{}")
    argv = ["convert", model_path, "--after", "fc1", "--data", data_path]
    err = _one_line(capsys, [*argv, "--out", tmp_path / "x.weights.h5"])
    assert "x.json exists" in err and (tmp_path / "x.json").read_text() == "{}"


# ---------------------------------------------------------------- names


@pytest.mark.parametrize("suffix", [".keras", ".weights.h5"])
def test_a_255_byte_output_name_works(tmp_path, capsys, suffix):
    model_path, data_path = _files(tmp_path)
    out = tmp_path / ("n" * (255 - len(suffix)) + suffix)
    argv = ["convert", model_path, "--after", "fc1", "--data", data_path]
    assert cli.main([*map(str, argv), "--out", str(out)]) == 0
    assert out.exists() and not [
        n for n in os.listdir(tmp_path) if n.startswith(WORK_PREFIX)
    ]


def test_a_256_byte_output_name_is_refused_before_any_pass(
    tmp_path, capsys, monkeypatch
):
    model_path, data_path = _files(tmp_path)

    def no_pass(*args, **kwargs):
        raise AssertionError("a pass ran")

    monkeypatch.setattr(surgery, "convert", no_pass)
    out = tmp_path / ("n" * 250 + ".keras")
    argv = ["convert", model_path, "--after", "fc1", "--data", data_path]
    err = _one_line(capsys, [*argv, "--out", out], code=2)
    assert "256 bytes" in err and "shorter name" in err


def test_a_cache_name_too_long_for_its_partial_file_is_refused_up_front(tmp_path):
    model = _model()
    path = tmp_path / ("c" * 245 + ".zarr")
    calls = []
    model.predict_on_batch = lambda x: calls.append(x)
    with pytest.raises(UsageError, match="shorter name"):
        surgery.cache_features(model, X, str(path), verbose=0)
    assert calls == [] and os.listdir(tmp_path) == []


# ---------------------------------------------------------------- a full disk


@pytest.fixture
def disk(tmp_path):
    """A 1 MB tmpfs, unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    folder = tmp_path / "disk"
    folder.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)]
    if subprocess.run(mount, capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def _fill(folder, leave):
    """Fill the disk of `folder` but for `leave` bytes."""
    st = os.statvfs(folder)
    size = max(0, st.f_bavail * st.f_frsize - leave)
    with open(folder / "filler", "wb") as f:
        f.write(b"\0" * size)


_CLI = "import sys; from surgery.cli import main; sys.exit(main(sys.argv[1:]))"


@pytest.mark.parametrize(
    ("argv", "out"),
    [
        (["convert", "--after", "fc1"], "bn.keras"),
        (["convert", "--after", "fc1"], "bn.weights.h5"),
        (["stats", "--layers", "out"], "s.npz"),
    ],
    ids=["keras", "weights-h5", "stats-npz"],
)
def test_a_full_disk_is_one_line_naming_the_output_and_leaves_nothing(
    tmp_path, disk, argv, out
):
    model_path, data_path = _files(tmp_path, wide=20000)  # about 720 KB
    _fill(disk, 300_000)
    command, *rest = argv
    child = _child(
        _CLI, command, model_path, *rest, "--data", data_path, "--out", disk / out
    )
    err = child.stderr.strip().splitlines()
    assert child.returncode == 1, child.stderr  # not -11: HDF5 did not crash
    assert "Traceback" not in child.stderr, child.stderr
    assert err[-1].startswith(f"surgery: error: cannot write {disk / out}"), err
    assert "no space left" in err[-1], err
    assert os.listdir(disk) == ["filler"]


_CACHE = """
import sys
import keras, numpy as np, surgery
model = keras.saving.load_model(sys.argv[1])
try:
    surgery.cache_features(model, np.load(sys.argv[2]), sys.argv[3], verbose=0)
except surgery.SurgeryError as e:
    print(e)
    sys.exit(1)
"""


@pytest.mark.parametrize("name", ["f.zarr", "f.h5"])
def test_a_cache_on_a_full_disk_is_a_surgery_error_naming_it(tmp_path, disk, name):
    model_path, data_path = _files(tmp_path, wide=20000)  # 3.6 MB of rows
    child = _child(_CACHE, model_path, data_path, disk / name)
    assert child.returncode == 1, child.stderr  # not -11: HDF5 did not crash
    assert "Traceback" not in child.stderr, child.stderr
    (line,) = child.stdout.strip().splitlines()
    assert line.startswith(f"cannot write {disk / name}.partial: no space"), line
    assert not os.path.exists(disk / name)
    assert not os.path.exists(disk / f"{name}.lock")


def test_save_stats_on_a_full_disk_is_a_surgery_error(disk):
    _fill(disk, 0)
    stats = {"fc1": Moments(10, np.zeros(50000), np.ones(50000))}
    with pytest.raises(surgery.SurgeryError, match="cannot write .*s.npz: no space"):
        save_stats(str(disk / "s.npz"), stats)
    assert os.listdir(disk) == ["filler"]


def test_convert_with_a_full_workdir_is_a_surgery_error(disk):
    model = _model(wide=20000)  # 3.6 MB of reference outputs
    with pytest.raises(surgery.SurgeryError, match="reference outputs .*no space"):
        surgery.convert(model, after=["fc1"], data=X, workdir=str(disk), verbose=0)
