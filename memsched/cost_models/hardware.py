"""Hardware profiles: memory tiers, compute peaks and link bandwidths.

The scheduler only needs a handful of numbers per machine: how much memory
each tier holds, how fast the device computes and streams memory, and how fast
bytes move between tiers.  Presets come from vendor datasheets (compute, HBM)
and typical measured values (PCIe, NVMe); ``local_hardware`` measures the
machine it runs on with a few quick micro-benchmarks and caches the result.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash

# One transfer resource per link direction: each can run concurrently with
# compute and with the other directions (full-duplex PCIe, separate disk queues).
from ..ir.kinds import LINKS
from .measures import measured_rate

GB = 1e9  # bandwidths and FLOP/s are decimal, as vendors quote them
GiB = 1 << 30  # GPU "GB" capacities are binary in practice (nvidia-smi MiB)


# CUDA's caching allocator rounds every allocation up to whole 512-byte blocks
# (c10/cuda/CUDACachingAllocator.cpp, kMinBlockSize), and its statistics count the blocks
CUDA_BLOCK_BYTES = 512
_WORKSPACE_SPEC = re.compile(r":([0-9]+):([0-9]+)")


def cublas_workspace_bytes(sm_major: int | None = None) -> int:
    """The bytes of the workspace PyTorch gives cuBLAS (and cuBLASLt, which shares it) per
    handle and stream, made by the caching allocator at the first matmul on a stream and kept:
    ``CUBLAS_WORKSPACE_CONFIG`` (":SIZE_KiB:COUNT" terms, summed) when set, else 4096 KiB x 8 on
    sm90 and later (Hopper) and 4096 KiB x 2 + 16 KiB x 8 before it (ATen's
    CublasHandlePool.cpp). Unknown architecture (``sm_major=None``): the larger, Hopper's."""
    terms = _WORKSPACE_SPEC.findall(os.environ.get("CUBLAS_WORKSPACE_CONFIG", ""))
    if terms:
        return sum(int(size) * 1024 * int(count) for size, count in terms)
    if sm_major is None or sm_major >= 9:
        return 4096 * 1024 * 8
    return 4096 * 1024 * 2 + 16 * 1024 * 8


LOCAL_CPU = "local:cpu"   # the profile of this machine's CPU: measured prices apply to it


@dataclass(frozen=True)
class Hardware:
    """A device tier (GPU or CPU) plus optional host-RAM and disk tiers.

    ``host_bytes == 0`` means there is no separate host tier: on a CPU device
    host RAM *is* device memory, so offloads go straight to disk.
    """

    name: str
    device_type: str  # "cuda" or "cpu"
    device_bytes: int
    host_bytes: int
    peak_flops: float  # dense fp16/bf16 (tensor cores on GPUs), no sparsity
    peak_flops_fp32: float
    mem_bw: float  # device memory bandwidth, B/s
    h2d_bw: float
    d2h_bw: float
    disk_read_bw: float
    disk_write_bw: float
    op_overhead_s: float  # fixed dispatch/launch cost per kernel
    source: str = ""
    # the page-cache path of memsched's offload file: written without fsync, read back while its
    # pages are still cached and checksum-verified (0: not measured; presets leave them out)
    disk_cached_read_bw: float = 0.0
    disk_cached_write_bw: float = 0.0
    # FLOP/s of an fp32 matmul whose output has 32 rows (a decode step's or a micro-batch's
    # linear): libraries reach a fraction of their peak there (0: not measured, the peak applies)
    skinny_flops_fp32: float = 0.0
    # FLOP/s of fp32 matrix products with one output row, a batch of them (a decode step's
    # attention scores per head, a batch-1 linear): slower still (0: not measured)
    gemv_flops_fp32: float = 0.0
    # fp32 elements/s of the ops that take a transcendental or a row reduction per element (GELU,
    # softmax, LayerNorm and their backwards; op_cost._SPECIAL_OPS): far below the memory
    # bandwidth on CPUs (0: not measured, the roofline applies)
    special_elems_per_s: float = 0.0
    # memsched's runtime's own cost on the calling thread: per line of a scheduled program (an
    # op's output tracked, a value freed; views cost this too) and per transfer issued or waited
    # (0: not measured; presets leave them out)
    runtime_op_s: float = 0.0
    runtime_move_s: float = 0.0
    # a CPU device's cores and the threads torch computes on: its transfers are copies made by
    # worker threads, which take cores from compute once torch's threads leave none spare
    # (0: not measured; presets leave them out)
    cpu_cores: int = 0
    compute_threads: int = 0
    # What the device's allocator counts beside the program's tensors, so that a plan bounds the
    # allocator's own peak (torch.cuda.max_memory_allocated), not only memsched's sum of tensors.
    # None: the device type's rule (``__post_init__``). Every allocation takes whole blocks of
    # ``alloc_block_bytes`` (CUDA's caching allocator: 512; elsewhere 1, exact bytes), and
    # ``workspace_bytes`` are held from a program's first op to its end: cuBLAS's workspace on
    # the stream that computes (``cublas_workspace_bytes``; 0 off CUDA).
    alloc_block_bytes: int | None = None
    workspace_bytes: int | None = None

    def __post_init__(self):
        cuda = self.device_type == "cuda"
        if self.alloc_block_bytes is None:
            object.__setattr__(self, "alloc_block_bytes", CUDA_BLOCK_BYTES if cuda else 1)
        if self.workspace_bytes is None:
            object.__setattr__(self, "workspace_bytes", cublas_workspace_bytes() if cuda else 0)
        if self.alloc_block_bytes < 1 or self.workspace_bytes < 0:
            raise ValueError(f"hardware {self.name!r}: alloc_block_bytes must be >= 1 and workspace_bytes >= 0, "
                             f"got {self.alloc_block_bytes} and {self.workspace_bytes}")

    def bandwidth(self, link: str) -> float:
        """Bytes/s of one transfer link (one of ``LINKS``)."""
        if link not in LINKS:
            raise ValueError(f"unknown link {link!r}; expected one of {LINKS}")
        return getattr(self, f"{link}_bw")

    def flops_for(self, dtype: torch.dtype) -> float:
        """Peak FLOP/s for math in ``dtype``.

        Half types (fp16/bf16/fp8) use the tensor-core peak; everything else
        (fp32, ints, bools) the fp32 peak.  fp64 is taken as half the fp32
        rate: right for CPUs and A100/H100, optimistic for consumer GPUs
        (1/64 rate), which rarely matters because models don't run in fp64.
        """
        if dtype in (torch.float16, torch.bfloat16) or "float8" in str(dtype):
            return self.peak_flops
        if dtype == torch.float64:
            return self.peak_flops_fp32 / 2
        return self.peak_flops_fp32

    def matmul_flops(self, rows: int, dtype: torch.dtype) -> float:
        """FLOP/s of a matmul whose output's smaller side is ``rows``: the fp32 rates measured at
        1 row (``gemv_flops_fp32``), 32 rows (``skinny_flops_fp32``) and the peak from 512,
        log-linear between (the peak wherever nothing was measured: presets, half types; the
        32-row rate below 32 where 1 row was not measured)."""
        peak = self.flops_for(dtype)
        if not self.skinny_flops_fp32 or dtype != torch.float32 or rows >= 512:
            return peak
        skinny = min(self.skinny_flops_fp32, peak)
        if rows >= 32:
            return _log_between(rows, 32, skinny, 512, peak) if rows > 32 else skinny
        if not self.gemv_flops_fp32:
            return skinny
        return _log_between(max(rows, 1), 1, min(self.gemv_flops_fp32, skinny), 32, skinny)

    def page_cached(self, nbytes: int, available: int | None = None) -> Hardware:
        """This profile with disk reads and writes priced on the page-cache path when ``nbytes``
        (all a program could put on disk) fit in half the RAM the OS has available: the offload
        file's pages then stay cached between a write and the read back, as Linux keeps them.
        Unchanged where the cached rates were not measured or the bytes do not fit."""
        read, write = max(self.disk_cached_read_bw, self.disk_read_bw), max(self.disk_cached_write_bw, self.disk_write_bw)
        if not (self.disk_cached_read_bw and self.disk_cached_write_bw) or (read, write) == (self.disk_read_bw,
                                                                                           self.disk_write_bw):
            return self
        available = available_ram_bytes() if available is None else available
        if not available or nbytes > available // 2:
            return self
        how = "probed"
        if self.name.startswith("local:"):   # this machine: the rates its steps ran at, where recorded
            seen_r, seen_w = measured_rate(self.device_type, "disk_read"), measured_rate(self.device_type, "disk_write")
            read, write = seen_r or read, seen_w or write
            how = "as steps ran" if seen_r or seen_w else how
        return self.replace(disk_read_bw=read, disk_write_bw=write,
                            source=f"{self.source}; disk priced on the page cache, {how} ({nbytes / GiB:.2f} GiB "
                                   f"fit in half the {available / GiB:.1f} GiB of RAM available)")

    def replace(self, **kw) -> Hardware:
        """A copy with some fields changed, e.g. ``hw.replace(host_bytes=...)``."""
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Hardware:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# --------------------------------------------------------------------------
# Presets.  Assumptions shared by all of them (override with hw.replace):
#  * PCIe: measured pinned-copy rates, not the link's theoretical peak
#    (Gen3 x16 ~12 GB/s, Gen4 x16 ~25 GB/s per direction).
#  * One NVMe SSD per machine: Gen3 -> Samsung 970 EVO Plus datasheet
#    (3.5 GB/s read, 3.3 GB/s write); Gen4 desktop -> Samsung 980 PRO
#    (7.0 / 5.0 GB/s); Gen4/Gen5 servers -> Samsung PM9A3 U.2 3.84 TB
#    (6.9 / 4.1 GB/s).  Sequential rates; real offload traffic is large
#    sequential blocks, so this is the right regime.
#  * host_bytes: 64 GiB for desktop/cloud-VM cards, 256 GiB for datacenter
#    servers (a per-GPU share of a typical node).
#  * op_overhead_s: ~5 us kernel launch + PyTorch dispatch on GPUs.
# --------------------------------------------------------------------------

_NVME_GEN3 = dict(disk_read_bw=3.5 * GB, disk_write_bw=3.3 * GB)  # 970 EVO Plus
_NVME_DESKTOP = dict(disk_read_bw=7.0 * GB, disk_write_bw=5.0 * GB)  # 980 PRO
_NVME_SERVER = dict(disk_read_bw=6.9 * GB, disk_write_bw=4.1 * GB)  # PM9A3
_PCIE3 = dict(h2d_bw=12 * GB, d2h_bw=12 * GB)  # measured Gen3 x16 pinned copies
_PCIE4 = dict(h2d_bw=25 * GB, d2h_bw=25 * GB)  # measured Gen4 x16 pinned copies
_PCIE5 = dict(h2d_bw=35 * GB, d2h_bw=53 * GB)  # measured on H100 SXM (Gen5 x16)

PRESETS: dict[str, Hardware] = {
    hw.name: hw
    for hw in [
        Hardware(
            name="t4", device_type="cuda", workspace_bytes=cublas_workspace_bytes(7),  # sm7x
            device_bytes=16 * GiB,  # T4 datasheet: 16 GB GDDR6
            host_bytes=64 * GiB,  # assumption: cloud VM (e.g. g4dn.4xlarge)
            peak_flops=65e12,  # T4 datasheet: 65 TFLOPS mixed-precision FP16
            peak_flops_fp32=8.1e12,  # T4 datasheet: 8.1 TFLOPS FP32
            mem_bw=320 * GB,  # T4 datasheet: 320 GB/s
            **_PCIE3, **_NVME_GEN3, op_overhead_s=5e-6,
            source="NVIDIA T4 datasheet; PCIe Gen3 measured-typical; 970 EVO Plus",
        ),
        Hardware(
            name="rtx3090", device_type="cuda", workspace_bytes=cublas_workspace_bytes(8),  # sm8x
            device_bytes=24 * GiB,  # GeForce RTX 3090 spec: 24 GB GDDR6X
            host_bytes=64 * GiB,  # assumption: desktop
            peak_flops=71e12,  # GA102 whitepaper: FP16/BF16 tensor, FP32 acc, dense
            peak_flops_fp32=35.6e12,  # GA102 whitepaper: 35.6 TFLOPS FP32
            mem_bw=936 * GB,  # GA102 whitepaper: 936 GB/s
            **_PCIE4, **_NVME_DESKTOP, op_overhead_s=5e-6,
            source="NVIDIA Ampere GA102 whitepaper; PCIe Gen4 measured-typical; 980 PRO",
        ),
        Hardware(
            name="rtx4090", device_type="cuda", workspace_bytes=cublas_workspace_bytes(8),  # sm8x
            device_bytes=24 * GiB,  # GeForce RTX 4090 spec: 24 GB GDDR6X
            host_bytes=64 * GiB,  # assumption: desktop
            peak_flops=165.2e12,  # Ada whitepaper: FP16/BF16 tensor, FP32 acc, dense
            peak_flops_fp32=82.6e12,  # Ada whitepaper: 82.6 TFLOPS FP32
            mem_bw=1008 * GB,  # Ada whitepaper: 1008 GB/s
            **_PCIE4, **_NVME_DESKTOP, op_overhead_s=5e-6,
            source="NVIDIA Ada Lovelace whitepaper; PCIe Gen4 measured-typical; 980 PRO",
        ),
        Hardware(
            name="a100-40gb", device_type="cuda", workspace_bytes=cublas_workspace_bytes(8),  # sm8x
            device_bytes=40 * GiB,  # A100 datasheet: 40 GB HBM2
            host_bytes=256 * GiB,  # assumption: datacenter server
            peak_flops=312e12,  # A100 datasheet: BF16/FP16 tensor 312 TFLOPS dense
            peak_flops_fp32=19.5e12,  # A100 datasheet: FP32 19.5 TFLOPS (no TF32)
            mem_bw=1555 * GB,  # A100 40GB PCIe datasheet: 1,555 GB/s
            **_PCIE4, **_NVME_SERVER, op_overhead_s=5e-6,
            source="NVIDIA A100 datasheet (40GB PCIe); PCIe Gen4 measured-typical; PM9A3",
        ),
        Hardware(
            name="a100-80gb", device_type="cuda", workspace_bytes=cublas_workspace_bytes(8),  # sm8x
            device_bytes=80 * GiB,  # A100 datasheet: 80 GB HBM2e
            host_bytes=256 * GiB,  # assumption: datacenter server
            peak_flops=312e12,  # A100 datasheet: BF16/FP16 tensor 312 TFLOPS dense
            peak_flops_fp32=19.5e12,  # A100 datasheet: FP32 19.5 TFLOPS (no TF32)
            mem_bw=2039 * GB,  # A100 80GB SXM datasheet: 2,039 GB/s
            **_PCIE4, **_NVME_SERVER, op_overhead_s=5e-6,
            source="NVIDIA A100 datasheet (80GB SXM); PCIe Gen4 measured-typical; PM9A3",
        ),
        Hardware(
            name="h100", device_type="cuda", workspace_bytes=cublas_workspace_bytes(9),  # sm9x
            device_bytes=80 * GiB,  # H100 SXM datasheet: 80 GB HBM3
            host_bytes=256 * GiB,  # assumption: datacenter server
            peak_flops=989.5e12,  # H100 SXM datasheet: BF16 1,979 TFLOPS sparse -> /2
            peak_flops_fp32=67e12,  # H100 SXM datasheet: FP32 67 TFLOPS
            mem_bw=3350 * GB,  # H100 SXM datasheet: 3.35 TB/s
            **_PCIE5, **_NVME_SERVER, op_overhead_s=5e-6,
            source="NVIDIA H100 SXM datasheet; PCIe Gen5 measured (35 H2D / 53 D2H GB/s); PM9A3",
        ),
        Hardware(
            name="h200", device_type="cuda", workspace_bytes=cublas_workspace_bytes(9),  # sm9x
            device_bytes=141 * GiB,  # H200 SXM datasheet: 141 GB HBM3e
            host_bytes=256 * GiB,  # assumption: datacenter server
            peak_flops=989.5e12,  # H200 SXM datasheet: BF16 1,979 TFLOPS sparse -> /2
            peak_flops_fp32=67e12,  # H200 SXM datasheet: FP32 67 TFLOPS
            mem_bw=4800 * GB,  # H200 SXM datasheet: 4.8 TB/s
            **_PCIE5, **_NVME_SERVER, op_overhead_s=5e-6,
            source="NVIDIA H200 datasheet (SXM); PCIe Gen5 as H100; PM9A3",
        ),
    ]
}


def list_hardware() -> list[Hardware]:
    """All presets (no calibration)."""
    return list(PRESETS.values())


def get_hardware(spec: str | Hardware | None = None, device: str | torch.device = "cpu") -> Hardware:
    """Resolve a hardware spec: None/"local" -> this machine, a name -> preset."""
    if spec is None:
        return local_hardware(device)
    if isinstance(spec, Hardware):
        return spec
    key = str(spec).strip().lower().replace("_", "-")
    if key == "local":
        return local_hardware(device)
    if key in PRESETS:
        return PRESETS[key]
    raise ValueError(f"unknown hardware {spec!r}; known: {', '.join(['local', *PRESETS])}")


def _log_between(x: float, x0: float, y0: float, x1: float, y1: float) -> float:
    """y0 at x0, y1 at x1, log-linear in both between."""
    w = math.log(x / x0) / math.log(x1 / x0)
    return math.exp((1 - w) * math.log(y0) + w * math.log(y1))


# --------------------------------------------------------------------------
# Local calibration
# --------------------------------------------------------------------------


# bumped when a probe changes what it measures, so profiles cached by an older memsched are
# measured again (2: disk reads into a tensor's buffer, as the runtime reads; 3: one-row matmuls;
# 4: transcendental and normalising ops)
_PROFILE_VERSION = 4


def _cache_path(device_type: str) -> Path:
    root = os.environ.get("MEMSCHED_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "memsched")
    # a CPU computes at the rate of the threads torch runs ops on: a profile per thread count
    threads = f"-{torch.get_num_threads()}t" if device_type == "cpu" else ""
    return Path(root) / f"hardware-{device_type}{threads}.v{_PROFILE_VERSION}.json"


def cpu_cores() -> int:
    """The cores this process may run on (its affinity, which a container's CPU set limits)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _host_ram_bytes() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * GiB  # unknown platform: a conservative guess


def available_ram_bytes() -> int:
    """MemAvailable from /proc/meminfo (0 where unknown: nothing is assumed cached)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _best_time(fn, reps: int, sync=lambda: None) -> float:
    """Minimum wall time of ``fn`` over ``reps`` runs after one warm-up.

    The minimum, not the mean: we want the machine's capability, not noise
    from whatever else is running.
    """
    fn()
    sync()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return max(best, 1e-9)


def _matmul_flops(n: int, dtype: torch.dtype, device: torch.device, reps: int, sync, inner: int = 1) -> float:
    """FLOP/s of n x n matmuls; ``inner`` back-to-back launches per sample
    amortize the sync, which matters for fast GPUs."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)

    def run():
        for _ in range(inner):
            torch.mm(a, b)

    return inner * 2 * n**3 / _best_time(run, reps, sync)


def _copy_bw(src: torch.Tensor, dst: torch.Tensor, reps: int, sync) -> float:
    """Bytes/s of ``dst.copy_(src)``: counts bytes moved once (read or write)."""
    return src.numel() * src.element_size() / _best_time(lambda: dst.copy_(src, non_blocking=True), reps, sync)


def _skinny_matmul_flops(dtype: torch.dtype, device: torch.device, reps: int, sync) -> float:
    """FLOP/s of a (32 x 1024) @ (1024 x 2048) matmul: 32 rows, as a decode step's linears."""
    a = torch.randn(32, 1024, device=device).to(dtype)
    b = torch.randn(1024, 2048, device=device).to(dtype)
    return 2 * 32 * 1024 * 2048 / _best_time(lambda: torch.mm(a, b), reps, sync)


def _gemv_flops(dtype: torch.dtype, device: torch.device, reps: int, sync) -> float:
    """FLOP/s of 256 one-row products (1 x 64) @ (64 x 160): a decode step's attention scores,
    one per batch row and head."""
    a = torch.randn(256, 1, 64, device=device).to(dtype)
    b = torch.randn(256, 64, 160, device=device).to(dtype)
    return 2 * 256 * 64 * 160 / _best_time(lambda: torch.bmm(a, b), reps, sync)


def _special_elems(device: torch.device, reps: int, sync) -> float:
    """fp32 elements/s of GELU, softmax and LayerNorm over rows of 1024 (the median of the three),
    on 4 Mi elements: the rate op_cost prices transcendental and normalising ops at."""
    x = torch.randn(4096, 1024, device=device)
    fns = (lambda: torch.nn.functional.gelu(x), lambda: torch.softmax(x, -1),
           lambda: torch.nn.functional.layer_norm(x, (1024,)))
    rates = sorted(x.numel() / _best_time(fn, reps, sync) for fn in fns)
    return rates[1]


# memsched's runtime registers the probe of its own per-line and per-transfer costs
# (runtime/calibration.py): it sits above this layer, which measures them through it
_runtime_probe = None


def set_runtime_probe(probe) -> None:
    """``probe(device) -> (runtime_op_s, runtime_move_s)``, called when a local profile is measured."""
    global _runtime_probe
    _runtime_probe = probe


def _runtime_costs(device: torch.device) -> dict:
    if _runtime_probe is None:
        return {}
    op_s, move_s = _runtime_probe(device)
    return {"runtime_op_s": op_s, "runtime_move_s": move_s}


def _op_overhead(device: torch.device, sync) -> float:
    """Median time of a tiny op: pure dispatch/launch cost."""
    x = torch.ones(8, device=device)
    for _ in range(20):
        torch.add(x, 1)
    sync()
    times = []
    for _ in range(200):
        t0 = time.perf_counter()
        torch.add(x, 1)
        times.append(time.perf_counter() - t0)
    sync()
    return statistics.median(times)


def _workspace_bytes(device: torch.device, sm_major: int) -> int:
    """cuBLAS's workspace as the caching allocator counts it: what a first matmul on a new
    stream leaves allocated besides its output. ATen's rule for this architecture where nothing
    stays (its workspace caching off, or the allocator replaced)."""
    stream, x = torch.cuda.Stream(device), torch.ones(8, 8, device=device)
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    with torch.cuda.stream(stream):
        y = x @ x
    torch.cuda.synchronize(device)
    grown = torch.cuda.memory_allocated(device) - before - CUDA_BLOCK_BYTES   # y: one block
    del y
    return grown if grown > 0 else cublas_workspace_bytes(sm_major)


def _disk_bw(nbytes: int = 32 << 20) -> tuple[float, float, str, float, float]:
    """Sequential write (+fsync) and read bandwidth of a temp file, then the page-cache path
    memsched's offload file takes (``_cached_bw``).

    After writing we ask the kernel to drop the file's pages
    (POSIX_FADV_DONTNEED) so the read hits the device; where that is
    unavailable the read may be served from the page cache, and the returned
    note says so.
    """
    buf = os.urandom(1 << 20) * (nbytes >> 20)
    with tempfile.TemporaryDirectory(prefix="memsched-cal-") as d:
        path = os.path.join(d, "probe.bin")
        t0 = time.perf_counter()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, buf)
            os.fsync(fd)
        finally:
            os.close(fd)
        write_bw = nbytes / max(time.perf_counter() - t0, 1e-9)

        fd = os.open(path, os.O_RDONLY)
        try:
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                note = "disk read after fadvise(DONTNEED); may still be partly page-cached"
            except (AttributeError, OSError):
                note = "disk read likely served from page cache (overestimate)"
            t0 = time.perf_counter()
            while os.read(fd, 8 << 20):
                pass
            read_bw = nbytes / max(time.perf_counter() - t0, 1e-9)
        finally:
            os.close(fd)
        cached_write, cached_read = _cached_bw(path, buf)
    return write_bw, read_bw, note, cached_read, cached_write


def _cached_bw(path: str, buf: bytes) -> tuple[float, float]:
    """(write, read) bytes/s of ``buf`` rewritten without fsync, then read back at once into a
    reused buffer and checksummed as the runtime verifies every read (xxh3): best of three. The
    buffer is a tensor's, as the runtime's are: a bytearray reads at well under half the speed
    here (1.5 against 3.7 GB/s for 32 MiB on a 2-core VM), which priced every disk read too high."""
    out = memoryview(torch.empty(len(buf), dtype=torch.uint8).numpy())
    fd = os.open(path, os.O_RDWR)
    try:
        writes, reads = [], []
        for _ in range(3):
            t0 = time.perf_counter()
            done = 0
            while done < len(buf):
                done += os.pwrite(fd, buf[done:], done)
            writes.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            os.preadv(fd, [out], 0)
            xxhash.xxh3_64_intdigest(out)
            reads.append(time.perf_counter() - t0)
    finally:
        os.close(fd)
    return len(buf) / max(min(writes), 1e-9), len(buf) / max(min(reads), 1e-9)


def _calibrate(device: torch.device) -> Hardware:
    """Measure this machine (well under a second on a small CPU box)."""
    host_ram = _host_ram_bytes()
    disk_w, disk_r, disk_note, cached_r, cached_w = _disk_bw()

    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        device = torch.device("cuda", idx)
        sync = lambda: torch.cuda.synchronize(device)  # noqa: E731
        props = torch.cuda.get_device_properties(device)
        _, total = torch.cuda.mem_get_info(device)
        n = 64 << 20  # 64 MiB copies
        src_h = torch.empty(n, dtype=torch.uint8, pin_memory=True)
        dst_h = torch.empty(n, dtype=torch.uint8, pin_memory=True)
        dev_a = torch.empty(n, dtype=torch.uint8, device=device)
        dev_b = torch.empty(n, dtype=torch.uint8, device=device)
        return Hardware(
            name=f"local:{props.name}",
            device_type="cuda",
            device_bytes=int(total),  # total, not free: free memory is transient and this is cached
            host_bytes=host_ram // 2,  # leave half of RAM to the OS / dataloaders
            peak_flops=_matmul_flops(4096, torch.float16, device, 3, sync, inner=10),
            peak_flops_fp32=_matmul_flops(2048, torch.float32, device, 3, sync, inner=10),
            skinny_flops_fp32=_skinny_matmul_flops(torch.float32, device, 10, sync),
            gemv_flops_fp32=_gemv_flops(torch.float32, device, 10, sync),
            special_elems_per_s=_special_elems(device, 10, sync),
            # a device-to-device copy reads and writes every byte
            mem_bw=2 * _copy_bw(dev_a, dev_b, 10, sync),
            h2d_bw=_copy_bw(src_h, dev_a, 10, sync),
            d2h_bw=_copy_bw(dev_a, dst_h, 10, sync),
            disk_read_bw=disk_r,
            disk_write_bw=disk_w,
            disk_cached_read_bw=cached_r,
            disk_cached_write_bw=cached_w,
            op_overhead_s=_op_overhead(device, sync),
            workspace_bytes=_workspace_bytes(device, props.major),
            **_runtime_costs(device),
            source=f"measured by memsched.local_hardware ({props.name}; pinned copies; {disk_note})",
        )

    cpu = torch.device("cpu")
    no_sync = lambda: None  # noqa: E731
    a = torch.empty(64 << 20, dtype=torch.uint8)
    b = torch.empty_like(a)
    a.fill_(1)
    b.fill_(0)  # touch pages so we time copying, not page faults
    memcpy = _copy_bw(a, b, 3, no_sync)
    fp32 = _matmul_flops(512, torch.float32, cpu, 5, no_sync)
    # bf16 on CPU is fast only with AMX/AVX512-BF16; measure instead of assuming.
    half = _matmul_flops(256, torch.bfloat16, cpu, 3, no_sync)
    return Hardware(
        name=LOCAL_CPU,
        device_type="cpu",
        device_bytes=host_ram,
        host_bytes=0,  # host RAM *is* the device tier; offload goes to disk
        peak_flops=half,
        peak_flops_fp32=fp32,
        skinny_flops_fp32=_skinny_matmul_flops(torch.float32, cpu, 5, no_sync),
        gemv_flops_fp32=_gemv_flops(torch.float32, cpu, 5, no_sync),
        special_elems_per_s=_special_elems(cpu, 3, no_sync),
        mem_bw=2 * memcpy,  # memcpy reads and writes every byte
        h2d_bw=memcpy,  # a "host->device" copy on a CPU device is a memcpy
        d2h_bw=memcpy,
        disk_read_bw=disk_r,
        disk_write_bw=disk_w,
        disk_cached_read_bw=cached_r,
        disk_cached_write_bw=cached_w,
        op_overhead_s=_op_overhead(cpu, no_sync),
        cpu_cores=cpu_cores(),
        compute_threads=torch.get_num_threads(),
        **_runtime_costs(cpu),
        source=f"measured by memsched.local_hardware (cpu, {os.cpu_count()} cores; {disk_note})",
    )


def local_hardware(device: str | torch.device = "cpu", *, recalibrate: bool = False) -> Hardware:
    """A calibrated profile of this machine, measured once and cached as JSON.

    The cache lives in ``$MEMSCHED_CACHE_DIR`` (default ``~/.cache/memsched``);
    if it cannot be read or written we simply measure again next time.
    """
    device = torch.device(device)
    path = _cache_path(device.type)
    if not recalibrate:
        try:
            d = json.loads(path.read_text())
            if {f.name for f in dataclasses.fields(Hardware)} - set(d):
                raise ValueError("measured by an older memsched: a field is missing")
            hw = Hardware.from_dict(d)
            if hw.device_type == device.type and (
                device.type != "cuda" or hw.name == f"local:{torch.cuda.get_device_name(device)}"
            ):
                return hw
        except (OSError, ValueError, TypeError, RecursionError):
            pass  # missing, corrupt or stale cache: re-measure
    hw = _calibrate(device)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(hw.to_dict(), indent=2))
        os.replace(tmp, path)  # atomic: concurrent processes never see half a file
    except OSError:
        pass
    return hw
