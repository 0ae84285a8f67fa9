"""Megatron-style model-parallel training engine for multimodal models (CLIP, global DiT, VLM)."""
from setuptools import find_packages, setup

setup(
    name="mmengine-parallel",
    version="0.1.0",
    description="Megatron-core TP/PP/DP training engine for CLIP, DiT and VLM models",
    python_requires=">=3.11",
    packages=find_packages(include=["engine*", "models*", "parallel*", "data*", "conversion*"]),
    install_requires=[
        # 2.13.0 is the CPU build this project is developed and tested on; a GPU machine brings
        # its own CUDA build (any torch >= 2.4 that megatron-core 0.16 accepts).
        "torch>=2.4",
        "megatron-core>=0.16,<0.17",  # 0.17+ needs Python 3.12
        "webdataset>=0.2.86",
        "sentencepiece>=0.2",
        "regex",
        "ftfy",
        "pyyaml>=6",
        "omegaconf>=2.3",
        "tensorboard>=2.14",
        "pillow>=10",
        "numpy",
        "psutil",
        "safetensors>=0.4",  # Hugging Face checkpoints (examples/convert_checkpoint.py)
    ],
    extras_require={
        "gpu": ["transformer-engine[pytorch]", "flash-attn"],
        # open_clip_torch pulls torchvision: PyPI's torchvision needs PyPI's (CUDA) torch of the same
        # release, so the test environment installs torch==2.14.1 torchvision==0.29.1 first.
        "test": ["pytest>=8", "open_clip_torch>=3.0", "transformers>=4.45", "safetensors>=0.4"],
    },
)
