"""`reals reproduction`: a thin wrapper over `reals_cli.pipeline.reproduction` (what `make repro` writes)."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.group("reproduction", short_help="Fix an experiment's protocol; gather its runs into a JSON and a page.")
def reproduction() -> None:
    """The protocol of a multi-seed experiment, written before its runs, and its results with intervals."""


def _value(text: str):
    """A JSON value (numbers, lists, true/false) where the text is one, else the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


@reproduction.command("protocol")
@click.argument("root", type=click.Path(file_okay=False, path_type=Path))
@click.argument("settings", nargs=-1, required=True, metavar="KEY=VALUE...")
def protocol(root: Path, settings: tuple[str, ...]) -> None:
    """Write ROOT/protocol.json from KEY=VALUE pairs (VALUE as JSON when it parses, e.g. seeds=[0,1,2]).

    Needs variants, seeds, steps and fid_samples. Run again with the same pairs it does
    nothing; with others it is refused: the protocol is fixed before the runs.
    """
    from ..errors import UserError
    from ..pipeline.reproduction import write_protocol

    pairs = {}
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"{item!r} is not KEY=VALUE (e.g. seeds=[0,1,2])")
        pairs[key] = _value(value)
    write_protocol(root, pairs)
    click.echo(f"{root / 'protocol.json'}: " + ", ".join(f"{k}={json.dumps(v)}" for k, v in pairs.items()))


@reproduction.command("collect")
@click.argument("root", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--json", "json_out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Every number, per variant and per seed (e.g. docs/reproduction.json).")
@click.option("--md", "md_out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The page (e.g. docs/reproduction.md); its plot is written beside it as <stem>-fid.png.")
@click.option("--title", default="Reproduction: ReaLS against its baseline", show_default=True, help="The page title.")
def collect(root: Path, json_out: Path, md_out: Path, title: str) -> None:
    """Gather ROOT's runs: means and 95% t-intervals over seeds, FID against SiT step."""
    from ..console import print_summary
    from ..pipeline.reproduction import write_reproduction

    result = write_reproduction(root, json_out, md_out, title)
    rows = []
    for variant, data in result["variants"].items():
        s = data["summary"]["fid"]
        rows.append((f"{variant} FID", "–" if s["mean"] is None else
                     f"{s['mean']:.2f}" + ("" if s["lo"] is None else f" [{s['lo']:.2f}, {s['hi']:.2f}]")))
    print_summary(f"reproduction -> {md_out}, {json_out}", rows)
