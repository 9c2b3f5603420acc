from setuptools import find_packages, setup

setup(
    name="pytest-ostimages",
    version="0.1.0",
    description="pytest fixtures with disposable VMs booted from installed, layered ost-images",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="GPL-2.0-or-later",
    packages=find_packages(include=["pytest_ostimages", "pytest_ostimages.*"]),
    package_data={"pytest_ostimages": ["py.typed"], "pytest_ostimages.hypervisor": ["templates/*.xml"]},
    python_requires=">=3.9",
    install_requires=[
        "pytest>=8.0",  # the floor: .ci/setup installs it in .venv-floor, tests/unit/test_floor.py runs there
        "libvirt-python",
        "paramiko>=3.2",
        "lxml",
        "tenacity>=8.3",
        "pytest-xdist",
        "psutil>=5.9",  # owner liveness (state/owner.py)
        "cryptography",  # host keys made in-process (guest/keys.py)
    ],
    extras_require={
        "cloud-init": ["pycdlib", "pyyaml"],  # NoCloud seeds, and which modules a suite's cloud-config asks for
        "ansible": ["ansible-core", "ansible-runner"],  # ost_ansible_inventory, OST's ost_utils
        "testinfra": ["pytest-testinfra"],  # vm.testinfra
        "test": ["pytest-timeout", "pycdlib", "pyyaml", "ansible-core", "ansible-runner", "pytest-testinfra"],
    },
    entry_points={"pytest11": ["ostimages = pytest_ostimages.plugin"]},
    classifiers=[
        "Framework :: Pytest",
        "Programming Language :: Python :: 3",
        "Topic :: Software Development :: Testing",
    ],
)
