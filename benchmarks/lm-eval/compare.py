"""Compare the per-choice loglikelihoods of lm-evaluation-harness runs (their --log_samples output).
Usage: python compare.py REFERENCE_DIR OTHER_DIR...  Exit status 1 if any differs."""

import glob
import json
import sys


def loglikelihoods(run_dir: str) -> dict[int, list[str]]:
    path = glob.glob(f"{run_dir}/**/samples_*.jsonl", recursive=True)[0]
    with open(path) as f:
        return {r["doc_id"]: [resp[0][0] for resp in r["resps"]] for r in map(json.loads, f)}


reference = loglikelihoods(sys.argv[1])
count = sum(map(len, reference.values()))
same = True
for other in sys.argv[2:]:
    equal = loglikelihoods(other) == reference
    same &= equal
    print(f"{other}: {count} loglikelihoods {'identical to' if equal else 'DIFFER from'} {sys.argv[1]}")
sys.exit(0 if same else 1)
