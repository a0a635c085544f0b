"""The memory planner's former single module, kept so that `from hift import planner` and
`python -m hift.planner` keep working. The planner lives in hift.plan (trace, predict, report,
run); measuring real runs against it lives in bench/planner_measure.py.
"""
from __future__ import annotations

import sys

from hift.plan.predict import (GB, STATE_STORES, Breakdown, GiB, describe_format, make_group_ranges,
                               plan, plan_adamw, plan_hift, plan_lomo, plans_from_trace, state_chunk_bytes,
                               state_format, sweep, update_temporaries)
from hift.plan.predict import _place_state  # noqa: F401
from hift.plan.predict import plans_from_trace as _plans  # noqa: F401
from hift.plan.report import (FORMAT_HEADER, FORMAT_ROWS, GOAL_7B_BYTES, HEADER, HOST_RAM_TARGETS_7B,
                              PUBLISHED, breakdown_row, formats_notes, formats_table, published_table)
from hift.plan.report import _what_it_takes  # noqa: F401
from hift.plan.report import breakdown_row as _row  # noqa: F401
from hift.plan.report import formats_notes as _formats_notes  # noqa: F401
from hift.plan.run import main
from hift.plan.trace import (DTYPES, LLAMA2, UnitTrace, block_input_bytes, llama_config, meta_model,
                             trace_units)
from hift.plan.trace import _fused_sdpa, _FusedAttention, _trace_saved  # noqa: F401

__all__ = ["GB", "GiB", "STATE_STORES", "Breakdown", "describe_format", "make_group_ranges", "plan",
           "plan_adamw", "plan_hift", "plan_lomo", "plans_from_trace", "state_chunk_bytes",
           "state_format", "sweep", "update_temporaries", "FORMAT_HEADER", "FORMAT_ROWS",
           "GOAL_7B_BYTES", "HEADER", "HOST_RAM_TARGETS_7B", "PUBLISHED", "breakdown_row",
           "formats_notes", "formats_table", "published_table", "main", "DTYPES", "LLAMA2", "UnitTrace",
           "block_input_bytes", "llama_config", "meta_model", "trace_units"]


def __getattr__(name):
    if name == "measure":
        raise AttributeError("hift.planner.measure moved to bench: from bench.planner_measure import measure "
                             "(run from the repository root)")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    sys.exit(main())
