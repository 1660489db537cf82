from setuptools import find_packages, setup

setup(
    name="tnas",
    version="0.1.0",
    description="T-NAS and auto-MAML: fast adaptation of neural architectures with meta learning",
    packages=find_packages(include=["tnas", "tnas.*"]),
    package_data={"tnas": ["data/splits/*.txt", "data/splits/*.json"]},
    include_package_data=True,
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "tensorboardX>=2.6",
        "tensorboard>=2.14",  # the viewer: `tensorboard --logdir runs` (tensorboardX only writes the events)
        "ptflops>=0.7",
        "numpy>=1.23",
        "pillow>=9.0",
        "pyyaml>=6.0",
        "tqdm>=4.60",
        "matplotlib>=3.6",
    ],
    extras_require={"test": ["pytest>=7.0"]},
)
