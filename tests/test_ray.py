"""The statistics pass on Ray: same results as one process, faults, Ctrl-C, CLI.

One local cluster (2 CPUs) serves the module; every command starts its
actors afresh, which dominates the time, so each test runs as few commands
as it can.
"""

import _thread
import os
import sys
import threading

import keras
import numpy as np
import pytest

ray = pytest.importorskip("ray")

import surgery  # noqa: E402
from surgery import cli, default  # noqa: E402
from surgery.engines import ray_engine  # noqa: E402
from surgery.engines.ray_actor import BATCH, TapActor  # noqa: E402
from surgery.engines.ray_pool import ActorPool  # noqa: E402
from surgery.files import statsfile  # noqa: E402
from surgery.numerics import moments as moments_module  # noqa: E402

RTOL = 1e-12


@pytest.fixture(scope="module", autouse=True)
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    # Actor classes defined here travel by value: workers cannot import tests/.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def model():
    return default.load()


@pytest.fixture(scope="module")
def x():
    # 200 = 6 full batches of 32 and a short one of 8
    return np.random.default_rng(7).uniform(0, 255, (200, 32, 32, 3)).astype("float32")


def assert_same(got, want):
    assert list(got) == list(want)
    for key in want:
        assert got[key].count == want[key].count
        np.testing.assert_allclose(got[key].mean, want[key].mean, rtol=RTOL, atol=0)
        np.testing.assert_allclose(got[key].var, want[key].var, rtol=RTOL, atol=0)


def test_a_parquet_dataset_is_batched_by_ray(model, x, tmp_path):
    ray.data.from_numpy(x).write_parquet(str(tmp_path / "x"))
    got = surgery.activation_stats(
        model, ["fc1"], str(tmp_path / "x"), engine=surgery.RayEngine(workers=1)
    )
    want = surgery.activation_stats(model, ["fc1"], x, verbose=0)
    assert got["fc1"].count == 200
    # Ray makes up the batches: equal to float32 rounding of the activations
    np.testing.assert_allclose(got["fc1"].mean, want["fc1"].mean, rtol=1e-6)
    np.testing.assert_allclose(got["fc1"].var, want["fc1"].var, rtol=1e-5)


class FailingActor(TapActor):
    """Raises on batch 2 and kills its own process on batch 4, once each."""

    marker_dir = None

    def __call__(self, rows):
        for i in rows[BATCH]:
            for batch, fault in ((2, "raise"), (4, "die")):
                marker = os.path.join(self.marker_dir, fault)
                if i == batch and not os.path.exists(marker):
                    open(marker, "w").close()
                    if fault == "raise":
                        raise RuntimeError("injected fault")
                    os._exit(1)
        return super().__call__(rows)


def test_arrays_give_the_in_process_statistics_despite_a_failing_and_a_dying_actor(
    model, x, tmp_path, monkeypatch
):
    actor = type("Failing", (FailingActor,), {"marker_dir": str(tmp_path)})
    monkeypatch.setattr(ray_engine, "TapActor", actor)
    layers, before = ["fc1", "block2_conv1"], ["fc2"]
    kwargs = dict(before=before, verbose=0, max_samples=190)  # a short last batch
    got = surgery.activation_stats(
        model, layers, x, engine=surgery.RayEngine(workers=2), **kwargs
    )
    assert sorted(os.listdir(tmp_path)) == ["die", "raise"]  # both faults happened
    assert got["fc1"].count == 190
    assert got["block2_conv1"].count == 190 * 16 * 16
    assert_same(got, surgery.activation_stats(model, layers, x, **kwargs))


def test_cli_stats_and_convert_with_ray_match_the_in_process_run(
    model, x, tmp_path, cluster, capsys
):
    ray_args = ["--ray", cluster, "--workers", "1"]
    # stats on the embedded images: an image folder, resized by the actors
    base = ["stats", "--layers", "fc1", "fc2"]
    assert cli.main([*base, "--out", str(tmp_path / "local.npz")]) == 0
    assert cli.main([*base, *ray_args, "--out", str(tmp_path / "ray.npz")]) == 0
    want, _ = statsfile.load_stats(str(tmp_path / "local.npz"))
    got, _ = statsfile.load_stats(str(tmp_path / "ray.npz"))
    assert_same(got, want)

    # convert on a .npy file, which every actor opens by path
    np.save(tmp_path / "x.npy", x)
    data = str(tmp_path / "x.npy")
    out = tmp_path / "bn.keras"
    argv = ["convert", "--data", data, *ray_args, "--out", str(out)]
    assert cli.main(argv) == 0
    assert "identical: True" in capsys.readouterr().out
    stats = surgery.activation_stats(model, ["fc1", "fc2"], data, verbose=0)
    new = surgery.insert_identity_bn(model, after=["fc1", "fc2"], stats=stats)
    saved = keras.models.load_model(out)
    for name in ("fc1_bn", "fc2_bn"):
        for a, b in zip(
            saved.get_layer(name).get_weights(),
            new.get_layer(name).get_weights(),
            strict=True,
        ):
            np.testing.assert_allclose(a, b, rtol=1e-6)


def test_ctrl_c_leaves_no_output(model, x, tmp_path, cluster, monkeypatch):
    # Ctrl-C arrives at a known point, once the driver has merged the first
    # batch: `interrupt_main` from the main thread raises SIGINT's
    # KeyboardInterrupt there, before the pass can finish, whatever the load.
    np.save(tmp_path / "x.npy", x)
    merged = []
    check = moments_module.check_finite

    def first_batch_merged(*args):
        check(*args)
        merged.append(args)
        if len(merged) == 1:
            assert threading.current_thread() is threading.main_thread()
            _thread.interrupt_main()

    monkeypatch.setattr(moments_module, "check_finite", first_batch_merged)
    out = tmp_path / "out"
    out.mkdir()
    argv = ["stats", "--data", str(tmp_path / "x.npy"), "--layers", "fc1"]
    argv += ["--ray", cluster, "--workers", "1", "--batch-size", "8"]
    assert cli.main([*argv, "--out", str(out / "s.npz")]) == 130  # one line, no trace
    assert len(merged) == 1  # interrupted right after the first batch
    assert os.listdir(out) == []  # neither the file nor a temporary one


def test_recalibrate_with_ray_matches_in_process(model, x):
    bn_model = surgery.insert_identity_bn(
        model, after=["fc1", "fc2"], data=x[:64], verbose=0
    )
    kwargs = dict(layers=["fc2_bn"], mode="exact", verbose=0)
    want = surgery.recalibrate_bn(bn_model, x, **kwargs)
    got = surgery.recalibrate_bn(
        bn_model, x, engine=surgery.RayEngine(workers=1), **kwargs
    )
    bn_got, bn_want = got.get_layer("fc2_bn"), want.get_layer("fc2_bn")
    np.testing.assert_allclose(
        bn_got.moving_mean.numpy(), bn_want.moving_mean.numpy(), rtol=1e-6
    )
    np.testing.assert_allclose(
        bn_got.moving_variance.numpy(), bn_want.moving_variance.numpy(), rtol=1e-6
    )
    assert not np.allclose(
        bn_got.moving_variance.numpy(),
        bn_model.get_layer("fc2_bn").moving_variance.numpy(),
    )


def test_ray_errors_are_one_line(model, x, capsys):
    with pytest.raises(surgery.SurgeryError, match="engine must be"):
        surgery.activation_stats(model, ["fc1"], x, engine="spark")
    with pytest.raises(surgery.SurgeryError, match="engine='ray' reads"):
        surgery.activation_stats(model, ["fc1"], iter([x]), engine="ray")
    argv = ["stats", "--layers", "fc1", "--gpus-per-worker", "1", "--out", "s.npz"]
    assert cli.main(argv)
    err = capsys.readouterr().err
    assert err == "surgery: error: --gpus-per-worker needs --ray\n"


def test_cli_recalibrate_with_ray_matches_the_in_process_run(
    model, x, tmp_path, cluster
):
    bn_model = surgery.insert_identity_bn(
        model, after=["fc1", "fc2"], data=x[:64], verbose=0
    )
    bn_model.save(tmp_path / "bn.keras")
    np.save(tmp_path / "x.npy", x)
    base = [
        "recalibrate",
        str(tmp_path / "bn.keras"),
        "--data",
        str(tmp_path / "x.npy"),
    ]
    base += ["--mode", "exact", "--batch-size", "32"]
    assert cli.main([*base, "--out", str(tmp_path / "local.keras")]) == 0
    ray_args = ["--ray", cluster, "--workers", "2"]
    assert cli.main([*base, *ray_args, "--out", str(tmp_path / "ray.keras")]) == 0
    want = keras.models.load_model(tmp_path / "local.keras")
    got = keras.models.load_model(tmp_path / "ray.keras")
    for name in ("fc1_bn", "fc2_bn"):
        a, b = want.get_layer(name), got.get_layer(name)
        assert np.array_equal(a.moving_mean.numpy(), b.moving_mean.numpy())
        assert np.array_equal(a.moving_variance.numpy(), b.moving_variance.numpy())
        assert not np.array_equal(
            a.moving_variance.numpy(),
            bn_model.get_layer(name).moving_variance.numpy(),
        )


def test_recalibrate_with_ray_starts_its_actors_once_and_reports(model, x):
    # fc1_bn feeds fc2_bn: two levels, two passes, one pool of two actors
    bn_model = surgery.insert_identity_bn(
        model, after=["fc1", "fc2"], data=x[:64], verbose=0
    )
    kwargs = dict(mode="exact", verbose=0, return_report=True)
    want, want_report = surgery.recalibrate_bn(bn_model, x, **kwargs)
    started = ActorPool.started
    got, report = surgery.recalibrate_bn(
        bn_model, x, engine=surgery.RayEngine(workers=2), **kwargs
    )
    assert ActorPool.started - started == 2
    assert report == want_report
    for name in ("fc1_bn", "fc2_bn"):
        a, b = want.get_layer(name), got.get_layer(name)
        assert np.array_equal(a.moving_mean.numpy(), b.moving_mean.numpy())
        assert np.array_equal(a.moving_variance.numpy(), b.moving_variance.numpy())


def test_a_non_finite_input_is_refused_on_ray_as_locally(model, x):
    bad = x.copy()
    bad[40, 3, 4, 1] = np.inf  # batch 1 of 32
    with pytest.raises(
        surgery.SurgeryError, match=r"non-finite value \(inf\).*batch 1"
    ):
        surgery.activation_stats(
            model, ["fc1"], bad, engine=surgery.RayEngine(workers=1), verbose=0
        )
