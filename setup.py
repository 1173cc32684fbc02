"Packaging for distill_nb: every field comes from settings.ini (nbdev 2 layout, no pyproject.toml)."
from configparser import ConfigParser
import setuptools

cp = ConfigParser(delimiters=["="])
cp.read("settings.ini", encoding="utf-8")
c = cp["DEFAULT"]
lib = c["lib_path"]
req = lambda k: c.get(k, "").split()

setuptools.setup(
    name=c["lib_name"], version=c["version"], description=c["description"],
    author=c["author"], author_email=c["author_email"], license="Apache-2.0", url=c["git_url"],
    long_description=open("README.md", encoding="utf-8").read(), long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=[lib, lib + ".*"]),
    package_data={lib: ["fixtures/*", "configs/*/*.yaml", "manifest.json"]}, include_package_data=True,
    install_requires=req("requirements"),
    extras_require={"dev": req("dev_requirements"), "full": req("full_requirements")},
    entry_points={"nbdev": [f"{c['lib_name']}={lib}._modidx:d"],
                  "console_scripts": req("console_scripts")},
    python_requires=">=" + c["min_python"], zip_safe=False)
