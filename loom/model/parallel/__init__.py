"""Tensor parallelism: a model's attention heads and MLP columns split over processes that
all-reduce after each row-parallel projection (``shard``), and the processes themselves: a gloo
group, and the peer ranks that follow rank 0's steps (``group``)."""
