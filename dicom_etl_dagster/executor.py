"""The run executor: as many step processes as the CPUs this container may use.

Dagster's multiprocess executor defaults ``max_concurrent`` to ``multiprocessing.cpu_count()``,
the host's core count: a run pod limited to 2 CPUs on a 64-core node would start up to 64
step processes. ``available_cpus()`` honours CPU affinity and the cgroup quota, the same
count the ingest step uses for its parse workers.
"""

from __future__ import annotations

import dagster as dg

from dicom_etl_dagster.core.cpu import available_cpus


def default_executor() -> dg.ExecutorDefinition:
    """``multiprocess_executor`` with ``max_concurrent`` = the CPUs of this container.

    Evaluated where the code is loaded: a launched run (a run pod, or the process the
    DefaultRunLauncher starts) loads the definitions itself, so the count is the run's own.
    """
    return dg.multiprocess_executor.configured({"max_concurrent": available_cpus()})
