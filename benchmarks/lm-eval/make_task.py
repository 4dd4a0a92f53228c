"""Write a small multiple-choice lm-evaluation-harness task (loglikelihood scoring) into DIR.

Every item repeats one long instruction block, so a server with prefix caching has a prefix to
hit on the second run; the items themselves are easy facts. Usage: python make_task.py DIR
"""

import json
import random
import sys
from pathlib import Path

FACTS = [
    ("The capital of France is", "Paris", ["London", "Berlin", "Madrid"]),
    ("The capital of Japan is", "Tokyo", ["Beijing", "Seoul", "Bangkok"]),
    ("Water freezes at a temperature of zero degrees", "Celsius", ["Fahrenheit", "Kelvin", "Rankine"]),
    ("The largest planet in the solar system is", "Jupiter", ["Mars", "Venus", "Mercury"]),
    ("The opposite of hot is", "cold", ["warm", "red", "fast"]),
    ("A baby cat is called a", "kitten", ["puppy", "calf", "foal"]),
    ("The sun rises in the", "east", ["west", "north", "south"]),
    ("Two plus two equals", "four", ["five", "three", "six"]),
    ("The color of the sky on a clear day is", "blue", ["green", "purple", "orange"]),
    ("Bees make", "honey", ["milk", "silk", "wool"]),
    ("The first month of the year is", "January", ["March", "June", "October"]),
    ("Ice is frozen", "water", ["sand", "metal", "air"]),
]
INSTRUCTION = ("Answer the question. A shared instruction block that every item repeats, so that the "
               "prefix cache has something to hit on reruns. ") * 3

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
rng = random.Random(0)
with open(out / "data.jsonl", "w") as f:
    for i in range(48):
        question, answer, wrong = FACTS[i % len(FACTS)]
        choices = [answer, *wrong]
        rng.shuffle(choices)
        f.write(json.dumps({"question": f"{INSTRUCTION}\nQ{i}: {question}", "choices": choices,
                            "label": choices.index(answer)}) + "\n")
(out / "loom_mc.yaml").write_text(f"""task: loom_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {(out / "data.jsonl").resolve()}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: " "
metric_list:
  - metric: acc
  - metric: acc_norm
""")
