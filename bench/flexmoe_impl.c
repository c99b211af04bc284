/* The flexmoe implementation for the benchmark, compiled as C without OpenMP (bench/meson.build) so that every
 * kernel runs on one thread, like the single-threaded peers. */
#define FLEXMOE_IMPLEMENTATION
#include "flexmoe.h"
