"""How many threads a CPU run computes with: the command line's ``--threads`` and the start summary's line.

Measured on a 2-core machine (``benchmarks/results/cli/cpu-threads-tiny.json``, ``benchmarks/speed/cpu_threads.py``):
the README's tiny ``train`` run trains in about the same time with 1, 2 or torch's default threads on an idle machine,
and beside one busy process per core it trains several times faster with 1 thread than with 2 or the default, whose
threads spin while they wait for a core. So a CPU run of the command line computes with :data:`CPU_THREADS` unless
``--threads`` says otherwise; a GPU run leaves torch's setting alone (its CPU threads only feed the device). From
Python the package changes no torch setting: the start summary says how many threads run and what the command line
would use.
"""

from __future__ import annotations

__all__ = ["CPU_THREADS", "CPU_THREADS_EVIDENCE", "THREADS_HELP", "apply_threads", "threads_text"]

#: the command line's threads for a CPU run (``--threads``' default)
CPU_THREADS = 1
#: where :data:`CPU_THREADS` comes from
CPU_THREADS_EVIDENCE = "benchmarks/results/cli/cpu-threads-tiny.json"

THREADS_HELP = (
    f"CPU threads for a run on the CPU (default {CPU_THREADS}: on a 2-core machine shared with other work, one thread "
    f"trained the tiny run several times faster than torch's default, and as fast on an idle one; "
    f"{CPU_THREADS_EVIDENCE}). 0: torch's default. A GPU run leaves it alone."
)


def apply_threads(threads: int | None, on_cpu: bool) -> None:
    """The command line's setting for its own process: ``threads`` (``None``: :data:`CPU_THREADS`; 0: torch's
    default) torch threads for a CPU run; nothing for a GPU run."""
    if threads is not None and threads < 0:
        raise ValueError(f"--threads {threads}: give 1 or more, or 0 for torch's default")
    if not on_cpu:
        return
    threads = CPU_THREADS if threads is None else threads
    if threads > 0:
        import torch

        torch.set_num_threads(threads)


def threads_text() -> str:
    """The start summary's line for a CPU run: the threads in use and, where they are not :data:`CPU_THREADS`, how to
    set it."""
    import torch

    threads = torch.get_num_threads()
    text = f"CPU threads {threads} (torch.get_num_threads())"
    if threads != CPU_THREADS:
        text += (
            f"; on a machine shared with other work {CPU_THREADS} trains faster ({CPU_THREADS_EVIDENCE}): "
            f"--threads {CPU_THREADS} on the command line, torch.set_num_threads({CPU_THREADS}) in Python"
        )
    return text
