"""megadistill: distill Wan video diffusion transformers into few-step and block-autoregressive
students, with DeepSpeed ZeRO-3 and Megatron-style tensor / Ulysses sequence / pipeline parallelism.

Folders, one concern each (imports point one way):
config <- distributed, kernels <- models <- methods, pipeline <- train, data, eval <- launch/, tools/.
"""
__version__ = "0.1.0"
