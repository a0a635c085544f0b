"""`hift train`: fine-tune a model directory on a JSON-lines file or a 🤗 datasets dataset.

    options.py   Config's fields and the command's own options -> argparse, merged with a YAML/JSON file
    data.py      records (JSONL, datasets) -> format -> tokenized examples; the collate
    evaluate.py  held-out loss (and accuracy) of the model as it stands
    metrics.py   metrics.jsonl (one row per step) and the loss plot
    run.py       the command: check everything, load, fit with on_step, save final/
"""


class TrainError(ValueError):
    """Input `hift train` cannot use; the message names what is wrong and the fix. Raised
    before any training step."""
