"""Dropping known noise from what Ray prints on the driver's console.

Two kinds. Ray Data's own log records in this process (a hint that its progress bars are off, a
line per execution) are dropped by ``logging`` filters on the loggers that emit them
(``quiet_ray_data``): the stages print their own progress and summary.

And the workers' output: Ray forwards every worker's stdout/stderr to the driver and prints it
there line by line with ``print``, not through Python logging, so a ``logging.Filter`` in the
driver cannot see it and the process that logs it (Ray Train's detached placement-group cleaner
actor) is not ours to configure. ``drop_lines`` swaps ``sys.stdout``/``sys.stderr`` for line
filters while a block runs (``trainer.fit()``): lines containing one of the given fragments are
counted and dropped, every other byte passes through unchanged (partial lines, such as progress
bars, on ``flush``).
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from typing import Any, Iterator, Sequence, TextIO

#: ``MDA_VERBOSE=1`` brings back the detail hidden from the console: Ray Train's per-report and
#: per-checkpoint lines, Ray's authentication notice and its actor-argument notices.
VERBOSE_ENV = "MDA_VERBOSE"

#: Printed every few seconds by Ray Train V2's placement-group cleaner when the State API is slow
#: (a loaded 2-core machine): harmless, the cleaner "continues to monitor".
RAY_TRAIN_CONTROLLER_NOISE = "Failed to query Ray Train Controller actor state"


#: Ray Data's records dropped by ``quiet_ray_data``: logger name -> a fragment of the message.
RAY_DATA_NOTICES = {
    "ray.data._internal.progress": "Progress bars disabled",  # off on purpose (configure_data_context)
    "ray.data._internal.execution.streaming_executor": "execution finished in",  # one per map
}
#: Ray's notice, at every local start, that token authentication is on (it stays on; the notice
#: is dropped unless ``MDA_VERBOSE`` is set): logger name -> fragment.
RAY_AUTH_NOTICE = {"ray._private.authentication.authentication_token_setup":
                   "Token authentication is enabled for this Ray cluster"}
#: Lines of Ray's C++ core workers that Ray Train's and Ray Data's own actors cause at every run:
#: a notice that an actor's constructor arguments live in the object store (harmless here).
RAY_ACTOR_ARGS_NOTICE = "has constructor arguments in the object store and max_restarts > 0"
#: What Ray Train's controller prints while it starts the worker group (the stage prints its own
#: one-line start and per-epoch summary instead).
RAY_TRAIN_START_NOTICES = ("Requesting resources:", "Attempting to start training worker group",
                           "Started training worker group", ") world_rank=", "Setting up process group for",
                           "Moving model to device", "Wrapping provided model in DistributedDataParallel")


class _DropMessages(logging.Filter):
    """Drops the records whose message contains ``fragment``."""

    def __init__(self, fragment: str) -> None:
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


def quiet_ray_auth_notice() -> None:
    """Drop ``RAY_AUTH_NOTICE`` in this process unless ``MDA_VERBOSE`` is set (idempotent)."""
    if os.environ.get(VERBOSE_ENV):
        return
    for name, fragment in RAY_AUTH_NOTICE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) and f.fragment == fragment for f in logger.filters):
            logger.addFilter(_DropMessages(fragment))


def quiet_ray_data() -> None:
    """Drop ``RAY_DATA_NOTICES`` at the loggers that emit them, in this process (idempotent).

    Dropped at the source, they are missing from Ray Data's ``ray-data.log`` too; everything
    else Ray Data logs, warnings and errors included, is untouched."""
    for name, fragment in RAY_DATA_NOTICES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) and f.fragment == fragment for f in logger.filters):
            logger.addFilter(_DropMessages(fragment))


class LineFilter:
    """A text stream that forwards whole lines to ``target`` unless they contain a fragment."""

    def __init__(self, target: TextIO, fragments: Sequence[str]) -> None:
        self.target = target
        self.fragments = tuple(fragments)
        self.dropped = 0
        self._pending = ""

    def write(self, text: str) -> int:
        """Buffer ``text``; forward each finished line that contains no fragment."""
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            if any(f in line for f in self.fragments):
                self.dropped += 1
            else:
                self.target.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        """Forward a pending partial line (a progress bar) unless it is noise being written."""
        if self._pending and not any(f in self._pending for f in self.fragments):
            self.target.write(self._pending)
            self._pending = ""
        self.target.flush()

    def __getattr__(self, name: str) -> Any:  # fileno, isatty, encoding, ...
        return getattr(self.target, name)


@contextmanager
def drop_lines(*fragments: str) -> Iterator[list[LineFilter]]:
    """Filter ``sys.stdout`` and ``sys.stderr`` inside the block (see the module docstring).

    Yields:
        The two filters (their ``dropped`` counts are final when the block ends).
    """
    saved = sys.stdout, sys.stderr
    filters = [LineFilter(saved[0], fragments), LineFilter(saved[1], fragments)]
    sys.stdout, sys.stderr = filters  # type: ignore[assignment]
    try:
        yield filters
    finally:
        sys.stdout, sys.stderr = saved
        for f in filters:
            if f._pending and not any(frag in f._pending for frag in fragments):
                f.target.write(f._pending)
            f.target.flush()



def quiet_ray_train_worker() -> None:
    """In a Ray Train worker: Ray's "Reporting training result ..." (the whole metrics dict, on
    every worker and epoch) and "Checkpoint successfully created" lines go to DEBUG level, unless
    ``MDA_VERBOSE`` is set. The stage prints its own per-epoch summary."""
    if os.environ.get(VERBOSE_ENV):
        return
    import ray.train.v2._internal.execution.context as context
    import ray.train.v2._internal.execution.storage as storage

    for name in (context.__file__, storage.__name__, "ray.train"):
        logging.getLogger(name).setLevel(logging.WARNING)
