#pragma once
// The OCI runtime CLI behind a small interface. RuncRuntime drives `runc` (sysbox-runc takes the
// same commands, so it is the same class with another binary). Errors carry the tool's own message
// in a kTool cvm::Error; a container the runtime does not know is kNotFound.

#include <chrono>
#include <string>
#include <vector>

#include "cvm/base/result.h"

namespace cvm::agent {

enum class ContainerStatus { kCreating, kCreated, kRunning, kPaused, kStopped, kUnknown };

[[nodiscard]] ContainerStatus parse_container_status(std::string_view text);
[[nodiscard]] std::string_view to_string(ContainerStatus status);

struct ContainerState {
  std::string id;
  ContainerStatus status = ContainerStatus::kUnknown;
  int pid = 0;  // the container's init on the host; 0 when stopped
  std::string bundle;
};

class OciRuntime {
 public:
  virtual ~OciRuntime() = default;

  // Sets the container up without starting its process. The container's stdout/stderr are appended
  // to `log_file` (empty: <bundle>/container.log); stdin is /dev/null.
  virtual Status create(const std::string& id, const std::string& bundle,
                        const std::string& log_file) = 0;
  virtual Status start(const std::string& id) = 0;
  // create + start in one (`runc run --detach`); a container that fails to start is deleted.
  virtual Status run_detached(const std::string& id, const std::string& bundle,
                              const std::string& log_file) = 0;
  // run_detached, returning the host pid of the container's init. The default asks `state`; runc
  // writes it to a --pid-file instead (one runtime process fewer on the launch path).
  virtual Result<int> run_detached_pid(const std::string& id, const std::string& bundle,
                                       const std::string& log_file);
  // Whether the runtime may know a container `id` (false only when that is certain): a launch
  // skips the forced delete of an earlier life when there is none.
  virtual bool maybe_exists(const std::string& /*id*/) { return true; }
  virtual Result<ContainerState> state(const std::string& id) = 0;
  virtual Status kill(const std::string& id, int signal) = 0;
  // `force` also kills a running container first.
  virtual Status remove(const std::string& id, bool force) = 0;
  virtual Result<std::vector<ContainerState>> list() = 0;
};

struct RuncOptions {
  std::string binary = "runc";
  // runc's state directory (--root). Empty: runc's default (/run/runc). Tests use a private one so
  // they never see or touch the host's containers.
  std::string root;
  std::chrono::milliseconds timeout{30000};
};

class RuncRuntime final : public OciRuntime {
 public:
  explicit RuncRuntime(RuncOptions options) : options_(std::move(options)) {}

  Status create(const std::string& id, const std::string& bundle,
                const std::string& log_file) override;
  Status start(const std::string& id) override;
  Status run_detached(const std::string& id, const std::string& bundle,
                      const std::string& log_file) override;
  Result<int> run_detached_pid(const std::string& id, const std::string& bundle,
                               const std::string& log_file) override;
  bool maybe_exists(const std::string& id) override;
  Result<ContainerState> state(const std::string& id) override;
  Status kill(const std::string& id, int signal) override;
  Status remove(const std::string& id, bool force) override;
  Result<std::vector<ContainerState>> list() override;

 private:
  [[nodiscard]] std::vector<std::string> command(std::initializer_list<std::string> args) const;
  // `runc <args>` with stdio appended to `log`; on failure the error carries what runc wrote
  // there ("runc <what> <id>: exit N: ..."); with `delete_on_failure` a half-made container
  // is deleted first.
  Status run_logged(std::initializer_list<std::string> args, const std::string& what,
                    const std::string& id, const std::string& log, bool delete_on_failure);
  static std::string log_path(const std::string& bundle, const std::string& log_file);
  RuncOptions options_;
};

// SIGTERM, up to `grace` for the container's init to exit, then SIGKILL and up to `kill_wait`.
// Waits on a pidfd of the init (no polling loop); a container already stopped is left alone.
Status stop_container(OciRuntime& runtime, const std::string& id, std::chrono::milliseconds grace,
                      std::chrono::milliseconds kill_wait = std::chrono::seconds(5));

// Waits up to `timeout` for host process `pid` to exit; true when it is gone.
[[nodiscard]] bool wait_for_process_exit(int pid, std::chrono::milliseconds timeout);

}  // namespace cvm::agent
