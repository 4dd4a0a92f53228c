"""The step planner: which requests run this step and how many tokens each; and the owner of
request progress (``Scheduler.update``)."""

from loom.scheduler.policy import FCFSPolicy, QueueState, SchedulingPolicy
from loom.scheduler.registry import POLICIES, make_policy, policy_from_config
from loom.scheduler.scheduler import Scheduler

__all__ = ["POLICIES", "FCFSPolicy", "QueueState", "Scheduler", "SchedulingPolicy", "make_policy", "policy_from_config"]
