"""The one training loop (loop.py) and what launchers need to know of it."""


# Exit status when a stop signal (SIGUSR1/SIGUSR2/SIGTERM, e.g. SLURM's warning before the time
# limit) made every rank checkpoint and stop early: launchers requeue the job on it (EX_TEMPFAIL).
# Here, not in train/loop.py, so the launchers read it without importing torch.
EXIT_STOPPED = 75
