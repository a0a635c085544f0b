import os

# Triton reads this once, when it is first imported: with no GPU here its kernels run on the
# CPU under the interpreter (hift_kernels.runs_on("cpu") is then True). Set
# TRITON_INTERPRET=0 in the environment to test the compiled kernels on a GPU instead.
os.environ.setdefault("TRITON_INTERPRET", "1")
