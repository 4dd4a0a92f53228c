"""The step planner: which requests run this step and how many tokens each."""

from loom.scheduler.policy import POLICIES, FCFSPolicy, SchedulingPolicy, make_policy
from loom.scheduler.scheduler import ScheduledRequest, Scheduler, SchedulerOutput

__all__ = [
    "POLICIES",
    "FCFSPolicy",
    "ScheduledRequest",
    "Scheduler",
    "SchedulerOutput",
    "SchedulingPolicy",
    "make_policy",
]
