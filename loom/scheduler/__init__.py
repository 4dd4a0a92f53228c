"""The step planner: which requests run this step and how many tokens each; and the owner of
request progress (``Scheduler.update``)."""

from loom.scheduler.policy import POLICIES, FCFSPolicy, SchedulingPolicy, make_policy
from loom.scheduler.scheduler import Scheduler

__all__ = ["POLICIES", "FCFSPolicy", "Scheduler", "SchedulingPolicy", "make_policy"]
