"""Requests in flight and the scheduler that batches them."""

from foretell.scheduler.request import Request, Status
from foretell.scheduler.scheduler import Scheduler

__all__ = ["Request", "Scheduler", "Status"]
