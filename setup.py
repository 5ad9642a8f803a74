from setuptools import setup

# The kernels live in the top-level kernels/ folder (pure Triton) and install as mmmerge_triton.kernels:
# never as a top-level module named `kernels`, a name Hugging Face's package owns (transformers >= 5.25 imports
# it). The folder has no __init__.py, so from a checkout's root (first on sys.path for `python -m pytest`, a
# notebook, CI) it is a namespace portion, which the installed regular package always beats; installed, it is
# a namespace subpackage of mmmerge_triton, and from a checkout mmmerge_triton/__init__.py maps it (an
# editable install's finder maps only folders with an __init__.py). tests/test_layout.py guards all three.
setup(
    name="mmmerge_triton",
    version="0.1.0",
    description="Triton kernels for the multimodal embedding merge of vision-language models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=["mmmerge_triton", "mmmerge_triton.kernels", "mmmerge_triton.integrations", "mmmerge_triton.tools"],
    package_dir={"mmmerge_triton": "mmmerge_triton", "mmmerge_triton.kernels": "kernels"},
    package_data={"mmmerge_triton": ["configs/*.json"]},
    # torch: 2.11 on the H100 image is the oldest run (CI runs 2.13). Triton: 3.6 on the H100 image; CI's
    # interpreter runs 3.9. Capped below the next minor, whose compiled-launcher contract this package has not
    # been checked against.
    install_requires=["torch>=2.11", "triton>=3.6,<3.10", "numpy"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis", "matplotlib"],  # the tools' plots are tested too
        "bench": ["matplotlib", "tqdm"],
        "models": ["transformers>=4.57.1"],  # 4.57.0 is yanked; .ci/run tests this floor
    },
    entry_points={
        "console_scripts": [
            "mmmerge-bench=mmmerge_triton.tools.bench:main",
            "mmmerge-tune=mmmerge_triton.tools.tune:main",
            "mmmerge-report=mmmerge_triton.tools.report:main",
        ],
        # vLLM calls every general plugin in each process; this one switches on with MMMERGE_TRITON_VLLM=1.
        "vllm.general_plugins": ["mmmerge_triton = mmmerge_triton.integrations.vllm:register"],
    },
)
