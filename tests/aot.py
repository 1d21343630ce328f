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
# Per SM: 32-bit registers, shared memory a CTA may take (the 1 KB the driver reserves per CTA included
# below), threads; MUFU (ex2) lanes per clock.
SM_REGISTERS, SM_THREADS, MUFU_PER_CLK = 65536, 2048, 16
SM_SHARED = {90: 233_472, 80: 167_936}
SETMAXREG = re.compile(r"\bUSETMAXREG\.\S+\s+(?:UP\d+,\s*)?(0x[0-9a-f]+)")
# LOP3.LUT d, a, b, c, table: the b operand (an immediate, or R for a register) and c (RZ or R) with the table
LOP3 = re.compile(r"\bLOP3\.LUT\s+\w+,\s*[\w.]+,\s*([\w.]+),\s*([\w.]+),\s*(0x[0-9a-f]+)")
CTA_BARRIER = re.compile(r"\bBAR\.SYNC(?:\.DEFER_BLOCKING)?\s+0x0\s*;")  # barrier 0 with no thread count: all


def _mma_macs(match) -> int:
    """Multiply-adds of one HGMMA (per warpgroup, ``HGMMA.64xNxK``) or HMMA (per warp, ``HMMA.16816``)."""
    if match.group(1) == "HGMMA":
        return int(match.group(2)) * int(match.group(3)) * int(match.group(4))
    m, n, k = match.group(2)[:2], match.group(2)[2], match.group(2)[3:]  # "16816" -> 16, 8, 16
    return int(m) * int(n) * int(k)


def ctas_per_sm(cc: int, warps: int, registers: int, shared: int) -> int:
    """Resident CTAs per SM from registers (allocated per warp in units of 8 per thread), shared memory and
    threads."""
    by_regs = SM_REGISTERS // (-(-registers // 8) * 8 * 32 * warps)
    return max(0, min(by_regs, SM_SHARED[cc] // (shared + 1024), SM_THREADS // (32 * warps), 32))


def hot_loop(sass: str, cc: int, num_warps: int, registers: int | None = None, shared: int = 0) -> dict:
    """The issue model of a matmul kernel's hot loop, read from its SASS (``num_warps``: all the CTA's warps,
    a warp-specialised kernel's producer included).

    The hot loop is the innermost loop (a backward branch to a label; the shortest such span through a
    given set of tensor-core instructions, containing no other) with the most tensor-core instructions.
    A warp-specialised kernel (``USETMAXREG``: Triton moves registers between its warpgroups) runs one
    such loop per consumer warpgroup, each by 4 warps; ``groups`` counts them.  Per CTA iteration (every
    group once), in SM clocks:

    * ``t_mma``: multiply-adds over the SM's dense rate;
    * ``t_issue``: instructions x warps / 4 schedulers (one instruction per clock each);
    * ``t_mufu``: ex2/rcp and friends at 16 lanes per clock.

    The loop is **serial** when it waits for all its wgmma (``WARPGROUP.DEPBAR.LE gsb0, 0x0``) and nothing
    else can use the tensor cores meanwhile: one CTA per SM (``ctas_per_sm``, from ``registers`` and
    ``shared``) whose warpgroups meet at a CTA-wide barrier in the loop (or that is one warpgroup).  Then
    the softmax-type work adds to the tensor-core time: ``t = t_mma + max(t_issue - its MMA issue, t_mufu)``.
    Otherwise (a second CTA, or warpgroups that wait only on their own wgmma) it is **overlapped**:
    ``t = max(t_mma, t_issue, t_mufu)``.  ``mma_efficiency = t_mma / t``: the fraction of the tensor cores'
    peak the loop's issue allows (shared-memory and L2 bandwidth are not in it: docs/architecture.md).
    ``issue_per_tc`` is ``t_issue / t_mma`` of one loop, the older measure; ``registers``: per thread in
    the loop (a warp-specialised group's ``USETMAXREG`` share, else ``registers`` as given).  Nested loops
    count their body once (a static count); sm_80's ``mma.sync`` never waits for a group, so its loops count
    as overlapped.  ``lop3``: the loop's LOP3 instructions by form, ``"b|c|table"`` (b an immediate or R, c RZ
    or R)."""
    labels, instrs = {}, []
    for line in sass.splitlines():
        label = re.match(r"^\s*(\.L_\w+):", line)
        if label:
            labels[label.group(1)] = len(instrs)
        elif re.match(r"^\s*/\*[0-9a-f]{4,}\*/", line):
            instrs.append(line)
    loops = {}  # the shortest loop through each set of tensor-core instructions: (start, end, matches)
    for end, text in enumerate(instrs):
        target = re.search(r"BRA\b.*`\((\.L_\w+)\)", text)
        if target and labels.get(target.group(1), end + 1) <= end:
            start = labels[target.group(1)]
            at = tuple(i for i in range(start, end + 1) if SASS_MMA.search(instrs[i]))
            if at and (at not in loops or end - start < loops[at][1] - loops[at][0]):
                loops[at] = (start, end, [SASS_MMA.search(instrs[i]) for i in at])
    loops = list(loops.values())
    inner = [lp for lp in loops if not any(o is not lp and lp[0] <= o[0] and o[1] <= lp[1] for o in loops)]
    if not inner:
        return {}
    most = max(len(lp[2]) for lp in inner)
    start, end, mmas = min((lp for lp in inner if len(lp[2]) == most), key=lambda lp: lp[1] - lp[0])
    body = instrs[start:end + 1]
    specialised = "USETMAXREG" in sass
    # registers the loop runs with: a warp-specialised group's own (its last USETMAXREG before the loop)
    maxreg = [int(r.group(1), 16) for r in (SETMAXREG.search(x) for x in instrs[:start]) if r]
    groups = sum(len(lp[2]) == most for lp in inner) if specialised else 1
    warps = 4 if specialised else num_warps
    copies = warps / 4 if cc >= 90 else warps  # a warpgroup issues each HGMMA once, every warp its own HMMAs
    rate = lambda m: MAC_PER_CLK[cc] / (2 if m.group(5) == "TF32" else 1)  # noqa: E731
    tc_clk = sum(_mma_macs(m) * copies / rate(m) for m in mmas)
    t_mma, t_issue = groups * tc_clk, groups * len(body) * warps / 4
    t_mufu = groups * sum("MUFU" in x for x in body) * warps * 32 / MUFU_PER_CLK
    waits_all = any("WARPGROUP.DEPBAR.LE gsb0, 0x0" in x for x in body)
    barrier = any(CTA_BARRIER.search(x) for x in body)
    ctas = ctas_per_sm(cc, num_warps, registers, shared) if registers else 1
    independent = ctas * groups * (1 if barrier else max(1, warps // 4))
    serial = waits_all and independent == 1
    t = t_mma + max(t_issue - groups * len(mmas) * warps / 4, t_mufu) if serial else max(t_mma, t_issue, t_mufu)
    return {"instructions": len(body), "mma": len(mmas), "issue_per_tc": round(len(body) * warps / 4 / tc_clk, 3),
            "registers": maxreg[-1] if maxreg else registers, "groups": groups, "waits_all": waits_all,
            "cta_barrier": barrier, "ctas_per_sm": ctas,
            "mode": "serial" if serial else "overlapped", "t_mma": round(t_mma), "t_issue": round(t_issue),
            "t_mufu": round(t_mufu), "mma_efficiency": round(t_mma / t, 3), "lop3": _lop3_forms(body)}


def _lop3_forms(body) -> dict:
    forms = {}
    for m in filter(None, map(LOP3.search, body)):
        b, c = (m.group(1) if m.group(1).startswith("0x") else "R"), ("RZ" if m.group(2) == "RZ" else "R")
        form = f"{b}|{c}|{m.group(3)}"
        forms[form] = forms.get(form, 0) + 1
    return forms


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
                   mma_types=sorted({m.group(5) or "F16" for m in SASS_MMA.finditer(sass)}))
        res["loop"] = hot_loop(sass, cc, kernel.metadata.num_warps, max(res["registers"], default=0), res["shared"])
    except Exception as exc:  # reported per case by the test
        res["error"] = f"{type(exc).__name__}: {exc}"
    return res


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for res in pool.map(compile_case, cases()):
            print(json.dumps(res), flush=True)
    sys.exit(0)
