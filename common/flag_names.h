// Lets command lines spell flags with dashes (--metrics-listen) as well as the underscores that
// absl flags define (--metrics_listen). Used by the mains only. Thread-compatible.
#ifndef KVPOOL_COMMON_FLAG_NAMES_H_
#define KVPOOL_COMMON_FLAG_NAMES_H_

#include <string>
#include <vector>

namespace kvpool {

// Rewrites "--foo-bar[=v]" to "--foo_bar[=v]" (the name part only) in every argument before a
// bare "--". The returned strings own the text; pass ArgvPointers(result) to absl.
std::vector<std::string> NormalizeFlagNames(int argc, char** argv);
std::vector<char*> ArgvPointers(std::vector<std::string>& args);

}  // namespace kvpool

#endif  // KVPOOL_COMMON_FLAG_NAMES_H_
