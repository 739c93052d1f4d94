"""The one training loop (loop.py) and what launchers need to know of it."""


# Exit status when a stop signal (SIGUSR1/SIGUSR2/SIGTERM, e.g. SLURM's warning before the time
# limit) made every rank checkpoint and stop early: launchers requeue the job on it (EX_TEMPFAIL).
# Here, not in train/loop.py, so the launchers read it without importing torch.
EXIT_STOPPED = 75

# Where rank 0 writes the stop marker (a file path), set by the launchers' job scripts: it tells
# "stopped on the signal with a checkpoint" from "a rank failed" without relying on srun's status.
STOP_MARKER_ENV = "TAMING_DIST_STOP_MARKER"
