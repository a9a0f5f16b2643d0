"""Install spatialformer-kernels.

The C++ CPU kernel in spatialformer_kernels/backends/cpu/csrc/ is compiled on first use
(torch.utils.cpp_extension.load) and cached, so `pip install` needs no preinstalled torch,
no build-isolation flags and no compiler; see the README for why.
"""
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
TRAIN_REQUIRES = ["scikit-learn"]

setup(
    name="spatialformer-kernels",
    version="0.1.0",
    description="Fused bilateral cross-attention kernels (Triton, C++) and SpatialFormer models",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["spatialformer_kernels*", "spatialformer*"]),
    # The C++ sources, compiled on first use from the installed package.
    package_data={"spatialformer_kernels.backends.cpu": ["csrc/*.cpp", "csrc/*.h"]},
    install_requires=[
        "torch>=2.5",
        # the launch plans read triton.knobs (3.4), the forward uses tl.gather (3.3); tested with 3.8
        "triton>=3.4; platform_system == 'Linux'",
        "timm>=1.0.9",
        "einops>=0.8",
        "tqdm",
        "numpy",
        "safetensors",  # checkpoints (spatialformer.train)
        "scipy",  # Hungarian matching of the segmentation loss (spatialformer.seg_loss)
        # torch.utils.cpp_extension builds the C++ CPU kernel on first use with ninja.
        "ninja",
    ],
    extras_require={
        # python -m spatialformer.train: its data set (digits) ships inside scikit-learn
        "train": TRAIN_REQUIRES,
        "test": ["pytest>=8", "pytest-xdist>=3", "pytest-benchmark>=4", "hypothesis>=6", "matplotlib"] + TRAIN_REQUIRES,
        "bench": ["matplotlib", "pytest-benchmark>=4"],
    },
    entry_points={
        "console_scripts": [
            "spatialformer-bench=spatialformer_kernels.bench.cli:main",
        ],
    },
)
