"""Transfer learning on ResNet50: a new head with identity BN, tuned on cached features.

1. a ResNet50 trunk (`include_top=False, pooling="avg"`: one 2048-vector per
   image) and the images of a class-folder directory;
2. the trunk's features over the images, streamed to disk once;
3. a new head `fc1` (Dense 256, ReLU) -> Dropout -> softmax over the classes,
   warmed up for a few epochs at a low learning rate;
4. identity BN after `fc1`, measured on the cached features, and a check
   that trunk + BN head is bit-identical to trunk + head over the images;
5. a few epochs of Adam at a higher learning rate on the BN head alone, the
   trunk frozen, and the tuned head spliced back onto the trunk.

Why BN on the head with cached features rather than on the whole model:
the trunk is frozen, so its output for an image never changes. Computing
it once and caching it means the BN statistics and every fine-tuning epoch
cost only the two dense layers, and the trunk is frozen by construction
(it is not in the trained graph) rather than by `trainable=False` flags. On
the whole model every epoch would run ResNet50 over every image again, to
get the same numbers: with `trainable=False` its BN layers run in inference
mode, so they output exactly what the cache holds. `surgery.combine` puts
the tuned head back on the trunk for deployment.

Run:
    python examples/transfer_resnet50.py     # random ResNet50, 64x64, ~30-50 s on 2 CPUs
    python examples/transfer_resnet50.py --weights \\
        resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5 --images DIR --size 224

Nothing is downloaded: without `--weights` the trunk has random weights
(its features are then weakly informative and the accuracies low: the
example shows the mechanics; give it real weights for real numbers). The default images are the embedded default
model's 200 digits (10 class folders), resized to `--size`, put through
ResNet50's own `preprocess_input` ("caffe" style: BGR, ImageNet mean
subtracted).
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


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--weights",
        help="ResNet50 notop weights file for keras.applications.ResNet50; "
        "default: random weights (nothing is downloaded)",
    )
    p.add_argument(
        "--images",
        help="image folder with one sub-folder per class; "
        "default: the embedded default's 200 digit images",
    )
    p.add_argument("--size", type=int, default=64, help="input height and width")
    p.add_argument(
        "--workdir",
        help="where the feature cache goes; kept and reused across runs. "
        "Default: a temporary directory, removed at the end",
    )
    p.add_argument("--warmup-epochs", type=int, default=3, help="plain head first")
    p.add_argument("--warmup-lr", type=float, default=3e-4)
    p.add_argument("--epochs", type=int, default=5, help="BN head epochs")
    p.add_argument("--lr", type=float, default=1e-3, help="BN head Adam learning rate")
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
    keras.utils.set_random_seed(args.seed)  # head init, dropout, shuffling
    return run_in_workdir(run, args, prefix="transfer_resnet50-")


def run(args, workdir: str) -> dict:
    started = time.perf_counter()

    # (1) The trunk: ResNet50 without its classifier, global-average-pooled,
    # so each image becomes one 2048-vector. weights=None builds it randomly
    # initialised; a path loads that file (Keras reads it by position).
    trunk = keras.applications.ResNet50(
        weights=args.weights,
        include_top=False,
        pooling="avg",
        input_shape=(args.size, args.size, 3),
    )
    images_dir = subset_folder(
        args.images or surgery.default.images_dir(), args.max_samples, workdir
    )
    # The images, one batch at a time, resized to the trunk's input size and
    # preprocessed the way ResNet50 was trained. Order: sorted class
    # sub-folders, then sorted names (`surgery.data.sources.list_images`).
    images = surgery.data.sources.open_source(
        images_dir, model=trunk, preprocess="resnet50", batch_size=args.batch_size
    )
    labels, class_names = surgery.data.sources.folder_labels(images_dir)
    print(f"{len(labels)} images in {len(class_names)} classes from {images_dir}")

    # (2) Cache the trunk's features, streamed to a zarr array batch by batch
    # in the images' order, so row i has label labels[i]. A finished cache
    # from an earlier run with the same --workdir is reused once checked to
    # fit (same trunk, same first images, same feature shape, one row per
    # image); an interrupted one resumes once checked the same way.
    cache = surgery.cache_features(
        trunk, images, os.path.join(workdir, "feats.zarr"), verbose=args.verbose
    )
    features = zarr.open_array(cache, mode="r")
    assert features.shape[0] == len(labels)

    # (3) The new head, a model of its own whose input is a feature vector.
    x = keras.Input(shape=trunk.outputs[0].shape[1:], name="features")
    h = keras.layers.Dense(256, activation="relu", name="fc1")(x)
    h = keras.layers.Dropout(0.5, name="dropout")(h)
    y = keras.layers.Dense(len(class_names), activation="softmax", name="predictions")(
        h
    )
    head = keras.Model(x, y, name="head")

    # The cache rows are sorted by class, so every epoch shuffles rows (not
    # just batches). The trunk is not in this graph: it stays frozen.
    def batches(seed):
        return surgery.open_features(
            cache, args.batch_size, labels=labels, shuffle=True, seed=seed
        )

    # (3b) Warm up the plain head at a low learning rate. An identity BN
    # preserves what the head computes, which is only worth preserving once
    # the head has learned something; this is the state fast.ai started from
    # (a trained VGG head). --warmup-epochs 0 puts BN into the random head.
    warmup_losses = fit(head, batches(args.seed), args.warmup_lr, args.warmup_epochs)

    # (4) Identity BN after fc1 (after its ReLU, which is fused into the
    # Dense). Its moving mean/variance are fc1's activation statistics over
    # the cached features, read in chunks by `open_features`; gamma/beta are
    # chosen so that at inference it outputs its input bit for bit.
    head_bn = surgery.insert_identity_bn(
        head, after=["fc1"], data=surgery.open_features(cache), verbose=args.verbose
    )
    # Trunk + head vs trunk + BN head, end to end over the images.
    model = surgery.combine(trunk, head, name="resnet50_head")
    model_bn = surgery.combine(trunk, head_bn, name="resnet50_head_bn")
    report = surgery.verify(model, model_bn, images, verbose=args.verbose)
    print(report)

    # (5) Fine-tune the BN head at a higher learning rate. In training mode
    # the BN normalises with batch statistics; its moving statistics start at
    # the true population ones, so inference is sane from the first step.
    losses = fit(head_bn, batches(args.seed + 1), args.lr, args.epochs, "BN head")
    loss_after, accuracy_after = head_bn.evaluate(batches(0), verbose=0)
    # Inference mode (no dropout, BN with its moving statistics), on the
    # images the head was tuned on: not a held-out measure.
    print(f"tuned BN head: loss {loss_after:.4f}, accuracy {accuracy_after:.3f}")

    # The deployable model takes images again. Its trunk output for an image
    # is that image's cache row, so it predicts exactly what the head does on
    # the cache; check that on the first batch.
    tuned = surgery.combine(trunk, head_bn, name="resnet50_tuned")
    first = images[0]
    same = np.array_equal(
        tuned.predict_on_batch(first), head_bn.predict_on_batch(features[: len(first)])
    )
    print(f"tuned model on images == tuned head on cached features: {same}")
    seconds = time.perf_counter() - started
    print(f"done in {seconds:.1f} s")
    return {
        "identical": report.identical,
        "report": report.as_dict(),
        "cache": cache,
        "cache_rows": int(features.shape[0]),
        "num_images": len(labels),
        "warmup_losses": warmup_losses,
        "losses": losses,
        "loss_after": float(loss_after),
        "accuracy_after": float(accuracy_after),
        "deployed_matches_head": same,
        "seconds": seconds,
    }


def fit(model, data, lr, epochs, what="plain head") -> list[float]:
    """`epochs` of Adam at `lr`, printing and returning the loss per epoch."""
    model.compile(
        optimizer=keras.optimizers.Adam(lr),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    losses = []

    def log(epoch, logs):
        losses.append(float(logs["loss"]))
        print(
            f"{what} epoch {epoch + 1}: loss {logs['loss']:.4f}, "
            f"acc {logs['accuracy']:.3f}"
        )

    model.fit(
        data,
        epochs=epochs,
        shuffle=False,  # `data` shuffles rows itself
        verbose=0,
        callbacks=[keras.callbacks.LambdaCallback(on_epoch_end=log)],
    )
    return losses


if __name__ == "__main__":
    main()
