// flexmoe_bench: every benchmark single-threaded (the peers included), names
// <kernel>/<impl>/<shape...>, items_per_second in rows (tokens) per second.
#include <benchmark/benchmark.h>
#include <omp.h>

#include <cstdio>

#include "flexmoe.h"

int main(int argc, char **argv) {
    omp_set_num_threads(1);  // oneDNN runs on OpenMP: one thread, like flexmoe here
    benchmark::Initialize(&argc, argv);
    if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
    benchmark::AddCustomContext("flexmoe_best_isa", fm_isa_name(fm_active_isa()));
    benchmark::RunSpecifiedBenchmarks();
    benchmark::Shutdown();
    return 0;
}
