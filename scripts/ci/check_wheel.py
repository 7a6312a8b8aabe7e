"""Check a built xent_ext wheel: exactly the package, its compiled module, license and metadata.

    python scripts/ci/check_wheel.py WHEEL [--torch-version 2.14.1] [--cuda 13.0 | --cpu]

Fails (exit 1, with the reasons) when the wheel holds anything else (sources,
tests, build files), lacks a file the package needs, or its metadata does not
pin the torch minor it was built for (Note [Build identity] in setup.py).
Called by .ci/run and .github/workflows/wheels.yml.
"""

from __future__ import annotations

import argparse
import email.parser
import re
import sys
import zipfile


def check(wheel: str, torch_version: str | None, cuda: str | None, cpu: bool) -> list[str]:
    problems = []
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        dist_info = sorted({n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")})
        if len(dist_info) != 1:
            return [f"expected one .dist-info folder, found {dist_info}"]
        di = dist_info[0]
        metadata = email.parser.Parser().parsestr(zf.read(f"{di}/METADATA").decode())

    allowed = [
        r"xent_ext/[A-Za-z_][A-Za-z0-9_]*\.py",
        r"xent_ext/_C(\.[A-Za-z0-9_-]+)*\.so",
        re.escape(di) + r"/(METADATA|WHEEL|RECORD|top_level\.txt|LICENSE|licenses/LICENSE)",
    ]
    for n in names:
        if n.endswith("/"):
            continue
        if not any(re.fullmatch(p, n) for p in allowed):
            problems.append(f"unexpected file in the wheel: {n}")
    required = ["xent_ext/__init__.py", "xent_ext/_build_config.py", "xent_ext/functional.py", "xent_ext/_ops.py",
                "xent_ext/_compat.py", f"{di}/METADATA"]
    for r in required:
        if r not in names:
            problems.append(f"missing from the wheel: {r}")
    if not any(re.fullmatch(r"xent_ext/_C(\.[A-Za-z0-9_-]+)*\.so", n) for n in names):
        problems.append("missing from the wheel: the compiled module xent_ext/_C*.so")
    if not any(n in (f"{di}/LICENSE", f"{di}/licenses/LICENSE") for n in names):
        problems.append("missing from the wheel: LICENSE")

    version = metadata["Version"]
    m = re.fullmatch(r"\d+\.\d+\.\d+\+pt(\d)(\d+)(cpu|cu\d+)", version)
    if not m:
        problems.append(f"version {version!r} lacks the local tag +pt<major><minor><cpu|cuXYZ>")
    requires = [r.replace(" ", "") for r in metadata.get_all("Requires-Dist") or []]
    torch_reqs = [r for r in requires if re.match(r"torch\b", r) and "extra==" not in r]
    if m:
        major, minor = int(m.group(1)), int(m.group(2))
        pin = {f"torch<{major}.{minor + 1},>={major}.{minor}", f"torch>={major}.{minor},<{major}.{minor + 1}"}
        if not any(r in pin for r in torch_reqs):
            problems.append(f"Requires-Dist does not pin torch {major}.{minor}: {torch_reqs}")
        if torch_version and tuple(int(p) for p in torch_version.split(".")[:2]) != (major, minor):
            problems.append(f"built for torch {major}.{minor} per its version, expected {torch_version}")
        tag = m.group(3)
        if cpu and tag != "cpu":
            problems.append(f"expected a CPU-only build, the version says {tag}")
        if cuda and tag != "cu" + cuda.replace(".", ""):
            problems.append(f"expected a CUDA {cuda} build, the version says {tag}")
    if metadata.get("License") is None and metadata.get("License-Expression") is None:
        problems.append("METADATA has no License")
    print(f"{wheel}: version {version}, requires {torch_reqs}, {len(names)} files")
    return problems


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("wheel")
    p.add_argument("--torch-version", help="the torch the wheel must be built for (major.minor checked)")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--cuda", help="the CUDA version the wheel must be built for, e.g. 13.0")
    kind.add_argument("--cpu", action="store_true", help="the wheel must be a CPU-only build")
    a = p.parse_args()
    problems = check(a.wheel, a.torch_version, a.cuda, a.cpu)
    for pr in problems:
        print("  FAIL:", pr)
    print("wheel check:", "FAILED" if problems else "ok")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
