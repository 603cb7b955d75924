from setuptools import find_packages, setup

setup(
    name="megadistill",
    version="0.1.0",
    description="DeepSpeed + Megatron-style distillation of Wan video diffusion transformers",
    packages=find_packages(include=["megadistill", "megadistill.*"]),
    python_requires=">=3.10",
    # On a CPU-only machine install torch==2.13.0 (the CPU build) before this package: a plain
    # `torch` requirement resolved by pip alone pulls a multi-GB CUDA build. The README's set-up
    # line does that.
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.15",
        "transformers>=4.45",
        "diffusers>=0.33",
        "accelerate",  # diffusers needs it to load a WanTransformer3DModel folder
        "sentencepiece",
        "webdataset",
        "tensorboard",
        "safetensors",
        "pyyaml",
        "tqdm",
        "numpy",
        "pillow",
    ],
    extras_require={
        # Triton ships with CUDA builds of torch; on CPU it is only used through its interpreter.
        "triton": ["triton"],
        "test": ["pytest", "triton"],
    },
)
