"""`surgery.convert`: the two-pass conversion and its check."""

import json

import keras
import numpy as np
import pytest

import surgery
from surgery import cli, default
from surgery.data import sources
from surgery.verbs import convert as conversion

L = keras.layers


def _x(n=100, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 255, (n, 32, 32, 3)).astype("float32")


def _count_predicts(monkeypatch, model):
    calls = []
    original = model.predict_on_batch

    def counted(x):
        calls.append(len(x))
        return original(x)

    monkeypatch.setattr(model, "predict_on_batch", counted)
    return calls


def test_two_passes_give_the_three_pass_result(monkeypatch):
    model, x = default.load(), _x(100)
    stats = surgery.activation_stats(model, ["fc1", "fc2"], x, verbose=0)
    calls = _count_predicts(monkeypatch, model)
    result = surgery.convert(model, ["fc1", "fc2"], data=x, verbose=0)
    # the original runs once, on the first batch (checking the fused outputs)
    assert calls == [32]
    assert result.report == surgery.verify(model, result.model, x, verbose=0)
    assert result.report.identical and result.report.samples == 100
    for key, m in stats.items():
        got = result.stats[key]
        assert got.count == m.count
        np.testing.assert_allclose(got.mean, m.mean, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(got.m2, m.m2, rtol=1e-12, atol=1e-9)
    reference = surgery.insert_identity_bn(model, ["fc1", "fc2"], stats=stats)
    names = [layer.name for layer in reference.layers]
    assert [layer.name for layer in result.model.layers] == names
    assert [p.samples for p in result.passes] == [100, 100]
    assert [p.name for p in result.passes] == [
        "statistics + original outputs",
        "verification (new model)",
    ]


def test_a_different_new_model_is_reported_as_verify_reports_it(monkeypatch):
    model, x = default.load(), _x(70)

    def perturbed(model, **kwargs):
        new = surgery.insert_identity_bn(model, **kwargs)
        bn = new.get_layer("fc2_bn")
        gamma, *rest = bn.get_weights()
        bn.set_weights([gamma * np.float32(1.001), *rest])
        return new

    monkeypatch.setattr(conversion, "insert_identity_bn", perturbed)
    result = surgery.convert(model, ["fc1", "fc2"], data=x, verbose=0)
    assert not result.report.identical and result.report.max_ulp_diff > 0
    assert result.report == surgery.verify(model, result.model, x, verbose=0)


def test_verify_samples_checks_only_the_first_n():
    model, x = default.load(), _x(90)
    result = surgery.convert(model, "fc1", data=x, verify_samples=40, verbose=0)
    assert result.stats["fc1"].count == 90
    assert result.report.samples == 40 and result.passes[1].samples == 40
    assert result.report == surgery.verify(
        model, result.model, x, max_samples=40, verbose=0
    )
    with pytest.raises(surgery.SurgeryError, match="verify_samples must be >= 1"):
        surgery.convert(model, "fc1", data=x, verify_samples=0)


def test_reference_from_the_original_when_the_fused_outputs_differ(monkeypatch):
    model, x = default.load(), _x(64)
    monkeypatch.setattr(conversion, "_same", lambda a, b: False)
    calls = _count_predicts(monkeypatch, model)
    result = surgery.convert(model, "fc1", data=x, verbose=0)
    assert calls == [32, 32, 32]  # the check, then once per batch
    assert "original run beside" in result.passes[0].name
    assert result.report == surgery.verify(model, result.model, x, verbose=0)


class _Shrinking(keras.utils.PyDataset):
    """Four batches on the first pass, three afterwards."""

    def __init__(self, x):
        super().__init__()
        self.x, self.passes = x, 0

    def __len__(self):
        return 4 if self.passes == 0 else 3

    def __getitem__(self, i):
        return self.x[16 * i : 16 * (i + 1)]

    def on_epoch_end(self):
        self.passes += 1


def test_data_that_changes_between_passes_is_an_error():
    model, x = default.load(), _x(64)
    with pytest.raises(surgery.SurgeryError, match="changed between passes"):
        surgery.convert(model, "fc1", data=_Shrinking(x), verbose=0)
    once = ((x[i : i + 16],) for i in range(0, 64, 16))
    with pytest.raises(surgery.SurgeryError, match="reads the data twice"):
        surgery.convert(model, "fc1", data=once, verbose=0)


def test_image_folder_converts_with_parallel_decode():
    model = default.load()
    folder = default.images_dir()
    serial = surgery.activation_stats(
        model, ["fc1"], sources.open_source(folder, model=model, workers=1)
    )
    data = sources.open_source(folder, model=model, workers=3)
    result = surgery.convert(model, "fc1", data=data, verbose=0)
    assert result.report.identical and result.report.samples == 200
    np.testing.assert_array_equal(result.stats["fc1"].count, serial["fc1"].count)
    np.testing.assert_allclose(result.stats["fc1"].mean, serial["fc1"].mean, 1e-12)


def test_cli_convert_prints_its_passes_and_verifies_a_subset(tmp_path, capsys):
    out = tmp_path / "bn.keras"
    argv = ["convert", "--out", str(out), "--verify-samples", "50", "--workers", "2"]
    assert cli.main(["--format", "json", *argv]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["identical"] is True and result["samples"] == 50
    assert [p["samples"] for p in result["passes"]] == [200, 50]
    assert cli.main([*argv, "--force"]) == 0
    text = capsys.readouterr().out
    assert "pass 1, statistics + original outputs: 200 samples in" in text
    assert "pass 2, verification (new model): 50 samples in" in text
    assert cli.main(["convert", "--out", str(out), "--force", "--verify-samples", "0"])
    assert "--verify-samples must be >= 1" in capsys.readouterr().err
