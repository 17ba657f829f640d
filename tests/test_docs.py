"""The README and the documentation site agree: the README's links into docs/ lead to a page and a heading that
exist, and every reference link in the README's sections that docs pages include (`--8<-- "README.md:NAME"`) is
defined both at the README's end (for GitHub) and in each page that includes it (for the site). `mkdocs build
--strict` (.ci/run, tox -e docs) checks the links inside docs/, but neither the README's nor an undefined reference
label, which Markdown prints as text instead of failing.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
INCLUDE = re.compile(r'^--8<-- "README\.md:([\w-]+)"$', re.M)
LABEL_USED = re.compile(r"\]\[([\w-]+)\]")
LABEL_DEFINED = re.compile(r"^\[([\w-]+)\]: (\S+)$", re.M)


def readme_section(name: str) -> str:
    readme = README.read_text()
    start, end = f"<!-- --8<-- [start:{name}] -->\n", f"<!-- --8<-- [end:{name}] -->"
    assert start in readme and end in readme, f"README.md has no section {name!r}"
    return readme.split(start, 1)[1].split(end, 1)[0]


def with_includes(page: Path) -> str:
    """The page as mkdocs renders it: each include replaced by the README's section."""
    return INCLUDE.sub(lambda match: readme_section(match.group(1)), page.read_text())


def slug(heading: str) -> str:
    """The anchor Python-Markdown's toc (mkdocs) and GitHub both give a plain heading."""
    text = unicodedata.normalize("NFKD", re.sub(r"[`*]", "", heading)).encode("ascii", "ignore").decode()
    return re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", text).strip().lower())


def anchors(page: Path) -> set[str]:
    return {slug(heading) for heading in re.findall(r"^#+ (.+)$", with_includes(page), re.M)}


def test_the_readme_links_into_docs_lead_to_pages_and_headings_that_exist():
    readme = README.read_text()
    targets = re.findall(r"\]\((docs/[^)]+)\)", readme) + [
        target for _, target in LABEL_DEFINED.findall(readme) if target.startswith("docs/")]
    assert len(targets) >= 10
    for target in targets:
        path, _, anchor = target.partition("#")
        assert (ROOT / path).is_file(), f"README.md links to {path}, which does not exist"
        if anchor:
            assert anchor in anchors(ROOT / path), f"README.md links to {target}: {path} has no such heading"


def test_every_reference_label_of_the_readme_is_defined_for_github_and_for_each_page_that_includes_it():
    readme = README.read_text()
    defined = dict(LABEL_DEFINED.findall(readme))
    assert set(LABEL_USED.findall(readme)) <= set(defined), "define each [label] at the end of README.md"
    including = [page for page in sorted(DOCS.glob("*.md")) if INCLUDE.search(page.read_text())]
    assert {page.name for page in including} >= {"index.md", "cli.md"}
    for page in including:
        used = {label for name in INCLUDE.findall(page.read_text()) for label in LABEL_USED.findall(
            readme_section(name))}
        page_defines = dict(LABEL_DEFINED.findall(page.read_text()))
        assert used <= set(page_defines), f"docs/{page.name} lacks {sorted(used - set(page_defines))}"
        for label in used:  # the same page, seen from docs/ rather than from the repository's root
            readme_target = defined[label].removeprefix("docs/")
            assert page_defines[label] in (readme_target, readme_target.removeprefix(page.name)), (page.name, label)


def test_the_quickstart_commands_table_and_exit_codes_are_included_in_the_site():
    included = {name for page in DOCS.glob("*.md") for name in INCLUDE.findall(page.read_text())}
    assert {"quickstart", "commands", "exit-codes"} <= included
    assert "| 75 |" in with_includes(DOCS / "cli.md")
