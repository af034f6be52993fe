#include "cvm/test/files.h"

#include <fstream>
#include <sstream>

namespace cvm::test {

std::string read_file(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace cvm::test
