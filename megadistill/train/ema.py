"""EMA of a ZeRO-3 partitioned module: each rank averages only its own partition of every parameter
(``param.ds_tensor``), so the average costs 4 bytes per parameter / data-parallel size, like the
fp32 master weights it mirrors."""
from __future__ import annotations

import torch

from megadistill.methods.roles import EMA


class PartitionedEMA(EMA):
    partitioned = True

    def __init__(self, module, decay: float, start_step: int = 0):
        super().__init__(torch.nn.Module(), decay, start_step)  # validates decay / start_step
        self.module = module
        self.shadow = {name: p.ds_tensor.detach().float().clone() for name, p in module.named_parameters()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        copy = step < self.start_step
        for name, p in self.module.named_parameters():
            value = p.ds_tensor.detach().float()
            if copy:
                self.shadow[name].copy_(value)
            else:
                self.shadow[name].lerp_(value, 1.0 - self.decay)

    @torch.no_grad()
    def full_state_dict(self) -> dict:
        """The averaged parameters at full shape (collective: every rank calls it). Partitions are
        contiguous flat slices of the padded flattened parameter, in rank order."""
        import torch.distributed as dist

        out = {}
        for name, p in self.module.named_parameters():
            group = p.ds_process_group
            parts = [torch.empty_like(self.shadow[name]) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, self.shadow[name].contiguous(), group=group)
            out[name] = torch.cat(parts)[:p.ds_numel].view(p.ds_shape).clone()
        return out

    def copy_to(self, module=None):
        raise NotImplementedError("PartitionedEMA: use full_state_dict() and load it into a full model")
