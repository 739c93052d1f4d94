"""Cluster launchers for `taming-dist train`: submitit (launch/submitit_launcher.py) and a generated
sbatch script (launch/sbatch.py). Both start one task per GPU with `srun`; each task reads its rank
from SLURM (taming_dist/engines/dist.py), and a stop signal before the time limit ends in a
checkpoint on every rank, `scontrol requeue` and a resumed run. README_cluster.md shows the commands.
"""
