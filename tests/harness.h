// Minimal test registry shared by every test binary.
//
//   TEST(name) { CHECK(x == 1); CHECK_CLOSE(got, want, rtol, atol); }
//
// Each test prints exactly one line that tests/run.sh counts:
//   PASS name (0.12s)  |  FAIL name: why  |  SKIP name: why
// A binary exits non-zero when any test failed. `./test_x pattern` runs only
// the tests whose name contains `pattern`; `./test_x -pattern` all but those (see test_selected);
// `./test_x --list [patterns]` prints the names the patterns select, one a line, and runs nothing.
#pragma once
#include <chrono>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

struct TestFailure : std::runtime_error { using std::runtime_error::runtime_error; };
struct TestSkip : std::runtime_error { using std::runtime_error::runtime_error; };

struct TestCase { const char* name; void (*fn)(); };
inline std::vector<TestCase>& test_registry() { static std::vector<TestCase> r; return r; }
struct TestRegistrar { TestRegistrar(const char* n, void (*f)()) { test_registry().push_back({n, f}); } };

#define TEST(name) \
    static void test_##name(); \
    static TestRegistrar test_registrar_##name(#name, test_##name); \
    static void test_##name()

inline std::string test_format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
inline std::string test_format(const char* fmt, ...) {
    char buf[2048];
    va_list ap; va_start(ap, fmt); vsnprintf(buf, sizeof buf, fmt, ap); va_end(ap);
    return buf;
}

#define CHECK(cond) do { if (!(cond)) \
    throw TestFailure(test_format("%s:%d: CHECK(%s) failed", __FILE__, __LINE__, #cond)); } while (0)

#define CHECK_MSG(cond, ...) do { if (!(cond)) \
    throw TestFailure(test_format("%s:%d: ", __FILE__, __LINE__) + test_format(__VA_ARGS__)); } while (0)

// |got - want| <= atol + rtol*|want|, element by element; reports the worst index.
inline void check_close_impl(const char* file, int line, const double* got, const double* want, size_t n,
                             double rtol, double atol) {
    size_t worst = 0; double worst_excess = -1e300;
    for (size_t i = 0; i < n; i++) {
        double err = std::fabs(got[i] - want[i]);
        double excess = err - (atol + rtol * std::fabs(want[i]));
        if (!(excess <= worst_excess) || std::isnan(got[i]) != std::isnan(want[i])) {
            worst_excess = excess;
            worst = i;
        }
        if (std::isnan(got[i]) || std::isnan(want[i])) { worst_excess = 1e300; worst = i; break; }
    }
    if (n > 0 && worst_excess > 0)
        throw TestFailure(test_format("%s:%d: mismatch at [%zu]: got %.9g want %.9g (rtol %g atol %g, n=%zu)",
                                      file, line, worst, got[worst], want[worst], rtol, atol, n));
}
template <class A, class B>
inline void check_close_vec(const char* file, int line, const A* got, const B* want, size_t n, double rtol,
                            double atol) {
    std::vector<double> g(got, got + n), w(want, want + n);
    check_close_impl(file, line, g.data(), w.data(), n, rtol, atol);
}
#define CHECK_CLOSE(got, want, rtol, atol) do { double g_ = (got), w_ = (want); \
    check_close_impl(__FILE__, __LINE__, &g_, &w_, 1, rtol, atol); } while (0)
#define CHECK_ALL_CLOSE(got, want, n, rtol, atol) check_close_vec(__FILE__, __LINE__, got, want, n, rtol, atol)

// Runs `expr`, which must throw; the message must contain `needle`.
#define CHECK_THROWS(expr, needle)                                                                                   \
    do {                                                                                                             \
        bool thrown_ = false;                                                                                        \
        std::string msg_;                                                                                            \
        try {                                                                                                        \
            expr;                                                                                                    \
        } catch (const TestFailure&) {                                                                               \
            throw;                                                                                                   \
        } catch (const std::exception& e_) {                                                                         \
            thrown_ = true;                                                                                          \
            msg_ = e_.what();                                                                                        \
        }                                                                                                            \
        if (!thrown_) throw TestFailure(test_format("%s:%d: expected an error from %s", __FILE__, __LINE__, #expr)); \
        if (msg_.find(needle) == std::string::npos)                                                                  \
            throw TestFailure(test_format("%s:%d: error message \"%s\" lacks \"%s\"", __FILE__, __LINE__,            \
                                          msg_.c_str(), std::string(needle).c_str()));                               \
    } while (0)

#define SKIP(why) throw TestSkip(why)

// Which tests run: `pattern` includes the names containing it, `-pattern` excludes them; the last
// pattern a name matches decides. A name no pattern matches runs when the first pattern excludes.
// PGOLF_TEST_FILTER=text (tests/run.sh PATTERN sets it) narrows the selection to names containing text.
inline bool test_selected(const char* name, int argc, char** argv) {
    const char* only = getenv("PGOLF_TEST_FILTER");
    if (only && *only && !strstr(name, only)) return false;
    bool run = argc < 2 || argv[1][0] == '-';
    for (int i = 1; i < argc; i++) {
        bool exclude = argv[i][0] == '-';
        if (strstr(name, argv[i] + exclude)) run = !exclude;
    }
    return run;
}

inline int test_main(int argc, char** argv) {
    if (argc >= 2 && strcmp(argv[1], "--list") == 0) {  // the names the patterns after --list select
        for (const TestCase& t : test_registry())
            if (test_selected(t.name, argc - 1, argv + 1)) printf("%s\n", t.name);
        return 0;
    }
    int passed = 0, failed = 0, skipped = 0;
    for (const TestCase& t : test_registry()) {
        if (!test_selected(t.name, argc, argv)) continue;
        auto t0 = std::chrono::steady_clock::now();
        try {
            t.fn();
            double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
            printf("PASS %s (%.2fs)\n", t.name, s); passed++;
        } catch (const TestSkip& e) {
            printf("SKIP %s: %s\n", t.name, e.what()); skipped++;
        } catch (const std::exception& e) {
            printf("FAIL %s: %s\n", t.name, e.what()); failed++;
        }
        fflush(stdout);
    }
    printf("%d passed, %d failed, %d skipped\n", passed, failed, skipped);
    return failed ? 1 : 0;
}
