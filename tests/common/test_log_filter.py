"""drop_lines: known noise from Ray's forwarded worker output is dropped, the rest passes."""

from __future__ import annotations

import sys

from pipeline.common.log_filter import RAY_TRAIN_CONTROLLER_NOISE, drop_lines


def test_noise_lines_dropped_and_counted_other_output_intact(capsys):
    noise = f"(PlacementGroupCleaner pid=123) WARNING: {RAY_TRAIN_CONTROLLER_NOISE}. Continuing to monitor."
    with drop_lines(RAY_TRAIN_CONTROLLER_NOISE) as filters:
        print(noise, file=sys.stderr)  # print() writes the text and the newline separately
        print("epoch 1: loss 0.5", file=sys.stderr)
        print(noise)
        sys.stderr.write("progress 50%\r")
        sys.stderr.flush()
        print("done")
    out = capsys.readouterr()
    assert out.out == "done\n"
    assert out.err == "epoch 1: loss 0.5\nprogress 50%\r"
    assert [f.dropped for f in filters] == [1, 1]


def test_quiet_ray_data_drops_only_its_notices():
    import logging

    from pipeline.common.log_filter import RAY_DATA_NOTICES, quiet_ray_data

    quiet_ray_data()
    quiet_ray_data()  # idempotent: one filter per logger
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    for name, fragment in RAY_DATA_NOTICES.items():
        logger = logging.getLogger(name)
        assert sum(type(f).__name__ == "_DropMessages" for f in logger.filters) == 1
        logger.addHandler(handler)
        try:
            logger.warning("x %s y", fragment)
            logger.warning("Task failed: out of memory")  # anything else still shows
        finally:
            logger.removeHandler(handler)
    assert seen == ["Task failed: out of memory"] * len(RAY_DATA_NOTICES)
