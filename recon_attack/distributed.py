"""torchrun: one process per GPU (gloo on the CPU); rank 0 speaks, writes and draws for all."""
import os

import torch.distributed as dist


def init_distributed(device):
    """One process per GPU under torchrun (gloo on the CPU); returns False when not launched by torchrun."""
    if int(os.environ.get('WORLD_SIZE', 1)) == 1:
        return False
    dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo',
                            device_id=device if device.type == 'cuda' else None)
    return True


def rank_and_world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process():
    """Only rank 0 prints, writes checkpoints and draws."""
    return rank_and_world()[0] == 0


def same_on_all_processes(value):
    """Rank 0's `value` in every torchrun process (e.g. a run folder chosen by looking at the disk)."""
    if rank_and_world()[1] == 1:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather_from_processes(value):
    """[each torchrun process's `value`] in rank order ([value] in a single process)."""
    if rank_and_world()[1] == 1:
        return [value]
    gathered = [None] * rank_and_world()[1]
    dist.all_gather_object(gathered, value)
    return gathered


def mean_over_processes(value):
    """A tensor's mean over the torchrun processes (itself in a single process)."""
    if rank_and_world()[1] > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= rank_and_world()[1]
    return value


def main_first(load):
    """`load()` under torchrun: rank 0 first (it fills the caches on disk), then the other processes."""
    distributed, main = rank_and_world()[1] > 1, is_main_process()
    if distributed and not main:
        dist.barrier()
    loaded = load()
    if distributed and main:
        dist.barrier()
    return loaded


def save_if_main(save, obj, path):
    if is_main_process():
        save(obj, path)
