"""Ahead-of-time compile of every kernel variant, as the binary a launch really builds.

Run as a script (without TRITON_INTERPRET): prints one JSON object per (kernel variant, dtype, D,
arch) with shared memory, registers, spills, the tensor-core instructions in the PTX (and the
widths of the wgmma ones), or the error.  tests/test_compile.py runs it in a subprocess because
the interpreter replaces @triton.jit functions in-process.

Each kernel module's ``aot_specs(dtype, d)`` gives :class:`~sslcore.kernels._backend.KernelSpec`s
with example launch arguments.  The signature is derived from those values by Triton's own
``specialize_impl``, as its launcher does: 16-byte-aligned pointers and integers divisible by 16
get ``tt.divisibility = 16`` and integers equal to 1 become constants.  Without those attributes
the compile is a different binary (no async copies, other registers, other shared memory).
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
DTYPES = ("bf16", "fp16", "fp32")
DIMS = {"sslcore.kernels.infonce": (128, 256, 384, 768), "sslcore.kernels.kmeans": (128, 256),
        "sslcore.kernels.contranorm": (0,)}  # ContraNorm's kernels are elementwise: D does not enter them
ARCHS = {80: "sm_80", 90: "sm_90a"}
TENSOR_CORE = {80: r"\bmma\.sync", 90: r"\bwgmma\.mma_async"}
SASS_MMA = re.compile(r"\b(HGMMA|HMMA)\.(\d+)x?(\d+)?x?(\d+)?\.F32(?:\.(BF16|F16|TF32))?\b")
# Dense tensor-core rate per SM per clock, in multiply-adds: H100 (989 TFLOP/s bf16 at 132 SMs, 1.83 GHz)
# and A100 (312 TFLOP/s at 108 SMs, 1.41 GHz); tf32 at half the rate.
MAC_PER_CLK = {90: 2048, 80: 1024}


def _mma_macs(match) -> int:
    """Multiply-adds of one HGMMA (per warpgroup, ``HGMMA.64xNxK``) or HMMA (per warp, ``HMMA.16816``)."""
    if match.group(1) == "HGMMA":
        return int(match.group(2)) * int(match.group(3)) * int(match.group(4))
    m, n, k = match.group(2)[:2], match.group(2)[2], match.group(2)[3:]  # "16816" -> 16, 8, 16
    return int(m) * int(n) * int(k)


def hot_loop(sass: str, cc: int, num_warps: int) -> dict:
    """The SASS loop with the most tensor-core instructions (for equal counts, the shortest): its
    instruction count, its MMA count, and ``issue_per_tc``: the clocks the SM's four schedulers need to
    issue one iteration's instructions (one per clock each) over the clocks its tensor cores need for its
    multiply-adds at the dense peak.  Above 1 the loop is bound by instruction issue, not by the tensor
    cores.  A loop is a backward branch to a label; nested loops count their body once (a static count)."""
    labels, instrs = {}, []
    for line in sass.splitlines():
        label = re.match(r"^\s*(\.L_\w+):", line)
        if label:
            labels[label.group(1)] = len(instrs)
        elif re.match(r"^\s*/\*[0-9a-f]{4,}\*/", line):
            instrs.append(line)
    best = None
    for end, text in enumerate(instrs):
        target = re.search(r"BRA\b.*`\((\.L_\w+)\)", text)
        if not (target and labels.get(target.group(1), end + 1) <= end):
            continue
        body = instrs[labels[target.group(1)]:end + 1]
        mmas = [m for m in (SASS_MMA.search(x) for x in body) if m]
        if mmas and (best is None or (len(mmas), -len(body)) > (best["mma"], -best["instructions"])):
            # per CTA iteration: a warpgroup (4 warps) issues each HGMMA once, every warp its own HMMAs
            copies = num_warps / 4 if cc >= 90 else num_warps
            rate = lambda m: MAC_PER_CLK[cc] / (2 if m.group(5) == "TF32" else 1)  # noqa: E731
            tc_clk = sum(_mma_macs(m) * copies / rate(m) for m in mmas)
            best = {"instructions": len(body), "mma": len(mmas),
                    "issue_per_tc": round(len(body) * num_warps / 4 / tc_clk, 3)}
    return best or {}


def cases():
    """(family, dtype, d, spec index, spec name, cc) for every case, importable under the interpreter."""
    out = []
    for fam in FAMILIES:
        module = importlib.import_module(fam)
        for dtype in DTYPES:
            for d in DIMS[fam]:
                for cc in ARCHS:
                    out += [(fam, dtype, d, i, spec.name, cc) for i, spec in enumerate(module.aot_specs(dtype, d, cc))]
    return out


def case_id(case) -> str:
    fam, dtype, d, _, name, cc = case
    return f"{name}-{dtype}{f'-D{d}' if d else ''}-sm{cc}"


def launch_signature(spec):
    """``(signature, constexprs, attrs)`` exactly as the launcher derives them from ``spec.args``."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    signature, constexprs, attrs = {}, dict(spec.constexprs), {}
    for i, name in enumerate(spec.fn.arg_names):
        if name in spec.constexprs:
            signature[name] = "constexpr"
            continue
        kind, spec_key = native_specialize_impl(BaseBackend, spec.args[name], False, True, True)[:2]
        signature[name] = kind
        if kind == "constexpr":  # an int equal to 1 (or None) is compiled in as a constant
            constexprs[name] = spec.args[name]
        elif spec_key and isinstance(spec_key, str):
            attrs[(i,)] = BaseBackend.parse_attr(spec_key)
    return signature, constexprs, attrs


def compile_case(case):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fam, dtype, d, i, name, cc = case
    spec = importlib.import_module(fam).aot_specs(dtype, d, cc)[i]
    res = {"id": case_id(case), "mma_expected": spec.mma}
    try:
        signature, constexprs, attrs = launch_signature(spec)
        kernel = triton.compile(ASTSource(fn=spec.fn, signature=signature, constexprs=constexprs, attrs=attrs),
                                target=GPUTarget("cuda", cc, 32),
                                options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
        ptx = kernel.asm["ptx"]
        ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "k.ptx")
            with open(src, "w") as f:
                f.write(ptx)
            rep = subprocess.run([ptxas, "-v", f"--gpu-name={ARCHS[cc]}", src, "-o", os.path.join(tmp, "k.cubin")],
                                 capture_output=True, text=True, check=True)
            with open(os.path.join(tmp, "k.cubin"), "wb") as f:
                f.write(kernel.asm["cubin"])
            nvdisasm = os.path.join(os.path.dirname(ptxas), "nvdisasm")
            sass = subprocess.run([nvdisasm, "-c", os.path.join(tmp, "k.cubin")], capture_output=True, text=True,
                                  check=True).stdout
        report = rep.stdout + rep.stderr
        res.update(shared=kernel.metadata.shared, tensor_core=bool(re.search(TENSOR_CORE[cc], ptx)),
                   wgmma_n=sorted({int(n) for n in re.findall(r"wgmma\.mma_async\.sync\.aligned\.m64n(\d+)k", ptx)}),
                   divisible=sorted(spec.fn.arg_names[k[0]] for k in attrs),
                   spills=[int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", report)],
                   registers=[int(x) for x in re.findall(r"Used (\d+) registers", report)],
                   mma_types=sorted({m.group(5) or "F16" for m in SASS_MMA.finditer(sass)}),
                   loop=hot_loop(sass, cc, spec.num_warps))
    except Exception as exc:  # reported per case by the test
        res["error"] = f"{type(exc).__name__}: {exc}"
    return res


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for res in pool.map(compile_case, cases()):
            print(json.dumps(res), flush=True)
    sys.exit(0)
