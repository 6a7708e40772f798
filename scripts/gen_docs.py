"""Write the docs pages generated from other sources (or, with --check, say which are stale):
docs/index.md, the README as the site's front page; docs/reference/config.md, the
configuration reference generated from the config dataclasses; and the list of model families
split learning cuts, in the README and docs/concepts/split.md. `make docs` runs it."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from silotune.config_reference import markdown
from silotune.split.families import families_markdown

ROOT = Path(__file__).resolve().parent.parent


# A block between these markers is written from the code (the split families' test matrix).
FAMILIES = re.compile(r"(<!-- split-families -->\n)(?:.*?\n)?(<!-- /split-families -->)", re.S)


def with_families(path: Path) -> str:
    """`path`'s text with its split-families block written from `SPLIT_FAMILIES`."""
    text = path.read_text(encoding="utf-8")
    return FAMILIES.sub(lambda m: m.group(1) + families_markdown() + "\n" + m.group(2), text)


def front_page() -> str:
    """The README with its links into docs/ made relative to docs/."""
    readme = with_families(ROOT / "README.md")
    page = re.sub(r"\]\(docs/", "](", readme)
    note = "<!-- Generated from README.md by scripts/gen_docs.py: edit the README. -->\n"
    return note + page


def generated() -> dict[Path, str]:
    split = ROOT / "docs" / "concepts" / "split.md"
    return {
        ROOT / "README.md": with_families(ROOT / "README.md"),
        split: with_families(split),
        ROOT / "docs" / "index.md": front_page(),
        ROOT / "docs" / "reference" / "config.md": markdown() + "\n",
    }


def main(argv: list[str]) -> int:
    if argv not in ([], ["--check"]):
        print("usage: python scripts/gen_docs.py [--check]", file=sys.stderr)
        return 2
    stale = []
    for path, text in generated().items():
        current = path.read_text(encoding="utf-8") if path.is_file() else None
        if current == text:
            continue
        stale.append(path.relative_to(ROOT))
        if not argv:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    if argv and stale:
        names = ", ".join(map(str, stale))
        print(f"stale generated docs: {names}; run `make docs` and commit them", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
