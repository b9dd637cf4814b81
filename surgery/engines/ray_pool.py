"""A pool of Ray actors that lives for a command and serves each of its passes.

Ray Data's `ActorPoolStrategy` starts its actors for one dataset, so a
command of many passes (`recalibrate_bn` in exact mode: one per BN level,
49 on ResNet50) would pay the actor start, model load and TensorFlow import
once per pass. This pool starts its actors once and hands them batch numbers
itself: a few in flight per actor, each retried on failure (an exception in
the actor, or the actor's death: the pool starts another in its place and
its batches are tried again), up to the engine's retries.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

from surgery.errors import SurgeryError, first_line

IN_FLIGHT = 2  # batches queued per actor: one running, one ready to start


class ActorPool:
    """`size` actors of `actor_class`, built with `init`, until `close`.

    `ActorPool.started` counts the actors this process has started, so a
    test or a benchmark can tell one pool per command from one per pass.
    """

    started = 0

    def __init__(self, ray, actor_class, size: int, options: dict, init: dict):
        self.ray, self.init = ray, init
        self.remote = ray.remote(actor_class).options(**options)
        self.actors = [self._start() for _ in range(size)]
        self.successor: dict = {}  # actor id -> the actor started in its place

    def run(self, items: list[dict], plan, updates, retries: int) -> Iterator[dict]:
        """Each item measured by some actor for `plan`, in completion order.

        `updates` is `(version, [ObjectRef])` of the weights changed so far.
        """
        ray = self.ray
        todo = deque((item, 0) for item in items)
        idle = deque(actor for actor in self.actors for _ in range(IN_FLIGHT))
        pending: dict = {}
        while todo or pending:
            while todo and idle:
                actor, (item, tries) = idle.popleft(), todo.popleft()
                ref = actor.run.remote(plan, updates, item)
                pending[ref] = (actor, item, tries)
            [ready], _ = ray.wait(list(pending), num_returns=1)
            actor, item, tries = pending.pop(ready)
            try:
                block = ray.get(ready)
            except ray.exceptions.RayError as e:
                if isinstance(e, ray.exceptions.RayActorError):
                    actor = self._replace(actor)
                idle.append(actor)
                if tries >= retries:
                    cause = getattr(e, "cause", None) or e.__cause__ or e
                    raise SurgeryError(
                        f"the Ray pass failed: {first_line(cause)}"
                    ) from e
                todo.append((item, tries + 1))
                continue
            idle.append(actor)
            yield block

    def _start(self):
        ActorPool.started += 1
        return self.remote.remote(**self.init)

    def _replace(self, dead):
        """The actor started in place of `dead` (once, however many of its
        batches failed with it)."""
        key = dead._actor_id
        if key not in self.successor:
            self.successor[key] = self._start()
            self.actors = [
                self.successor[key] if a._actor_id == key else a for a in self.actors
            ]
        return self.successor[key]

    def close(self) -> None:
        """Stop every actor (its queued batches with it)."""
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []
