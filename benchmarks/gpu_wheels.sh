#!/usr/bin/env bash
# The wheels `benchmarks/throughput.py --gpu` needs on a GPU machine without network whose Python (3.12) has
# torch, transformers, accelerate, peft, safetensors, numpy, pandas, pyarrow, fsspec, pillow and pyyaml but not
# diffusers or pydantic: downloads exactly those (and what they need that such an image lacks) into
# .gpu-wheels/ (gitignored, ~10 MB). The benchmark installs them from there with
# `pip install --no-index --find-links .gpu-wheels` when `import diffusers` fails; the shard worker it runs
# imports nothing of Prefect, Dask or s3fs.
#
#   benchmarks/gpu_wheels.sh [PYTHON_VERSION]      # default 3.12
set -euo pipefail
cd "$(dirname "$0")/.."
version="${1:-3.12}"
abi="cp${version/./}"
pip download --only-binary=:all: --no-deps --python-version "$version" --implementation cp --abi "$abi" \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
  -d .gpu-wheels \
  "diffusers==0.42.1" "pydantic==2.14.4" "pydantic-core==2.50.5" "annotated-types==0.8.0" \
  "typing-inspection==0.4.5" "typing-extensions==4.16.0" "importlib-metadata==10.2.0" "zipp==4.1.2" \
  "lazy-importer==0.1.0" "requests==2.34.2" "charset-normalizer" "idna" "urllib3" "certifi"
ls -la .gpu-wheels
du -sh .gpu-wheels
