#!/usr/bin/env bash
# The wheels `benchmarks/throughput.py --gpu` needs on a GPU machine without network whose Python (3.12) has
# torch, transformers, accelerate, peft, safetensors, numpy, pandas, pyarrow, fsspec, pillow and pyyaml but not
# diffusers or pydantic: downloads exactly those (and what they need that such an image may lack) into
# .gpu-wheels/ (gitignored, ~20 MB). The benchmark installs them from there with
# `pip install --no-index --find-links .gpu-wheels diffusers pydantic` when `import diffusers` fails; pip takes
# from the folder only what the machine lacks (diffusers 0.42 needs huggingface-hub >= 1.32, which an image
# built around transformers 5.17 may predate: 1.33 and its dependencies are here, within transformers'
# < 2.0). The shard worker the benchmark runs imports nothing of Prefect, Dask or s3fs.
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
  "lazy-importer==0.1.0" "requests==2.34.2" "charset-normalizer" "idna" "urllib3" "certifi" \
  "huggingface-hub==1.33.0" "click>=8.4.2" "hf-xet>=1.6,<2" "httpx<1" "httpcore" "h11" "anyio" "sniffio"
ls -la .gpu-wheels
du -sh .gpu-wheels
