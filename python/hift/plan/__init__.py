"""The memory planner behind `hift plan`: the peak device memory of a hift run, and of full
AdamW and LOMO, predicted from a model config before any weight exists.

    trace.py    the model on the meta device (LLaMA-2 configs, any local config.json), and the
                bytes autograd saves for backward per unit: UnitTrace
    predict.py  the backward sweep, plan_hift / plan_adamw / plan_lomo -> Breakdown, and the
                optimizer state's bytes per format and store (device slots, host RAM, disk, traffic)
    fsdp.py     the weights sharded by FSDP2 (shard_weights) or in host RAM (offload_weights): one rank's
                peak, host RAM per node, network and PCIe bytes and time per step (WeightsPlan)
    peers.py    full fine-tuning beside it: FSDP2 + AdamW, DeepSpeed ZeRO-3, their CPU offloads
    auto.py     memory="auto": the unset memory options chosen to fit the machine's budgets
    resting.py  the options as set: what rests on a rank of a sharded run, held to the machine
    report.py   the tables `hift plan` prints, beside the HiFT paper's published figures
    run.py      the command

Measuring real runs against these predictions is bench's job (bench/planner_measure.py,
bench/planner_check.py, bench/llama7b_gpu.py).
"""
