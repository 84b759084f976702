"""A vLLM general plugin for tests: load format "shardstate_dumpafter" is shardstate's load format, and then
writes every rank's parameters as loaded (before vLLM's post-processing) with vLLM's own saver into
$DUMP_DIR, so a test can compare what each path put into vLLM's parameters, bit for bit, with what vLLM's
default loader puts there (../shared/peers/vllm-dumppre). Use: PYTHONPATH=<this folder>
VLLM_PLUGINS=shardstate_dumpafter DUMP_DIR=OUT ... load_format="shardstate_dumpafter"."""
import os


def register():
    from vllm.model_executor.model_loader import _LOAD_FORMAT_TO_MODEL_LOADER, ShardedStateLoader, register_model_loader

    from shardstate.vllm.loader import ShardstateModelLoader
    from shardstate.vllm.plugin import register as register_shardstate

    register_shardstate()
    if "shardstate_dumpafter" in _LOAD_FORMAT_TO_MODEL_LOADER:
        return

    @register_model_loader("shardstate_dumpafter")
    class DumpAfterLoader(ShardstateModelLoader):
        def load_weights(self, model, model_config):
            super().load_weights(model, model_config)
            os.makedirs(os.environ["DUMP_DIR"], exist_ok=True)
            ShardedStateLoader.save_model(model, os.environ["DUMP_DIR"])
