"""Repository hygiene: the repository is self-contained and talks about the product, not about how it was made.

Every check reads the tracked files (``git ls-files``) as text, skips binary files, and names each offending file and
line. (a) No link or path leads outside the repository (in text, or as a tracked symbolic link), and no text cites
a notes file the repository does not ship (``method.md`` etc. other than ``docs/method.md``). (b) No file name or
text carries development-history labels (work sessions, issue numbers, version-suffixed raw files). (c) Every
``docs/<name>.md §N`` citation, and every bare ``§N`` inside a doc, points to a section heading that exists. (d) Raw
results under ``docs/results/`` are exactly the files docs/results.md cites. (e) Relative links in Markdown files
point to files that exist.
"""

from __future__ import annotations

import os
import re
import subprocess
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
THIS = Path(__file__).resolve().relative_to(REPO).as_posix()  # holds the patterns below, so it is not scanned
RESULTS_DIR = "docs/results/"

# (a) outside the repository
OUTSIDE = [
    (re.compile(r"\.\./shared"), "a path into ../shared"),
    (re.compile(r"(?<![\w.-])shared/docs"), "a path into shared/docs"),
    (re.compile(r"(?<![\w.-])/work/"), "an absolute /work/ path"),
]
NOTES_NAMES = ("method", "teachers", "environment", "architecture")
NOTES_CITE = re.compile(r"(?<![\w/.-])(" + "|".join(NOTES_NAMES) + r")\.md\b")
NOTES_TAG = re.compile(r"\[(?:PROP|I/PROP|C-SiD|I, strong)\]")  # claim tags that only mean something in those notes

# (b) development history
HISTORY_TEXT = [
    (re.compile(r"\bsessions?[\s_-]*\d", re.I), "a work-session label"),
    (re.compile(r"\bissues?\s*#\s*\d", re.I), "an issue number"),
    (re.compile(r"\bissues?\s+\d", re.I), "an issue number"),
    (re.compile(r"(?<![\w&/#.])#\d+\b(?![-\w])"), "an issue number"),
    (re.compile(r"\brounds?\s+\d", re.I), "a work-round label"),
]
HISTORY_NAME = [
    (re.compile(r"session", re.I), "a work-session label"),
    (re.compile(r"issue[\s_#-]*\d", re.I), "an issue number"),
    (re.compile(r"(^|/)s\d+_"), "a work-round prefix"),
    (re.compile(r"_v\d+(\.|$)"), "a version suffix"),
]

# (c) section citations
DOC_CITE = re.compile(
    r"docs/(?P<doc>[\w-]+)\.md(?P<refs>(?:\s*(?:,|/|and)?\s*§\s*\d+(?:\.\d+)*(?:\s*[-–]\s*§?\d+(?:\.\d+)*)?)+)"
)
SECTION_NUMBER = re.compile(r"\d+(?:\.\d+)*")
BARE_SECTION = re.compile(r"§\s*(\d+(?:\.\d+)*)(?:\s*[-–]\s*§?(\d+(?:\.\d+)*))?")
HEADING = re.compile(r"^#{1,6}\s+(\d+(?:\.\d+)*)\.?\s", re.M)

# (e) Markdown links
MD_LINK = re.compile(r"\]\(([^)\s]+)\)")


@cache
def tracked() -> tuple[str, ...]:
    """Tracked paths that exist in the working tree (a file deleted but not yet committed is not checked)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        pytest.skip(f"not a git checkout ({err}): the hygiene checks read `git ls-files`")
    return tuple(p for p in out.decode().split("\0") if p and (REPO / p).is_file())


@cache
def text_of(path: str) -> str | None:
    """The file's text, or None for a binary file."""
    data = (REPO / path).read_bytes()
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def text_files(skip_json: bool = False) -> list[tuple[str, str]]:
    files = []
    for path in tracked():
        if path == THIS or (skip_json and path.endswith(".json")):
            continue
        text = text_of(path)
        if text is not None:
            files.append((path, text))
    return files


def line_of(text: str, index: int) -> tuple[int, str]:
    start = text.rfind("\n", 0, index) + 1
    end = text.find("\n", index)
    return text.count("\n", 0, index) + 1, text[start : end if end >= 0 else len(text)].strip()


def report(offenders: list[str], what: str) -> str:
    shown = "\n  ".join(offenders[:40])
    more = f"\n  ... and {len(offenders) - 40} more" if len(offenders) > 40 else ""
    return f"{len(offenders)} {what}:\n  {shown}{more}"


@cache
def sections(doc: str) -> frozenset[str]:
    """Section numbers of docs/<doc>.md from its headings ("## 12. ...", "### 12.4 ..."); empty if it does not exist."""
    path = REPO / "docs" / f"{doc}.md"
    return frozenset(HEADING.findall(path.read_text())) if path.is_file() else frozenset()


# ---------------------------------------------------------------------------------------------------------------
# (a) self-contained
# ---------------------------------------------------------------------------------------------------------------


def test_no_path_outside_the_repository():
    offenders = []
    for path, text in text_files(skip_json=True):
        for pattern, what in OUTSIDE:
            for m in pattern.finditer(text):
                line, content = line_of(text, m.start())
                offenders.append(f"{path}:{line}: {what}: {content[:160]}")
    assert not offenders, report(offenders, "references outside the repository")


def test_no_tracked_link_leads_outside_the_repository():
    """A tracked symbolic link (git mode 120000) must point inside the checkout: a clone elsewhere lacks its target."""
    try:
        out = subprocess.run(["git", "ls-files", "-s", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        pytest.skip(f"not a git checkout ({err}): the hygiene checks read `git ls-files`")
    offenders = []
    for entry in out.decode().split("\0"):
        meta, _, path = entry.partition("\t")
        if not meta.startswith("120000 "):
            continue
        target = os.readlink(REPO / path) if (REPO / path).is_symlink() else "?"
        resolved = (REPO / path).parent.joinpath(target).resolve()
        if os.path.isabs(target) or not resolved.is_relative_to(REPO.resolve()):
            offenders.append(f"{path}: links to {target}")
    assert not offenders, report(offenders, "links outside the repository")


def test_no_citation_of_notes_the_repository_does_not_ship():
    """``method.md`` and friends only as ``docs/method.md`` (a relative link inside docs/ resolves to docs/ and is
    fine when that doc exists)."""
    offenders = []
    for path, text in text_files(skip_json=True):
        in_docs = path.startswith("docs/") and path.count("/") == 1
        for m in NOTES_CITE.finditer(text):
            if in_docs and (REPO / "docs" / f"{m.group(1)}.md").is_file():
                continue
            line, content = line_of(text, m.start())
            offenders.append(f"{path}:{line}: cites {m.group(0)} (write docs/{m.group(0)}): {content[:160]}")
        for m in NOTES_TAG.finditer(text):
            line, content = line_of(text, m.start())
            offenders.append(f"{path}:{line}: claim tag {m.group(0)} of notes outside the repository: {content[:160]}")
    assert not offenders, report(offenders, "citations of notes outside the repository")


def test_the_cited_docs_exist():
    for name in ("method", "teachers", "environment"):
        assert sections(name), f"docs/{name}.md is missing or has no numbered sections"


# ---------------------------------------------------------------------------------------------------------------
# (b) no development history
# ---------------------------------------------------------------------------------------------------------------


def test_no_history_in_file_names():
    offenders = [f"{path}: {what}" for path in tracked() for pattern, what in HISTORY_NAME if pattern.search(path)]
    assert not offenders, report(offenders, "file names with development-history labels")


def test_no_history_in_text():
    offenders = []
    for path, text in text_files():
        for pattern, what in HISTORY_TEXT:
            for m in pattern.finditer(text):
                line, content = line_of(text, m.start())
                offenders.append(f"{path}:{line}: {what} ({m.group(0)!r}): {content[:160]}")
    assert not offenders, report(offenders, "development-history labels")


# ---------------------------------------------------------------------------------------------------------------
# (c) section citations resolve
# ---------------------------------------------------------------------------------------------------------------


def test_doc_section_citations_exist():
    offenders = []
    for path, text in text_files(skip_json=True):
        for m in DOC_CITE.finditer(text):
            doc, refs = m.group("doc"), m.group("refs")
            line, content = line_of(text, m.start())
            if not sections(doc):
                offenders.append(f"{path}:{line}: docs/{doc}.md has no numbered sections (or does not exist)")
                continue
            for number in SECTION_NUMBER.findall(refs):
                if number not in sections(doc):
                    offenders.append(f"{path}:{line}: docs/{doc}.md has no §{number}: {content[:160]}")
    assert not offenders, report(offenders, "citations of sections that do not exist")


def test_bare_section_references_inside_a_doc_exist():
    """Inside docs/<name>.md a bare ``§N`` (not part of a ``docs/<other>.md §N`` citation) means its own §N."""
    offenders = []
    for path, text in text_files():
        if not (path.startswith("docs/") and path.endswith(".md") and path.count("/") == 1):
            continue
        doc = Path(path).stem
        cited = [m.span() for m in DOC_CITE.finditer(text)]
        for m in BARE_SECTION.finditer(text):
            if any(a <= m.start() < b for a, b in cited):
                continue
            for number in (n for n in m.groups() if n):
                if number not in sections(doc):
                    line, content = line_of(text, m.start())
                    offenders.append(f"{path}:{line}: no §{number} in this doc: {content[:160]}")
    assert not offenders, report(offenders, "section references that do not exist")


def test_section_citation_pattern():
    """The citation pattern reads lists and ranges, and stops at the first word that is not a section."""
    refs = lambda s: SECTION_NUMBER.findall(DOC_CITE.search(s).group("refs"))  # noqa: E731
    assert refs("(docs/method.md §3.3, §13.5: CFG 2.0)") == ["3.3", "13.5"]
    assert refs("docs/teachers.md §3.1-3.2): 24 layers") == ["3.1", "3.2"]
    assert refs("docs/method.md §8-§10; Tab.11") == ["8", "10"]
    assert refs("docs/teachers.md §2.1 / §3.1 (verified") == ["2.1", "3.1"]
    assert refs("(docs/method.md §13.1, Tab.4: expect") == ["13.1"]
    assert HEADING.findall("## 12. Departures\n### 12.4 The compact head\n#### 5 x\n") == ["12", "12.4", "5"]


# ---------------------------------------------------------------------------------------------------------------
# (d) raw results are what the results doc cites
# ---------------------------------------------------------------------------------------------------------------


def test_raw_results_are_cited_and_cited_raw_results_exist():
    results_md = (REPO / "docs" / "results.md").read_text()
    raw = [p for p in tracked() if p.startswith(RESULTS_DIR)]
    assert raw, "no raw results under docs/results/"
    uncited = [p for p in raw if Path(p).name not in results_md]
    assert not uncited, report(uncited, "raw result files that docs/results.md does not cite (cite or delete them)")
    missing = []
    for path, text in text_files(skip_json=True):
        for m in re.finditer(r"(?:docs/)?results/[\w./-]+\.(?:json|png)", text):
            target = m.group(0) if m.group(0).startswith("docs/") else f"docs/{m.group(0)}"
            if not (REPO / target).is_file():
                line, _ = line_of(text, m.start())
                missing.append(f"{path}:{line}: {m.group(0)} does not exist")
    assert not missing, report(missing, "references to raw results that do not exist")


def test_no_loose_raw_data_outside_docs_results():
    """Raw data lives in docs/results/<benchmark>/; scripts live in jobs/ or dd2dist/, not in docs/."""
    loose = [p for p in tracked() if p.startswith("docs/") and not p.startswith((RESULTS_DIR, "docs/img/"))
             and not (p.endswith(".md") and p.count("/") == 1)]
    assert not loose, report(loose, "files in docs/ that are neither a doc, an image nor a raw result")


# ---------------------------------------------------------------------------------------------------------------
# (e) Markdown links resolve
# ---------------------------------------------------------------------------------------------------------------


def test_relative_markdown_links_exist():
    offenders = []
    for path, text in text_files():
        if not path.endswith(".md"):
            continue
        base = (REPO / path).parent
        for m in MD_LINK.finditer(text):
            target = m.group(1).split("#", 1)[0]
            if not target or re.match(r"^[a-z]+:", target):  # same-page anchors and URLs
                continue
            if not (base / target).exists():
                line, _ = line_of(text, m.start())
                offenders.append(f"{path}:{line}: link to {m.group(1)} does not resolve")
    assert not offenders, report(offenders, "broken relative links")
