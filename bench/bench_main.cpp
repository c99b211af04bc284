// flexmoe_bench: every benchmark single-threaded (the peers included), names
// <kernel>/<impl>/<shape...>, items_per_second in rows (tokens) per second.
#include <benchmark/benchmark.h>
#include <omp.h>
#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>

#include "flexmoe.h"

extern "C" char *openblas_get_corename(void);

namespace {

// The CPU's "model name" from /proc/cpuinfo, or "unknown" (Google Benchmark's own context gives
// only the core count, the clock and the caches).
std::string cpu_model_name() {
    std::ifstream cpuinfo("/proc/cpuinfo");
    std::string line;
    while (std::getline(cpuinfo, line)) {
        if (line.compare(0, 10, "model name") != 0) continue;
        const size_t colon = line.find(':');
        if (colon == std::string::npos) break;
        const size_t begin = line.find_first_not_of(" \t", colon + 1);
        if (begin == std::string::npos) break;
        return line.substr(begin, line.find_last_not_of(" \t") + 1 - begin);
    }
    return "unknown";
}

// glibc hands freed blocks above its mmap threshold, and the free top of its heap, back to the
// kernel, so a peer that allocates its tensors anew on every call (PyTorch) pays a page fault per
// 4 KiB of them on every call: a quarter of torch's layer time on a VM (the allocator advice of
// PyTorch's CPU performance guides). Keeping freed memory in the heap lets every peer run at its
// best; flexmoe allocates nothing per call. Returns what the context reports.
const char *keep_freed_memory() {
#if defined(__GLIBC__)
    const bool ok = mallopt(M_MMAP_THRESHOLD, 32 << 20) && mallopt(M_TRIM_THRESHOLD, 1 << 30) &&
                    mallopt(M_TOP_PAD, 64 << 20);
    return ok ? "glibc: freed memory kept (mmap threshold 32 MiB, no trim)" : "glibc defaults (mallopt failed)";
#else
    return "the C library's defaults";
#endif
}

}  // namespace

int main(int argc, char **argv) {
    const char *malloc_setting = keep_freed_memory();
    omp_set_num_threads(1);  // oneDNN runs on OpenMP: one thread, like flexmoe here
    benchmark::Initialize(&argc, argv);
    if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
    benchmark::AddCustomContext("flexmoe_best_isa", fm_isa_name(fm_active_isa()));
    benchmark::AddCustomContext("cpu_model", cpu_model_name());
    benchmark::AddCustomContext("malloc", malloc_setting);
    // OpenBLAS picks its kernels by CPU model when loaded; on a CPU newer than it knows it falls
    // back to generic ones (Prescott) unless OPENBLAS_CORETYPE names a family
    // (scripts/openblas_coretype.sh): the openblas rows mean little without these two.
    const char *corename = openblas_get_corename();
    benchmark::AddCustomContext("openblas_corename", corename ? corename : "unknown");
    const char *coretype = std::getenv("OPENBLAS_CORETYPE");
    // (set but empty is not unset: OpenBLAS then skips its model detection and picks by features)
    benchmark::AddCustomContext("openblas_coretype_env", !coretype ? "unset" : *coretype ? coretype : "(empty)");
    benchmark::RunSpecifiedBenchmarks();
    benchmark::Shutdown();
    return 0;
}
