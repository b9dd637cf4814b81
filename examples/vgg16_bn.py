"""fast.ai's VGG16-BN workflow, done so the BN model starts out bit-identical.

fast.ai (2017) made `vgg16bn` by splitting VGG16 at its last conv block,
caching the conv features, adding BatchNormalization to the dense head and
fine-tuning that head on the cached features at a higher learning rate. Its
BN weights were set to `[std, mu, mu, std]`, so the "identical" model was
not identical. Here the BN layers compute exactly `x` at inference, so the
fine-tune starts from the pretrained model itself:

1. split the model into a conv trunk and a dense head at the last pooling
   layer before `flatten`;
2. run the trunk once over the images and stream its features to disk
   (zarr; an interrupted run resumes where it stopped);
3. insert identity BN after `fc1` and `fc2` of the head, measuring their
   activations on the cached features (no trunk pass);
4. splice the head back on and check the result is bit-identical to the
   original model over the images;
5. fine-tune the BN head on the cached features with labels from the class
   sub-folders, then splice it back on and measure the accuracy.

Run:
    python examples/vgg16_bn.py             # embedded digits CNN, ~20-30 s on 2 CPUs
    python examples/vgg16_bn.py --weights vgg16_weights_tf_dim_ordering_tf_kernels.h5 \\
        --images DIR [--max-samples 64]     # real VGG16 at 224x224 (slow on CPU)

Without `--weights` it uses the embedded default model (a small VGG-style
digits CNN, 32x32x3 input of raw 0..255 pixels that rescales them itself, so
no preprocessing) and its 200 shipped images. With `--weights` it builds
VGG16 from the classic legacy weights file and feeds it VGG16's own
`preprocess_input` (BGR, ImageNet mean subtracted).
"""

from __future__ import annotations

import argparse
import os
import time

import keras
import numpy as np
import zarr
from _common import run_in_workdir, subset_folder

import surgery
import surgery.data.sources
import surgery.default
import surgery.files.models


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--weights",
        help="legacy VGG16 weights file (vgg16_weights_tf_dim_ordering_tf_kernels"
        ".h5, with the top); default: the embedded digits CNN",
    )
    p.add_argument(
        "--images",
        help="image folder with one sub-folder per class; "
        "default: the embedded default's images",
    )
    p.add_argument(
        "--workdir",
        help="where the feature cache goes; kept and reused (resumed) across "
        "runs. Default: a temporary directory, removed at the end",
    )
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--max-samples",
        type=int,
        help="use only this many images, spread evenly over the (class-sorted) "
        "image list so every class keeps some",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", type=int, default=0, help="Keras progress bars")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    keras.utils.set_random_seed(args.seed)  # dropout, shuffling, new layers
    return run_in_workdir(run, args, prefix="vgg16_bn-")


def run(args, workdir: str) -> dict:
    started = time.perf_counter()

    # The pretrained model and how its images are prepared.
    if args.weights:
        # Legacy weights only; the architecture is keras.applications.VGG16.
        # The file is read by layer name with every shape checked.
        model = surgery.files.models.load_model(args.weights, family="vgg16")
        preprocess = "vgg16"  # keras.applications.vgg16.preprocess_input
    else:
        model = surgery.default.load()
        preprocess = None  # raw 0..255 pixels: the model has its own Rescaling
    images_dir = args.images or surgery.default.images_dir()
    images_dir = subset_folder(images_dir, args.max_samples, workdir)

    # The images, read one batch at a time, resized to the model's input size
    # (taken from `model`). Order: sorted class sub-folders, then sorted file
    # names, i.e. `surgery.data.sources.list_images(images_dir)`. The cached
    # features come out in that order too, which is what lets us attach
    # labels to them below.
    images = surgery.data.sources.open_source(
        images_dir, model=model, preprocess=preprocess, batch_size=args.batch_size
    )
    labels, class_names = surgery.data.sources.folder_labels(images_dir)
    print(f"{len(labels)} images in {len(class_names)} classes from {images_dir}")

    # (1) Split. VGG's conv trunk ends at the last pooling layer before
    # `flatten` (block5_pool for VGG16, block3_pool for the digits CNN); the
    # head is flatten -> fc1 -> dropout -> fc2 -> dropout -> predictions.
    # Both halves get their own copies of the weights; `model` is untouched.
    at = last_layer_before_flatten(model)
    trunk, head = surgery.split(model, at=at)
    print(f"split at {at}: trunk output {trunk.outputs[0].shape[1:]}")

    # (2) Cache the trunk's features, streamed to disk batch by batch. The
    # trunk is where all the compute is, so it runs once; everything after
    # this reads the cache. A complete cache already on disk is returned as
    # it is (after checking it fits this trunk and these images), and a
    # half-written one (`feats.zarr.partial`) is resumed.
    cache = surgery.cache_features(
        trunk, images, os.path.join(workdir, "feats.zarr"), verbose=args.verbose
    )
    cache_rows = zarr.open_array(cache, mode="r").shape[0]
    assert cache_rows == len(labels)

    # (3) Identity BN after fc1 and fc2 (after their ReLU, since the
    # activation is fused into the Dense layer). The statistics come from the
    # head's activations over the cached features, read in chunks of 256 rows
    # by `open_features`: no trunk pass, constant memory.
    head_bn = surgery.insert_identity_bn(
        head,
        after=["fc1", "fc2"],
        data=surgery.open_features(cache),
        verbose=args.verbose,
    )

    # (4) Splice the BN head back onto the trunk and compare with the
    # original over the images: bit-identical outputs, not just close ones.
    full = surgery.combine(trunk, head_bn)
    report = surgery.verify(model, full, images, verbose=args.verbose)
    print(report)

    # (5) Fine-tune the BN head on the cached features. The trunk is not in
    # this graph at all, so it is frozen by construction and an epoch costs
    # only the dense layers. The BN layers start as identities carrying the
    # real population statistics as moving mean/variance; in training mode
    # they normalise with batch statistics, which is what makes the higher
    # learning rate safe.
    same_classes = head_bn.outputs[0].shape[-1] == len(class_names)
    # The original's accuracy only means something if its classes are ours.
    accuracy_before = accuracy(model, images, labels) if same_classes else None
    if not same_classes:
        # A 1000-way ImageNet top and, say, 2 folders: replace the classifier
        # (fast.ai's `finetune`). The BN layers stay.
        head_bn = with_new_classifier(head_bn, len(class_names))
    head_bn.compile(
        optimizer=keras.optimizers.Adam(args.lr),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    # The cache rows are in class order: shuffle them every epoch (in
    # bounded memory), or every batch would hold one class.
    train = surgery.open_features(
        cache, args.batch_size, labels=labels, shuffle=True, seed=args.seed
    )
    # Inference-mode loss on the cached features before any update.
    loss_before = float(head_bn.evaluate(train, verbose=0)[0])
    print(f"before fine-tuning: loss {loss_before:.4f} (inference mode)")
    # Training-mode losses: dropout is on and BN uses batch statistics, so
    # epoch 1 can start above the inference-mode loss just printed.
    losses, accuracies = [], []

    def log(epoch, logs):
        losses.append(float(logs["loss"]))
        accuracies.append(float(logs["accuracy"]))
        print(f"epoch {epoch + 1}: loss {logs['loss']:.4f}, acc {logs['accuracy']:.3f}")

    # shuffle=False: `train` shuffles rows itself (Keras' shuffle for a
    # PyDataset only reorders whole batches).
    head_bn.fit(
        train,
        epochs=args.epochs,
        shuffle=False,
        verbose=0,
        callbacks=[keras.callbacks.LambdaCallback(on_epoch_end=log)],
    )

    # Splice the fine-tuned head back on: the result takes images again.
    tuned = surgery.combine(trunk, head_bn, name=f"{model.name}_bn")
    accuracy_after = accuracy(tuned, images, labels)
    # These are the same images the head was tuned on (the embedded set is
    # small); use a held-out folder to measure generalisation.
    if accuracy_before is not None:
        print(f"accuracy of the original on the images: {accuracy_before:.3f}")
    print(f"accuracy of the fine-tuned BN model on them: {accuracy_after:.3f}")
    seconds = time.perf_counter() - started
    print(f"done in {seconds:.1f} s (work dir {workdir})")
    return {
        "split_at": at,
        "identical": report.identical,
        "report": report.as_dict(),
        "cache": cache,
        "cache_rows": cache_rows,
        "num_images": len(labels),
        "loss_before": loss_before,
        "losses": losses,
        "accuracies": accuracies,
        "accuracy_before": accuracy_before,
        "accuracy_after": accuracy_after,
        "seconds": seconds,
    }


def last_layer_before_flatten(model: keras.Model) -> str:
    """The name of the layer just before `Flatten` (VGG: the last pooling)."""
    for i, layer in enumerate(model.layers):
        if isinstance(layer, keras.layers.Flatten):
            return model.layers[i - 1].name
    raise SystemExit(f"{model.name} has no Flatten layer to split in front of")


def with_new_classifier(head: keras.Model, num_classes: int) -> keras.Model:
    """`head` with its last Dense replaced by a new `num_classes` softmax."""
    last = head.layers[-1]
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="classifier")(
        last.input
    )
    return keras.Model(head.inputs, outputs, name=head.name)


def accuracy(model: keras.Model, images, labels) -> float:
    """Top-1 accuracy over an image source, one batch at a time."""
    correct, seen = 0, 0
    for i in range(len(images)):
        probs = model.predict_on_batch(images[i])
        correct += int(
            np.sum(np.argmax(probs, axis=-1) == labels[seen : seen + len(probs)])
        )
        seen += len(probs)
    return correct / seen


if __name__ == "__main__":
    main()
