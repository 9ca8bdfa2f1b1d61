"""Composition and orchestration: Hydra turns conf/ into the schema's dataclasses, Prefect runs the stages.

Command-line programs (each `python -m flows.<name> --help` says more):
    finetune   fine-tune, evaluate, predict and register in one command (Hydra overrides as arguments)
    predict    score a file with a registered model version (models:/<name>@champion)
    registry   list, show, promote and roll back registered model versions
    serve      serve the finetune flow as Prefect deployments (a nightly schedule and an unscheduled default)

The flow itself:
    pipeline   the `finetune` Prefect flow: one line per stage of stages/, one MLflow run
    sweep      the `finetune-sweep` flow: a grid (`-m`) or an Optuna search, one child flow run per trial
    pruning    the trainer callback through which a sweep stops a pruned trial's ranks

Helpers: config (Hydra composition of conf/ into stages.schema), runtime (the process environment set before
Prefect is imported), serving_model (the registered model's code, stored by MLflow as source).
"""
