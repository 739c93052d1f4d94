import sys

HELP = "run `train` on a SLURM cluster: submit with submitit, or write (and submit) an sbatch script"
EXAMPLE = ("taming-dist launch submitit vqgan-f16-1024 train.steps=200000 --nodes 2 --gpus-per-node 8 "
           "--cpus-per-task 10 --partition gpu --time-min 1440\n"
           "  taming-dist launch sbatch vqgan-f16-1024 train.steps=200000 --nodes 2 --gpus-per-node 8 "
           "--out train.sbatch --submit")


def _resources(parser) -> None:
    parser.add_argument("config", help="a preset name (see `taming-dist info`) or a YAML file")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides passed to `train`")
    g = parser.add_argument_group("resources (sbatch options)")
    g.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    g.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node; one training task per GPU")
    g.add_argument("--tasks-per-node", type=int, default=None,
                   help="tasks per node for CPU-only jobs (default: --gpus-per-node, or 1)")
    g.add_argument("--cpus-per-task", type=int, default=None, help="CPUs per task (main thread + data workers)")
    g.add_argument("--mem-gb", type=float, default=None, help="memory per node in GB (default: partition's)")
    g.add_argument("--partition", default=None)
    g.add_argument("--account", default=None)
    g.add_argument("--qos", default=None)
    g.add_argument("--time-min", type=int, default=60, help="time limit in minutes (default 60)")
    g.add_argument("--constraint", default=None, help="node features, e.g. a100")
    g.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                   help="extra sbatch option, repeatable: --sbatch=--exclusive --sbatch gres=gpu:8")
    g.add_argument("--job-name", default="taming-dist")
    g.add_argument("--signal-delay-s", type=int, default=120,
                   help="seconds before the time limit at which training checkpoints and requeues (default 120)")
    g.add_argument("--max-failures", type=int, default=2,
                   help="requeues after a rank failure (a rank died or raised) before the job ends as FAILED; "
                        "stops on the time-limit or preemption signal never count (default 2)")
    g.add_argument("--master-addr", default=None,
                   help="rank 0's address when node names do not resolve (default: first host of the job)")
    parser.add_argument("--resume", default="auto",
                        help="first start: auto (the run's latest checkpoint if any), none, or a checkpoint folder; "
                             "a requeued run always resumes from its own latest checkpoint")


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="launcher", metavar="LAUNCHER")
    sub.required = True
    p = sub.add_parser("submitit", help="submit with submitit; prints the job id and log paths")
    _resources(p)
    p.add_argument("--folder", default="slurm_logs/submitit/%j", help="submitit folder (%%j = job id)")
    p.add_argument("--setup", action="append", default=[], metavar="LINE",
                   help="shell line run before srun, repeatable (module load ..., source venv/bin/activate)")
    p = sub.add_parser("sbatch", help="write a readable sbatch script; --submit also submits it")
    _resources(p)
    p.add_argument("--out", required=True, help="path of the script to write")
    p.add_argument("--submit", action="store_true", help="submit the script with sbatch and print the job id")
    p.add_argument("--log-dir", default="slurm_logs", help="folder of the job logs, relative to --chdir")
    p.add_argument("--chdir", default=None, help="working folder of the job (default: the current one)")
    p.add_argument("--python", default=None, help="python of the job's environment (default: this one)")
    p.add_argument("--signal", default="USR1", choices=["USR1", "USR2"], help="stop signal (default USR1)")


def _resource_kwargs(args) -> dict:
    return dict(nodes=args.nodes, gpus_per_node=args.gpus_per_node, tasks_per_node=args.tasks_per_node,
                cpus_per_task=args.cpus_per_task, mem_gb=args.mem_gb, partition=args.partition,
                account=args.account, qos=args.qos, time_min=args.time_min, constraint=args.constraint,
                extra_sbatch=args.sbatch, job_name=args.job_name, signal_delay_s=args.signal_delay_s,
                max_failures=args.max_failures)


def run(args) -> int:
    if args.launcher == "submitit":
        return _submitit(args)
    return _sbatch(args)


def _submitit(args) -> int:
    from taming_dist.launch.submitit_launcher import submit

    job = submit(args.config, args.overrides, folder=args.folder, master_addr=args.master_addr,
                 resume=args.resume, setup=args.setup or None, **_resource_kwargs(args))
    print(f"submitted job {job.job_id}")
    print(f"  stdout (rank 0): {job.paths.stdout}")
    print(f"  stderr (rank 0): {job.paths.stderr}")
    return 0


def _sbatch(args) -> int:
    from taming_dist.config import load_config
    from taming_dist.launch.sbatch import SlurmResources, log_path, render_script, submit_script, write_script

    load_config(args.config, args.overrides)  # a typo in an override fails here, not in the queue
    res = SlurmResources(**_resource_kwargs(args))
    text = render_script(args.config, args.overrides, res, log_dir=args.log_dir, chdir=args.chdir,
                         python=args.python, signal=args.signal, master_addr=args.master_addr, resume=args.resume)
    path = write_script(args.out, text)
    print(f"wrote {path}")
    if args.submit:
        try:
            job_id = submit_script(path)
        except RuntimeError as e:
            print(f"taming-dist launch sbatch: {e}", file=sys.stderr)
            return 1
        print(f"submitted job {job_id}")
        print(f"  log: {log_path(text, job_id, res.job_name)}")
    return 0
