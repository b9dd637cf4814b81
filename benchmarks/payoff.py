"""Case 7, the payoff: does fine-tuning with identity BN beat fine-tuning without?

The task, chosen so that the pretrained weights are really pretrained and the
fine-tuning really transfers (everything ships in scikit-learn, offline):

- **Pretraining**: the embedded default's architecture
  (`surgery.default.train.build_model`, VGG-style, 32x32 RGB) with a 5-way
  softmax, trained from scratch on the digits **0-4** (80% of them; the other
  20% are the source validation set).
- **Transfer**: the digits **5-9**, which the pretrained net never saw, half
  for fine-tuning and half for validation. As in the fast.ai notebook, the
  conv trunk is frozen and its features are computed once
  (`surgery.split(at="flatten")`); the dense head is fine-tuned: the
  pretrained `fc1` and `fc2` plus a new 5-way `new_predictions` layer.

Three variants of the same head, all fine-tuned with Adam on the same batches
in the same order, the same new-layer initialisation and the same dropout
masks per seed:

1. `original`: as it is;
2. `identity BN`: BN after `fc1` and `fc2` by `surgery.insert_identity_bn`;
3. `fast.ai BN`: the same BN layers set to `[std, mu, mu, std]` (gamma = std,
   beta = moving mean = mu, moving variance = std), as the notebook does.

BN statistics come from the transfer training set. Validation losses are
computed in float64 from the compiled model's probabilities (clipped to
[1e-7, 1 - 1e-7] as Keras does), so "before training" is bit for bit what
the model computes. Each fine-tuned BN model is also evaluated after
`surgery.recalibrate_bn`, which separates what BN did for training from the
lag of its moving statistics.
"""

from __future__ import annotations

import math
import statistics
import time

import keras
import numpy as np

import surgery
from surgery.default import train as default_train

TAPS = ["fc1", "fc2"]
VARIANTS = ("original", "identity BN", "fast.ai BN")
NEW_HEAD = "new_predictions"
SOURCE = (0, 1, 2, 3, 4)
TARGET = (5, 6, 7, 8, 9)
BATCH = 32
EPSILON = 1e-7  # Keras' probability clip in crossentropy

LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
SIZES = {
    "full": {
        "seeds": 5,
        "lrs": LRS,
        "epochs": 10,
        "pretrain_epochs": 10,
        "pretrain_samples": None,
        "mixed_lr": 1e-3,
    },
    "quick": {
        "seeds": 1,
        "lrs": (1e-3, 1e-1),
        "epochs": 1,
        "pretrain_epochs": 1,
        "pretrain_samples": 256,
        "mixed_lr": 1e-3,
    },
}


def run(quick: bool = False, log=print) -> dict:
    """The whole experiment; raises AssertionError if a property fails."""
    sizes = SIZES["quick" if quick else "full"]
    seeds = list(range(sizes["seeds"]))
    started = time.perf_counter()
    data = digits_task()
    pretrained = pretrain(data, sizes["pretrain_epochs"], sizes["pretrain_samples"])
    log(f"  pretrained on digits {SOURCE} in {time.perf_counter() - started:.0f} s")

    trunk, head = surgery.split(pretrained, at="flatten")
    features = {
        name: trunk.predict(x, batch_size=256, verbose=0)
        for name, x in data["images"].items()
    }
    kept = function_kept(head, features["source_val"], data["labels"]["source_val"])
    log(
        "  source task, val loss: " + ", ".join(f"{k} {v:.4f}" for k, v in kept.items())
    )

    base = transfer_base(head)
    task = {
        "x_train": features["target_train"],
        "y_train": data["labels"]["target_train"],
        "x_val": features["target_val"],
        "y_val": data["labels"]["target_val"],
    }
    models = variants(base, task["x_train"])
    log(f"  variants built at {time.perf_counter() - started:.0f} s")
    runs = sweep(models, task, seeds, sizes["lrs"], sizes["epochs"], log)
    log(f"  sweep done at {time.perf_counter() - started:.0f} s")

    mixed_models = variants(with_policy(base, "mixed_float16"), task["x_train"])
    mixed = sweep(
        mixed_models,
        task,
        seeds,
        [sizes["mixed_lr"]],
        sizes["epochs"],
        log,
        loss_scale=True,
    )
    result = {
        "task": {
            "pretrain_classes": list(SOURCE),
            "transfer_classes": list(TARGET),
            "pretrain_samples": len(
                data["labels"]["source_train"][: sizes["pretrain_samples"]]
            ),
            "source_val_samples": len(data["labels"]["source_val"]),
            "train_samples": len(task["y_train"]),
            "val_samples": len(task["y_val"]),
            "features": int(task["x_train"].shape[1]),
            "batch_size": BATCH,
            "optimizer": "Adam",
        },
        "sizes": {k: list(v) if isinstance(v, tuple) else v for k, v in sizes.items()},
        "source_val_loss": kept,
        "runs": runs,
        "summary": summarize(runs),
        "diverges_at": diverges_at(runs, len(seeds)),
        "mixed": {"lr": sizes["mixed_lr"], "runs": mixed, "summary": summarize(mixed)},
        "seconds": time.perf_counter() - started,
    }
    result["checks"] = check(result)
    return result


# -- data and models -----------------------------------------------------------


def digits_task(seed: int = 0) -> dict:
    """scikit-learn's digits as 32x32 RGB, split into source and target sets."""
    images, labels = default_train.digit_images()
    rng = np.random.default_rng(seed)
    parts = {
        k: [] for k in ("source_train", "source_val", "target_train", "target_val")
    }
    for label in range(10):
        members = rng.permutation(np.flatnonzero(labels == label))
        if label in SOURCE:
            cut = int(round(0.8 * len(members)))
            parts["source_train"].append(members[:cut])
            parts["source_val"].append(members[cut:])
        else:
            cut = len(members) // 2
            parts["target_train"].append(members[:cut])
            parts["target_val"].append(members[cut:])
    index = {k: np.sort(np.concatenate(v)) for k, v in parts.items()}
    offset = {"source": SOURCE[0], "target": TARGET[0]}
    return {
        "images": {k: images[i].astype("float32") for k, i in index.items()},
        "labels": {k: labels[i] - offset[k.split("_")[0]] for k, i in index.items()},
    }


def pretrain(data: dict, epochs: int, samples: int | None = None) -> keras.Model:
    """The default's architecture with a 5-way head, trained on digits 0-4."""
    keras.utils.set_random_seed(0)
    net = default_train.build_model()
    outputs = keras.layers.Dense(len(SOURCE), activation="softmax", name="predictions")(
        net.get_layer("dropout_1").output
    )
    model = keras.Model(net.input, outputs, name="digits_vgg_0to4")
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="sparse_categorical_crossentropy",
    )
    model.fit(
        data["images"]["source_train"][:samples],
        data["labels"]["source_train"][:samples],
        batch_size=BATCH,
        epochs=epochs,
        shuffle=True,
        verbose=0,
    )
    return model


def transfer_base(head: keras.Model) -> keras.Model:
    """The pretrained dense head with a new 5-way layer instead of its own.

    Fresh copies of the head's layers (weights copied), so the new model
    shares no variables with the pretrained one.
    """
    x = inputs = keras.Input(head.input.shape[1:], name="flatten_features")
    for name in ("fc1", "dropout", "fc2", "dropout_1"):
        layer = head.get_layer(name)
        copy = layer.__class__.from_config(layer.get_config())
        x = copy(x)
        copy.set_weights(layer.get_weights())
    outputs = keras.layers.Dense(len(TARGET), activation="softmax", name=NEW_HEAD)(x)
    return keras.Model(inputs, outputs, name="transfer_head")


def with_policy(model: keras.Model, policy: str) -> keras.Model:
    """A copy with `policy` on every layer but the softmax output (float32).

    A dtype policy is fixed when a layer is built, so the copy is rebuilt
    from the config; mixed policies keep float32 variables, so copying the
    weights is lossless.
    """
    config = model.get_config()
    for layer in config["layers"]:
        if layer["class_name"] != "InputLayer":
            layer["config"]["dtype"] = (
                "float32" if layer["name"] == NEW_HEAD else policy
            )
    copy = keras.Model.from_config(config)
    copy.set_weights(model.get_weights())
    return copy


def variants(base: keras.Model, x: np.ndarray) -> dict[str, keras.Model]:
    """`base` as it is, with identity BN, and with fast.ai's BN."""
    stats = surgery.activation_stats(base, TAPS, x, verbose=0)
    fastai = surgery.insert_identity_bn(base, after=TAPS, stats=stats)
    for tap in TAPS:
        mu = stats[tap].mean.astype("float32")
        std = stats[tap].std.astype("float32")
        fastai.get_layer(f"{tap}_bn").set_weights([std, mu, mu, std])
    original = keras.models.clone_model(base)
    original.set_weights(base.get_weights())
    return {
        "original": original,
        "identity BN": surgery.insert_identity_bn(base, after=TAPS, stats=stats),
        "fast.ai BN": fastai,
    }


def function_kept(head: keras.Model, x: np.ndarray, y: np.ndarray) -> dict:
    """Validation loss of the pretrained head on its own task, per variant."""
    models = variants(head, x)
    return {name: val_loss(m.predict_on_batch(x), y) for name, m in models.items()}


def head_init(seed: int, fan_in: int) -> list[np.ndarray]:
    """Glorot-uniform kernel and zero bias for the new layer, from the seed."""
    limit = math.sqrt(6.0 / (fan_in + len(TARGET)))
    rng = np.random.default_rng(1000 + seed)
    kernel = rng.uniform(-limit, limit, (fan_in, len(TARGET))).astype("float32")
    return [kernel, np.zeros(len(TARGET), "float32")]


def val_loss(probabilities, labels) -> float:
    p = np.asarray(probabilities, dtype=np.float64)
    picked = np.clip(p[np.arange(len(labels)), labels], EPSILON, 1 - EPSILON)
    return float(np.mean(-np.log(picked)))


def accuracy(probabilities, labels) -> float:
    return float(np.mean(np.argmax(probabilities, axis=-1) == labels))


# -- fine-tuning ---------------------------------------------------------------


class Trainer:
    """One compiled model, reset to the same start before every run.

    Resetting the weights, the optimizer's variables, the learning rate and
    the dropout seeds replays what a freshly built and compiled model does,
    bit for bit (tests/test_payoff.py checks it), without tracing the train
    function again for every (seed, learning rate).
    """

    def __init__(self, model: keras.Model, loss_scale: bool = False):
        optimizer = keras.optimizers.Adam(1e-3)
        if loss_scale:
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
        optimizer.build(model.trainable_variables)
        self.model, self.optimizer = model, optimizer
        self.weights = model.get_weights()
        self.optimizer_start = [np.array(v) for v in optimizer.variables]
        self.dropouts = [
            layer for layer in model.layers if isinstance(layer, keras.layers.Dropout)
        ]

    def reset(self, seed: int, lr: float) -> None:
        self.model.set_weights(self.weights)
        layer = self.model.get_layer(NEW_HEAD)
        layer.set_weights(head_init(seed, layer.kernel.shape[0]))
        for variable, value in zip(
            self.optimizer.variables, self.optimizer_start, strict=True
        ):
            variable.assign(value)
        self.optimizer.learning_rate = lr
        for i, dropout in enumerate(self.dropouts):
            state = dropout.seed_generator.state
            state.assign(np.array([100 * seed + i + 1, 0], dtype=state.dtype))


def fine_tune(trainer: Trainer, task: dict, seed: int, lr: float, epochs: int) -> dict:
    """One run: val loss before, then per epoch the train and val figures."""
    trainer.reset(seed, lr)
    model, x, y = trainer.model, task["x_train"], task["y_train"]
    steps = (
        len(x) // BATCH
    )  # whole batches only: BN statistics of 1-2 samples are noise
    before = model.predict_on_batch(task["x_val"])
    out = {
        "seed": seed,
        "lr": lr,
        "before": val_loss(before, task["y_val"]),
        "before_accuracy": accuracy(before, task["y_val"]),
        "train_loss": [],
        "val_loss": [],
        "val_accuracy": [],
        "_before": np.asarray(before),
    }
    for epoch in range(epochs):
        order = np.random.default_rng([seed, epoch]).permutation(len(x))
        losses = []
        for step in range(steps):
            batch = order[step * BATCH : (step + 1) * BATCH]
            losses.append(float(np.asarray(model.train_on_batch(x[batch], y[batch]))))
        p = model.predict_on_batch(task["x_val"])
        out["train_loss"].append(_finite(statistics.fmean(losses)))
        out["val_loss"].append(_finite(val_loss(p, task["y_val"])))
        out["val_accuracy"].append(accuracy(p, task["y_val"]))
    out["diverged"] = failed(out)
    out["recalibrated_loss"], out["recalibrated_accuracy"] = recalibrated(model, task)
    if isinstance(trainer.optimizer, keras.optimizers.LossScaleOptimizer):
        out["loss_scale"] = float(np.asarray(trainer.optimizer.dynamic_scale))
    return out


def recalibrated(model: keras.Model, task: dict) -> tuple:
    """Val loss and accuracy once the BN moving statistics are recomputed.

    With momentum 0.99 and 130 steps, a BN's moving statistics still hold
    27% of their starting values, measured on weights that fine-tuning has
    since moved. `surgery.recalibrate_bn` replaces them with the population
    statistics of the training features under the final weights, which
    separates what the BN layers did for training from that lag.
    (None, None) without BN layers or with non-finite activations.
    """
    if not any(isinstance(x, keras.layers.BatchNormalization) for x in model.layers):
        return None, None
    try:
        fixed = surgery.recalibrate_bn(model, task["x_train"], verbose=0)
    except surgery.SurgeryError:  # a diverged run's activations are not finite
        return None, None
    p = fixed.predict_on_batch(task["x_val"])
    return _finite(val_loss(p, task["y_val"])), accuracy(p, task["y_val"])


def failed(run: dict) -> bool:
    """Diverged: the final val loss is not finite or above the loss before
    training, or the final accuracy is below twice chance (a collapse to
    one class keeps the loss near log(5) but learns nothing)."""
    end = run["val_loss"][-1]
    chance = 1 / len(TARGET)
    return end is None or end > run["before"] or run["val_accuracy"][-1] < 2 * chance


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def sweep(models, task, seeds, lrs, epochs, log=print, loss_scale=False) -> list[dict]:
    """Every (learning rate, seed, variant) run, variants on identical terms."""
    trainers = {name: Trainer(m, loss_scale) for name, m in models.items()}
    runs = []
    for lr in lrs:
        for seed in seeds:
            start = {}
            for name, trainer in trainers.items():
                r = fine_tune(trainer, task, seed, lr, epochs)
                start[name] = r.pop("_before")
                r["variant"] = name
                r["identical_before"] = bool(
                    np.array_equal(start[name], start["original"])
                )
                runs.append(r)
        cells = [f"{name} {_cell(runs, name, lr)}" for name in models]
        log(f"  lr {lr:g}: " + "; ".join(cells))
    return runs


def _cell(runs, variant, lr):
    accs = [
        r["val_accuracy"][-1] for r in runs if r["variant"] == variant and r["lr"] == lr
    ]
    return f"acc {statistics.fmean(accs):.3f}"


# -- summary and checks --------------------------------------------------------


def summarize(runs: list[dict]) -> list[dict]:
    """Per (variant, lr): mean losses, accuracy mean and std, diverged runs."""
    rows = []
    for lr in sorted({r["lr"] for r in runs}):
        for variant in VARIANTS:
            cell = [r for r in runs if r["variant"] == variant and r["lr"] == lr]
            accs = [r["val_accuracy"][-1] for r in cell]
            rows.append(
                {
                    "variant": variant,
                    "lr": lr,
                    "seeds": len(cell),
                    "before": _mean([r["before"] for r in cell]),
                    "identical_before": sum(r["identical_before"] for r in cell),
                    "epoch1": _mean([r["val_loss"][0] for r in cell]),
                    "end": _mean([r["val_loss"][-1] for r in cell]),
                    "accuracy": statistics.fmean(accs),
                    "accuracy_std": statistics.pstdev(accs),
                    "diverged": sum(r["diverged"] for r in cell),
                    **_recalibrated(cell),
                }
            )
    return rows


def _mean(values):
    """Mean of the finite values; None if any is not finite."""
    return None if None in values else statistics.fmean(values)


def _recalibrated(cell):
    """Means over the runs that could be recalibrated (finite activations)."""
    done = [r for r in cell if r["recalibrated_accuracy"] is not None]
    losses = [r["recalibrated_loss"] for r in done]
    accs = [r["recalibrated_accuracy"] for r in done]
    return {
        "recalibrated_runs": len(done),
        "recalibrated_end": _mean(losses) if done else None,
        "recalibrated_accuracy": statistics.fmean(accs) if done else None,
        "recalibrated_accuracy_std": statistics.pstdev(accs) if done else None,
    }


def diverges_at(runs: list[dict], seeds: int) -> dict:
    """Per variant, the smallest learning rate at which most seeds diverged."""
    out = {}
    for variant in VARIANTS:
        out[variant] = None
        for lr in sorted({r["lr"] for r in runs}):
            cell = [r for r in runs if r["variant"] == variant and r["lr"] == lr]
            if sum(r["diverged"] for r in cell) * 2 > seeds:
                out[variant] = lr
                break
    return out


def check(result: dict) -> dict:
    """The properties every run must have, whatever the outcome; asserted."""
    runs, kept = result["runs"] + result["mixed"]["runs"], result["source_val_loss"]
    lowest = min(r["lr"] for r in result["runs"])
    checks = {
        "identity BN keeps the pretrained function (source val loss equal)": (
            kept["identity BN"] == kept["original"]
        ),
        "fast.ai BN changes it (source val loss differs)": (
            kept["fast.ai BN"] != kept["original"]
        ),
        "identity BN: predictions before training equal the original's": all(
            r["identical_before"] for r in runs if r["variant"] == "identity BN"
        ),
        "fast.ai BN: predictions before training differ": not any(
            r["identical_before"] for r in runs if r["variant"] == "fast.ai BN"
        ),
        "training runs at the lowest lr (val loss finite and changed)": all(
            r["val_loss"][-1] is not None and r["val_loss"][-1] != r["before"]
            for r in runs
            if r["lr"] == lowest
        ),
    }
    failed = [name for name, ok in checks.items() if not ok]
    assert not failed, "payoff: failed checks: " + "; ".join(failed)
    return checks
