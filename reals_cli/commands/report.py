"""`reals report`: a thin wrapper over `reals_cli.pipeline.report.write_report`."""

from __future__ import annotations

import click


@click.command("report", short_help="Write a pipeline folder's metrics, pictures and commands as Markdown.")
@click.argument("root", type=click.Path(file_okay=False))
@click.option("--out", default=None, help="The Markdown file to write.  [default: ROOT/report.md]")
@click.option("--title", default=None, help="The page title.  [default: names ROOT]")
@click.option("--note", default=None, help="A paragraph under the title, also printed under the table: what the "
              "experiment can and cannot show (e.g. a budget too small to tell the variants apart).")
def report_command(root, out, title, note):
    """Collect what the pipeline in ROOT measured into one Markdown page, and print its table.

    ROOT holds one folder per variant (`reals/`, `baseline/`, `kl1e-06/`, ...), each with
    the Makefile layout: vae/, latents.zarr, sit/, samples/, fid.json, fid-nocfg.json,
    analysis/; and seg/ and depth/ probe evaluations beside them. Nothing is recomputed:
    a step that has not run is a blank cell. The page is rewritten only when it changes.
    """
    from ..pipeline.report import print_table, write_report

    print_table(write_report(root, out, title, note))
