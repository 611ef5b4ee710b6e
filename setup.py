import os
import re

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

VERSION = re.search(r'__version__ = "([^"]+)"', open("kcgevent/__init__.py", encoding="utf-8").read())[1]



class BuildPyWithContract(build_py):
    """Ship kallichore.json inside the package: the server serves that very file at /openapi.json."""

    def run(self):
        super().run()
        self.copy_file("kallichore.json", os.path.join(self.build_lib, "kcgevent", "api", "kallichore.json"))


setup(
    cmdclass={"build_py": BuildPyWithContract},
    name="kcgevent",
    version=VERSION,
    description="A durable, headless supervisor for Jupyter kernels, wire-compatible with Kallichore",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["kcgevent", "kcgevent.*"]),
    install_requires=[
        "gevent>=23.9",
        "flask>=3.0",
        "pyzmq>=25",
        "marshmallow>=3.20",
        "argh>=0.30",
        "psutil>=5.9",
        "wsproto>=1.2",
        "websocket-client>=1.6",
        "mcp>=2.3",
        "jupyter_client>=8",  # kernelspec discovery (kernel_name, `kcgevent kernelspecs`) and provisioners
    ],
    extras_require={
        "test": [
            "pytest>=7",
            "pytest-timeout>=2.1",
            "ipykernel>=6",
            "jupyter_client>=8",
            "requests>=2.28",
            "jsonschema>=4",
            "openapi-spec-validator>=0.7",
            "schemathesis>=4.0",
            "apispec>=6.0",
            "gunicorn>=22",
            "gateway_provisioners[k8s]>=0.5",  # = the "remote" extra: the SSH and Kubernetes tests run
        ],
        # kernels launched by gateway_provisioners (SSH "distributed", Kubernetes; add
        # gateway_provisioners[docker] or [yarn] for those)
        "remote": ["gateway_provisioners[k8s]>=0.5"],
        "bench": ["ipykernel>=6", "jupyter_client>=8"],
    },
    entry_points={"console_scripts": ["kcgevent = kcgevent.__main__:main"]},
)
