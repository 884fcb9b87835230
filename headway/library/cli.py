"""`headway library`: list the catalog and pull models ahead of time (a Typer sub-app)."""
from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from headway.library.cache import EntryCache
from headway.library.catalog import CATALOG, CatalogEntry, get_entry
from headway.library.errors import LibraryError
from headway.library.packages import is_installed
from headway.library.resolve import resolve_entry

app = typer.Typer(help="The model library: named, pinned models carried by PyPI packages.",
                  no_args_is_help=True)


def _packages_cell(entry: CatalogEntry) -> str:
    pins = [p.requirement for p in entry.packages]
    return "\n".join(pins) if len(pins) <= 2 else f"{pins[0]}\n+ {len(pins) - 1} more"


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    raise AssertionError("unreachable")


@app.command("list")
def list_models() -> None:
    """Show every catalog entry: runtime, pinned packages, installed? cached?"""
    table = Table(title="Headway model library")
    for col in ("name", "runtime", "packages", "size", "installed", "cached"):
        table.add_column(col, no_wrap=col != "packages")
    for entry in CATALOG:
        installed = sum(is_installed(p) for p in entry.packages)
        inst = "yes" if installed == len(entry.packages) else ("no" if installed == 0 else
                                                                f"{installed}/{len(entry.packages)}")
        cached = "yes" if EntryCache(entry).load() is not None else "no"
        table.add_row(entry.name, entry.runtime, _packages_cell(entry), _size(entry.total_size), inst, cached)
    Console().print(table)


@app.command("pull")
def pull(
    name: str = typer.Argument(..., help="Catalog name, see `headway library list`."),
    install: bool = typer.Option(True, "--install/--no-install", help="pip-install missing pins."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Install, verify and convert a model ahead of time; prints its path and step times."""
    console = Console()
    try:
        resolved = resolve_entry(get_entry(name), install=install, progress=progress)
    except LibraryError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(code=1) from exc
    state = "cached (no work done)" if resolved.cache_hit else "built"
    console.print(f"{resolved.name} ({resolved.runtime}, {resolved.layout}): {state}")
    console.print(f"path: {resolved.path}")
    console.print(f"sha256: {resolved.sha256}")
    console.print("times: " + ", ".join(f"{k}={v:.2f}s" for k, v in resolved.timings.items()))
