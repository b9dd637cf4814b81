"""Bad data, odd paths and damaged statistics files, refused in one line each."""

import json
import os
import threading

import keras
import numpy as np
import PIL.Image
import pytest

import surgery
from surgery import cli, default
from surgery.errors import SurgeryError, first_line
from surgery.sources import open_source

X = np.random.default_rng(0).normal(size=(16, 6)).astype("float32")


def _model(seed=0, name="small"):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation="relu", name="fc1"),
            keras.layers.Dense(3, name="out"),
        ],
        name=name,
    )


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "small.keras"
    _model().save(path)
    return path


def _run(capsys, *argv):
    code = cli.main([*map(str, argv)])
    return code, capsys.readouterr().err.strip()


def _refused(capsys, *argv, match):
    code, err = _run(capsys, *argv)
    assert code == 1, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("surgery: error: ") and match in err, err
    return err


def _convert(model_path, data, out):
    return ["convert", model_path, "--after", "fc1", "--data", data, "--out", out]


@pytest.mark.parametrize(
    "array, message",
    [
        (np.full((16, 6), "ab"), "holds text (dtype <U2), not numbers"),
        (X.astype("complex64") + 1j, "is complex (complex64)"),
        (np.empty((16, 6), object), "holds Python objects"),
        (np.float32(3.0), "is a single value (a 0-d array), not a batch"),
        (np.ones(16, "float32"), "data has shape (16,) but model input"),
    ],
)
def test_data_that_is_no_batch_of_real_numbers_is_refused(
    tmp_path, capsys, model_path, array, message
):
    out = tmp_path / "o.keras"
    if array.dtype != object:  # numpy saves objects with pickle only
        np.save(tmp_path / "x.npy", array)
        err = _refused(
            capsys, *_convert(model_path, tmp_path / "x.npy", out), match=message
        )
        assert "'" + str(tmp_path / "x.npy") + "'" in err or "shape" in message
        assert not out.exists()
    for verb in (surgery.activation_stats, surgery.insert_identity_bn):
        with pytest.raises(SurgeryError, match=message.replace("(", r"\(")[:20]):
            verb(_model(), ["fc1"], data=array, verbose=0)


def test_a_generator_of_text_batches_is_refused():
    batches = ((np.full((4, 6), "a"),) for _ in range(2))
    with pytest.raises(SurgeryError, match="holds text"):
        surgery.activation_stats(_model(), ["fc1"], data=batches, verbose=0)


def test_convert_refuses_an_inf_pixel_as_stats_does(tmp_path, capsys, model_path):
    x = X.copy()
    x[3, 2] = np.inf
    np.save(tmp_path / "x.npy", x)
    stats = ["stats", model_path, "--layers", "fc1", "--data", tmp_path / "x.npy"]
    said = _refused(capsys, *stats, "--out", tmp_path / "s.npz", match="non-finite")
    out = tmp_path / "o.keras"
    err = _refused(capsys, *_convert(model_path, tmp_path / "x.npy", out), match="")
    assert err == said and "(inf) in input 0, batch 0, at (3, 2)" in err
    with pytest.raises(SurgeryError) as caught:  # the CLI's insert reads --stats
        surgery.insert_identity_bn(_model(), ["fc1"], data=x, verbose=0)
    assert f"surgery: error: {caught.value}" == said
    assert not out.exists()


def test_values_no_bn_dtype_holds_get_advice_that_holds():
    model = _model()
    x = (np.abs(X) * 1e37).astype("float32")  # variance ~1e74 > float32's 3.4e38
    with pytest.raises(SurgeryError) as caught:
        surgery.insert_identity_bn(
            model, before="fc1", data=x, bn_dtype="mixed_float16", verbose=0
        )
    message = str(caught.value)
    assert "beyond the range of float32" in message
    assert "'mixed_float32'" not in message and "bn_dtype='float32'" not in message
    if keras.backend.backend() == "tensorflow":
        assert "bn_dtype='float64'" in message  # and it does hold it:
        new = surgery.insert_identity_bn(
            model, before="fc1", data=x, bn_dtype="float64", verbose=0
        )
        assert surgery.verify(model, new, x, verbose=0).identical
    else:
        assert "scale the data down" in message


def _png16(path, value):
    PIL.Image.fromarray(np.full((40, 40), value, np.uint16)).save(path)


def test_a_16_bit_grayscale_png_reads_on_the_8_bit_scale(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    _png16(folder / "a16.png", 130 * 257)
    PIL.Image.fromarray(np.full((40, 40), 130, np.uint8)).save(folder / "b8.png")
    assert PIL.Image.open(folder / "a16.png").mode.startswith("I")
    gray = keras.Sequential([keras.Input((32, 32, 1)), keras.layers.Flatten()])
    for model in (default.load(), gray):
        batch = open_source(str(folder), model=model, batch_size=2, workers=1)[0]
        assert batch.shape[-1] == model.inputs[0].shape[-1]
        np.testing.assert_allclose(batch.reshape(2, -1).mean(axis=1), [130, 130])


def test_32_bit_float_images_are_refused(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    PIL.Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(folder / "f.tif")
    rows = open_source(str(folder), image_size=(8, 8), batch_size=1, workers=1)
    with pytest.raises(SurgeryError, match="32-bit floats, with no known 0..255"):
        rows[0]


def _within(seconds, run):
    """`run()`'s result, or a failure if it blocks (a FIFO opened)."""
    result = []
    thread = threading.Thread(target=lambda: result.append(run()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "blocked on a special file"
    return result[0]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_fifos_are_refused_without_being_opened(tmp_path, capsys, model_path):
    fifo_model, fifo_data = tmp_path / "m.keras", tmp_path / "d.npy"
    os.mkfifo(fifo_model)
    os.mkfifo(fifo_data)
    fifo_weights, fifo_json = tmp_path / "w.weights.h5", tmp_path / "a.json"
    os.mkfifo(fifo_weights)
    os.mkfifo(fifo_json)
    (tmp_path / "arch.json").write_text(_model().to_json())
    np.save(tmp_path / "x.npy", X)
    out = tmp_path / "o.keras"
    for argv, what in [
        (_convert(fifo_model, tmp_path / "x.npy", out), f"model '{fifo_model}'"),
        (_convert(model_path, fifo_data, out), f"data '{fifo_data}'"),
        (
            ["inspect", tmp_path / "arch.json", "--weights", fifo_weights],
            f"weights '{fifo_weights}'",
        ),
        (
            ["inspect", fifo_json, "--weights", model_path],
            f"architecture '{fifo_json}'",
        ),
    ]:
        code, err = _within(60, lambda a=argv: _run(capsys, *a))
        assert code == 1 and len(err.splitlines()) == 1, err
        assert f"{what} is a FIFO (named pipe), not a regular file" in err
    fifo_stats = tmp_path / "s.npz"
    os.mkfifo(fifo_stats)
    merged = tmp_path / "m.npz"
    code, err = _within(60, lambda: _run(capsys, "merge", fifo_stats, "--out", merged))
    assert code == 1 and "is a FIFO" in err and len(err.splitlines()) == 1


def test_a_newline_in_a_file_name_stays_on_one_line(tmp_path, capsys, model_path):
    odd = tmp_path / "ev\nil.npy"
    np.save(odd, np.float32(1))
    out = tmp_path / "o.keras"
    err = _refused(capsys, *_convert(model_path, odd, out), match="ev\\nil.npy'")
    assert "0-d array" in err
    missing = tmp_path / "no\nmodel.keras"
    err = _refused(capsys, *_convert(missing, odd, out), match="no\\nmodel.keras")
    assert "does not exist" in err
    assert first_line(SurgeryError("file a\nb is odd")) == "file a\\nb is odd"
    assert first_line(ValueError("keras says\nmore")) == "keras says"


def _stats(capsys, model_path, out, *extra):
    np.save(out.parent / "x.npy", X)
    argv = ["stats", model_path, "--layers", "fc1", "--data", out.parent / "x.npy"]
    assert _run(capsys, *argv, *extra, "--out", out)[0] == 0
    return out


def _rewrite_header(path, **fields):
    with np.load(path) as f:
        arrays = dict(f)
    header = json.loads(str(arrays["header"][()]))
    header.update(fields)
    arrays["header"] = np.array(json.dumps(header))
    np.savez(path, **arrays)


@pytest.mark.parametrize(
    "field, value", [("shard", [1]), ("shard", [3, 2]), ("shard", "0/2"), ("model", 5)]
)
def test_merge_checks_header_fields_before_use(
    tmp_path, capsys, model_path, field, value
):
    s0 = _stats(capsys, model_path, tmp_path / "s0.npz", "--shard", "0/2")
    s1 = _stats(capsys, model_path, tmp_path / "s1.npz", "--shard", "1/2")
    _rewrite_header(s1, **{field: value})
    out = tmp_path / "m.npz"
    err = _refused(capsys, "merge", s0, s1, "--out", out, match=f"'{s1}'")
    assert f"its header field '{field}' is {value!r}" in err
    assert "write it again with `surgery stats`" in err
    assert not out.exists()


def test_merge_says_when_same_named_models_have_other_weights(tmp_path, capsys):
    paths = []
    for seed in (0, 1):
        path = tmp_path / f"m{seed}.keras"
        _model(seed).save(path)  # both named 'small'
        shard = tmp_path / f"s{seed}.npz"
        paths.append(_stats(capsys, path, shard, "--shard", f"{seed}/2"))
    out = tmp_path / "m.npz"
    err = _refused(capsys, "merge", *paths, "--out", out, match="different weights")
    assert "both named 'small'" in err


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.fc = keras.layers.Dense(4, name="fc")

    def call(self, x):
        return self.fc(x)


def test_a_traced_models_input_is_named_by_its_input_layer():
    model = Subclassed()
    model(X[:2])
    traced = surgery.functional(model)
    assert traced.inputs[0].name.startswith("keras_tensor")
    with pytest.raises(SurgeryError) as caught:
        surgery.activation_stats(traced, ["fc"], data=X[:, :5], verbose=0)
    message = str(caught.value)
    assert "keras_tensor" not in message
    assert f"model input '{traced.layers[0].name}' expects (None, 6)" in message


def test_a_keras_message_that_leads_into_code_ends_at_a_whole_sentence():
    tf = pytest.importorskip("tensorflow")
    if keras.backend.backend() != "tensorflow":
        pytest.skip("a TensorFlow function in call() is the TensorFlow case")

    class UsesTf(keras.Model):
        def __init__(self):
            super().__init__()
            self.fc = keras.layers.Dense(3)

        def call(self, x):
            return self.fc(tf.nn.relu(x))

    model = UsesTf()
    model(np.zeros((1, 4), "float32"))
    with pytest.raises(SurgeryError) as e:
        surgery.functional(model)
    message = str(e.value)
    assert "like:" not in message and "\n" not in message, message
    assert "`keras.layers`" in message, message
    assert first_line(ValueError("You do it. Likely like:\n\n  code")) == "You do it."
