"""``python -m loom.bench serve|compare|peers ...``"""

import sys

from loom.bench.cli import main

sys.exit(main())
