// The schedule tracer: the SMoE layer's forward + backward in training (M = 6) per modality mix,
// every work item of its parallel loops timed at one thread (the implementation compiled with
// FLEXMOE_TRACE), and the call's wall time at each thread count, in the same process. Writes
// JSON for scripts/schedule.py, which replays the items on 4 to 128 simulated threads.
//   flexmoe_trace [--tokens T] [--mixes full,skewed,...] [--threads 1,2] [--repeats N] [--out FILE]
#include <omp.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <string>
#include <vector>

#include "bench_layer_setup.hpp"

namespace {

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

std::vector<std::string> split(const std::string &list) {
    std::vector<std::string> out;
    std::stringstream in(list);
    for (std::string item; std::getline(in, item, ',');)
        if (!item.empty()) out.push_back(item);
    return out;
}

const fm_moe_loss_weights kWeights = {0.01f, 0.0f, 0.0f, nullptr};

// One training forward + backward; its wall time in seconds.
double step(fmbench::Layer &l) {
    const double t0 = now();
    if (fm_moe_forward(&l.desc, &l.params, &l.batch, l.y.data(), 0, l.saved, l.workspace, nullptr) != FM_OK ||
        fm_moe_backward(&l.desc, &l.params, &l.batch, l.saved, l.dy.data(), 0, &kWeights, l.dx.data(), 0, &l.grads,
                        l.workspace) != FM_OK) {
        std::fprintf(stderr, "flexmoe_trace: fm_moe_forward/backward failed\n");
        std::exit(1);
    }
    return now() - t0;
}

// The cheapest of `repeats` empty parallel regions on `threads` threads: the fork and the join.
double fork_join(int threads, int repeats) {
    double best = 1e30;
    for (int r = 0; r < repeats; r++) {
        const double t0 = now();
#pragma omp parallel num_threads(threads)
        { benchmark::DoNotOptimize(omp_get_thread_num()); }
        best = std::min(best, now() - t0);
    }
    return best;
}

int usage(const char *why) {
    if (why) std::fprintf(stderr, "flexmoe_trace: %s\n", why);
    std::fprintf(why ? stderr : stdout,
                 "usage: flexmoe_trace [--tokens T] [--mixes a,b,...] [--threads 1,2,...] [--repeats N] [--out FILE]\n"
                 "  Times every work item of the SMoE layer's training forward + backward (M = 6, d = 128,\n"
                 "  h = 256, 16 experts, top-4) at one thread, and the whole call at each thread count\n"
                 "  (fastest of N, the counts interleaved). Defaults: --tokens 16384, every mix\n"
                 "  (full,single,uniform,skewed,realistic), --threads 1,2, --repeats 5, --out trace.json.\n");
    return why ? 2 : 0;
}

}  // namespace

int main(int argc, char **argv) {
    int tokens = 16384, repeats = 5;
    std::vector<std::string> mixes(std::begin(fmbench::kMixes), std::end(fmbench::kMixes));
    std::vector<int> thread_counts = {1, 2};
    std::string out = "trace.json";
    for (int i = 1; i < argc; i++) {
        const std::string arg = argv[i];
        if (arg == "--help" || arg == "-h") return usage(nullptr);
        if (i + 1 >= argc) return usage(("missing a value after " + arg).c_str());
        const std::string value = argv[++i];
        if (arg == "--tokens") tokens = std::atoi(value.c_str());
        else if (arg == "--repeats") repeats = std::atoi(value.c_str());
        else if (arg == "--mixes") mixes = split(value);
        else if (arg == "--out") out = value;
        else if (arg == "--threads") {
            thread_counts.clear();
            for (const std::string &t : split(value)) thread_counts.push_back(std::atoi(t.c_str()));
        } else return usage(("unknown option " + arg).c_str());
    }
    if (tokens < 16 || tokens % 16) return usage("--tokens must be a positive multiple of 16");
    if (repeats < 1) return usage("--repeats must be at least 1");
    for (int t : thread_counts)
        if (t < 1) return usage("--threads takes positive counts");
    for (const std::string &m : mixes)
        if (std::find(std::begin(fmbench::kMixes), std::end(fmbench::kMixes), m) == std::end(fmbench::kMixes))
            return usage(("unknown mix " + m).c_str());
    FILE *f = std::fopen(out.c_str(), "w");
    if (!f) return std::perror(out.c_str()), 1;
    std::fprintf(f, "{\"tokens\": %d, \"modalities\": 6, \"dim\": %d, \"hidden\": %d, \"experts\": %d, \"top_k\": %d,\n",
                 tokens, fmbench::Layer::D, fmbench::Layer::H, fmbench::Layer::E, fmbench::Layer::K);
    std::fprintf(f, " \"isa\": \"%s\", \"fork_join_seconds\": {", fm_isa_name(fm_active_isa()));
    for (size_t i = 0; i < thread_counts.size(); i++)
        std::fprintf(f, "%s\"%d\": %.9f", i ? ", " : "", thread_counts[i], fork_join(thread_counts[i], 2000));
    std::fprintf(f, "},\n \"mixes\": [\n");
    std::vector<fm_trace_event> events(size_t(1) << 20);
    for (size_t m = 0; m < mixes.size(); m++) {
        fmbench::Layer l(mixes[m], 6, tokens);
        l.batch.training = 1;
        std::fprintf(stderr, "flexmoe_trace: %s, %d tokens: timing at", mixes[m].c_str(), tokens);
        std::vector<double> wall(thread_counts.size(), 1e30);
        for (int r = 0; r < repeats + 1; r++) // the first round warms up
            for (size_t i = 0; i < thread_counts.size(); i++) {
                fm_set_threads(thread_counts[i]);
                const double t = step(l);
                if (r > 0) wall[i] = std::min(wall[i], t);
            }
        for (int t : thread_counts) std::fprintf(stderr, " %d", t);
        std::fprintf(stderr, " threads; tracing\n");
        // the items at one thread, `repeats` times: each interval between events (and after the last)
        // is the shortest of the runs', so a run's preemption (this is a shared machine) does not
        // make an item look expensive
        fm_set_threads(1);
        std::vector<fm_trace_event> kept;
        std::vector<std::vector<double>> intervals; // [event (the last: the call's end)][run]
        for (int r = 0; r < repeats; r++) {
            fm_trace_start(events.data(), int(events.size()));
            const double t = step(l);
            const int count = fm_trace_stop();
            if (count > int(events.size())) {
                std::fprintf(stderr, "flexmoe_trace: %d events, more than the %zu kept\n", count, events.size());
                return 1;
            }
            if (r == 0) kept.assign(events.begin(), events.begin() + count), intervals.resize(size_t(count) + 1);
            if (size_t(count) != kept.size()) {
                std::fprintf(stderr, "flexmoe_trace: the runs' work items differ (%d events, then %zu)\n", count,
                             kept.size());
                return 1;
            }
            for (int i = 0; i <= count; i++)
                intervals[size_t(i)].push_back((i < count ? events[size_t(i)].seconds : t) -
                                               (i > 0 ? events[size_t(i) - 1].seconds : 0.0));
        }
        // and at each thread count, the fastest of `repeats` traced runs as it ran: what the items
        // cost when threads share the caches and the memory, against the same statistic at one
        // thread (scripts/schedule.py compares)
        std::vector<std::vector<fm_trace_event>> at(thread_counts.size());
        for (size_t i = 0; i < thread_counts.size(); i++) {
            fm_set_threads(thread_counts[i]);
            double fastest = 1e30;
            for (int r = 0; r < repeats; r++) {
                fm_trace_start(events.data(), int(events.size()));
                const double t = step(l);
                const int count = std::min(fm_trace_stop(), int(events.size()));
                if (t < fastest) fastest = t, at[i].assign(events.begin(), events.begin() + count);
            }
        }
        fm_set_threads(0);
        double traced = 0.0;
        for (size_t i = 0; i < intervals.size(); i++) {
            traced += *std::min_element(intervals[i].begin(), intervals[i].end());
            if (i < kept.size()) kept[i].seconds = traced;
        }
        std::fprintf(f, "  {\"mix\": \"%s\", \"rows\": %d, \"expert_rows\": [", mixes[m].c_str(), l.rows);
        for (int e = 0; e < fmbench::Layer::E; e++) std::fprintf(f, "%s%d", e ? ", " : "", l.expert_rows[e]);
        std::fprintf(f, "],\n   \"wall_seconds\": {");
        for (size_t i = 0; i < thread_counts.size(); i++)
            std::fprintf(f, "%s\"%d\": %.9f", i ? ", " : "", thread_counts[i], wall[i]);
        const auto print_events = [f](const std::vector<fm_trace_event> &list) {
            for (size_t i = 0; i < list.size(); i++)
                std::fprintf(f, "    [\"%s\", %d, %d, %d, %d, %.9f]%s\n", list[i].loop, list[i].line, list[i].item,
                             list[i].expert, list[i].thread, list[i].seconds, i + 1 < list.size() ? "," : "");
        };
        std::fprintf(f, "},\n   \"traced_seconds\": %.9f,\n   \"events\": [\n", traced);
        print_events(kept);
        std::fprintf(f, "   ],\n   \"events_at\": {");
        for (size_t i = 0; i < thread_counts.size(); i++) {
            std::fprintf(f, "%s\"%d\": [\n", i ? ", " : "", thread_counts[i]);
            print_events(at[i]);
            std::fprintf(f, "   ]");
        }
        std::fprintf(f, "}}%s\n", m + 1 < mixes.size() ? "," : "");
    }
    std::fprintf(f, " ]}\n");
    if (std::fclose(f) != 0) return std::perror(out.c_str()), 1;
    std::fprintf(stderr, "flexmoe_trace: wrote %s\n", out.c_str());
    return 0;
}
