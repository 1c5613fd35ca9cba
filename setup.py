"""graphquant: offline INT8 quantization compiler for frozen TensorFlow graphs."""

from setuptools import find_packages, setup

# TensorFlow is an extra, not a hard requirement: a user who already has
# tensorflow, tensorflow-cpu or intel-tensorflow keeps it, and pip never pulls a
# second TensorFlow distribution next to it.  See BUILD_NOTES.md.
TF = "tensorflow>=2.21,<2.22"

setup(
    name="graphquant",
    version="0.1.0",
    description="Offline INT8 quantization of frozen TensorFlow graphs for x86 CPUs",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["graphquant", "graphquant.*"]),
    python_requires=">=3.10",  # TensorFlow 2.21 wheels exist for 3.10-3.13
    install_requires=["numpy", "protobuf", "networkx", "absl-py"],
    extras_require={
        "tf": [TF],
        "tf-cpu": ["tensorflow-cpu>=2.21,<2.22"],
        # tf-keras (the tf.keras exports of the model zoo) requires `tensorflow`
        # itself, so the development extras use that distribution too.
        "test": [TF, "tf-keras>=2.21,<2.22", "pytest", "pytest-xdist", "hypothesis"],
    },
    entry_points={"console_scripts": ["graphquant=graphquant.cli:run"]},
)
