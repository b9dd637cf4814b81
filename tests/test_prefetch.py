"""Parallel, prefetched decoding keeps the serial order and results."""

import threading
import time

import numpy as np
import pytest

import surgery
from surgery import default
from surgery.data import sources
from surgery.data.prefetch import Prefetcher


def _slow_identity(threads):
    rng = np.random.default_rng(0)
    delays = rng.uniform(0, 0.01, 64)

    def load(i):
        threads.add(threading.get_ident())
        time.sleep(delays[i])  # later items often finish first
        return i

    return load


def test_batches_come_back_in_order_whatever_finishes_first():
    threads = set()
    fetch = Prefetcher(
        _slow_identity(threads), lambda b: range(8 * b, 8 * b + 8), 8, workers=4
    )
    assert [fetch.get(b) for b in range(8)] == [
        list(range(8 * b, 8 * b + 8)) for b in range(8)
    ]
    assert len(threads) > 1  # the items really were loaded on several threads
    # out-of-order access restarts from the batch asked for
    assert fetch.get(5) == list(range(40, 48))
    assert fetch.get(2) == list(range(16, 24))
    assert fetch.get(3) == list(range(24, 32))


def test_a_load_error_reaches_the_caller():
    def load(i):
        if i == 5:
            raise surgery.SurgeryError("cannot read image 5")
        return i

    fetch = Prefetcher(load, lambda b: range(4 * b, 4 * b + 4), 3, workers=2)
    assert fetch.get(0) == [0, 1, 2, 3]
    with pytest.raises(surgery.SurgeryError, match="cannot read image 5"):
        fetch.get(1)


def test_image_folder_batches_are_the_same_with_any_number_of_workers():
    model = default.load()
    open_ = sources.open_source
    serial = open_(default.images_dir(), model=model, batch_size=24, workers=1)
    parallel = open_(default.images_dir(), model=model, batch_size=24, workers=3)
    assert len(serial) == len(parallel) == 9
    for i in [*range(9), 4, 0]:
        assert np.array_equal(serial[i], parallel[i])
    with pytest.raises(surgery.SurgeryError, match="workers must be >= 1"):
        open_(default.images_dir(), model=model, workers=0)
