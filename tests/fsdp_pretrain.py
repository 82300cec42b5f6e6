"""``e4t pretrain`` with the trained parts sharded by FSDP2 over gloo, on CPU.

accelerate turns FSDP on only for GPUs, so this does by hand what its FSDP2
plugin does there: ``fully_shard`` the module handed to ``prepare``, with the
plugin's mixed-precision policy (accelerate sets one from ``--precision``;
here bf16, as ``--precision bf16`` would on a GPU), and point the optimizer at
the sharded parameters. Everything else is the real command.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/fsdp_pretrain.py pretrain ...
"""

import sys

import e4tcli.api as api


class ShardingAccelerator:
    def __init__(self, accelerator):
        from types import SimpleNamespace

        from accelerate.utils import FullyShardedDataParallelPlugin

        self._accelerator = accelerator
        plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
        plugin.set_mixed_precision("bf16")
        self.state = SimpleNamespace(fsdp_plugin=plugin)

    def __getattr__(self, name):
        return getattr(self._accelerator, name)

    def prepare(self, module, optimizer):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        from torch.distributed.tensor import DTensor

        policy = self.state.fsdp_plugin.mixed_precision_policy or MixedPrecisionPolicy()
        names = {id(p): name for name, p in module.named_parameters()}
        fully_shard(module, mesh=init_device_mesh("cpu", (self._accelerator.num_processes,)), mp_policy=policy)
        sharded = dict(module.named_parameters())
        for group in optimizer.param_groups:
            group["params"] = [sharded[names[id(p)]] for p in group["params"]]
        assert all(isinstance(p, DTensor) for p in module.parameters())
        return module, optimizer


def sharding_accelerator(*args, **kwargs):
    accelerator, placement = unsharded_accelerator(*args, **kwargs)
    return ShardingAccelerator(accelerator), placement


unsharded_accelerator = api.make_accelerator
api.make_accelerator = sharding_accelerator

if __name__ == "__main__":
    from e4tcli.cli.app import app

    sys.exit(app(sys.argv[1:], prog_name="e4t"))
