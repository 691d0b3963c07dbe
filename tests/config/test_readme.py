"""The README and docs/ are the contract users read.

Every setting is documented in docs/configuration.md, every task in docs/tasks.md, every relative
link and #anchor leads somewhere, and the README stays short enough to read top to bottom.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from config.celery_app import app

ROOT = Path(__file__).resolve().parent.parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
FAMILIES = ("default.", "email.", "images.", "data_sync.", "analytics.")
# Written from benchmark result files on another branch; links into it are checked once it is here.
BENCHMARKS = DOCS / "benchmarks.md"

LINK = re.compile(r"(?<!!)\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"")


def documents() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def prose(text: str) -> str:
    """The text outside fenced code blocks, with inline code spans blanked out."""
    lines, fence = [], ""
    for line in text.splitlines():
        marker = re.match(r"\s*(```+|~~~+)", line)
        if marker and (not fence or marker.group(1).startswith(fence)):
            fence = "" if fence else marker.group(1)
            lines.append("")
            continue
        lines.append("" if fence else re.sub(r"`[^`\n]*`", "``", line))
    return "\n".join(lines)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text, lower-case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    found: set[str] = set(HTML_ANCHOR.findall(text))
    seen: dict[str, int] = {}
    fence = ""
    for line in text.splitlines():
        marker = re.match(r"\s*(```+|~~~+)", line)
        if marker and (not fence or marker.group(1).startswith(fence)):
            fence = "" if fence else marker.group(1)
            continue
        heading = None if fence else re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            base = slug(heading.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def broken_links(path: Path, text: str) -> list[str]:
    """Relative links in `text`, read as the page `path`, whose file or heading does not exist."""
    broken = []
    for target in LINK.findall(prose(text)):
        if SCHEME.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(ROOT)}: {target}"
        if linked == BENCHMARKS and not BENCHMARKS.exists():
            continue
        if not file_part:
            if anchor not in anchors(text):
                broken.append(f"{where} (no heading #{anchor} on this page)")
        elif not linked.exists() or ROOT not in (linked, *linked.parents):
            broken.append(f"{where} (no such file)")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked.read_text()):
            broken.append(f"{where} (no heading #{anchor} in {linked.relative_to(ROOT)})")
    return broken


def test_every_environment_variable_the_settings_read_is_documented() -> None:
    source = (ROOT / "config" / "settings" / "base.py").read_text()
    variables = set(re.findall(r"env\.\w+\(\s*\"([A-Z][A-Z0-9_]+)\"", source))
    configuration = (DOCS / "configuration.md").read_text()

    assert len(variables) > 30  # the pattern still finds them
    assert sorted(name for name in variables if f"`{name}`" not in configuration) == []


def test_every_task_is_documented_by_name() -> None:
    names = {name for name in app.tasks if name.startswith(FAMILIES) and "probe" not in name}
    tasks = (DOCS / "tasks.md").read_text()

    assert {"email.send", "images.process", "data_sync.sync", "analytics.aggregate_daily"} <= names
    assert sorted(name for name in names if f"`{name}`" not in tasks) == []


@pytest.mark.parametrize("path", documents(), ids=lambda path: str(path.relative_to(ROOT)))
def test_every_relative_link_leads_to_a_file_and_heading_that_exist(path: Path) -> None:
    assert broken_links(path, path.read_text()) == []


def test_the_link_check_catches_a_missing_file_and_a_missing_heading() -> None:
    page = (
        "# Probe\n\n## The SSRF guard (tasks/services/fetch.py)\n\n```\n# not a heading\n```\n\n"
        "[ok](#the-ssrf-guard-tasksservicesfetchpy) [ok](tasks.md#dead-letters) [ok](../deploy/)\n"
        "[ok](https://example.com/#x) `[skipped](nowhere.md)`\n"
        "[bad](nowhere.md) [bad](#not-a-heading) [bad](tasks.md#no-such-heading)\n"
    )
    broken = broken_links(DOCS / "probe.md", page)

    assert [entry.split(": ", 1)[1].split(" ")[0] for entry in broken] == [
        "nowhere.md",
        "#not-a-heading",
        "tasks.md#no-such-heading",
    ]


def test_anchors_follow_githubs_rules() -> None:
    assert slug("`data_sync.export` (queue `data_sync`) — the hourly backup") == (
        "data_syncexport-queue-data_sync--the-hourly-backup"
    )
    assert slug("Every job has a record; which way to send") == "every-job-has-a-record-which-way-to-send"
    assert slug("Only for bin/run and bin/test") == "only-for-binrun-and-bintest"


def test_the_readme_stays_short() -> None:
    lines = README.read_text().count("\n")

    assert lines < 350, f"README.md has {lines} lines: move the depth to a page under docs/"


MEASURED = re.compile(
    r"\d[\d,.]*\s*(?:jobs|messages|images|records|events|tasks|rows|answers|sends)/s\b"
    r"|\bpeak RSS\b|\bp50 \d|\bstack ready in \d"
)


@pytest.mark.parametrize(
    "path",
    [path for path in documents() if path.name not in ("benchmarks.md", "faults.md")],
    ids=lambda path: str(path.relative_to(ROOT)),
)
def test_measured_numbers_live_in_the_benchmarks_page(path: Path) -> None:
    found = [match.group(0) for match in MEASURED.finditer(path.read_text())]

    assert found == [], f"{path.name}: move these to docs/benchmarks.md and link it: {found}"
