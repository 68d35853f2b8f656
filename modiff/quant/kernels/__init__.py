"""Kernels of the quantized layers: MoDiff's per-sample modulation step (`modulate`, registered as a torch op;
`modulate_triton`, its two Triton kernels) and the real W8A8 backend (`real`, two torch ops; `real_triton`, its
three Triton kernels)."""
import hashlib
from pathlib import Path


def source_digest(*modules: str) -> str:
    """A digest of these kernel modules' source files (names of modules in this package), which the torch ops take
    as an argument. torch.compile's caches on disk key a compiled graph on its ops' arguments, not on the Python
    body of an op or the Triton kernels it launches: without it, a warm cache replays the kernels of before an edit
    (benchmarks/README.md, "Fewer passes", sitting 43)."""
    digest = hashlib.sha256()
    for module in modules:
        digest.update((Path(__file__).parent / f"{module}.py").read_bytes())
    return digest.hexdigest()[:16]
