"""Insert identity BN into the embedded default model, then split/cache/combine."""

import numpy as np

import surgery
import surgery.default

model = surgery.default.load()  # or any Functional / Sequential model
X = np.random.default_rng(0).uniform(0, 255, (256, 32, 32, 3)).astype("float32")

new = surgery.insert_identity_bn(model, after=["fc1", "fc2"], data=X)  # a NEW model
new = surgery.insert_identity_bn(model, before=["fc2"], data=X)  # BN on fc2's input
stats = surgery.activation_stats(model, ["fc1", "fc2"], data=X)  # {name: Moments}
new = surgery.insert_identity_bn(model, after=["fc1"], stats=stats)  # no data pass
report = surgery.verify(model, new, data=X)
print(report)  # identical: True (max abs diff 0, max ulp diff 0, 256 samples)

trunk, head = surgery.split(model, at="block3_pool")  # conv trunk | dense head
path = surgery.cache_features(
    trunk, X, "feats.zarr"
)  # streamed to disk (.zarr or .h5), resumable
head_bn = surgery.insert_identity_bn(
    head, after=["fc1", "fc2"], data=surgery.open_features(path)
)
full = surgery.combine(trunk, head_bn)  # head nested as one layer
print(surgery.verify(model, full, data=X))  # identical: True

# layer surgery: Dropouts deleted, identity layers deepened, in one rebuild
edited = surgery.edit(
    model, delete=["dropout", "dropout_1"], deepen=["fc1", "block3_conv2"]
)
print(surgery.verify(model, edited, data=X))  # identical: True
