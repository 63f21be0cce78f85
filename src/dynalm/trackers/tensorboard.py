"""TensorBoard: scalars through torch's SummaryWriter into RUN/tb; tables as markdown text
(TensorBoard's text plugin renders them)."""

from __future__ import annotations

from pathlib import Path

from .base import Tracker


def _cell(v) -> str:
    s = f"{v:.4g}" if isinstance(v, float) else str(v)
    return s.replace("\n", " ").replace("|", "\\|")


class TensorBoardTracker(Tracker):
    name = "tensorboard"

    def __init__(self, run_dir: Path, run_name: str, project: str, config: dict, run_id: str | None):
        from torch.utils.tensorboard import SummaryWriter

        self.w = SummaryWriter(str(run_dir / "tb"))

    def metrics(self, step, values):
        for k, v in values.items():
            self.w.add_scalar(k, v, step)

    def table(self, key, columns, rows, step):
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(_cell(v) for v in r) + " |" for r in rows]
        self.w.add_text(key, "\n".join(lines), step)

    def close(self, failed=False):
        self.w.close()
