"""Cluster launchers for `taming-dist train`: submitit (submitit_launcher.py) and a generated sbatch
script (sbatch.py). Both start one task per GPU with `srun`; each task reads its rank from SLURM
(taming_dist/engines/dist.py), and a stop signal before the time limit ends in a checkpoint on every
rank, `scontrol requeue` and a resumed run. README.md ("Running on a cluster") shows the commands;
the top-level launch/ folder holds the files people copy and run (an sbatch script, a submit script,
a DeepSpeed hostfile and .deepspeed_env).
"""
