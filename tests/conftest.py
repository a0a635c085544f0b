import os

# Triton reads this once, when it is first imported: with no GPU here its kernels run on the
# CPU under the interpreter (hift_kernels.runs_on("cpu") is then True). Set
# TRITON_INTERPRET=0 in the environment to test the compiled kernels on a GPU instead.
os.environ.setdefault("TRITON_INTERPRET", "1")


# Test files whose verdicts no CPU instruction set can change: they check structure, parsing,
# byte copies and integer arithmetic (unit detection, options, data files, the swappers' copies,
# the meta-device planner, setup's checks, weights saved and re-sharded, task data), never a float computed two ways. `make test` runs
# them once, natively, and leaves them out of its capped-ISA passes (-m "not isa_blind").
ISA_BLIND = {"test_config.py", "test_demo_data.py", "test_groups.py", "test_planner.py", "test_setup_checks.py",
             "test_quality_protocol.py", "test_swapper.py", "test_gpu_check_dry_run.py", "test_plan_fsdp.py",
             "test_model_weights.py", "test_quality_tasks.py"}


def pytest_collection_modifyitems(config, items):
    import pytest

    for item in items:
        if item.path.name in ISA_BLIND:
            item.add_marker(pytest.mark.isa_blind)
