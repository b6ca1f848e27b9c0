"""Slurm: the one home for its options and its jobs.

- ``options``: resources and site settings as sbatch/srun options, the batch script, and
  Slurm's time strings. Nothing else in the package spells a Slurm option.
- ``jobs``: submitit extended for scripts we render (heterogeneous jobs), job states from
  sacct, and waiting for jobs to end.
- ``stage_job``: a training stage as a Slurm job: its job steps, the supervisor that
  requeues itself, chained submission. The eval sweep (``deepscaler/eval/sweep.py``) is the
  other user of ``options`` and ``jobs``.
"""
