"""The README and docs/ link to each other by file and heading: every relative link lands on a
file that exists and, with a #fragment, on a heading of it (GitHub's anchor rule)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def anchors(page: Path) -> set[str]:
    """GitHub's ids of a page's headings: lower case, punctuation but - and _ dropped, spaces
    to -; code blocks are not headings."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.+)$", text, re.M)}


def links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_lands(page: Path) -> None:
    for target in links(page):
        path, _, fragment = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{page.name}: {target}: no such file"
        if fragment:
            assert fragment in anchors(dest), f"{page.name}: {target}: no such heading"


def test_the_readme_links_every_doc() -> None:
    readme = set(links(ROOT / "README.md"))
    for doc in (ROOT / "docs").glob("*.md"):
        assert any(t.partition("#")[0] == f"docs/{doc.name}" for t in readme), doc.name


def test_the_readme_stays_a_front_door() -> None:
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300
