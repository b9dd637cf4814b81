"""Joining a Ray cluster and sizing, configuring and quieting the work on it."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile

import keras

from surgery.errors import SurgeryError, first_line
from surgery.graph.taps import deep_graphs

TOKEN_NOTICE = "ray._private.authentication.authentication_token_setup"


def connect(engine):
    """The `ray` module, joined to the `RayEngine`'s cluster."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise SurgeryError(
            "engine='ray' needs Ray Data: pip install 'surgery[ray]'"
        ) from None
    if not ray.is_initialized():
        # "Token authentication is enabled for this Ray cluster": Ray's notice
        # that its default is on, not something a surgery user acts on
        logging.getLogger(TOKEN_NOTICE).setLevel(logging.ERROR)
        try:
            ray.init(
                address=engine.address,
                include_dashboard=False,
                logging_level=logging.WARNING,
                log_to_driver=False,  # actors' output stays in Ray's logs
            )
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise SurgeryError(
                f"cannot join the Ray cluster at {engine.address or 'RAY_ADDRESS'}: "
                f"{first_line(e)}; start one with `ray start --head` or check the "
                "address"
            ) from None
    return ray


def workers(ray, engine) -> int:
    """The actors of a pool: as asked, else as many as the cluster holds."""
    if engine.workers is not None:
        return engine.workers
    resources = ray.cluster_resources()
    if engine.gpus_per_worker:
        gpus = resources.get("GPU", 0)
        if gpus < engine.gpus_per_worker:
            raise SurgeryError(
                f"the Ray cluster has {gpus:g} GPUs but each worker asks for "
                f"{engine.gpus_per_worker:g}; lower --gpus-per-worker"
            )
        return max(1, int(gpus // engine.gpus_per_worker))
    return max(1, int(resources.get("CPU", 1) // engine.cpus_per_worker))


def model_bytes(model: keras.Model) -> bytes:
    """`model` as the bytes of a `.keras` file (what every actor loads)."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.keras")
        with deep_graphs():
            model.save(path)
        with open(path, "rb") as f:
            return f.read()


def configure(context, engine) -> None:
    """One progress bar (ours); Ray Data retries a batch whose actor raised."""
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    context.retried_map_errors = True
    context.max_map_retries = engine.retries
    context.execution_options.preserve_order = False


@contextlib.contextmanager
def quiet_ray_data():
    """Ray Data's info lines (execution started/finished) off during our pass."""
    logger = logging.getLogger("ray.data")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def unwrapped(iterator):
    """Ray's errors as one line; the cause of a user-code error as itself."""
    import ray

    try:
        yield from iterator
    except ray.exceptions.RayError as e:
        cause = getattr(e, "cause", None) or e.__cause__
        raise SurgeryError(f"the Ray pass failed: {first_line(cause or e)}") from e
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()
