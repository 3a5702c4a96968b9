"""Admission, batching across requests, and reassembly (core.py); which windows run together is
the pure policy in policy.py; how many batches of a model run at once, lanes.py."""

from optim.scheduler.core import Scheduler, SchedulerConfig

__all__ = ["Scheduler", "SchedulerConfig"]
