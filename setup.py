"""Package discovery for the wheel (everything else is in pyproject.toml).

The product's layout keeps ``gpu/`` and ``calibrators/`` at the top of the tree, but they
install inside the one import namespace as ``prune_cli.gpu`` and ``prune_cli.calibrators``
(poor top-level names in a user's site-packages). ``[tool.setuptools.packages.find]`` cannot
rename what it finds, so the packages are discovered here: every folder with an
``__init__.py`` under ``prune_cli/``, and under each mapped folder with its new prefix. A new
subpackage ships without editing any list (tests/packaging/test_wheel.py checks the wheel).
"""

from setuptools import find_packages, setup

MAPPED = {"prune_cli.gpu": "gpu", "prune_cli.calibrators": "calibrators"}


def discover() -> list[str]:
    packages = find_packages(include=["prune_cli", "prune_cli.*"])
    for name, folder in MAPPED.items():
        packages += [name] + [f"{name}.{sub}" for sub in find_packages(folder)]
    return sorted(packages)


setup(packages=discover(), package_dir=MAPPED)
