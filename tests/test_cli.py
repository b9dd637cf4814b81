import json

import keras
import numpy as np

from surgery import cli, default


def test_convert_embedded_default_is_identical_and_reloads(tmp_path, capsys):
    out = tmp_path / "bn.keras"
    assert cli.main(["--format", "json", "convert", "--out", str(out)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["identical"] is True
    original = default.load()
    converted = keras.models.load_model(out, safe_mode=True)
    assert {"fc1_bn", "fc2_bn"} <= {layer.name for layer in converted.layers}
    x = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    assert np.array_equal(converted.predict_on_batch(x), original.predict_on_batch(x))


def test_existing_output_is_not_overwritten_and_errors_are_one_line(tmp_path, capsys):
    out = tmp_path / "bn.keras"
    out.write_bytes(b"keep me")
    assert cli.main(["convert", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert "exists; pass --force" in err and len(err.splitlines()) == 1
    assert out.read_bytes() == b"keep me"
    assert (
        cli.main(["convert", "--after", "fc9", "--out", str(tmp_path / "x.keras")]) == 1
    )
    assert "no layer 'fc9'" in capsys.readouterr().err
    assert not (tmp_path / "x.keras").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bn.keras"]
