"""What the serving tests train and expect: the overrides of their runs, the registered name, the train limit."""

GOOD = [
    "task=glue",
    "task.subset=sst2",
    "model=tiny_bert",
    "trainer.learning_rate=3e-3",
    "trainer.max_steps=120",
    "trainer.per_device_train_batch_size=16",
    "trainer.logging_steps=20",
    "trainer.save_steps=120",
    "trainer.warmup_steps=0.1",
    "task.max_train_samples=512",
    "task.max_eval_samples=128",
    "task.max_predict_samples=64",
]
"""Tiny model on the generated SST-2-like folder: 120 steps reach validation accuracy ~1.0 in a few seconds."""
MODEL_NAME = "glue-sst2-tiny_bert"
TRAIN_LIMIT = 2
