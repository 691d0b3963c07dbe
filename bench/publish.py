"""Renders docs/benchmarks.md from its template and the results files the benchmarks write.

    python -m bench.publish           # writes docs/benchmarks.md
    python -m bench.publish --check   # exit 1 if docs/benchmarks.md is not what the files render

The template (bench/benchmarks.md.in) is the prose: what each benchmark measures and how. Every
number on the page comes from a results file (docs/results/<name>.json, written by the benchmark
at the end of its run with the date, the machine and the commit), through a results block:

    <!-- results email: python -m bench.email_smtp --database-url $DATABASE_URL -->
    | | messages/s | p50 |
    |---|---:|---:|
    | SMTP backend alone | {{ figures.smtp_backend.messages_per_s | .0f }} | ... |
    <!-- end results -->

The block becomes a line naming the file, its date, machine and commit and the exact command that
wrote it, then its text with each {{ path | format }} replaced by the value at that path in the
file (a Python format spec; list items and a dict's "key: value" pairs are joined with ", ").
Without the file, the block says "not measured yet" and how to measure it, and none of its text
is shown. A path the file does not have,
or a file no block uses, is an error: the page cannot show a number that is not in a file, nor
leave a file unread.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "bench" / "benchmarks.md.in"
RESULTS = ROOT / "docs" / "results"
PAGE = ROOT / "docs" / "benchmarks.md"

BLOCK = re.compile(
    r"^<!-- results (?P<name>[\w-]+)(?:: (?P<command>.*?))? -->\n(?P<body>.*?)^<!-- end results -->\n",
    re.MULTILINE | re.DOTALL,
)
PLACEHOLDER = re.compile(r"\{\{\s*(?P<path>[\w.-]+)\s*(?:\|\s*(?P<spec>[^}]*?)\s*)?\}\}")
REQUIRED = ("name", "date", "machine", "commit", "dirty", "command", "params", "figures")
MACHINE_REQUIRED = ("cpu", "cores", "ram_gib", "os", "python")
SERVICE_NAMES = {"postgresql": "PostgreSQL", "redis": "Redis", "valkey": "Valkey", "sqlite": "SQLite"}


class PublishError(Exception):
    pass


def load_results(directory: Path = RESULTS) -> dict[str, dict[str, Any]]:
    results = {}
    for path in sorted(directory.glob("*.json")):
        data = json.loads(path.read_text())
        problems = missing_stamp(data)
        if problems:
            raise PublishError(f"docs/results/{path.name}: {', '.join(problems)}")
        results[path.stem] = data
    return results


def missing_stamp(data: dict[str, Any]) -> list[str]:
    """What a results file lacks of its date, machine and commit (empty: nothing)."""
    problems = [f"no {key!r}" for key in REQUIRED if key not in data]
    if problems:
        return problems
    try:
        offset = datetime.fromisoformat(data["date"]).utcoffset()
        if offset is None or offset.total_seconds() != 0:
            problems.append(f"date {data['date']!r} is not in UTC")
    except (TypeError, ValueError):
        problems.append(f"date {data['date']!r} is not an ISO 8601 date and time")
    if not re.fullmatch(r"[0-9a-f]{40}", str(data["commit"])):
        problems.append(f"commit {data['commit']!r} is not a git commit id")
    problems += [f"no machine {key!r}" for key in MACHINE_REQUIRED if not data["machine"].get(key)]
    return problems


def value_at(data: dict[str, Any], path: str) -> Any:
    value: Any = data
    for part in path.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            raise KeyError(path)
    return value


def formatted(value: Any, spec: str | None) -> str:
    if isinstance(value, list):
        return ", ".join(formatted(item, spec) for item in value)
    if isinstance(value, dict):
        return ", ".join(f"{key}: {formatted(item, spec)}" for key, item in value.items())
    if value is None:
        return "n/a"
    if spec:
        return format(value, spec)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int) or abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def machine_line(data: dict[str, Any]) -> str:
    machine = data["machine"]
    services = ", ".join(
        f"{SERVICE_NAMES.get(service, service)} {version.split(' ')[0]}"
        for service, version in machine.get("services", {}).items()
    )
    parts = [
        f"{machine['cpu']} ({machine['cores']} cores)",
        f"{machine['ram_gib']:g} GiB RAM",
        machine["os"],
        f"Python {machine['python']}",
    ]
    return ", ".join(parts + ([services] if services else []))


def stamp(name: str, data: dict[str, Any]) -> str:
    date = datetime.fromisoformat(data["date"])
    tree = " with uncommitted changes" if data["dirty"] else ""
    load = data["machine"].get("load_average")
    load_note = f"; load average at the end {load[0]:g} / {load[1]:g} / {load[2]:g}" if load else ""
    return (
        f"*Measured {date:%Y-%m-%d %H:%M} UTC, commit `{data['commit'][:10]}`{tree}, "
        f"{machine_line(data)}{load_note}; run took {data.get('run_seconds', 0):.0f} s "
        f"([`docs/results/{name}.json`](results/{name}.json)).*  \n"
        f"Re-run: `{data['command']}`\n"
    )


def render_block(match: re.Match[str], results: dict[str, dict[str, Any]], used: set[str]) -> str:
    name, command = match["name"], match["command"]
    data = results.get(name)
    if data is None:
        how = f" To measure: `{command}`, then `python -m bench.publish`." if command else ""
        return f"*Not measured yet* (no `docs/results/{name}.json`).{how}\n"
    used.add(name)

    def fill(placeholder: re.Match[str]) -> str:
        try:
            return formatted(value_at(data, placeholder["path"]), placeholder["spec"])
        except KeyError:
            raise PublishError(
                f"docs/results/{name}.json has no {placeholder['path']!r} (asked for by {TEMPLATE.name}): "
                "run the benchmark again, or change the template"
            ) from None
        except (TypeError, ValueError) as exc:
            raise PublishError(f"docs/results/{name}.json: {placeholder[0]}: {exc}") from None

    return stamp(name, data) + "\n" + PLACEHOLDER.sub(fill, match["body"])


def render(template: Path = TEMPLATE, directory: Path = RESULTS) -> str:
    results = load_results(directory)
    text = template.read_text()
    used: set[str] = set()
    page = BLOCK.sub(lambda match: render_block(match, results, used), text)
    outside = PLACEHOLDER.search(BLOCK.sub("", text))
    if outside:
        raise PublishError(f"{template.name}: {outside[0]} is outside a results block")
    unread = sorted(set(results) - used)
    if unread:
        raise PublishError(
            f"results files no block of {template.name} shows: "
            + ", ".join(f"docs/results/{name}.json" for name in unread)
        )
    return page


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args(argv)
    try:
        page = render()
    except (PublishError, json.JSONDecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    shown = PAGE.relative_to(ROOT) if PAGE.is_relative_to(ROOT) else PAGE
    if not args.check:
        PAGE.write_text(page)
        print(f"wrote {shown}")
        return 0
    current = PAGE.read_text() if PAGE.exists() else ""
    if current == page:
        print(f"{shown} is what the results files render")
        return 0
    diff = difflib.unified_diff(
        current.splitlines(), page.splitlines(), "docs/benchmarks.md", "rendered", lineterm="", n=1
    )
    print(
        f"{shown} is not what {TEMPLATE.relative_to(ROOT)} and docs/results/ render: "
        "run `python -m bench.publish` and commit the result\n" + "\n".join(list(diff)[:60]),
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
