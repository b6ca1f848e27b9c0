"""Evaluation of weights steps: ``python -m deepscaler.eval run|sweep|report|upload``.

- ``cli``: the command line (``__main__`` runs it);
- ``run``: one evaluation of a weights step, the base model or a model folder;
- ``sweep``: one Slurm array over a stage's weights steps, each task one ``run``;
- ``metrics``: avg@n, unbiased pass@k, length and truncation statistics, the seed's line;
- ``report``: the results table (``report.md``) and plot (``eval.png``);
- ``hub``: a weights step uploaded to the Hugging Face Hub with a model card.

Imports go one way: cli -> sweep, run, report, hub; sweep -> run, report; hub -> report;
run -> metrics. Nothing is imported here, so ``import deepscaler.eval.metrics`` stays light.
"""
