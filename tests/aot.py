"""Ahead-of-time compile of every kernel config (run as a script, without TRITON_INTERPRET).

Prints one JSON object per (kernel config, dtype, D, arch): shared memory, whether tensor-core
instructions are in the PTX, the spill bytes ptxas -v reports, or the error.  tests/test_compile.py
runs this in a subprocess because the interpreter replaces @triton.jit functions in-process.
"""
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

FAMILIES = ["sslcore.kernels.infonce", "sslcore.kernels.contranorm", "sslcore.kernels.kmeans"]
DTYPES = ("bf16", "fp16")
DIMS = (128, 768)
ARCHS = {80: "sm_80", 90: "sm_90a"}
TENSOR_CORE = {80: r"\bmma\.sync", 90: r"\bwgmma\."}


def cases():
    """(family, dtype, d, spec index, spec name, cc) for every case, importable under the interpreter."""
    out = []
    for fam in FAMILIES:
        module = importlib.import_module(fam)
        for dtype in DTYPES:
            for d in DIMS:
                for i, spec in enumerate(module.aot_specs(dtype, d)):
                    out += [(fam, dtype, d, i, spec[0], cc) for cc in ARCHS]
    return out


def compile_case(case):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fam, dtype, d, i, name, cc = case
    _, fn, signature, constexprs, warps, stages = importlib.import_module(fam).aot_specs(dtype, d)[i]
    res = {"id": f"{name}-{dtype}-D{d}-sm{cc}"}
    try:
        sig = dict(signature, **{k: "constexpr" for k in constexprs})
        kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs),
                                target=GPUTarget("cuda", cc, 32), options={"num_warps": warps, "num_stages": stages})
        ptx = kernel.asm["ptx"]
        ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "k.ptx")
            with open(src, "w") as f:
                f.write(ptx)
            rep = subprocess.run([ptxas, "-v", f"--gpu-name={ARCHS[cc]}", src, "-o", os.path.join(tmp, "k.cubin")],
                                 capture_output=True, text=True, check=True)
        report = rep.stdout + rep.stderr
        res.update(shared=kernel.metadata.shared, tensor_core=bool(re.search(TENSOR_CORE[cc], ptx)),
                   spills=[int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", report)],
                   registers=[int(x) for x in re.findall(r"Used (\d+) registers", report)])
    except Exception as exc:  # reported per case by the test
        res["error"] = f"{type(exc).__name__}: {exc}"
    return res


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for res in pool.map(compile_case, cases()):
            print(json.dumps(res), flush=True)
    sys.exit(0)
