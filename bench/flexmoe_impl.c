/* The flexmoe implementation for the benchmark programs, with OpenMP when the openmp option has it
 * (bench/meson.build); bench_main holds it to one thread but for the scaling study's benchmarks.
 * The schedule tracer compiles it again with FLEXMOE_TRACE. */
#define FLEXMOE_IMPLEMENTATION
#include "flexmoe.h"
