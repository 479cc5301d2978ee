"""The package list, which pyproject.toml cannot express: ``conf/`` stays at the repo's top level
(Hydra's usual layout; the checkout, the tests and ``make run`` read it there) and ships inside the
package as ``sectune/conf``, so a wheel or ``pip install .`` finds every config group
(sectune/paths.py). Everything else about the package is in pyproject.toml
(whose package-data table, if added, would replace the one here)."""

from setuptools import find_namespace_packages, find_packages, setup

# every folder under conf/ (model, hydra/launcher, ...) as sectune.conf.<group>, holding its YAML files
CONF_PACKAGES = ["sectune.conf", *(f"sectune.conf.{p}" for p in find_namespace_packages(where="conf"))]

# the Flower app project `flwr run` takes (its pyproject names sectune.training.flower_app's apps) ships as
# sectune/flower_app_project, so an installed sectune has it too (sectune.paths.FLOWER_APP_DIR)
FLOWER_APP = "sectune.flower_app_project"

setup(
    packages=[*find_packages(include=["sectune", "sectune.*"]), *CONF_PACKAGES, FLOWER_APP],
    package_dir={"sectune.conf": "conf", FLOWER_APP: "experiments/hdfs_federated/flower_app"},
    package_data={"sectune": ["data/*.json"], **{p: ["*.yaml"] for p in CONF_PACKAGES}, FLOWER_APP: ["pyproject.toml"]},
)
