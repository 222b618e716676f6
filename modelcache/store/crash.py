"""Crash points for the fault tests: ``MODELCACHE_TEST_CRASH_AT=<name>`` SIGKILLs the process there.

Only tests set the variable; it names the one step after which the process
dies as if the power went, so a test can show that gc finishes the job.
"""

from __future__ import annotations

import os
import signal


def crash_point(name: str) -> None:
    """Die at once (SIGKILL, no cleanup) if the tests asked for a crash at ``name``."""
    if os.environ.get("MODELCACHE_TEST_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
