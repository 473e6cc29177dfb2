"""Stopping a run: SIGINT/SIGTERM requests, the exception they end in, and rewinding a step.

`StopRequests`: the first SIGINT/SIGTERM asks the loop to stop after the current step (with a
checkpoint), a second abandons the step; `RunInterrupted` carries exit code 128 + signal.
`rewind_point` / `rewind`: the data position, RNG states and method-part states before a step,
restored when a step is abandoned (an unreachable served teacher) so the resumed run repeats it.
"""

from __future__ import annotations

import signal
import threading

from opd.run_setup import component_states, load_component_states


class RunInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM stopped the run after a checkpoint; `exit_code` is 130 or 143."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class StopRequests:
    """SIGINT/SIGTERM while training: the first asks to stop after this step, a second
    abandons the step (KeyboardInterrupt). Installed only in the main thread."""

    def __init__(self):
        self.signum, self._old = None, {}

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(s) is signal.SIG_IGN:
                    continue  # e.g. SIGINT of a background job: ignored before, ignored now
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)


def rewind_point(run) -> tuple:
    import random

    import torch

    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    states = component_states(run.method)
    return run.stream.state_dict(), torch.get_rng_state(), cuda, random.getstate(), states


def rewind(run, point: tuple) -> None:
    import random

    import torch

    data, cpu, cuda, py, states = point
    run.stream.load_state_dict(data)
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
    random.setstate(py)
    load_component_states(run.method, states)
