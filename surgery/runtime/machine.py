"""What kind of CPU this is, as far as exactness depends on it.

Compiled inference picks its kernels by CPU: TensorFlow's oneDNN and XLA's
CPU backend choose other code paths (and other rounding) on Intel and AMD,
with or without AVX-512 and AMX. An exactness measured on one kind is a
fact about that kind, so reports and warnings say where they were measured.
"""

from __future__ import annotations

import functools
import platform

_FEATURES = (("amx_tile", "AMX"), ("avx512f", "AVX-512"), ("avx2", "AVX2"))


@functools.lru_cache(maxsize=1)
def cpu_kind() -> str:
    """The CPU's vendor and widest vector extension, e.g. "AMD (AVX-512)".

    Read from `/proc/cpuinfo` on Linux: the vendor (Intel, AMD or the raw
    vendor id) and the widest of AMX, AVX-512 and AVX2 it reports (AMX
    implies AVX-512). Elsewhere, the platform's processor string.
    """
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return platform.processor() or platform.machine() or "unknown CPU"
    fields = {}
    for line in info.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    vendor = {"GenuineIntel": "Intel", "AuthenticAMD": "AMD"}.get(
        fields.get("vendor_id", ""), fields.get("vendor_id") or platform.machine()
    )
    flags = set(fields.get("flags", "").split())
    widest = next((name for flag, name in _FEATURES if flag in flags), None)
    return f"{vendor} ({widest})" if widest else vendor
