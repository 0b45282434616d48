"""Serving engines as consumers: distconv's ``distconv_gloo`` weight-transfer engine for vLLM.

vLLM 0.32's built-in weight-transfer engines need CUDA (NCCL, CUDA IPC) or Ray; this one moves
tensors over a gloo group, so a trainer refits a vLLM that runs on CPUs, or across hosts without
NCCL. ``sender.GlooSender`` is the trainer side (no vLLM needed there); ``engine`` is vLLM's
worker side, registered under ``BACKEND`` by ``register()``, which vLLM calls in each of its
processes through the ``vllm.general_plugins`` entry point distconv declares. Serve with
``--weight-transfer-config '{"backend": "distconv_gloo"}'``.
"""

BACKEND = "distconv_gloo"


def register() -> None:
    """Register the worker engine with vLLM's ``WeightTransferEngineFactory`` (once per process:
    vLLM may load its plugins more than once)."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    if BACKEND not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(BACKEND, "distconv.vllm.engine", "GlooEngine")
