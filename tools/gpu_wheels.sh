#!/usr/bin/env bash
# What tools/gpu_check.py needs on the GPU machine, which has Python 3.12 with PyTorch but no
# Jupyter kernel and no internet: the cp312 manylinux wheels of the packages it lacks, into .whl/,
# and MNIST, into .gpu-data/. Both folders are ignored by git and carried by the device call
# (tools/gpu_check.py's docstring gives the command). Needs PyPI; run from anywhere.
set -euo pipefail
cd "$(dirname "$0")/.."

# The versions this project is developed with, known to work together. The machine already has
# the rest of what they require (pytest, pyyaml, packaging, psutil, attrs, pygments, six,
# python-dateutil, typing-extensions, coverage, tqdm, filelock, matplotlib, numpy, torch).
WHEELS=(
	# nbclient, which executes the chapters, and the kernel it starts
	nbclient==0.11.0 nbformat==5.11.1 jupyter_client==8.10.0 jupyter_core==5.9.1 traitlets==5.16.1
	platformdirs==4.14.9 fastjsonschema==2.22.3 jsonschema==4.26.0 jsonschema-specifications==2025.9.1
	referencing==0.37.0 rpds-py==2026.9.1
	ipykernel==7.4.0 comm==0.2.3 debugpy==1.8.22 matplotlib-inline==0.2.2 nest-asyncio2==1.7.4
	pyzmq==27.3.0 tornado==6.6.1
	ipython==9.18.1 ipython_pygments_lexers==1.1.1 jedi==0.20.1 parso==0.8.7 prompt_toolkit==3.0.53
	wcwidth==0.9.4 pexpect==4.9.0 ptyprocess==0.7.0 stack-data==0.6.3 asttokens==3.0.2 executing==2.3.0
	pure_eval==0.2.4
	# what the chapters import: ipywidgets, and myst-nb's glue (which imports docutils, not Sphinx)
	ipywidgets==8.1.9 widgetsnbextension==4.0.16 jupyterlab_widgets==3.0.17 myst-nb==1.4.0 docutils==0.21.2
	# the unit tests: pyproject.toml's pytest options load nbval
	nbval==0.11.0
)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_26_x86_64 manylinux_2_17_x86_64
	manylinux2014_x86_64 manylinux_2_5_x86_64 manylinux1_x86_64)

rm -rf .whl .gpu-data
"${PYTHON:-python3}" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
	--implementation cp "${PLATFORMS[@]/#/--platform=}" --dest .whl "${WHEELS[@]}"

data="${CAPSNET_DATA:-../shared/data}"
mkdir .gpu-data
cp -r "$data/mnist" .gpu-data/
du -sh .whl .gpu-data
