"""vLLM's CPU communicator, using shared memory only among ranks that actually share it.

vLLM's CPU build moves tp/pp tensors through a shared-memory segment whose name comes from the
distributed init port, which is the same on every host. Its consistency check compares only
those names, so ranks on different machines each look for a segment that exists only where it
was created, and the engine fails to start ("open shm in SHMManager failed. errno: 2"). Here a
group uses shared memory only when every rank sees the same /dev/shm; a group spanning hosts
goes through torch.distributed (gloo) over the network, vLLM's own fallback.
"""

from __future__ import annotations

import logging

import torch
from vllm.distributed.device_communicators.cpu_communicator import CpuCommunicator

from serve.shm_domain import shm_domain

logger = logging.getLogger(__name__)


class HostAwareCpuCommunicator(CpuCommunicator):
    """CpuCommunicator whose shared-memory check also compares the ranks' /dev/shm."""

    def _all_group_ranks_share_shm_group_name(self) -> bool:
        domains: list[str] = [""] * self.world_size
        torch.distributed.all_gather_object(domains, shm_domain(), group=self.device_group)
        if len(set(domains)) > 1:
            logger.info(
                "group %s spans %d hosts: tensors go over torch.distributed, not shared memory",
                self.unique_name,
                len(set(domains)),
            )
            return False
        return super()._all_group_ranks_share_shm_group_name()
