"""Insert identity BN into the embedded model under mixed_float16 and fine-tune.

A dtype policy is fixed when a layer is built, so a pretrained float32 model
is rebuilt from its config with the new policy and the weights are copied
over (mixed_float16 keeps float32 variables, so the copy is lossless). The
BN layers then start as an exact identity with the measured population
statistics as their moving mean and variance; fine-tuning the head with a
`LossScaleOptimizer` moves them towards the batch statistics.

Run: python examples/mixed_precision_finetune.py  (about half a minute on CPU)
"""

import keras
import numpy as np

import surgery
import surgery.default


def with_policy(model: keras.Model, policy: str) -> keras.Model:
    """A copy of a Functional model whose layers use `policy`."""
    config = model.get_config()
    for layer in config["layers"]:
        if layer["class_name"] != "InputLayer":
            layer["config"]["dtype"] = policy
    copy = keras.Model.from_config(config)
    copy.set_weights(model.get_weights())
    return copy


pretrained = surgery.default.load()
model = with_policy(pretrained, "mixed_float16")
print("fc1 computes in", model.get_layer("fc1").compute_dtype)

images = keras.utils.image_dataset_from_directory(
    surgery.default.images_dir(),
    image_size=(32, 32),
    batch_size=32,
    shuffle=True,
    seed=0,
    verbose=False,
)  # raw 0..255 pixels: the model rescales them itself
pixels = images.map(lambda x, y: x)

new = surgery.insert_identity_bn(model, after=["fc1", "fc2"], data=pixels, verbose=0)
print("before fine-tuning:", surgery.verify(model, new, pixels, verbose=0))

# Fine-tune the head only: freeze everything up to and including block3.
head = {"fc1", "fc1_bn", "fc2", "fc2_bn", "predictions"}
for layer in new.layers:
    layer.trainable = layer.name in head
bn = new.get_layer("fc1_bn")
start = np.asarray(bn.moving_mean).copy()
new.compile(
    optimizer=keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(1e-4)),
    loss="sparse_categorical_crossentropy",
    metrics=["accuracy"],
)
loss, accuracy = new.evaluate(images, verbose=0)
print(f"before: loss {loss:.4f}, accuracy {accuracy:.3f}")
# Training losses are computed in training mode: the BN layers normalise with
# each batch's statistics (and Dropout is on), so the first epoch's loss can
# sit above the inference loss printed just before.
history = new.fit(images, epochs=3, shuffle=False, verbose=0).history
for epoch, (loss, acc) in enumerate(
    zip(history["loss"], history["accuracy"], strict=True)
):
    print(f"epoch {epoch + 1}: loss {loss:.4f}, accuracy {acc:.3f}")
moved = np.abs(np.asarray(bn.moving_mean) - start).max()
print(f"fc1_bn moving mean moved by up to {moved:.3g} from the measured one")
print("loss scale:", float(new.optimizer.dynamic_scale.numpy()))
