"""Write the docs pages generated from other sources (or, with --check, say which are stale):
docs/index.md, the README as the site's front page, and docs/reference/config.md, the
configuration reference generated from the config dataclasses. `make docs` runs it."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from silotune.config_reference import markdown

ROOT = Path(__file__).resolve().parent.parent


def front_page() -> str:
    """The README with its links into docs/ made relative to docs/."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    page = re.sub(r"\]\(docs/", "](", readme)
    note = "<!-- Generated from README.md by scripts/gen_docs.py: edit the README. -->\n"
    return note + page


def generated() -> dict[Path, str]:
    return {
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
