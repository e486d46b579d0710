"""One all-reduce over the process group torchrun set up: `torchrun ... -m edgekd.doctor.allreduce BACKEND`.

The trainer joins a process group only when there are 2 processes or more, so on a one-GPU machine this is
what proves NCCL itself works (world size 1 is still a real NCCL communicator).
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist


def main(backend: str) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend)
    value = torch.tensor([rank + 1.0], device=device)
    dist.all_reduce(value)
    expected = world * (world + 1) / 2
    dist.destroy_process_group()
    if float(value) != expected:
        raise SystemExit(f"all_reduce gave {float(value)}, expected {expected}")
    if rank == 0:
        print(f"all_reduce over {backend}: world size {world}, sum {float(value):.0f} as expected")


if __name__ == "__main__":
    main(sys.argv[1])
