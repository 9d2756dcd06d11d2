from setuptools import find_packages, setup

setup(
    name="at_jax",
    version="0.1.0",
    description="Attention Transfer (Zagoruyko & Komodakis, ICLR 2017) in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["at_jax", "at_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.4.35",
        "flax>=0.12",
        "optax>=0.2.3",
        "orbax-checkpoint>=0.9",
        "ml-collections>=0.1.1",
        "absl-py>=2.0",
        "numpy>=1.24",
        "tqdm>=4.60",
        "tensorboardX>=2.6",
        "grain>=0.2.10",
        "pillow>=10",
    ],
    extras_require={
        "tfds": ["tensorflow-datasets>=4.9.4"],
        "viz": ["matplotlib>=3.7"],
        "dev": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "pytest-timeout>=2.2",
            "filelock>=3.12",
            "tensorflow-datasets>=4.9.4",
            "matplotlib>=3.7",
            # lint, format, types and layers: pinned, so that CI checks what developers check
            "ruff==0.17.6",
            "mypy==2.4.1",
            "import-linter==2.17",
            # the API reference (make docs)
            "sphinx>=8,<10",
            "myst-parser>=4",
        ],
    },
)
