/* The implementation, compiled once per build and linked into every test program (each would
 * otherwise compile the whole header, every ISA path included, again). */
#define FLEXMOE_IMPLEMENTATION
#include "flexmoe.h"
