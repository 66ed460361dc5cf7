"""The contract jobs' console: Dagster's colored console logger, quieter, one line per failure.

Dagster prints a failed step with the stack trace of the exception and then repeats that
error, stack and all, under the run's failure: a failure we raise on purpose (a ``dg.Failure``
made from a ``DicomEtlError`` in ``assets.common.dagster_failures``) came out as its reason
twice inside 40-90 lines of Dagster's and our frames. This logger shows such a failure as
``Execution of step "x" failed: <reason>`` and the run's failure without the copy, so the
reason is printed once, near the end. An unexpected error (a bug) keeps its full traceback.

It also leaves out Dagster's DEBUG bookkeeping (process starts, resource set-up), except
the run's start and end, and the "Dependencies for step x failed ... Not executing." line
of every step downstream of a failure (the run's failure names the step that failed), so
the last lines of a run are its result. The event log, and so
the UI, keeps every event, stack traces included.
"""

from __future__ import annotations

import logging
import time

import dagster as dg

#: A step process's output reaches the terminal through ``tail -F`` of a capture file, and the
#: tail is stopped when the step ends: the last line, the failure, was lost about one run in
#: five (dagster-io/dagster#23336, which offers DAGSTER_COMPUTE_LOG_TAIL_WAIT_AFTER_FINISH
#: for every step). Waiting after a failure line only, the tail has time to copy it.
TAIL_CATCH_UP_SECONDS = 1.5

#: DEBUG events still printed: the run's beginning and end (scripts look for RUN_SUCCESS).
_RUN_EVENTS = frozenset(
    {
        dg.DagsterEventType.RUN_START,
        dg.DagsterEventType.RUN_SUCCESS,
        dg.DagsterEventType.RUN_FAILURE,
        dg.DagsterEventType.RUN_CANCELED,
    }
)


def _event(record: logging.LogRecord) -> dg.DagsterEvent | None:
    metadata = getattr(record, "dagster_meta", None) or {}
    event = metadata.get("dagster_event")
    return event if isinstance(event, dg.DagsterEvent) else None


def _not_executing(record: logging.LogRecord) -> bool:
    """Dagster's line for a step left out because a step it depends on failed."""
    message = (getattr(record, "dagster_meta", None) or {}).get("orig_message") or ""
    return message.startswith("Dependencies for step ") and message.endswith("Not executing.")


def _intentional_failure(event: dg.DagsterEvent | None) -> str | None:
    """The reason of a step that failed with ``dg.Failure``, else None."""
    if event is None or event.event_type != dg.DagsterEventType.STEP_FAILURE:
        return None
    failure = event.step_failure_data.user_failure_data
    if failure is None or failure.label != "intentional-failure":
        return None
    return failure.description


def _repeats_a_step_failure(event: dg.DagsterEvent | None) -> bool:
    """A run failure whose error is its first failed step's, printed with that step."""
    if event is None or event.event_type != dg.DagsterEventType.RUN_FAILURE:
        return False
    return getattr(event.event_specific_data, "first_step_failure_event", None) is not None


class OneLineFailures(logging.Filter):
    """Rewrites failure records in place; drops records under ``level`` but the run's events."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        event = _event(record)
        if record.levelno < self.level and (event is None or event.event_type not in _RUN_EVENTS):
            return False
        if _not_executing(record) and self.level > logging.DEBUG:
            return False
        # Dagster appends the error to the event's line after a blank line.
        header = record.getMessage().split("\n\n", 1)[0]
        reason = _intentional_failure(event)
        if reason is not None:
            record.msg, record.args = f"{header.rstrip('.')}: {reason}", ()
        elif _repeats_a_step_failure(event):
            record.msg, record.args = header, ()
        return True


class _LetTheTailCatchUp(logging.Handler):
    """After the colored handler wrote a step's failure: wait for the capture's tail."""

    def emit(self, record: logging.LogRecord) -> None:
        event = _event(record)
        if event is not None and event.event_type == dg.DagsterEventType.STEP_FAILURE:
            time.sleep(TAIL_CATCH_UP_SECONDS)


@dg.logger(
    dg.colored_console_logger.config_schema,
    description="Dagster's colored console; failures we raise on purpose as one line, once.",
)
def console_logger(init_context: dg.InitLoggerContext) -> logging.Logger:
    # Dagster's logger at the configured level (INFO by default) would never see the run's
    # DEBUG start and end events: it takes everything and the filter applies the level.
    logger = dg.colored_console_logger.logger_fn(init_context)
    level = logger.level
    logger.setLevel(logging.DEBUG)
    for handler in logger.handlers:
        handler.setLevel(logging.DEBUG)
    logger.addFilter(OneLineFailures(level))
    logger.addHandler(_LetTheTailCatchUp())
    return logger
