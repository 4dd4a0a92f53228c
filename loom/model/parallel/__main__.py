"""A tensor-parallel peer process: ``python -m loom.model.parallel FD`` (started by rank 0)."""

import sys

from loom.model.parallel.group import peer_main

peer_main(int(sys.argv[1]))
