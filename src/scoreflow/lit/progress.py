"""Lightning's tqdm bars on a terminal only: in a log file (SLURM, ``> out.txt``, a subprocess) every redraw
and every validation bar is a line of noise around the lines that matter; the metrics are in the CSV/W&B logs
and the final table either way. ``force=true`` keeps the bars everywhere."""

from __future__ import annotations

import sys

from lightning.pytorch.callbacks import TQDMProgressBar


class TerminalProgressBar(TQDMProgressBar):
    def __init__(self, refresh_rate: int = 10, process_position: int = 0, leave: bool = False, force: bool = False):
        super().__init__(refresh_rate=refresh_rate, process_position=process_position, leave=leave)
        if not force and not sys.stdout.isatty():  # the bars write to stdout
            self.disable()
