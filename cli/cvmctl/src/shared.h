#pragma once
// What the command files of cvmctl share (not part of its public header).

#include <optional>
#include <ostream>
#include <string>

#include <boost/asio/io_context.hpp>

#include "cvm/base/result.h"
#include "cvm/bus/bus.h"
#include "cvm/cli/commands.h"
#include "cvm/v1/node.pb.h"

namespace cvm::cli::detail {

// "cvmctl: <what>: <why>" and what to try next; returns kExitUnavailable.
int unavailable(std::ostream& err, const std::string& what, const Error& e, const GlobalOptions& g);
// A connection that fails fast (a CLI should say so rather than wait for a server).
Result<bus::ConnectionPtr> connect(const GlobalOptions& g, boost::asio::io_context& io);
// Where a workspace lives now: its record in cvm_workspaces. nullopt when there is none.
Result<std::optional<cvm::v1::WorkspaceRecord>> workspace_record(bus::KeyValue& kv,
                                                                 const std::string& workspace);

}  // namespace cvm::cli::detail
