"""snncc: pip-installable; ``passes/``, ``runtime/`` and ``tools/`` install as ``snncc.passes``,
``snncc.runtime`` and ``snncc.tools``."""
from setuptools import setup

setup(
    name="snncc",
    version="0.1.0",
    description="A graph compiler for spiking neural networks in PyTorch step mode",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["snncc", "snncc.data", "snncc.passes", "snncc.runtime", "snncc.runtime.cuda", "snncc.tools"],
    package_dir={"snncc": "snncc", "snncc.passes": "passes", "snncc.runtime": "runtime",
                 "snncc.tools": "tools"},
    install_requires=["torch>=2.1", "networkx>=3.0", "numpy", "tqdm", "rich>=12"],
    extras_require={
        "test": ["pytest>=7", "pytest-xdist>=3", "hypothesis>=6", "scikit-learn>=1.2", "matplotlib>=3.5"],
        "demo": ["scikit-learn>=1.2", "matplotlib>=3.5"],
        "cuda12": ["cupy-cuda12x>=13"],
        "cuda13": ["cupy-cuda13x>=13"],
    },
    entry_points={"console_scripts": ["snncc-viz = snncc.tools.viz:main", "snncc-prof = snncc.tools.prof:main"]},
)
