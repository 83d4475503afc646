"""Stop signals: SIGTERM and SIGUSR1 ask a run to stop cleanly at the next step boundary.

Here: `StopRequest`, the flag a signal handler sets and its check, agreed over ranks. Not here:
the checkpoint written when a stop is requested (pipeline/checkpoint.py, `StageContext.end_of_step`
in pipeline/stages/common.py), the exit code and requeue the launch scripts read (launch/slurm/).
"""

from __future__ import annotations

import torch

from pipeline.distributed import collectives


class StopRequest:
    """SIGTERM and SIGUSR1 (what SLURM sends before a time limit) ask the run to stop cleanly.

    The handler only sets a flag; training checks it at step boundaries with `requested()`,
    which agrees over ranks (a signal delivered to one rank stops all of them at the same step).
    """

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self):
        self.signal: str | None = None

    def install(self) -> None:
        import signal

        for name in self.SIGNALS:
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), self._handle)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        import signal

        self.signal = signal.Signals(signum).name

    def requested(self) -> bool:
        return collectives.all_reduce_sum(torch.tensor(float(self.signal is not None))).item() > 0
