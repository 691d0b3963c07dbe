"""docs/benchmarks.md is rendered from the results files the benchmarks write, and cannot drift from them."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from bench import publish

# The anchors the README and the other docs pages link to.
ANCHORS = (
    "email",
    "images",
    "data-sync",
    "fan-out",
    "analytics",
    "beat",
    "monitoring",
    "enqueue",
    "api",
    "request-limits",
    "readiness",
    "stack",
    "delivery",
    "brokers",
    "bench",
    "tests",
)


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def results_file(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "email",
        "date": "2026-11-29T00:41:00+00:00",
        "machine": {"cpu": "Some CPU", "cores": 2, "ram_gib": 8.0, "os": "Linux", "python": "3.11.7"},
        "commit": "0123456789abcdef0123456789abcdef01234567",
        "dirty": False,
        "command": "python -m bench.email_smtp --messages 10",
        "params": {"messages": 10},
        "figures": {"rate": 123.456},
    }
    data.update(changes)
    return data


def test_the_page_is_what_the_template_and_the_results_files_render() -> None:
    # If this fails: `python -m bench.publish`, then commit docs/benchmarks.md with the results files.
    assert publish.main(["--check"]) == 0


def test_every_results_file_says_when_on_what_and_from_which_commit_it_was_measured() -> None:
    files = sorted(publish.RESULTS.glob("*.json"))
    for path in files:
        data = json.loads(path.read_text())
        assert publish.missing_stamp(data) == [], path.name
        assert data["name"] == path.stem
        assert re.match(r"python -m bench(\.\w+)?( |$)", data["command"]), data["command"]
        assert data["figures"], path.name


def test_every_anchor_the_docs_link_to_is_a_section_of_the_page() -> None:
    headings = re.findall(r"^## (.+)$", publish.PAGE.read_text(), re.MULTILINE)

    assert sorted(set(ANCHORS) - {slug(heading) for heading in headings}) == []


def test_a_benchmark_without_a_results_file_is_not_measured_yet(tmp_path: Path) -> None:
    template = tmp_path / "page.md.in"
    template.write_text(
        "## Email\n\n<!-- results email: python -m bench.email_smtp -->\n"
        "{{ figures.rate | .0f }} messages/s\n<!-- end results -->\n"
    )

    page = publish.render(template, tmp_path)

    assert "*Not measured yet* (no `docs/results/email.json`)" in page
    assert "To measure: `python -m bench.email_smtp`" in page
    assert "messages/s" not in page


def test_a_results_file_renders_its_figures_with_its_date_machine_and_commit(tmp_path: Path) -> None:
    template = tmp_path / "page.md.in"
    template.write_text(
        "<!-- results email: python -m bench.email_smtp -->\n"
        "{{ figures.rate | .0f }} messages/s, {{ params.messages }} messages\n<!-- end results -->\n"
    )
    (tmp_path / "email.json").write_text(json.dumps(results_file(dirty=True)))

    page = publish.render(template, tmp_path)

    assert "123 messages/s, 10 messages" in page
    assert "*Measured 2026-11-29 00:41 UTC, commit `0123456789` with uncommitted changes" in page
    assert "Some CPU (2 cores), 8 GiB RAM, Linux, Python 3.11.7" in page
    assert "Re-run: `python -m bench.email_smtp --messages 10`" in page


def test_a_figure_the_file_does_not_have_is_an_error_not_a_blank(tmp_path: Path) -> None:
    template = tmp_path / "page.md.in"
    template.write_text("<!-- results email -->\n{{ figures.missing }}\n<!-- end results -->\n")
    (tmp_path / "email.json").write_text(json.dumps(results_file()))

    with pytest.raises(publish.PublishError, match=r"has no 'figures\.missing'"):
        publish.render(template, tmp_path)


def test_a_results_file_no_section_shows_is_an_error(tmp_path: Path) -> None:
    template = tmp_path / "page.md.in"
    template.write_text("## Email\n")
    (tmp_path / "email.json").write_text(json.dumps(results_file()))

    with pytest.raises(publish.PublishError, match=r"no block .* shows: docs/results/email.json"):
        publish.render(template, tmp_path)


def test_a_results_file_without_its_commit_or_machine_is_refused(tmp_path: Path) -> None:
    template = tmp_path / "page.md.in"
    template.write_text("<!-- results email -->\n<!-- end results -->\n")
    (tmp_path / "email.json").write_text(json.dumps(results_file(commit="unknown", machine={"cores": 2})))

    with pytest.raises(publish.PublishError, match=r"is not a git commit id.*no machine 'cpu'"):
        publish.render(template, tmp_path)


def test_the_check_fails_when_the_page_differs_from_what_the_files_render(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    page = tmp_path / "benchmarks.md"
    page.write_text(publish.render() + "A number typed by hand: 9,999 jobs/s\n")
    monkeypatch.setattr(publish, "PAGE", page)

    assert publish.main(["--check"]) == 1
    error = capsys.readouterr().err
    assert "is not what bench/benchmarks.md.in and docs/results/ render" in error
    assert "-A number typed by hand: 9,999 jobs/s" in error
