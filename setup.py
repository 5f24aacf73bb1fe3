"""Builds the BPF objects (`make build`) before packaging them, so that
`pip install .` of a clean checkout gives a working tool, not a package
without its data plane. Everything else is in pyproject.toml."""

import subprocess

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithBpf(build_py):
    def run(self) -> None:
        subprocess.run(["make", "--no-print-directory", "build"], check=True)
        super().run()


setup(cmdclass={"build_py": BuildWithBpf})
