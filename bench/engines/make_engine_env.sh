#!/usr/bin/env bash
# The real engines for tests/engines/: vLLM 0.34.0 and SGLang 0.5.23 over the CPU torch, in a virtual environment
# outside the repo; their test run's log; and a bundle of their Python parts for the H100 (no internet there).
#
#   bash bench/engines/make_engine_env.sh venv   [VENV]          build VENV (default /work/engine-venv)
#   bash bench/engines/make_engine_env.sh test   [VENV] [LOG]    run tests/engines in VENV; log (default
#                                                                bench/results/engines/cpu_tests.log) starts
#                                                                with the engine versions
#   bash bench/engines/make_engine_env.sh bundle [DIR]           DIR (default .engine_bundle, git-excluded):
#                                                                site.tar.xz to carry, and run_tests.sh
#
# The engines pin their own CUDA torch, so they go in with --no-deps, after the CPU torch; then only what the
# merge modules' imports ask for (vllm.model_executor.models.utils, sglang.srt.managers.mm_utils and the model
# files the tests import), with torch and triton held by a constraints file. vLLM logs that its compiled
# extension is missing and runs its Python. PyPI has no CPU torchvision or torchaudio for this torch, and
# SGLang's mm_utils imports torchvision.transforms (InternVL preprocessing), some vLLM model files torchaudio:
# the venv gets a stand-in for each that imports and raises when used (the H100 image has the real ones).
# Where the compiled parts are missing (this venv, and the bundle: none carried), tests/engines/conftest.py sets
# VLLM_TARGET_DEVICE=cpu (vLLM's CPU platform, also where CUDA is visible) and, for SGLang, which imports
# sgl_kernel at import time where CUDA is visible, puts the import-time stub tests/engines/stubs/sgl_kernel on
# sys.path; the merge functions under test are the engines' own either way. The header of a run says which.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
ENGINES=(vllm==0.34.0 sglang==0.5.23)
# Import-time dependencies of the merge modules (found by importing them until nothing was missing). Where
# the two engines pin different versions, vLLM's range wins; transformers is the one both accept.
DEPS=(psutil pyzmq urllib3 cbor2 aiohttp requests "openai>=2.25,<3" pillow pybase64 cachetools msgspec cloudpickle
      uvloop py-cpuinfo prometheus_client "fastapi>=0.133,<0.137" partial-json-parser "llguidance>=1.7.6,<1.8"
      einops packaging regex transformers==5.19.0 openai-harmony==0.0.4 orjson ipython dill sentencepiece
      compressed-tensors gguf pytest)
NO_DEPS=(xgrammar==0.2.8 apache-tvm-ffi)  # their own requirements would pull a CUDA torch

stand_in() {  # stand_in SITE_PACKAGES NAME: a package NAME whose every module imports and every attribute raises
  mkdir -p "$1/$2"
  cat > "$1/$2/__init__.py" <<PY
"""A stand-in for $2 in the CPU engine environment, written by bench/engines/make_engine_env.sh: PyPI has
no CPU build of it for this torch, and the engines import it at import time for code the merge tests never
run. Every $2.* module imports; every attribute is a placeholder that raises when called. No package
metadata, so transformers reports $2 as absent."""
import importlib.abc
import importlib.machinery
import sys
import types


class _Missing:
    def __init__(self, name):
        self._name = name

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Missing(f"{self._name}.{attr}")

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self._name}: $2 is a stand-in in this environment")


def _module_getattr(module_name):
    def __getattr__(attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Missing(f"{module_name}.{attr}")
    return __getattr__


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name.startswith("$2."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = _module_getattr(spec.name)
        return module

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, _Finder())
__getattr__ = _module_getattr("$2")
__version__ = "0+stand-in"
PY
}

build_venv() {
  local venv=${1:-/work/engine-venv}
  python3 -m venv "$venv"
  . "$venv/bin/activate"
  # The CPU wheel: this machine's index serves it; elsewhere add PyTorch's CPU index (--index-url .../whl/cpu).
  python -m pip install -q torch==2.13.0 triton==3.9.0 numpy
  local constraints="$venv/engine-constraints.txt"
  python -c "import torch, triton; print(f'torch=={torch.__version__}\ntriton=={triton.__version__}')" > "$constraints"
  python -m pip install -q --no-deps "${ENGINES[@]}"
  python -m pip install -q -c "$constraints" "${DEPS[@]}"
  python -m pip install -q --no-deps "${NO_DEPS[@]}"
  local site
  site=$(python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  stand_in "$site" torchvision
  stand_in "$site" torchaudio
  python -m pip install -q --no-deps -e "$REPO"  # the vllm.general_plugins entry point comes with it
  python - <<'PY'
import importlib, warnings
warnings.simplefilter("ignore")
for name in ("vllm.model_executor.models.utils", "sglang.srt.managers.mm_utils", "mmmerge_triton"):
    importlib.import_module(name)
print("the merge modules import")
PY
}

run_tests() {
  local venv=${1:-/work/engine-venv} log=${2:-$REPO/bench/results/engines/cpu_tests.log}
  . "$venv/bin/activate"
  mkdir -p "$(dirname "$log")"
  cd "$REPO"
  local dirty=""
  git diff --quiet HEAD -- mmmerge_triton tests && [ -z "$(git status --porcelain -- tests/engines)" ] \
    || dirty=" + uncommitted changes"
  {
    # The versions follow in pytest's header (tests/engines/conftest.py).
    echo "# tests/engines, $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD)$dirty"
    echo "# bash bench/engines/make_engine_env.sh test (python -m pytest -v tests/engines -p no:cacheprovider)"
    python -m pytest -v tests/engines -p no:cacheprovider -W ignore::DeprecationWarning 2>&1
  } | sed -e "s#$REPO/##g" -e "s#$venv#VENV#g" | tee "$log"
}

make_bundle() {
  # For the H100 image (Python 3.12, torch 2.11, transformers 5.17, no internet): the engines' Python parts and
  # the import-time dependencies that image lacks, as cp312 manylinux wheels unpacked, less the engines'
  # compiled extensions (built against torch 2.14: they would not load) and their CUDA/C++ sources and
  # binaries. Not carried: transformers (the image's 5.17.0 passes these tests on the CPU too, where SGLang
  # pins 5.19.0) and jedi (IPython imports it lazily). Packed as one xz archive.
  local dir=${1:-$REPO/.engine_bundle}
  local site
  site=$(mktemp -d)  # unpacked here, packed into DIR, removed: only the archive is carried
  mkdir -p "$dir"
  local missing=(annotated-types apache-tvm-ffi asttokens cachetools cbor2 compressed-tensors dill distro executing
                 "fastapi>=0.133,<0.137" gguf httpcore2 httpx2 ipython ipython-pygments-lexers jiter
                 "llguidance>=1.7.6,<1.8" loguru matplotlib-inline msgspec "openai>=2.25,<3" openai-harmony==0.0.4
                 opentelemetry-api orjson partial-json-parser pexpect prompt-toolkit ptyprocess pure-eval pybase64
                 pydantic pydantic-core pyzmq sniffio stack-data starlette traitlets truststore typing-inspection
                 wcwidth xgrammar==0.2.8
                 # Past the point where the engines' imports first stopped on the GPU machine (vLLM's CUDA platform,
                 # sgl_kernel; tests/engines/conftest.py now gets past both) these are imported too: annotated-doc
                 # (fastapi's), and four the image may or may not have (unproven there, small): carried.
                 annotated-doc cloudpickle einops prometheus-client uvloop)
  # Wheels for a glibc up to 2.35 (the image's Python 3.12.3 is Ubuntu 24.04's, glibc 2.39); pip takes only
  # the platform tags named.
  local platforms=(--platform linux_x86_64 --platform manylinux2014_x86_64)
  for minor in $(seq 17 35); do platforms+=(--platform "manylinux_2_${minor}_x86_64"); done
  python3 -m pip install -q --no-deps --target "$site" --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" "${ENGINES[@]}" "${missing[@]}"
  # The engines' compiled parts and what only they read (kernel sources, a Rust binary, web assets).
  find "$site/vllm" "$site/sglang" -name "*.so" -delete
  rm -rf "$site/vllm/vllm-rs" "$site/sglang/multimodal_gen"  # a Rust binary; SGLang's diffusion server
  find "$site/vllm" "$site/sglang" -type f \( -name "*.cu" -o -name "*.cuh" -o -name "*.h" -o -name "*.hpp" \
    -o -name "*.cpp" -o -name "*.cc" -o -name "*.co" -o -name "*.js" -o -name "*.css" -o -name "*.png" \) -delete
  find "$site" -name "__pycache__" -type d -prune -exec rm -rf {} +
  echo "unpacked: $(du -sh "$site" | cut -f1)"
  tar -C "$site" -cJf "$dir/site.tar.xz" .
  rm -rf "$site"
  cat > "$dir/run_tests.sh" <<'SH'
#!/usr/bin/env bash
# On the H100, from the repo root: unpack the bundle, install this package (its entry point), run tests/engines.
set -euo pipefail
site=/tmp/engine_site && rm -rf "$site" && mkdir -p "$site" && tar -C "$site" -xJf .engine_bundle/site.tar.xz
python3 -m pip install -q --no-deps --no-build-isolation -e .
export PYTHONPATH="$site"
echo "# tests/engines from the bundle, $(date -u +%Y-%m-%dT%H:%MZ) (versions: pytest's header below)"
python3 -m pytest -v -rs tests/engines -p no:cacheprovider -W ignore::DeprecationWarning "$@"
SH
  du -sh "$dir/site.tar.xz"
}

case "${1:-}" in
  venv) build_venv "${2:-}" ;;
  test) run_tests "${2:-}" "${3:-}" ;;
  bundle) make_bundle "${2:-}" ;;
  *) echo "usage: $0 venv [VENV] | test [VENV] [LOG] | bundle [DIR]" >&2; exit 2 ;;
esac
