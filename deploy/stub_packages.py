"""Empty stand-ins for every package pyproject.toml lists, so the Dockerfile can install the dependencies
(`pip install "./[extra]"`) in a layer that only pyproject.toml invalidates, before the source is copied."""

import tomllib
from pathlib import Path

setuptools = tomllib.loads(Path("pyproject.toml").read_text())["tool"]["setuptools"]
package_dir = setuptools.get("package-dir", {})
for package in setuptools["packages"]:
    # The longest mapped prefix decides the folder: quiver.training -> training/, quiver.adapters -> server/adapters/.
    parts = package.split(".")
    for cut in range(len(parts), 0, -1):
        if ".".join(parts[:cut]) in package_dir:
            folder = Path(package_dir[".".join(parts[:cut])], *parts[cut:])
            break
    else:
        folder = Path(*parts)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "__init__.py").touch()
Path("README.md").touch()
