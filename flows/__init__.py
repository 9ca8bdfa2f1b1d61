"""Composition and orchestration: Hydra turns conf/ into the schema's dataclasses, Prefect runs the stages.

Command-line programs (each `python -m flows.<name> --help` says more):
    finetune   fine-tune, evaluate, predict and register in one command (Hydra overrides as arguments)
    predict    score a file with a registered model version (models:/<name>@champion)
    registry   list, show, promote and roll back registered model versions
    serve      serve the finetune flow as Prefect deployments (a nightly schedule and an unscheduled default)

The flow itself:
    pipeline   the `finetune` Prefect flow: one line per stage of stages/, one MLflow run

Helpers: config (Hydra composition of conf/ into stages.schema), runtime (the process environment set before
Prefect is imported), serving_model (the registered model's code, stored by MLflow as source).
"""
