"""FSDP on CPU processes: what the distributed tests and the engine benchmarks need to shard over gloo."""

from __future__ import annotations


def lift_fsdp_cpu_gate() -> None:
    """Let accelerate's own FSDP path run on CPU processes (gloo), for the tests and the benchmarks only.

    accelerate engages FSDP only on accelerators: on CPU it runs MULTI_CPU and drops the plugin ``accelerate launch``
    built from the config. Here the state keeps the plugin and says FSDP, so ``fully_shard`` really shards the UNet
    over the gloo group; the package itself never does this.
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    init = AcceleratorState.__init__

    def init_keeping_fsdp(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            # Both states: every later AcceleratorState() copies PartialState's distributed type over its own.
            self.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            if self._mixed_precision != "no":  # as accelerate's own FSDP branch does
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin

    AcceleratorState.__init__ = init_keeping_fsdp
