"""Rebuild the bundled MedQuAD demo subset from the full MedQuAD file.

Usage: python scripts/make_demo_data.py PATH/TO/medquad.jsonl

Keeps question-answer pairs with short-to-medium answers from the eight most common question
types, sampled evenly per type with a fixed seed, so the demo has a real label skew to split on.
"""

from __future__ import annotations

import json
import random
import sys
from collections import defaultdict
from pathlib import Path

PER_QTYPE = 60
MAX_ANSWER_CHARS = 900
MIN_ANSWER_CHARS = 80
OUT = Path(__file__).resolve().parents[1] / "src/silotune/data/bundled/medquad_demo.jsonl"


def main(source: Path) -> None:
    by_qtype: dict[str, list[dict[str, str]]] = defaultdict(list)
    with source.open(encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            if MIN_ANSWER_CHARS <= len(rec["answer"]) <= MAX_ANSWER_CHARS:
                by_qtype[rec["qtype"]].append(rec)
    common = sorted(by_qtype, key=lambda q: -len(by_qtype[q]))[:8]
    rng = random.Random(0)
    kept = []
    for qtype in sorted(common):
        kept += rng.sample(by_qtype[qtype], min(PER_QTYPE, len(by_qtype[qtype])))
    rng.shuffle(kept)
    fields = ("id", "source", "focus", "qtype", "question", "answer")
    with OUT.open("w", encoding="utf-8") as fh:
        for rec in kept:
            fh.write(json.dumps({k: rec[k] for k in fields}, ensure_ascii=False) + "\n")
    print(f"wrote {len(kept)} records over {len(common)} question types to {OUT.name}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
