"""dvclive for a stage that DVC runs: metrics and plot files only.

Training stages log losses and lr with dvclive; dvc.yaml already declares those
files as the stage's metrics and plots, so dvclive's own DVC-experiment wiring
is not wanted. It is also broken in a git repository without commits (dvclive
3.49 raises ``SCMError: Empty git repo`` from ``Live.__init__``), which is what
a user has right after ``git init``. This subclass skips that wiring.
"""

from __future__ import annotations

from pathlib import Path

from dvclive import Live


class StageLive(Live):
    """A :class:`dvclive.Live` that writes ``metrics.json`` and ``plots/`` and nothing else."""

    def __init__(self, live_dir: str | Path):
        super().__init__(str(live_dir), resume=False, save_dvc_exp=False, dvcyaml=None, report=None)

    def _init_dvc(self) -> None:  # no DVC experiment, no repo look-up
        self._dvc_file = self._init_dvc_file()
